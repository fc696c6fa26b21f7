"""Mesh, logical-axis rules and the sharded train step (8 simulated CPU devices)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moca_jax import layers, sharding, train_lib


class StandIn(nn.Module):
  """A small stand-in with logically named params: embed -> transformer block -> head."""
  width: int = 32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(self.width, ("in", "embed"), name="embed")(x)
    h = layers.TransformerBlock(num_heads=4, name="block")(h)
    h = layers.layer_norm(name="norm")(h)
    return layers.dense(x.shape[-1], ("embed", "in"), name="head")(h)


def _task():
  model = StandIn()

  def init_fn(rng, batch):
    return model.init(rng, batch["x"])

  def loss_fn(params, batch, rng):
    noise = jax.random.normal(rng, batch["x"].shape) * 0.1
    pred = model.apply({"params": params}, batch["x"] + noise)
    return jnp.mean((pred - batch["y"]) ** 2), {}
  return init_fn, loss_fn


def _optim():
  cfg = train_lib.default_optim_config()
  cfg.lr, cfg.warmup_steps, cfg.ema_decay = 1e-2, 1, 0.9
  return cfg


def test_make_mesh_and_errors():
  mesh = sharding.make_mesh(4, 2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh(-1, 8).shape) == {"data": 1, "fsdp": 8}
  with pytest.raises(ValueError, match="fsdp=3"):
    sharding.make_mesh(-1, 3)
  with pytest.raises(ValueError, match="data=3"):
    sharding.make_mesh(3, 2)
  with pytest.raises(ValueError, match="batch_size=6"):
    sharding.check_batch_divisible(6, mesh)


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh(4, 2)
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 128), mesh) == P("fsdp")
  assert sharding.logical_to_spec(("mlp", "embed"), (128, 32), mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(("embed", "embed"), (32, 32), mesh) == P("fsdp")  # used once
  assert sharding.logical_to_spec(("embed",), (33,), mesh) == P()                   # indivisible
  assert sharding.logical_to_spec(None, (4, 4), mesh) == P()
  assert sharding.logical_to_spec(("in", "heads"), (8, 8), mesh) == P()
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  # fsdp = 1: plain data parallel, nothing sharded
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 128), sharding.make_mesh(8, 1)) == P()


def _one_step(mesh, batch, steps=1):
  init_fn, loss_fn = _task()
  cfg = _optim()
  tx = train_lib.make_optimizer(cfg)
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  rng = jax.random.PRNGKey(0)
  state, setup = train_lib.create_train_state(init_fn, tx, spec, rng, mesh)
  compiled, mem = train_lib.compile_train_step(loss_fn, tx, train_lib.make_schedule(cfg),
                                               cfg.ema_decay, setup, spec, mesh)
  out = []
  for _ in range(steps):
    state, metrics = compiled(state, sharding.shard_batch(batch, mesh), jax.random.PRNGKey(1))
    out.append(jax.device_get(metrics))
  return state, out, setup, mem


def test_sharded_step_equals_single_device_step():
  """data 4 x fsdp 2 on 8 simulated devices == 1 device: loss and params to 1e-5."""
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(8, 6, 5)).astype(np.float32),
           "y": rng.normal(size=(8, 6, 5)).astype(np.float32)}
  mesh8 = sharding.make_mesh(4, 2)
  mesh1 = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  s8, m8, setup8, _ = _one_step(mesh8, batch, steps=2)
  s1, m1, _, _ = _one_step(mesh1, batch, steps=2)
  # params really are split over fsdp (and replicated over data)
  k = s8.params["block"]["mlp"]["fc1"]["kernel"]
  assert k.sharding.spec == P("fsdp") and len(k.addressable_shards) == 8
  assert k.addressable_shards[0].data.shape == (16, 128)
  mu = s8.opt_state[1][0].mu["block"]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == P("fsdp")
  assert setup8.param_names["block"]["mlp"]["fc1"]["kernel"] == ("embed", "mlp")
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  flat8 = jax.tree_util.tree_flatten_with_path(jax.device_get(s8.params))[0]
  flat1 = jax.tree.leaves(jax.device_get(s1.params))
  for (path, a), b in zip(flat8, flat1):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=str(path))
  assert int(s8.step) == 2


def test_weight_decay_mask_and_schedule():
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "norm": {"scale": jnp.ones(3)}, "emb": {"embedding": jnp.ones((5, 3))},
            "pos_embed": jnp.ones((1, 4, 3)), "conv": {"kernel": jnp.ones((2, 2, 3, 4))}}
  mask = train_lib.weight_decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False},
                  "emb": {"embedding": False}, "pos_embed": False, "conv": {"kernel": True}}
  cfg = train_lib.default_optim_config()
  cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.final_lr_fraction = 1.0, 10, 110, 0.1
  sched = train_lib.make_schedule(cfg)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(1000)], [0, 0.5, 1, 1])
  cfg.schedule = "cosine"
  sched = train_lib.make_schedule(cfg)
  np.testing.assert_allclose([sched(10), sched(60), sched(110)], [1.0, 0.55, 0.1], atol=1e-6)


def test_frozen_params_do_not_move():
  cfg = _optim()
  cfg.weight_decay = 0.5
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
  tx = train_lib.make_optimizer(cfg, trainable={"a": {"kernel": True}, "b": {"kernel": False}})
  opt = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  upd, opt = tx.update(grads, opt, params)      # step 0: warmup lr is 0
  upd, _ = tx.update(grads, opt, params)
  assert float(jnp.abs(upd["b"]["kernel"]).max()) == 0
  assert float(jnp.abs(upd["a"]["kernel"]).max()) > 0

