"""Mixture-of-Components attention: numpy reference, dense equivalence, routing, gathers."""
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moca_jax import moc

jax.config.update("jax_default_matmul_precision", "highest")

_moc = jax.jit(moc.moc_attention, static_argnames=("gate_on", "implementation", "gather"))
_route = jax.jit(moc.route, static_argnums=2)
_importance = jax.jit(moc.router_importance, static_argnums=2)
_dense = jax.jit(moc.dense_global_attention, static_argnums=4)

HAS_GPU = any(d.platform == "gpu" for d in jax.devices()) if jax.default_backend() == "gpu" else False


# ----------------------------------------------------------------------------------------
# Independent numpy reference: plain loops over batch, components and heads.
# ----------------------------------------------------------------------------------------

def reference_moc(q, kh, vh, kc, vc, s, mask, k, gate_on="keys"):
  """q, kh, vh [B, N, L, H, d]; kc, vc [B, N, m, H, d] or None; s [B, H, N, N] or None.

  Returns [B, N, L, H, d] for real components (zeros for padding).
  """
  q, kh, vh = (np.asarray(a, np.float64) for a in (q, kh, vh))
  kc = None if kc is None else np.asarray(kc, np.float64)
  vc = None if vc is None else np.asarray(vc, np.float64)
  b_, n_, _, h_, d_ = q.shape
  out = np.zeros(q.shape)
  for b in range(b_):
    real = [j for j in range(n_) if mask[b, j]]
    for i in real:
      others = [j for j in real if j != i]
      for h in range(h_):
        gate = {j: (1.0 if s is None else float(s[b, h, i, j])) for j in others}
        chosen = sorted(others, key=lambda j: -gate[j])[:k] if s is not None else []
        keys, values = [kh[b, i, :, h]], [vh[b, i, :, h]]
        for j in others:
          if j in chosen:
            kk, vv = kh[b, j, :, h], vh[b, j, :, h]
          elif kc is not None:
            kk, vv = kc[b, j, :, h], vc[b, j, :, h]
          else:
            continue
          if gate_on == "keys":
            kk = gate[j] * kk
          else:
            vv = gate[j] * vv
          keys.append(kk)
          values.append(vv)
        kmat, vmat = np.concatenate(keys), np.concatenate(values)
        logits = q[b, i, :, h] @ kmat.T / math.sqrt(d_)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[b, i, :, h] = w @ vmat
  return out


def _inputs(seed, b, n, seq_len, m, nh=2, hd=8):
  ks = jax.random.split(jax.random.key(seed), 6)
  shp = (b, n, seq_len, nh, hd)
  q, kh, vh = (jax.random.normal(ks[i], shp) for i in range(3))
  kc = jax.random.normal(ks[3], (b, n, m, nh, hd))
  vc = jax.random.normal(ks[4], (b, n, m, nh, hd))
  logits = 2.0 * jax.random.normal(ks[5], (b, nh, n, n))
  return q, kh, vh, kc, vc, logits


def _real_only(out, mask):
  return np.where(np.asarray(mask)[:, :, None, None, None], np.asarray(out), 0.0)


CASES = [  # (N, k, m, mask rows)
    (3, 1, 2, [[1, 1, 1], [1, 1, 1]]),
    (5, 2, 3, [[1, 1, 0, 1, 1], [1, 0, 1, 0, 0]]),
    (6, 4, 2, [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1]]),
    (4, 2, 1, [[1, 1, 0, 0], [1, 0, 0, 0]]),  # N_real <= k + 1 and a lone component
]


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(case, gather="hybrid"):
  """(The gather methods are proven equal in test_gather_methods_agree_with_gradients.)"""
  n, k, m, rows = case
  mask = jnp.array(rows, bool)
  q, kh, vh, kc, vc, logits = _inputs(n * 10 + k, 2, n, 5, m)
  s = _importance(logits, mask)
  sel, unsel = _route(s, mask, k)
  for gate_on, use_c in (("keys", True), ("values", True), ("keys", False)):
    got = _moc(q, kh, vh, kc if use_c else None, vc if use_c else None, s, sel,
                            unsel, mask, gate_on=gate_on, gather=gather)
    want = reference_moc(q, kh, vh, kc if use_c else None, vc if use_c else None, s,
                         np.asarray(mask), k, gate_on)
    np.testing.assert_allclose(_real_only(got, mask), want, atol=1e-5, rtol=1e-5)


