"""Attention backends under the VAE loss's second derivative (issue 17, 2a).

`vae_loss` differentiates the SDF with respect to the query points (eikonal and normal terms)
and training differentiates that again with respect to the parameters. cuDNN's fused
attention has no second derivative, so the query cross-attention must run under XLA while the
encoder and the decoder's self-attention keep cuDNN. On CPU a stand-in for cuDNN (same math,
a VJP rule, and a forward that cannot be differentiated again, like the real kernel) proves
the selection; on a GPU the real cuDNN path is differentiated.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moca_jax import layers, vae
from moca_jax.vae import VecSetVAE

_XLA_ATTENTION = jax.nn.dot_product_attention  # the real one, before any monkeypatching
# Surface points, near and volume queries of the test batch: the query cross-attention is the
# one attention whose query length is NUM_NEAR + NUM_VOLUME + NUM_SURFACE (the surface points
# join the queries: loss.num_normal_points >= NUM_SURFACE).
NUM_SURFACE, NUM_NEAR, NUM_VOLUME = 64, 24, 16
NUM_QUERIES = NUM_NEAR + NUM_VOLUME + NUM_SURFACE


def _numpy_attention(q, k, v):
  q, k, v = (np.asarray(t, np.float32) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def _callback_attention(q, k, v):
  """Softmax attention computed outside JAX (a callback: no JVP rule), in q's dtype."""
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return jax.pure_callback(_numpy_attention, out, q, k, v).astype(q.dtype)


@jax.custom_vjp
def _stand_in_cudnn(q, k, v):
  """Softmax attention with cuDNN's differentiation structure (jax's cuDNN attention is a
  custom_vjp whose forward rule binds a kernel primitive and keeps its output for the
  backward): a first derivative works, a second one reaches the forward kernel, which has no
  differentiation rule, and fails as 'dot_product_attention_fwd_wrapper' does."""
  return _callback_attention(q, k, v)


def _stand_in_fwd(q, k, v):
  out = _callback_attention(q, k, v)
  return out, (q, k, v, out)


def _stand_in_bwd(res, d_out):
  """The fused-attention backward (FlashAttention-2, Dao 2023, algorithm 2, one block):
  dS = P * (dP - rowsum(dO * O)) with the forward output O as a residual."""
  q, k, v, out = (t.astype(jnp.float32) for t in res)
  d_out = d_out.astype(jnp.float32)
  scale = 1.0 / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
  d_v = jnp.einsum("bhqk,bqhd->bkhd", probs, d_out)
  d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v)
  row = jnp.einsum("bqhd,bqhd->bhq", d_out, out)[..., None]
  d_logits = probs * (d_probs - row) * scale
  d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k)
  d_k = jnp.einsum("bhqk,bqhd->bkhd", d_logits, q)
  return tuple(g.astype(t.dtype) for g, t in zip((d_q, d_k, d_v), res[:3]))


_stand_in_cudnn.defvjp(_stand_in_fwd, _stand_in_bwd)


