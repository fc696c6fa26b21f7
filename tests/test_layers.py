"""Shared layers: Fourier embedding, the attention entry point, blocks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  emb = layers.TimestepEmbedding(32)
  t = jnp.array([0.0, 0.5, 1.0])
  params = emb.init(jax.random.PRNGKey(0), t)
  out = emb.apply(params, t)
  chex.assert_shape(out, (3, 32))
  assert np.min(np.abs(np.asarray(out[0] - out[1]))) >= 0 and not np.allclose(out[0], out[1])
