"""Vecset VAE: shapes, order invariance, chunked decoding, losses, overfitting two shapes."""
import functools

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moca_jax import vae
from moca_jax.vae import VecSetVAE


@pytest.fixture(scope="module")
def tiny():
  cfg = vae.vae_config("tiny")
  model = VecSetVAE(cfg)
  params = vae.init_vae(model, jax.random.PRNGKey(0), batch_size=2)
  return cfg, model, params


def _apply(model, method, **kw):
  """Jitted model.apply(params, *args, method=method, **kw) (eager Flax is slow on CPU)."""
  return jax.jit(lambda p, *a: model.apply(p, *a, method=method, **kw))


def _cloud(seed, b=2, p=200):
  rng = np.random.default_rng(seed)
  pts = rng.normal(size=(b, p, 3)).astype(np.float32)
  pts /= np.linalg.norm(pts, axis=-1, keepdims=True) * rng.uniform(1.2, 2.0, (b, 1, 1))
  nrm = pts / np.linalg.norm(pts, axis=-1, keepdims=True)
  return jnp.asarray(pts), jnp.asarray(nrm)


def test_configs():
  t = vae.vae_config("triposg")
  assert (t.enc_width, t.enc_heads, t.enc_cross_layers, t.enc_self_layers) == (512, 8, 1, 8)
  assert (t.dec_width, t.dec_layers, t.dec_heads, t.latent_channels) == (1024, 16, 8, 64)
  assert vae.vae_config("triposg-1024").num_latents == 1024
  assert vae.vae_config("triposg", num_latents=512).num_latents == 512
  assert vae.vae_config("small").num_latents < t.num_latents
  with pytest.raises(ValueError, match="unknown VAE size"):
    vae.vae_config("huge")


def test_encode_shapes_and_order_invariance(tiny):
  cfg, model, params = tiny
  pts, nrm = _cloud(0)
  encode = _apply(model, VecSetVAE.encode, deterministic=True)
  mean, logvar = encode(params, pts, nrm)
  chex.assert_shape([mean, logvar], (2, cfg.num_latents, cfg.latent_channels))
  chex.assert_tree_all_finite((mean, logvar))
  perm = np.random.default_rng(1).permutation(pts.shape[1])
  mean_p, logvar_p = encode(params, pts[:, perm], nrm[:, perm])
  np.testing.assert_allclose(mean_p, mean, atol=1e-4)
  np.testing.assert_allclose(logvar_p, logvar, atol=1e-4)
  # training mode draws its FPS subset and start from the 'fps' stream
  train_encode = jax.jit(lambda p, k: model.apply(p, pts, nrm, deterministic=False,
                                                  method=VecSetVAE.encode, rngs={"fps": k})[0])
  enc = lambda k: train_encode(params, jax.random.PRNGKey(k))
  np.testing.assert_array_equal(enc(3), enc(3))
  assert not np.allclose(enc(3), enc(4))
  with pytest.raises(ValueError, match="num_latents"):
    model.apply(params, pts[:, :10], nrm[:, :10], deterministic=True, method=VecSetVAE.encode)


def test_sample_latent_uses_noise_stream(tiny):
  _, model, params = tiny
  mean = jnp.zeros((2, 32, 8))
  logvar = jnp.full((2, 32, 8), 2 * np.log(0.5))
  z = model.apply(params, mean, logvar, method=VecSetVAE.sample_latent,
                  rngs={"noise": jax.random.PRNGKey(0)})
  assert abs(float(jnp.std(z)) - 0.5) < 0.05
  with pytest.raises(flax.errors.InvalidRngError, match='needs PRNG for "noise"'):
    model.apply(params, mean, logvar, method=VecSetVAE.sample_latent)


def test_encode_with_given_query_index(tiny):
  """query_index replaces FPS: the queries are exactly the given rows, in that order."""
  cfg, model, params = tiny
  pts, nrm = _cloud(6)
  idx = jnp.asarray(np.stack([np.arange(cfg.num_latents), np.arange(cfg.num_latents)[::-1]]))
  encode = jax.jit(lambda p, x, n, i: model.apply(p, x, n, query_index=i,
                                                  method=VecSetVAE.encode))
  mean, _ = encode(params, pts, nrm, idx)
  chex.assert_shape(mean, (2, cfg.num_latents, cfg.latent_channels))
  # reordering the queries reorders the latent tokens (no FPS in between)
  mean_rev, _ = encode(params, pts, nrm, idx[:, ::-1])
  np.testing.assert_allclose(mean_rev, mean[:, ::-1], atol=1e-5)
  # the chosen rows matter; the order of the other points does not
  perm = np.concatenate([np.arange(cfg.num_latents), np.arange(pts.shape[1] - 1,
                                                                cfg.num_latents - 1, -1)])
  mean_perm, _ = encode(params, pts[:, perm], nrm[:, perm], idx)
  np.testing.assert_allclose(mean_perm, mean, atol=1e-5)
  with pytest.raises(ValueError, match=r"query_index must have shape \[B=2, L\], got \(32,\)"):
    model.apply(params, pts, nrm, query_index=idx[0], method=VecSetVAE.encode)