@pytest.fixture
def recorded_attention(monkeypatch):
  """Routes jax.nn.dot_product_attention: 'cudnn' to the stand-in, anything else to XLA.
  Returns the list of (implementation, query length, key length) of every call traced."""
  calls = []

  def dispatch(q, k, v, mask=None, *, implementation=None, **kw):
    calls.append((implementation, q.shape[1], k.shape[1]))
    if implementation == "cudnn":
      assert mask is None and not kw, "the stand-in covers unmasked attention only"
      return _stand_in_cudnn(q, k, v)
    return _XLA_ATTENTION(q, k, v, mask=mask, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", dispatch)
  return calls


def _batch():
  rng = np.random.default_rng(0)
  pts = rng.normal(size=(2, NUM_SURFACE, 3)).astype(np.float32)
  pts *= 0.5 / np.linalg.norm(pts, axis=-1, keepdims=True)
  near = pts[:, :NUM_NEAR] + rng.normal(scale=0.02, size=(2, NUM_NEAR, 3)).astype(np.float32)
  vol = rng.uniform(-1, 1, (2, NUM_VOLUME, 3)).astype(np.float32)
  sdf = lambda x: np.linalg.norm(x, axis=-1) - 0.5
  return {
      "surface_points": pts,
      "surface_normals": pts / 0.5,
      "near_points": near,
      "near_sdf": sdf(near),
      "volume_points": vol,
      "volume_sdf": sdf(vol),
  }


def _config(implementation: str) -> ml_collections.ConfigDict:
  cfg = vae.vae_config("tiny")
  cfg.dtype = "bfloat16"
  cfg.attention_implementation = implementation
  return cfg


def _loss_grad(cfg, params, batch):
  model = VecSetVAE(cfg)
  grad_fn = jax.jit(
      jax.grad(lambda p: vae.vae_loss(p, model, batch, jax.random.PRNGKey(1), cfg)[0])
  )
  return grad_fn(params)


def _init():
  """Tiny VAE params (fp32 whatever the compute dtype), made with XLA attention so that the
  recorded calls are the loss's alone."""
  return vae.init_vae(
      VecSetVAE(vae.vae_config("tiny")), jax.random.PRNGKey(0), batch_size=2, num_points=NUM_SURFACE
  )


def test_resolve_attention_implementation(monkeypatch):
  resolve = layers.resolve_attention_implementation
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert resolve("auto", jnp.bfloat16) == "xla"
  assert resolve("cudnn", jnp.bfloat16) == "cudnn"
  assert resolve(None, jnp.float32) is None
  for requested in ("auto", "xla", "cudnn", None):  # twice differentiated: XLA, always
    assert resolve(requested, jnp.bfloat16, higher_order=True) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve("auto", jnp.bfloat16) == "cudnn"
  assert resolve("auto", jnp.float16) == "cudnn"
  assert resolve("auto", jnp.float32) == "xla"  # cuDNN attention needs half precision
  assert resolve("auto", jnp.bfloat16, higher_order=True) == "xla"
  with pytest.raises(ValueError, match="must be one of .* got 'flash'"):
    resolve("flash", jnp.bfloat16)


def test_stand_in_fails_a_second_derivative_like_cudnn():
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 4, 2, 8)) for i in range(3))
  first = jax.grad(lambda q: jnp.sum(_stand_in_cudnn(q, k, v) ** 2))(q)
  ref = jax.grad(lambda q: jnp.sum(_XLA_ATTENTION(q, k, v, implementation="xla") ** 2))(q)
  np.testing.assert_allclose(first, ref, rtol=1e-4, atol=1e-6)
  with pytest.raises(Exception, match="do not support JVP"):
    jax.grad(lambda q: jnp.sum(jax.grad(lambda q: jnp.sum(_stand_in_cudnn(q, k, v)))(q) ** 2))(q)


def test_loss_gradient_with_cudnn_requested_uses_xla_only_where_differentiated_twice(
    recorded_attention,
):
  batch = _batch()
  params = _init()
  recorded_attention.clear()  # the loss's calls only
  cfg = _config("cudnn")
  grads = _loss_grad(cfg, params, batch)
  chex.assert_tree_all_finite(grads)
  by_backend = {}
  for impl, tq, tk in recorded_attention:
    by_backend.setdefault(impl, set()).add((tq, tk))
  latents = cfg.num_latents
  # the query cross-attention (queries x latents) is the XLA one, and only it
  assert by_backend["xla"] == {(NUM_QUERIES, latents)}
  # encoder cross (latents x surface points) and every self-attention stay on "cuDNN"
  assert by_backend["cudnn"] == {(latents, NUM_SURFACE), (latents, latents)}
  # same gradient as the all-XLA model (both bf16)
  ref = _loss_grad(_config("xla"), params, batch)
  flat, flat_ref = (
      jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)]) for g in (grads, ref)
  )
  assert float(jnp.linalg.norm(flat - flat_ref) / jnp.linalg.norm(flat_ref)) < 0.05


def test_loss_gradient_fails_if_the_query_attention_kept_cudnn(recorded_attention, monkeypatch):
  """The negative control: without the higher-order fallback the stand-in fails as cuDNN
  did on the H200 (so the test above would catch the regression)."""
  original = layers.resolve_attention_implementation
  monkeypatch.setattr(
      layers,
      "resolve_attention_implementation",
      lambda requested, dtype, higher_order=False: original(requested, dtype),
  )
  cfg = _config("cudnn")
  with pytest.raises(Exception, match="do not support JVP"):
    _loss_grad(cfg, _init(), _batch())


@pytest.mark.gpu
@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="cuDNN attention needs a GPU (run: JAX_PLATFORMS=cuda pytest -m gpu)",
)
def test_loss_gradient_on_gpu_with_default_attention():
  batch = _batch()
  cfg = _config("auto")  # bf16: cuDNN for the encoder and decoder stacks, XLA for queries
  model = VecSetVAE(cfg)
  params = _init()
  grad_fn = jax.jit(
      jax.grad(lambda p: vae.vae_loss(p, model, batch, jax.random.PRNGKey(1), cfg)[0])
  )
  lowered = grad_fn.lower(params).as_text()  # jax's own custom calls, before XLA rewrites
  assert "cudnn$fmha" in lowered, "the GPU path should run cuDNN attention somewhere"
  grads = grad_fn(params)
  chex.assert_tree_all_finite(grads)
  ref = _loss_grad(_config("xla"), params, batch)
  flat, flat_ref = (
      jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)]) for g in (grads, ref)
  )
  # cuDNN and XLA round the bf16 attention differently: close, not equal
  assert float(jnp.linalg.norm(flat - flat_ref) / jnp.linalg.norm(flat_ref)) < 0.1
