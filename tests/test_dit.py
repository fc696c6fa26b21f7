"""Compositional DiT: shapes, equivariance, padding, local mask, ablations, config."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from moca_jax import dit
from moca_jax.dit import CompositionalDiT, DiTBlock, DiTSpec, dit_config

jax.config.update("jax_default_matmul_precision", "highest")

HAS_GPU = jax.default_backend() == "gpu"
B, N, L, C, TC, DC = 2, 5, 16, 8, 7, 32
MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], bool)


def _inputs(seed=0, n=N, scene=False):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (B, n, L, C))
  t = jnp.array([0.25, 0.75])
  cond_shape = (B, n, TC, DC) if scene else (B, TC, DC)
  return x, t, jax.random.normal(ks[1], cond_shape)


def _spec(**overrides) -> DiTSpec:
  """Tiny config cut to 2 blocks (global 0, local 1, one long skip) to keep compiles short."""
  cfg = dit_config("tiny")
  cfg.num_blocks = 2
  cfg.update(overrides)
  return DiTSpec.from_config(cfg)


def _params(spec: DiTSpec):
  """Weights shared by every spec with the same parameter tree (most ablations)."""
  return _init(dataclasses.replace(
      spec, global_attention="moc", routing="topk", compressed_tokens=True, gate_on="keys",
      router_activation="sigmoid", train_routing="gumbel", remat="none", gather="hybrid",
      attention_implementation="xla", dtype="float32"))


@functools.lru_cache(maxsize=None)
def _init(spec: DiTSpec):
  x, t, cond = _inputs()
  init = jax.jit(lambda key: CompositionalDiT(spec).init({"params": key}, x, t, cond, MASK,
                                                         train=False))
  return init(jax.random.key(42))


@functools.lru_cache(maxsize=None)
def _apply(spec: DiTSpec, train: bool, return_routing: bool = False):
  model = CompositionalDiT(spec)

  def f(params, x, t, cond, mask, ids, key):
    r1, r2 = jax.random.split(key)
    return model.apply(params, x, t, cond, mask, ids, train=train, return_routing=return_routing,
                       rngs={"routing": r1, "ids": r2})

  return jax.jit(f)


def _run(spec, x, t, cond, mask=MASK, ids=None, train=False, key=0, return_routing=False,
         params=None):
  params = _params(spec) if params is None else params
  return _apply(spec, train, return_routing)(params, x, t, cond, mask, ids, jax.random.key(key))


def test_config_sizes():
  tiny, small, paper = dit_config("tiny"), dit_config("small"), dit_config("paper")
  assert (tiny.width, tiny.num_heads, tiny.num_blocks, tiny.latent_tokens) == (64, 4, 4, 16)
  assert (tiny.latent_channels, tiny.num_compressed, tiny.top_k, tiny.cond_dim) == (8, 4, 2, 32)
  assert (small.width, small.num_blocks, small.latent_tokens) == (384, 12, 256)
  assert (paper.num_blocks, paper.width, paper.num_heads, paper.latent_tokens) == (21, 2048, 16, 1024)
  assert paper.cond_dim == 1024 and paper.id_codebook == 50 and paper.long_skips
  assert DiTSpec.from_config(paper).global_block_ids() == tuple(range(0, 21, 2))
  with pytest.raises(ValueError, match="router_activation"):
    _spec(router_activation="relu")
  with pytest.raises(ValueError, match="size"):
    dit_config("huge")


def test_paper_size_parameter_count():
  """Paper size has PartCrafter's 1.43 B weights plus the packing and router weights."""
  cfg = dit_config("paper")
  cfg.attention_implementation = "xla"  # tracing only; cuDNN is absent on CPU
  spec = DiTSpec.from_config(cfg)
  model = CompositionalDiT(spec)
  x = jnp.zeros((1, 2, 1024, 64))
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, jnp.zeros((1,)),
                                             jnp.zeros((1, 257, 1024)), None, train=False))
  count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(meta.unbox(shapes)))
  assert 1.40e9 < count < 1.50e9
  # Logical axis names on every kernel (for the sharding rules table).
  names = {n for p in jax.tree_util.tree_leaves(shapes, is_leaf=lambda v: isinstance(v, meta.Partitioned))
           if isinstance(p, meta.Partitioned) for n in p.names}
  assert names <= {"embed", "heads", "mlp", "vocab", "in"}