def test_triposg_layout_switches():
  """The published layout: exact GELU, eps 1e-5, decoder output negated, out_norm present and
  no norm after the decoder's self-attention stack."""
  t = vae.vae_config("triposg")
  assert (t.gelu_exact, t.norm_eps, t.negate_output, t.query_out_norm) == (True, 1e-5, True, True)
  assert (t.dec_features_norm, t.qk_norm, t.query_mlp) == (False, False, True)
  cfg = vae.vae_config_from_triposg({"width_encoder": 32, "width_decoder": 32,
                                     "num_attention_heads": 2, "num_layers_encoder": 1,
                                     "num_layers_decoder": 1, "latent_channels": 4},
                                    num_latents=8)
  model = VecSetVAE(cfg)
  params = vae.init_vae(model, jax.random.PRNGKey(0), num_points=16)
  assert "out_norm" in params["params"] and "dec_norm" not in params["params"]
  z = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 4))
  q = jax.random.uniform(jax.random.PRNGKey(2), (1, 5, 3), minval=-1, maxval=1)
  flipped = ml_collections.ConfigDict(cfg.to_dict())
  flipped.negate_output = False
  sdf = _apply(model, VecSetVAE.decode)(params, z, q)
  np.testing.assert_allclose(_apply(VecSetVAE(flipped), VecSetVAE.decode)(params, z, q), -sdf,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="embedding_type 'fourier' is not supported"):
    vae.vae_config_from_triposg({"embedding_type": "fourier"})


def test_chunked_decode_equals_unchunked(tiny):
  cfg, model, params = tiny
  z = jax.random.normal(jax.random.PRNGKey(1), (2, cfg.num_latents, cfg.latent_channels))
  q = jax.random.uniform(jax.random.PRNGKey(2), (2, 1000, 3), minval=-1, maxval=1)
  full = _apply(model, VecSetVAE.decode, chunk_size=1000)(params, z, q)
  chunked = _apply(model, VecSetVAE.decode, chunk_size=96)(params, z, q)  # pads to 1056
  feats = _apply(model, VecSetVAE.decode_features)(params, z)
  query = _apply(model, VecSetVAE.query_sdf)
  direct = query(params, feats, q)
  chex.assert_shape(chunked, (2, 1000))
  np.testing.assert_allclose(chunked, full, atol=1e-5)
  np.testing.assert_allclose(direct, full, atol=1e-5)
  # each query is decoded independently of the others
  np.testing.assert_allclose(query(params, feats, q[:, 7:8]), direct[:, 7:8], atol=1e-5)


def test_loss_terms_are_finite_and_match_definitions(tiny):
  cfg, model, params = tiny
  pts, nrm = _cloud(3, p=128)
  rng = np.random.default_rng(4)
  near = jnp.asarray(rng.uniform(-1, 1, (2, 64, 3)).astype(np.float32))
  vol = jnp.asarray(rng.uniform(-1, 1, (2, 32, 3)).astype(np.float32))
  batch = {"surface_points": pts, "surface_normals": nrm, "near_points": near,
           "near_sdf": jnp.linalg.norm(near, axis=-1) - 0.5, "volume_points": vol,
           "volume_sdf": jnp.linalg.norm(vol, axis=-1) - 0.5}
  loss_cfg = ml_collections.ConfigDict(cfg.to_dict())
  loss_cfg.loss.num_normal_points = 16
  loss, m = jax.jit(lambda p, b, r: vae.vae_loss(p, model, b, r, loss_cfg))(
      params, batch, jax.random.PRNGKey(5))
  chex.assert_tree_all_finite((loss, m))
  w = loss_cfg.loss
  total = (w.near_weight * m["near_l1"] + w.volume_weight * m["volume_l1"]
           + w.surface_weight * m["surface_l1"] + w.normal_weight * (1 - m["normal_cos"])
           + w.eikonal_weight * m["eikonal"] + w.kl_weight * m["kl"])
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  # the eikonal term of vae_loss is mean((|grad_q sdf| - 1)^2) over the near + volume queries,
  # with the spatial gradient of the decoded field: rebuilt here with central differences
  # through the same deterministic path (mean latent, FPS from the centroid-farthest point)
  det_cfg = ml_collections.ConfigDict(loss_cfg.to_dict())
  det_cfg.train_random_fps, det_cfg.sample_posterior = False, False
  det_model = VecSetVAE(det_cfg)
  _, m_det = jax.jit(lambda p, b, r: vae.vae_loss(p, det_model, b, r, det_cfg))(
      params, batch, jax.random.PRNGKey(5))
  mean, _ = _apply(det_model, VecSetVAE.encode, deterministic=True)(
      params, batch["surface_points"], batch["surface_normals"])
  feats = _apply(det_model, VecSetVAE.decode_features)(params, mean)
  field = jax.jit(lambda q: det_model.apply(params, feats, q, method=VecSetVAE.query_sdf))
  queries = jnp.concatenate([near, vol], axis=1)
  eps = 1e-3
  fd = jnp.stack([(field(queries + eps * e) - field(queries - eps * e)) / (2 * eps)
                  for e in jnp.eye(3)], axis=-1)
  eik_fd = float(jnp.mean(jnp.square(jnp.linalg.norm(fd, axis=-1) - 1.0)))
  assert float(m_det["eikonal"]) == pytest.approx(eik_fd, rel=0.02)
  # (that it enters the loss with its weight is the `total` check above)
  # KL: zero for the prior, positive otherwise
  assert float(vae.kl_divergence(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)))) == 0.0
  assert float(vae.kl_divergence(jnp.ones((1, 2, 3)), jnp.zeros((1, 2, 3)))) == pytest.approx(0.5)


