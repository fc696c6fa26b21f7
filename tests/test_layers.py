"""Shared layers: Fourier embedding, the attention entry point, blocks."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from moca_jax import layers


def test_fourier_embedding_matches_numpy_and_has_51_dims():
  x = np.random.default_rng(0).uniform(-1, 1, (5, 3)).astype(np.float32)
  out = np.asarray(layers.fourier_embed(jnp.asarray(x), num_freqs=8))
  assert out.shape == (5, 51) == (5, layers.fourier_dim(3, 8))
  freqs = 2.0 ** np.arange(8)
  ref_angles = np.stack([x[:, i:i + 1] * freqs for i in range(3)], axis=1).reshape(5, -1)
  np.testing.assert_allclose(out, np.concatenate([x, np.sin(ref_angles), np.cos(ref_angles)], -1),
                             atol=1e-5)
  with_pi = np.asarray(layers.fourier_embed(jnp.asarray(x), num_freqs=8, include_pi=True))
  np.testing.assert_allclose(with_pi[:, 3:27], np.sin(ref_angles * np.pi), atol=1e-4)


def _numpy_attention(q, k, v, mask):
  b, tq, h, d = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      logits = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(d)
      logits = np.where(mask[bi, hi], logits, -np.inf)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi, :, hi] = w @ v[bi, :, hi]
  return out


@pytest.mark.parametrize("tq,tk", [(4, 4), (3, 7)])
def test_attention_matches_numpy_with_mask(tq, tk):
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, t, 3, 8)).astype(np.float32) for t in (tq, tk, tk))
  mask = rng.uniform(size=(2, 3, tq, tk)) > 0.4
  mask[..., 0] = True
  ref = _numpy_attention(q, k, v, mask)
  out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(layers.naive_attention(q, k, v, mask)), ref, atol=1e-5)


def test_cudnn_rejects_fp32():
  q = jnp.zeros((1, 2, 1, 8))
  with pytest.raises(ValueError, match="bf16"):
    layers.attention(q, q, q, implementation="cudnn")


def test_transformer_block_masked_keys_do_not_leak():
  block = layers.TransformerBlock(num_heads=2, cross_attention=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 16))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 12))
  mask = jnp.ones((6, 6), bool).at[:3, 3:].set(False)  # first 3 tokens blind to last 3
  params = block.init(jax.random.PRNGKey(2), x, ctx, mask)
  out = block.apply(params, x, ctx, mask)
  chex.assert_shape(out, (1, 6, 16))
  x2 = x.at[:, 3:].set(7.0)
  out2 = block.apply(params, x2, ctx, mask)
  np.testing.assert_allclose(out[:, :3], out2[:, :3], atol=1e-5)
  assert not np.allclose(out[:, 3:], out2[:, 3:])


def test_timestep_embedding_distinguishes_times():
  """Different times give clearly different embeddings (pairwise distance well above
  rounding), equal times equal ones."""
  emb = layers.TimestepEmbedding(32)
  t = jnp.array([0.0, 0.5, 1.0, 0.5])
  params = emb.init(jax.random.PRNGKey(0), t)
  out = np.asarray(emb.apply(params, t))
  chex.assert_shape(out, (4, 32))
  scale = np.linalg.norm(out, axis=1).mean()
  for i, j in ((0, 1), (0, 2), (1, 2)):
    assert np.linalg.norm(out[i] - out[j]) > 0.05 * scale, (i, j)
  np.testing.assert_array_equal(out[1], out[3])


@pytest.mark.parametrize("order", ["cos_sin", "sin_cos"])
def test_sinusoidal_embedding_matches_numpy(order):
  """Frequencies exp(-ln(1e4) i / half) on the 0..1000 scale; 'sin_cos' is diffusers'
  Timesteps(flip_sin_to_cos=False) as TripoSG uses it. An odd width gets a zero last column."""
  t = np.array([0.0, 0.123, 0.9375, 1.0], np.float32)
  half = 8
  args = (t * 1000.0)[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / half)
  parts = [np.cos(args), np.sin(args)] if order == "cos_sin" else [np.sin(args), np.cos(args)]
  ref = np.concatenate(parts, axis=-1)
  np.testing.assert_allclose(layers.sinusoidal_embedding(jnp.asarray(t), 16, order=order), ref,
                             atol=2e-4)
  odd = np.asarray(layers.sinusoidal_embedding(jnp.asarray(t), 17, order=order))
  np.testing.assert_array_equal(odd[:, 16], 0.0)
  with pytest.raises(ValueError, match="order must be 'cos_sin' or 'sin_cos', got 'x'"):
    layers.sinusoidal_embedding(jnp.asarray(t), 16, order="x")


def test_triposg_timestep_embedding_and_exact_gelu():
  """TripoSG's time MLP: D sinusoid features -> 4D -> exact GELU -> D."""
  emb = layers.TimestepEmbedding(8, frequency_dim=8, hidden_dim=32, activation="gelu",
                                 order="sin_cos")
  t = jnp.array([0.25, 0.75])
  params = meta.unbox(emb.init(jax.random.PRNGKey(0), t))["params"]
  assert params["fc1"]["kernel"].shape == (8, 32) and params["fc2"]["kernel"].shape == (32, 8)
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(layers.sinusoidal_embedding(t, 8, order="sin_cos"))
  h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
  ref = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(emb.apply({"params": params}, t), ref, atol=1e-5)
  mlp = layers.Mlp(approximate_gelu=False)
  y = jnp.linspace(-3, 3, 8)[None]
  mp = mlp.init(jax.random.PRNGKey(1), y)
  tanh = layers.Mlp(approximate_gelu=True).apply(mp, y)
  assert not np.allclose(mlp.apply(mp, y), tanh, atol=1e-6)


def test_layer_norm_epsilon_and_fp32():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16)) * 1e-3, jnp.bfloat16)
  norm = layers.layer_norm(jnp.bfloat16, epsilon=1e-5, fp32=True)
  params = meta.unbox(norm.init(jax.random.PRNGKey(0), x))
  assert set(params["params"]) == {"scale", "bias"}
  out = norm.apply(params, x)
  assert out.dtype == jnp.bfloat16
  xf = np.asarray(x, np.float32)
  ref = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=1e-2, rtol=1e-2)
  eps6 = layers.layer_norm(jnp.float32, epsilon=1e-6).apply(params, xf)
  eps5 = layers.layer_norm(jnp.float32, epsilon=1e-5).apply(params, xf)
  assert not np.allclose(eps5, eps6, atol=1e-3)  # the variance is ~1e-6: epsilon matters