@pytest.mark.parametrize("mode", ["moc", "dense"])
def test_shapes_object_and_scene(mode):
  spec = _spec(global_attention=mode, num_blocks=3)
  for scene in (False, True):
    x, t, cond = _inputs(scene=scene)
    v, aux = _run(spec, x, t, cond, return_routing=True)
    chex.assert_shape(v, (B, N, L, C))
    chex.assert_tree_all_finite(v)
    g = 2 if mode == "moc" else 0
    chex.assert_shape(aux["importances"], (B, g, 4, N, N))
    chex.assert_shape(aux["selections"], (B, g, 4, N, 2))


def test_permutation_equivariance():
  spec = _spec()
  x, t, cond = _inputs(1)
  mask = jnp.ones((B, N), bool)
  ids = jnp.array([[3, 9, 1, 40, 7], [0, 1, 2, 3, 4]], jnp.int32)
  perm = jnp.array([2, 4, 0, 1, 3])
  v = _run(spec, x, t, cond, mask, ids)
  vp = _run(spec, x[:, perm], t, cond, mask, ids[:, perm])
  np.testing.assert_allclose(vp, v[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["moc", "dense"])
def test_padding_components_change_nothing(mode):
  """Real components' outputs ignore padding; N_real <= k + 1 works too."""
  spec = _spec(global_attention=mode)
  x, t, cond = _inputs(2)
  ids = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
  v = _run(spec, x, t, cond, MASK, ids)
  x2 = jnp.where(MASK[:, :, None, None], x, 100.0 * jax.random.normal(jax.random.key(5), x.shape))
  ids2 = ids.at[1, 2].set(33).at[1, 4].set(44)
  v2 = _run(spec, x2, t, cond, MASK, ids2)
  real = np.asarray(MASK)
  np.testing.assert_allclose(np.asarray(v2)[real], np.asarray(v)[real], atol=1e-5, rtol=1e-5)
  # Dropping the padding components entirely gives the same real outputs.
  keep = jnp.array([0, 1, 3])
  v3 = _run(spec, x[1:, keep], t[1:], cond[1:], jnp.ones((1, 3), bool), ids[1:, keep])
  np.testing.assert_allclose(v3[0], v[1, keep], atol=1e-5, rtol=1e-5)


def test_padding_components_change_nothing_with_per_component_conditions():
  """Scene mode: a padding component's own condition (the pipeline pads with zero images)
  reaches no real component either."""
  spec = _spec()
  x, t, cond = _inputs(3, scene=True)
  ids = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
  v = _run(spec, x, t, cond, MASK, ids)
  noise = 100.0 * jax.random.normal(jax.random.key(6), cond.shape)
  v2 = _run(spec, x, t, jnp.where(MASK[:, :, None, None], cond, noise), MASK, ids)
  real = np.asarray(MASK)
  np.testing.assert_allclose(np.asarray(v2)[real], np.asarray(v)[real], atol=1e-5, rtol=1e-5)
  assert not np.allclose(np.asarray(v2)[~real], np.asarray(v)[~real], atol=1e-3)


def test_local_block_vecset_blind_to_compressed_and_anchor():
  spec = _spec()
  block = DiTBlock(spec, is_global=False, has_skip=False)
  t_c = L + spec.num_compressed + 1
  x = jax.random.normal(jax.random.key(0), (B, N, t_c, spec.width))
  cond = jax.random.normal(jax.random.key(1), (B, TC, DC))
  params = jax.jit(lambda key: block.init(key, x, cond, MASK))(jax.random.key(2))
  apply = jax.jit(lambda x: block.apply(params, x, cond, MASK)[0])
  y = apply(x)
  x2 = x.at[:, :, L:].set(jax.random.normal(jax.random.key(3), (B, N, t_c - L, spec.width)))
  y2 = apply(x2)
  np.testing.assert_allclose(y2[:, :, :L], y[:, :, :L], atol=1e-5, rtol=1e-5)
  x3 = x.at[:, :, -1].add(5.0)  # the anchor changes nothing in the compressed tokens
  np.testing.assert_allclose(apply(x3)[:, :, L:-1], y[:, :, L:-1], atol=1e-5, rtol=1e-5)
  assert not np.allclose(apply(x.at[:, :, :L].add(1.0))[:, :, L:], y[:, :, L:])


def test_ids_drawn_in_training_identity_at_eval():
  x, t, cond = _inputs()
  with pytest.raises(ValueError, match="ID codebook"):
    CompositionalDiT(_spec(id_codebook=4)).init(jax.random.key(0), x, t, cond, MASK, train=False)
  ids = dit.draw_ids(jax.random.key(0), 64, N, 50)
  assert all(len(set(row)) == N for row in np.asarray(ids)) and int(ids.max()) < 50
  spec = _spec(train_routing="deterministic")
  eval_default = _run(spec, x, t, cond)
  eval_identity = _run(spec, x, t, cond, ids=jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)))
  chex.assert_trees_all_close(eval_default, eval_identity)
  train_a, train_b = _run(spec, x, t, cond, train=True, key=1), _run(spec, x, t, cond, train=True, key=2)
  assert not np.allclose(train_a, train_b)  # different ids drawn


