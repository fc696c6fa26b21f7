"""Vecset VAE: shapes, order invariance, chunked decoding, losses, overfitting two shapes."""
import chex
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
  mean, logvar = model.apply(params, pts, nrm, deterministic=True, method=VecSetVAE.encode)
  chex.assert_shape([mean, logvar], (2, cfg.num_latents, cfg.latent_channels))
  chex.assert_tree_all_finite((mean, logvar))
  perm = np.random.default_rng(1).permutation(pts.shape[1])
  mean_p, logvar_p = model.apply(params, pts[:, perm], nrm[:, perm], deterministic=True,
                                 method=VecSetVAE.encode)
  np.testing.assert_allclose(mean_p, mean, atol=1e-4)
  np.testing.assert_allclose(logvar_p, logvar, atol=1e-4)
  # training mode draws its FPS subset and start from the 'fps' stream
  enc = lambda k: model.apply(params, pts, nrm, deterministic=False, method=VecSetVAE.encode,
                              rngs={"fps": jax.random.PRNGKey(k)})[0]
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
  with pytest.raises(Exception):
    model.apply(params, mean, logvar, method=VecSetVAE.sample_latent)


def test_chunked_decode_equals_unchunked(tiny):
  cfg, model, params = tiny
  z = jax.random.normal(jax.random.PRNGKey(1), (2, cfg.num_latents, cfg.latent_channels))
  q = jax.random.uniform(jax.random.PRNGKey(2), (2, 1000, 3), minval=-1, maxval=1)
  full = model.apply(params, z, q, chunk_size=1000, method=VecSetVAE.decode)
  chunked = model.apply(params, z, q, chunk_size=96, method=VecSetVAE.decode)  # pads to 1056
  feats = model.apply(params, z, method=VecSetVAE.decode_features)
  direct = model.apply(params, feats, q, method=VecSetVAE.query_sdf)
  chex.assert_shape(chunked, (2, 1000))
  np.testing.assert_allclose(chunked, full, atol=1e-5)
  np.testing.assert_allclose(direct, full, atol=1e-5)
  # each query is decoded independently of the others
  np.testing.assert_allclose(model.apply(params, feats, q[:, 7:8], method=VecSetVAE.query_sdf),
                             direct[:, 7:8], atol=1e-5)


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
  small = VecSetVAE(ml_collections.FrozenConfigDict(dict(cfg.to_dict(), num_latents=16)))
  p16 = vae.init_vae(small, jax.random.PRNGKey(0))
  loss, m = jax.jit(lambda p, b, r: vae.vae_loss(p, small, b, r, loss_cfg))(
      p16, batch, jax.random.PRNGKey(5))
  chex.assert_tree_all_finite((loss, m))
  w = loss_cfg.loss
  total = (w.near_weight * m["near_l1"] + w.volume_weight * m["volume_l1"]
           + w.surface_weight * m["surface_l1"] + w.normal_weight * (1 - m["normal_cos"])
           + w.eikonal_weight * m["eikonal"] + w.kl_weight * m["kl"])
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  # the eikonal term uses the true spatial gradient of the field
  feats_fn = lambda q: small.apply(p16, small.apply(p16, jnp.zeros((2, 16, 8)),
                                                    method=VecSetVAE.decode_features),
                                   q, method=VecSetVAE.query_sdf)
  q0 = near[:, :4]
  g = jax.grad(lambda q: feats_fn(q).sum())(q0)
  eps = 1e-3
  fd = (feats_fn(q0 + jnp.array([eps, 0, 0])) - feats_fn(q0 - jnp.array([eps, 0, 0]))) / (2 * eps)
  np.testing.assert_allclose(g[..., 0], fd, rtol=0.05, atol=0.05)
  # KL: zero for the prior, positive otherwise
  assert float(vae.kl_divergence(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)))) == 0.0
  assert float(vae.kl_divergence(jnp.ones((1, 2, 3)), jnp.zeros((1, 2, 3)))) == pytest.approx(0.5)