def test_no_routing_matches_reference():
  """Ablation A: no importances, every other component through its compressed tokens."""
  mask = jnp.array([[1, 1, 0, 1, 1]], bool)
  q, kh, vh, kc, vc, _ = _inputs(3, 1, 5, 4, 3)
  sel, unsel = _route(jnp.ones((1, 2, 5, 5)), mask, 0)
  got = _moc(q, kh, vh, kc, vc, None, sel, unsel, mask)
  want = reference_moc(q, kh, vh, kc, vc, None, np.asarray(mask), 0)
  np.testing.assert_allclose(_real_only(got, mask), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [None, [[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]]])
def test_full_selection_without_compression_equals_dense(rows):
  n = 5
  mask = None if rows is None else jnp.array(rows, bool)
  q, kh, vh, _, _, _ = _inputs(11, 2, n, 6, 2)
  ones = jnp.ones((2, 2, n, n))
  sel, unsel = _route(ones, mask, n - 1)
  got = _moc(q, kh, vh, None, None, ones, sel, unsel, mask)
  want = _dense(q, kh, vh, mask)
  m = np.ones((2, n), bool) if mask is None else mask
  np.testing.assert_allclose(_real_only(got, m), _real_only(want, m), atol=1e-5, rtol=1e-5)


def test_dense_matches_reference_with_padding():
  mask = jnp.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
  q, kh, vh, _, _, _ = _inputs(5, 2, 4, 3, 1)
  ones = jnp.ones((2, 2, 4, 4))
  want = reference_moc(q, kh, vh, None, None, ones, np.asarray(mask), 3)
  got = _dense(q, kh, vh, mask)
  np.testing.assert_allclose(_real_only(got, mask), want, atol=1e-5, rtol=1e-5)


def test_route_excludes_self_and_padding_and_orders():
  mask = jnp.array([[1, 1, 0, 1, 1, 0, 1]], bool)
  s = _importance(jax.random.normal(jax.random.key(0), (1, 3, 7, 7)), mask)
  for rng in (None, jax.random.key(1)):
    sel, unsel = _route(s, mask, 2, rng)
    chex.assert_shape(sel, (1, 3, 7, 2))
    chex.assert_shape(unsel, (1, 3, 7, 4))
    sel, unsel = np.asarray(sel), np.asarray(unsel)
    for h, i in itertools.product(range(3), range(7)):
      assert i not in sel[0, h, i] and i not in unsel[0, h, i]
      order = list(sel[0, h, i]) + list(unsel[0, h, i])
      real = [j for j in order if mask[0, j]]
      assert order[:len(real)] == real  # real components form a prefix
      if rng is None:
        vals = [float(s[0, h, i, j]) for j in real]
        assert vals == sorted(vals, reverse=True)


def test_softmax_router_normalises_over_real_others():
  mask = jnp.array([[1, 1, 0, 1]], bool)
  s = _importance(jax.random.normal(jax.random.key(2), (1, 2, 4, 4)), mask, "softmax")
  sums = np.asarray(s.sum(-1))[0][:, np.asarray(mask[0])]
  np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
  assert np.all(np.asarray(s)[0, :, :, 2] == 0) and np.all(np.diagonal(np.asarray(s)[0], axis1=1, axis2=2) == 0)