def test_routing_eval_deterministic_train_random():
  spec = _spec()
  x, t, cond = _inputs(3)
  mask = jnp.ones((B, N), bool)
  ids = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
  e1 = _run(spec, x, t, cond, mask, ids, key=1, return_routing=True)
  e2 = _run(spec, x, t, cond, mask, ids, key=2, return_routing=True)
  chex.assert_trees_all_equal(e1, e2)
  t1 = _run(spec, x, t, cond, mask, ids, train=True, key=1, return_routing=True)
  t2 = _run(spec, x, t, cond, mask, ids, train=True, key=2, return_routing=True)
  assert not np.array_equal(t1[1]["selections"], t2[1]["selections"])


def test_router_gets_gradient_in_the_model():
  spec = _spec()
  x, t, cond = _inputs(4)
  params = _params(spec)

  def loss(p):
    v = CompositionalDiT(spec).apply(p, x, t, cond, MASK, train=True,
                                     rngs={"routing": jax.random.key(0), "ids": jax.random.key(1)})
    return jnp.sum(jnp.where(MASK[:, :, None, None], v, 0.0) ** 2)

  grads = jax.jit(jax.grad(loss))(params)["params"]
  for name in ("block_0",):
    router = grads[name]["global_attn"]["router"]
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(router)) > 0


