"""Fused MoC attention kernel (Pallas, interpret mode on CPU) against the gather reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moca_jax import moc
from moca_jax.kernels import moc_flash

_STATIC = ("gate_on", "block_q", "block_k")
_fused = jax.jit(moc_flash.moc_attention_fused, static_argnames=_STATIC)
_ref = jax.jit(moc.moc_attention, static_argnames=("gate_on", "implementation", "gather"))


def _case(
    n=4,
    k=2,
    mask=((1, 1, 0, 1), (1, 1, 1, 1)),
    gated=True,
    compressed=True,
    dtype=jnp.float32,
    b=2,
    seq_len=8,
    m=4,
    nh=2,
    hd=8,
    seed=0,
):
  """Random inputs and routing (moc.route on random importances) for one configuration."""
  ks = jax.random.split(jax.random.key(seed), 8)
  mk = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32).astype(dtype)
  q, kh, vh = (mk(i, (b, n, seq_len, nh, hd)) for i in range(3))
  kc, vc = (mk(3, (b, n, m, nh, hd)), mk(4, (b, n, m, nh, hd))) if compressed else (None, None)
  mask = None if mask is None else jnp.asarray(mask, bool)
  if gated:
    imp = moc.router_importance(2.0 * jax.random.normal(ks[5], (b, nh, n, n)), mask)
    sel, unsel = moc.route(imp, mask, k)
  else:  # ablation A, as GlobalAttention(routing='none') builds it
    imp = None
    sel, unsel = moc.route(jnp.ones((b, 1, n, n)), mask, 0)
    sel, unsel = (jnp.broadcast_to(t, (b, nh) + t.shape[2:]) for t in (sel, unsel))
  return (q, kh, vh, kc, vc, imp, sel, unsel, mask)


CASES = {
    "keys_padding": dict(),
    "values_padding": dict(gate_on="values"),
    "no_mask": dict(mask=None),
    "ablation_a_no_routing": dict(gated=False),
    "ablation_b_no_compressed": dict(compressed=False),
    "ablation_b_values": dict(compressed=False, gate_on="values"),
    "k0": dict(k=0),
    "k_all": dict(k=3),
    "k_all_padding_values": dict(k=3, gate_on="values", mask=((1, 0, 1, 1), (0, 1, 1, 1))),
    "n2": dict(n=2, k=1, mask=((1, 1), (1, 0))),
    "n2_k0": dict(n=2, k=0, mask=None),
    "one_real_component": dict(mask=((1, 0, 0, 0), (0, 0, 1, 1))),
    "n6_padding": dict(n=6, k=2, mask=((1, 1, 0, 1, 0, 1), (1, 1, 1, 1, 1, 0))),
}


def _split(cfg):
  cfg = dict(cfg)
  gate_on = cfg.pop("gate_on", "keys")
  return _case(**cfg), gate_on


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference_fp32(name):
  args, gate_on = _split(CASES[name])
  want = _ref(*args, gate_on=gate_on)
  got = _fused(*args, gate_on=gate_on, block_q=4, block_k=4)  # 2 query and 2 key blocks
  assert got.shape == want.shape and got.dtype == want.dtype
  # every component, padding ones included: the kernel reproduces the reference's prefix
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_default_blocks_and_dispatch_through_moc_attention():
  args, _ = _split(CASES["keys_padding"])
  want = _ref(*args)
  got = _ref(*args, gather="fused")  # moc.moc_attention dispatches to the kernel
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="fused"):
    moc.routed_context(*args[1:], gather="fused")


def test_gates_matter():
  """The comparison can fail: halving the importances changes the output."""
  q, kh, vh, kc, vc, imp, sel, unsel, mask = _case()
  a = _fused(q, kh, vh, kc, vc, imp, sel, unsel, mask)
  b = _fused(q, kh, vh, kc, vc, 0.5 * imp, sel, unsel, mask)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("gate_on", ["keys", "values"])
def test_forward_matches_reference_bf16(gate_on):
  args = _case(dtype=jnp.bfloat16, seq_len=16, hd=16)
  want = _ref(*args, gate_on=gate_on)
  got = _fused(*args, gate_on=gate_on, block_q=8, block_k=8)
  assert got.dtype == jnp.bfloat16
  exact = _ref(
      *[a.astype(jnp.float32) if a is not None and a.dtype == jnp.bfloat16 else a for a in args],
      gate_on=gate_on,
  )
  got, want, exact = (np.asarray(t, np.float32) for t in (got, want, exact))
  np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)
  # no worse than the bf16 reference against fp32 math on the same (bf16) inputs
  assert np.abs(got - exact).max() <= 2 * np.abs(want - exact).max() + 1e-2


def _grads(fn, args, gate_on, **kw):
  """Gradients of sum(out * proj) (every component, padding ones included) w.r.t. the inputs."""
  q, kh, vh, kc, vc, imp, sel, unsel, mask = args
  proj = jax.random.normal(jax.random.key(9), q.shape)

  def loss(q, kh, vh, kc, vc, imp):
    out = fn(q, kh, vh, kc, vc, imp, sel, unsel, mask, gate_on=gate_on, **kw)
    return jnp.sum(out.astype(jnp.float32) * proj)

  return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, kh, vh, kc, vc, imp)


_LABELS = ("q", "kh", "vh", "kc", "vc", "importance")


def _fused_grad_fn(bwd, block_q=4, block_k=4):
  return lambda *a, **kw: moc_flash.moc_attention_fused(
      *a, **kw, block_q=block_q, block_k=block_k, bwd=bwd
  )


def _assert_grads_close(got, want, atol=1e-5, rtol=1e-5):
  for g, w, label in zip(got, want, _LABELS):
    assert (g is None) == (w is None), label
    if w is not None:
      assert g.shape == w.shape and g.dtype == w.dtype, label
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=rtol, err_msg=label)


# every configuration: gate_on keys/values, importance None (ablation A), kc None (ablation B),
# k = 0, k = N - 1, padding components (their queries too: the loss reads every output), N = 2
@pytest.mark.parametrize("name", sorted(CASES))
def test_pallas_backward_matches_reference_fp32(name):
  args, gate_on = _split(CASES[name])
  got = _grads(_fused_grad_fn("pallas"), args, gate_on)
  want = _grads(moc.moc_attention, args, gate_on)
  for w, label in zip(want, _LABELS[:3]):  # the comparison is not vacuous
    assert float(jnp.max(jnp.abs(w))) > 0.1, label
  if args[5] is not None and name != "one_real_component":  # (one real: no other is attended)
    assert float(jnp.max(jnp.abs(want[5]))) > 0.1
  _assert_grads_close(got, want)


@pytest.mark.parametrize("name", ["keys_padding", "ablation_b_values"])
def test_recompute_backward_still_matches_reference(name):
  args, gate_on = _split(CASES[name])
  _assert_grads_close(
      _grads(_fused_grad_fn("recompute"), args, gate_on), _grads(moc.moc_attention, args, gate_on)
  )


def test_padding_queries_reach_real_keys():
  """The test above can fail: padding queries read real keys (the loss sees them), so a dk/dv
  that ignored them would differ; the gradients of importance depend on the gates."""
  args, gate_on = _split(CASES["keys_padding"])
  mask = args[8]
  full = _grads(_fused_grad_fn("pallas"), args, gate_on)
  real_only = _grads(
      lambda *a, **kw: jnp.where(
          mask[:, :, None, None, None], _fused_grad_fn("pallas")(*a, **kw), 0
      ),
      args,
      gate_on,
  )
  assert float(jnp.max(jnp.abs(full[1] - real_only[1]))) > 1e-3  # dkh
  assert float(jnp.max(jnp.abs(full[2] - real_only[2]))) > 1e-3  # dvh
  halved = _grads(_fused_grad_fn("pallas"), args[:5] + (0.5 * args[5],) + args[6:], gate_on)
  assert float(jnp.max(jnp.abs(full[5] - halved[5]))) > 1e-3


@pytest.mark.parametrize("gate_on", ["keys", "values"])
def test_pallas_backward_bf16(gate_on):
  args = _case(dtype=jnp.bfloat16, seq_len=16, hd=16)
  got = _grads(_fused_grad_fn("pallas", 8, 8), args, gate_on)
  want = _grads(moc.moc_attention, args, gate_on)
  up = [a.astype(jnp.float32) if a is not None and a.dtype == jnp.bfloat16 else a for a in args]
  exact = _grads(moc.moc_attention, up, gate_on)  # fp32 math on the same (bf16) inputs
  for g, w, e, label in zip(got, want, exact, _LABELS):
    assert g.dtype == w.dtype, label
    g, w, e = (np.asarray(t, np.float32) for t in (g, w, e))
    scale = np.abs(e).max()
    err, ref_err = np.abs(g - e).max(), np.abs(w - e).max()
    assert err <= 2e-2 * scale, (label, err, scale)
    # no worse than the bf16 reference against fp32 math
    assert err <= 2 * ref_err + 5e-3 * scale, (label, err, ref_err)


def test_reader_tables_brute_force():
  """The inverse routing tables against a direct enumeration (padding, k < N - 1)."""
  q, kh, vh, kc, vc, imp, sel, unsel, mask = _case(
      n=6, k=2, mask=((1, 1, 0, 1, 0, 1), (1, 1, 1, 1, 1, 0))
  )
  _, _, counts, _ = moc_flash._slot_tables(q, kc, imp, sel, unsel, mask, kh.dtype)
  pos = moc_flash._slot_positions(sel, unsel)
  rcounts, (full, full_gate), (comp, comp_gate) = moc_flash._reader_tables(
      pos, imp, counts, 2, True, kh.dtype
  )
  sel, unsel, counts, imp = (np.asarray(t) for t in (sel, unsel, counts, imp))
  b, nh, n, k = sel.shape
  for bb in range(b):
    n_full, n_comp = counts[bb]
    for h in range(nh):
      for j in range(n):
        want_full = [j] + [i for i in range(n) if j in sel[bb, h, i, : n_full - 1]]
        want_comp = [i for i in range(n) if j in unsel[bb, h, i, :n_comp]]
        assert rcounts[bb, h, j].tolist() == [len(want_full), len(want_comp)]
        assert np.asarray(full[bb, h, j, : len(want_full)]).tolist() == want_full
        assert np.asarray(comp[bb, h, j, : len(want_comp)]).tolist() == want_comp
        gates = [1.0] + [imp[bb, h, i, j] for i in want_full[1:]]
        np.testing.assert_allclose(full_gate[bb, h, j, : len(want_full)], gates)
        np.testing.assert_allclose(comp_gate[bb, h, j, : len(want_comp)], imp[bb, h, want_comp, j])
  assert full.shape[-1] == 8 and comp.shape[-1] == 8  # N and N - 1 padded to powers of two
  assert int(rcounts[..., 1].max()) > 0 and int(rcounts[..., 0].max()) > 1


def test_permutation_equivariance():
  """Permuting the components (inputs, mask, importances, re-routed) permutes the outputs."""
  q, kh, vh, kc, vc, imp, _, _, mask = _case(n=6, mask=((1, 1, 0, 1, 0, 1), (1, 1, 1, 1, 1, 1)))
  perm = jnp.array([3, 0, 5, 1, 4, 2])
  out = _fused(q, kh, vh, kc, vc, imp, *moc.route(imp, mask, 2), mask, block_q=4, block_k=4)
  p = lambda t: jnp.take(t, perm, axis=1)
  imp_p = jnp.take(jnp.take(imp, perm, axis=2), perm, axis=3)
  mask_p = p(mask)
  out_p = _fused(
      p(q),
      p(kh),
      p(vh),
      p(kc),
      p(vc),
      imp_p,
      *moc.route(imp_p, mask_p, 2),
      mask_p,
      block_q=4,
      block_k=4,
  )
  np.testing.assert_allclose(np.asarray(out_p), np.asarray(p(out)), atol=1e-5, rtol=1e-5)


def test_rejects_bad_blocks_and_shapes():
  args = _case()
  with pytest.raises(ValueError, match="block_q"):
    moc_flash.moc_attention_fused(*args, block_q=3)
  with pytest.raises(ValueError, match="unselected"):
    moc_flash.moc_attention_fused(*args[:6], args[6][..., :1], *args[7:])  # k != N-1-len(U)
  with pytest.raises(ValueError, match="bwd"):
    moc_flash.moc_attention_fused(*args, bwd="xla")
  with pytest.raises(ValueError, match="powers of two"):  # the compiled path's constraints
    moc_flash.moc_attention_fused(*args, interpret=False)


def test_gpu_lowering_builds_triton_ir():
  """The compiled path lowers to Triton IR for a GPU (cross-platform lowering on the CPU).

  Checks the Pallas -> Triton lowering of the forward and of the three backward kernels
  (dynamic component indices, loops with data-dependent trip counts, bf16 / fp32 dots,
  transposed dots, the gate-gradient register vector), not Triton's compilation to PTX nor a
  run: with this jaxlib the IR is embedded in the HLO custom call and compiled by XLA on the GPU.
  """
  from jax._src.lib import version as jaxlib_version

  if jaxlib_version > (0, 10, 2):
    pytest.skip("newer jaxlibs compile Triton while lowering (needs a GPU)")
  b, m, nh, hd, k = 1, 16, 2, 16, 2
  s = jax.ShapeDtypeStruct
  kernels = ["moc_flash_fwd", "moc_flash_bwd_dq", "moc_flash_bwd_dkv"]
  for gate_on, dtype, extras, n, seq_len in (
      ("keys", jnp.bfloat16, True, 4, 32),
      ("values", jnp.bfloat16, True, 6, 48),  # N and L not powers of two (whole-ref blocks)
      ("keys", jnp.float32, False, 4, 32),  # fp32 (IEEE dots), no importance, no kc/vc
  ):
    routing = (s((b, nh, n, k), jnp.int32), s((b, nh, n, n - 1 - k), jnp.int32), s((b, n), bool))
    args = (s((b, n, seq_len, nh, hd), dtype),) * 3
    args += (s((b, n, m, nh, hd), dtype),) * 2 if extras else (None, None)
    args += (s((b, nh, n, n), jnp.float32) if extras else None,)
    f = lambda *a: moc_flash.moc_attention_fused(
        *a, gate_on=gate_on, interpret=False, block_q=16, block_k=16
    )
    text = jax.jit(f).trace(*args, *routing).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text and "moc_flash_fwd" in text and "moc_flash_bwd" not in text
    diff = [i for i in range(6) if args[i] is not None]  # the differentiated inputs

    def loss(x, r):
      full = list(args)
      for i, xi in zip(diff, x):
        full[i] = xi
      return jnp.sum(f(*full, *r).astype(jnp.float32))

    inputs = tuple(args[i] for i in diff)
    text = jax.jit(jax.grad(loss)).trace(inputs, routing).lower(lowering_platforms=("cuda",))
    text = text.as_text()
    for name in kernels + (["moc_flash_bwd_dkv_compressed"] if extras else []):
      assert name in text, (gate_on, dtype, name)


def test_global_attention_layer_with_fused_gather():
  """GlobalAttention(gather='fused') equals the gather path, Gumbel routing and gradients."""
  b, n, seq_len, m, width = 2, 4, 8, 4, 32
  ks = jax.random.split(jax.random.key(3), 4)
  h = jax.random.normal(ks[0], (b, n, seq_len, width))
  c = jax.random.normal(ks[1], (b, n, m, width))
  a = jax.random.normal(ks[2], (b, n, width))
  mask = jnp.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)
  layer = lambda gather: moc.GlobalAttention(4, top_k=2, router_head_dim=8, gather=gather)
  params = layer("hybrid").init({"params": ks[3]}, h, c, a, mask, train=False)
  rngs = {"routing": jax.random.key(5)}

  def loss(gather, params):
    out, _ = layer(gather).apply(params, h, c, a, mask, train=True, rngs=rngs)
    return jnp.sum(jnp.where(mask[:, :, None, None], out, 0.0) ** 2)

  want, want_grad = jax.jit(jax.value_and_grad(lambda p: loss("hybrid", p)))(params)
  got, got_grad = jax.jit(jax.value_and_grad(lambda p: loss("fused", p)))(params)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_grad), jax.tree_util.tree_leaves(want_grad)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)