def test_gather_methods_agree_with_gradients():
  q, kh, vh, kc, vc, logits = _inputs(21, 2, 5, 4, 3)
  mask = jnp.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], bool)
  s = _importance(logits, mask)
  sel, unsel = _route(s, mask, 2)
  ct = jax.random.normal(jax.random.key(9), q.shape)

  def loss(gather, q, kh, vh, kc, vc, s):
    out = _moc(q, kh, vh, kc, vc, s, sel, unsel, mask, gather=gather)
    return jnp.sum(_mask_out(out, mask) * ct)

  grads = {g: jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5, 6)), static_argnums=0)(
               g, q, kh, vh, kc, vc, s)
           for g in moc.GATHER_METHODS}
  for g in ("take", "hybrid"):
    for a, b in zip(grads[g], grads["onehot"]):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  gate_grad = np.asarray(grads["hybrid"][-1])
  assert np.abs(gate_grad).max() > 1e-4  # gates (router) receive gradient


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_component_chunks_equal_one_call_with_gradients(chunk):
  """Chunked MoC attention (query components `chunk` at a time) is the same function."""
  n = 6
  q, kh, vh, kc, vc, logits = _inputs(31, 2, n, 4, 3)
  mask = jnp.array([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 0]], bool)
  s = _importance(logits, mask)
  sel, unsel = _route(s, mask, 2)
  ct = jax.random.normal(jax.random.key(8), q.shape)

  def loss(chunk, q, kh, vh, kc, vc, s):
    out = moc.moc_attention(q, kh, vh, kc, vc, s, sel, unsel, mask, component_chunk=chunk)
    return jnp.sum(_mask_out(out, mask) * ct), out

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5, 6), has_aux=True), static_argnums=0)
  (g0, out0), (g1, out1) = grad(0, q, kh, vh, kc, vc, s), grad(chunk, q, kh, vh, kc, vc, s)
  np.testing.assert_allclose(_real_only(out1, mask), _real_only(out0, mask), atol=1e-5, rtol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="divide"):
    moc.moc_attention(q, kh, vh, kc, vc, s, sel, unsel, mask, component_chunk=4)


def _mask_out(out, mask):
  return jnp.where(mask[:, :, None, None, None], out, 0.0)


def _layer(**kw):
  return moc.GlobalAttention(num_heads=2, top_k=2, router_head_dim=4, **kw)


def _layer_inputs(n=5):
  ks = jax.random.split(jax.random.key(4), 3)
  h = jax.random.normal(ks[0], (2, n, 6, 16))
  c = jax.random.normal(ks[1], (2, n, 3, 16))
  a = jax.random.normal(ks[2], (2, n, 16))
  mask = jnp.array([[1] * n, [1, 1, 0, 1] + [0] * (n - 4)], bool)
  return h, c, a, mask


def test_router_receives_gradient_through_key_gates():
  layer = _layer()
  h, c, a, mask = _layer_inputs()
  params = jax.jit(lambda key: layer.init({"params": key}, h, c, a, mask, train=False))(
      jax.random.key(0))

  def loss(p):
    out, _ = layer.apply(p, h, c, a, mask, train=False)
    return jnp.sum(jnp.where(mask[:, :, None, None], out, 0.0) ** 2)

  grads = jax.jit(jax.grad(loss))(params)["params"]["router"]
  for leaf in jax.tree_util.tree_leaves(grads):
    assert float(jnp.abs(leaf).max()) > 1e-6


def test_eval_routing_deterministic_and_training_routing_varies():
  layer = _layer()
  h, c, a, mask = _layer_inputs(n=8)
  mask = jnp.ones((2, 8), bool)
  params = jax.jit(lambda key: layer.init({"params": key}, h, c, a, mask, train=False))(
      jax.random.key(0))
  run = jax.jit(lambda p, key, train: layer.apply(p, h, c, a, mask, train=train,
                                                   rngs={"routing": key}), static_argnums=2)
  e1, e2 = run(params, jax.random.key(1), False), run(params, jax.random.key(2), False)
  chex.assert_trees_all_equal(e1, e2)
  t1, t2 = run(params, jax.random.key(1), True), run(params, jax.random.key(2), True)
  assert not np.array_equal(t1[1]["selected"], t2[1]["selected"])
  chex.assert_trees_all_equal(t1, run(params, jax.random.key(1), True))


def _inclusion_top2(p):
  """Exact P(j in the first two draws without replacement from p)."""
  n = len(p)
  out = np.zeros(n)
  for j in range(n):
    out[j] = p[j] + sum(p[l] * p[j] / (1 - p[l]) for l in range(n) if l != j)
  return out