ABLATIONS = {
    "A_no_routing": dict(routing="none"),
    "B_no_compressed": dict(compressed_tokens=False),
    "C_gates_on_values": dict(gate_on="values"),
    "D_softmax_router": dict(router_activation="softmax"),
    "E_deterministic_training": dict(train_routing="deterministic"),
    "F_shared_routing": dict(shared_routing_across_heads=True),
    "dense": dict(global_attention="dense"),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_switch_runs_and_changes_output(name):
  """Each switch runs in training mode and changes the output (same weights where shared)."""
  x, t, cond = _inputs(6, n=8)
  mask = jnp.ones((B, 8), bool)
  base = _spec(top_k=2)
  spec = _spec(top_k=2, **ABLATIONS[name])
  v0, _ = _run(base, x, t, cond, mask, train=True, key=3, return_routing=True)
  v1, aux1 = _run(spec, x, t, cond, mask, train=True, key=3, return_routing=True)
  chex.assert_tree_all_finite(v1)
  assert not np.allclose(v0, v1, atol=1e-6)
  if name == "F_shared_routing":
    sel = np.asarray(aux1["selections"])
    assert np.all(sel == sel[:, :, :1])


def test_remat_policies_match():
  x, t, cond = _inputs(7)
  v = _run(_spec(), x, t, cond)
  for policy in ("full", "dots"):
    spec = _spec(remat=policy)
    np.testing.assert_allclose(_run(spec, x, t, cond), v, atol=1e-6)


def test_moc_component_chunks_match():
  x, t, cond = _inputs(8)
  for train in (False, True):
    v = _run(_spec(), x, t, cond, train=train, key=3)
    got = _run(_spec(moc_component_chunk=1), x, t, cond, train=train, key=3)
    np.testing.assert_allclose(got, v, atol=1e-5)


def test_bad_inputs_raise():
  x, t, cond = _inputs()
  model = CompositionalDiT(_spec())
  with pytest.raises(ValueError, match="channels"):
    model.init(jax.random.key(0), x[..., :3], t, cond, MASK, train=False)
  with pytest.raises(ValueError, match="cond"):
    model.init(jax.random.key(0), x, t, cond[..., :5], MASK, train=False)
  with pytest.raises(ValueError, match="component_mask"):
    model.init(jax.random.key(0), x, t, cond, MASK[:, :3], train=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="cuDNN attention needs a GPU (run: JAX_PLATFORMS=cuda pytest -m gpu)")
def test_cudnn_matches_xla_in_the_model():
  x, t, cond = _inputs(8, scene=True)
  outs = {}
  for impl in ("xla", "cudnn"):
    spec = _spec(attention_implementation=impl, dtype="bfloat16", width=128, num_heads=2)
    outs[impl] = _run(spec, x, t, cond, train=True, key=1)
  real = np.asarray(MASK)
  a, b = np.asarray(outs["cudnn"])[real], np.asarray(outs["xla"])[real]
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2


# ----------------------------------------------------------------------------------------
# TripoSG / PartCrafter layout (packing=False, time token, dense global blocks)
# ----------------------------------------------------------------------------------------

def _upstream_spec(**overrides) -> DiTSpec:
  """PartCrafter layout at the tiny size: blocks 0 and 2 global, block 1 local, one skip."""
  cfg = dict(num_blocks=3, packing=False, time_embedding="token", global_attention="dense",
             num_compressed=0, top_k=0, global_blocks=(0, 2), id_codebook=16,
             id_assignment="batch_rows", global_condition="first_component", norm_eps=1e-5,
             norm_fp32=True, gelu="erf")
  cfg.update(overrides)
  full = dit_config("tiny").to_dict()
  full.update(cfg)
  return DiTSpec.from_config(full)


def _upstream_run(spec, x, t, cond, mask=None, ids=None, train=False):
  model = CompositionalDiT(spec)
  params = _init_upstream(spec)
  return jax.jit(lambda p, x, t, c, m, i: model.apply(p, x, t, c, m, i, train=train))(
      params, x, t, cond, mask, ids)


@functools.lru_cache(maxsize=None)
def _init_upstream(spec):
  x, t, cond = _inputs()
  return jax.jit(lambda key: CompositionalDiT(spec).init(key, x, t, cond, None, train=False))(
      jax.random.key(7))


def test_upstream_layout_params_and_validation():
  params = meta.unbox(_init_upstream(_upstream_spec()))["params"]
  assert "packing" not in params and "pack_norm" not in params
  assert params["time_embed"]["fc1"]["kernel"].shape == (64, 256)  # D -> 4D
  assert set(params["block_0"]) == {"norm1", "global_attn", "norm2", "cross_attn", "norm3", "mlp"}
  assert "local_attn" in params["block_1"] and "skip_linear" in params["block_2"]
  assert params["id_embed"]["embedding"].shape == (16, 64)
  assert "id_embed" not in meta.unbox(_init_upstream(_upstream_spec(id_codebook=0)))["params"]
  with pytest.raises(ValueError, match="global_attention='moc' needs packing=True"):
    _upstream_spec(global_attention="moc")
  with pytest.raises(ValueError, match="packing=False .* needs time_embedding='token'"):
    _upstream_spec(time_embedding="additive")


def test_batch_row_ids_reproduce_partcrafter():
  """Evaluation ids number every row of the batch (PartCrafter with an int num_parts: the
  conditional half of a CFG batch gets N..2N-1); training ids restart per object."""
  spec = _upstream_spec()
  np.testing.assert_array_equal(dit.default_ids(spec, 2, 4, False), np.arange(8).reshape(2, 4))
  np.testing.assert_array_equal(dit.default_ids(spec, 2, 3, True), [[0, 1, 2]] * 2)
  with pytest.raises(ValueError,
                     match=r"3 x 6 = 18 batch rows exceed the part-embedding table of 16"):
    dit.default_ids(spec, 3, 6, False)
  x, t, cond = _inputs(3)
  v = _upstream_run(spec, x, t, cond)
  given = _upstream_run(spec, x, t, cond, ids=jnp.arange(2 * N, dtype=jnp.int32).reshape(2, N))
  np.testing.assert_array_equal(v, given)
  restart = _upstream_run(spec, x, t, cond,
                          ids=jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (2, N)))
  np.testing.assert_array_equal(restart[0], v[0])   # row 0 has ids 0..N-1 either way
  assert not np.allclose(restart[1], v[1])