def test_tiny_vae_overfits_a_box_and_a_sphere():
  """Trains the tiny VAE (real train step) on two fixed shapes; voxel IoU of the extracted
  meshes against the exact solids >= 0.9."""
  from data_pipeline import primitives, vae_batches
  from experiments.configs.vae import get_config
  from moca_jax import extract, sharding, train_lib, vae_task

  c = get_config("tiny")
  c.num_steps, c.learning_rate, c.warmup_steps = 800, 3e-3, 100
  c.model.sample_posterior = False  # memorise two shapes: no posterior noise ...
  c.model.train_random_fps = False  # ... and no FPS noise (IoU >= 0.94 with 3 seeds)
  rot = primitives.random_rotation(np.random.default_rng(3))
  shapes = [primitives.Sphere(radius=0.6, translation=(0.05, -0.1, 0.0)),
            primitives.Box(half_extents=(0.55, 0.5, 0.45), rotation=rot)]
  model, init_fn, loss_fn = vae_task.make_task(c)
  rng = np.random.default_rng(0)

  def make_batch(num_near, num_volume):
    return vae_batches.stack_examples(
        [vae_batches.example_from_shape(s, rng, 512, num_near, num_volume) for s in shapes])

  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  tx = train_lib.make_optimizer(c.optim)
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(256, 128))
  state, setup = train_lib.create_train_state(init_fn, tx, spec, jax.random.PRNGKey(0), mesh)
  # The real step (train_lib.train_step), jitted and compiled ahead of time as
  # compile_train_step does (1 device: no shardings to give), but with XLA's CPU
  # optimisations on: the suite turns them off (conftest) because it compiles many small
  # programs and runs each a few times; this one runs 800 times, and runs 2x faster
  # optimised (train loop 61 s -> 30 s on 2 cores, for ~4 s more compilation).
  step = jax.jit(
      functools.partial(train_lib.train_step, loss_fn=loss_fn, tx=tx,
                        schedule=train_lib.make_schedule(c.optim), ema_decay=c.optim.ema_decay),
      donate_argnums=(0,),
  ).lower(setup.abstract_state, spec, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile(
      compiler_options={"xla_backend_optimization_level": 2})
  for _ in range(c.num_steps):
    state, metrics = step(state, make_batch(256, 128), jax.random.PRNGKey(1))
  assert float(metrics["near_l1"]) < 0.03

  batch = make_batch(1, 1)
  params = {"params": state.params}
  z, _ = _apply(model, VecSetVAE.encode, deterministic=True)(
      params, batch["surface_points"], batch["surface_normals"])
  meshes = extract.extract_vae_meshes(model, params, z, resolution=48, fine_resolution=None,
                                      chunk_size=8192)
  # cell centres of a 40^3 grid: no sample lies exactly on a face of the box
  grid = extract.grid_coordinates(np.arange(40 ** 3), 39, 0.975)
  ious = {}
  for shape, mesh in zip(shapes, meshes):
    assert mesh.is_watertight
    inside, exact = mesh.contains(grid), shape.sdf(grid) < 0
    ious[shape.kind] = (inside & exact).sum() / (inside | exact).sum()
  print("voxel IoU", ious)
  assert min(ious.values()) >= 0.9, ious