@pytest.mark.parametrize("k", [1, 2])
def test_training_selection_frequencies_follow_importance(k):
  n, draws = 5, 20000
  logits = jnp.array([[[[0.0, 2.0, -1.0, 0.5, 1.0]] * n]])  # [1, 1, N, N]
  s = _importance(logits, None)
  keys = jax.random.split(jax.random.key(123), draws)
  sel = jax.vmap(lambda key: _route(s, None, k, key)[0])(keys)  # [draws, 1, 1, N, k]
  for i in range(n):
    counts = np.bincount(np.asarray(sel[:, 0, 0, i]).ravel(), minlength=n) / draws
    p = np.asarray(s[0, 0, i]) / float(s[0, 0, i].sum())
    want = p if k == 1 else _inclusion_top2(p)
    assert counts[i] == 0
    np.testing.assert_allclose(counts, want, atol=0.015)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="cuDNN attention needs a GPU (run: JAX_PLATFORMS=cuda pytest -m gpu)")
def test_cudnn_matches_xla():
  mask = jnp.array([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
  q, kh, vh, kc, vc, logits = _inputs(8, 2, 6, 64, 8, nh=4, hd=64)
  bf = lambda t: t.astype(jnp.bfloat16)
  s = _importance(logits, mask)
  sel, unsel = _route(s, mask, 2)

  def loss(impl, q, kh, vh, kc, vc, s):
    out = _moc(q, kh, vh, kc, vc, s, sel, unsel, mask, implementation=impl)
    return jnp.sum(_mask_out(out.astype(jnp.float32), mask) ** 2), out

  res = {impl: jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3, 4, 5),
                                          has_aux=True))(bf(q), bf(kh), bf(vh), bf(kc), bf(vc), s)
         for impl in ("xla", "cudnn")}
  (_, out_x), g_x = res["xla"]
  (_, out_c), g_c = res["cudnn"]
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
  assert rel(_mask_out(out_c, mask), _mask_out(out_x, mask)) < 2e-2
  for a, b in zip(g_c, g_x):
    assert rel(a, b) < 3e-2
  dense = {impl: _dense(bf(q), bf(kh), bf(vh), mask, impl) for impl in ("xla", "cudnn")}
  assert rel(_mask_out(dense["cudnn"], mask), _mask_out(dense["xla"], mask)) < 2e-2


def test_odd_length_padding_for_cudnn_is_exact(monkeypatch):
  """cuDNN needs even lengths under grad: the padded calls equal the unpadded ones.

  Runs on CPU by standing in for the cuDNN backend: the stand-in asserts even lengths and
  full-size masks, then computes with XLA.
  """
  from moca_jax import dit, layers
  real = layers.attention

  def fake_cudnn(q, k, v, mask=None, implementation=None, **kw):
    assert implementation == "cudnn" and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0
    assert mask is None or mask.shape[2:] == (q.shape[1], k.shape[1])
    return real(q, k, v, mask=mask, implementation="xla", **kw)

  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (3, 7, 2, 8))
  k, v = jax.random.normal(ks[1], (3, 9, 2, 8)), jax.random.normal(ks[2], (3, 9, 2, 8))
  mask = jax.random.bernoulli(ks[3], 0.7, (3, 1, 7, 9)).at[..., 0].set(True)
  lengths = jnp.array([3, 9, 5])
  want_masked, want_plain = real(q, k, v, mask=mask), real(q, k, v)
  want_prefix = moc.attend_prefix(q, k, v, lengths, "xla")
  monkeypatch.setattr(layers, "attention", fake_cudnn)
  np.testing.assert_allclose(dit.attention_even(q, k, v, mask, "cudnn"), want_masked, atol=1e-6)
  np.testing.assert_allclose(dit.attention_even(q, k, v, None, "cudnn"), want_plain, atol=1e-6)
  np.testing.assert_allclose(moc.attend_prefix(q, k, v, lengths, "cudnn"), want_prefix, atol=1e-6)