def test_upstream_layout_padding_and_permutation():
  """Dense global blocks over all tokens: padding components change nothing and the model
  is permutation-equivariant given the ids."""
  spec = _upstream_spec()
  x, t, cond = _inputs(4)
  ids = jnp.array([[3, 9, 1, 12, 7], [0, 1, 2, 3, 4]], jnp.int32)
  v = _upstream_run(spec, x, t, cond, MASK, ids)
  x2 = jnp.where(MASK[:, :, None, None], x, 50.0)
  real = np.asarray(MASK)
  np.testing.assert_allclose(np.asarray(_upstream_run(spec, x2, t, cond, MASK, ids))[real],
                             np.asarray(v)[real], atol=1e-5, rtol=1e-5)
  perm = jnp.array([2, 4, 0, 1, 3])
  full = jnp.ones((B, N), bool)
  np.testing.assert_allclose(_upstream_run(spec, x[:, perm], t, cond, full, ids[:, perm]),
                             _upstream_run(spec, x, t, cond, full, ids)[:, perm],
                             atol=1e-5, rtol=1e-5)


def test_global_condition_first_component_and_local_independence():
  """PartCrafter's global blocks read the first part's condition; its local blocks keep the
  parts apart."""
  x, t, cond = _inputs(5, scene=True)
  cond2 = cond.at[:, 1:].add(1.0)  # every part's condition but the first
  all_global = _upstream_spec(global_blocks="all")
  np.testing.assert_allclose(_upstream_run(all_global, x, t, cond2),
                             _upstream_run(all_global, x, t, cond), atol=1e-6)
  per_part = _upstream_spec(global_blocks="all", global_condition="per_component")
  assert not np.allclose(_upstream_run(per_part, x, t, cond2), _upstream_run(per_part, x, t, cond))
  local = _upstream_spec(global_blocks="none")
  x3 = x.at[:, 1].add(1.0)
  a, b = _upstream_run(local, x, t, cond), _upstream_run(local, x3, t, cond)
  np.testing.assert_allclose(np.delete(np.asarray(a), 1, axis=1),
                             np.delete(np.asarray(b), 1, axis=1), atol=1e-6)
  assert not np.allclose(a[:, 1], b[:, 1])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="cuDNN attention needs a GPU (run: JAX_PLATFORMS=cuda pytest -m gpu)")
def test_cudnn_matches_xla_in_the_upstream_layout():
  """Odd lengths everywhere (L + 1 = 17 tokens per part, 7 condition tokens, 5 x 17 in the
  masked dense global blocks) are padded and masked under cuDNN."""
  x, t, cond = _inputs(9, scene=True)
  outs = {}
  for impl in ("xla", "cudnn"):
    spec = _upstream_spec(attention_implementation=impl, dtype="bfloat16", width=128,
                          num_heads=2)
    outs[impl] = _upstream_run(spec, x, t, cond, MASK)
  real = np.asarray(MASK)
  a, b = np.asarray(outs["cudnn"])[real], np.asarray(outs["xla"])[real]
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2
