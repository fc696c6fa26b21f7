"""Shared building blocks: Fourier embedding, one attention entry point, MLP, norms, timestep.

Every attention in the project goes through `attention()`, a thin wrapper around
`jax.nn.dot_product_attention`, so that the backend ('xla' on CPU, 'cudnn' on GPU with bf16)
is chosen in one place from config; `resolve_attention_implementation` maps a config's
request ('auto', 'xla', 'cudnn') to the backend, with the fallbacks (XLA where an attention
is differentiated twice, which cuDNN's kernels cannot be).

Logical axis names (mapped to mesh axes by `moca_jax.sharding`):
  'embed'  model width D            'heads'  fused q/k/v output (H * d)
  'mlp'    MLP hidden width         'vocab'  codebook / embedding table rows
  'in'     small input feature dims (positions, latent channels), never sharded
Shapes: B batch, T tokens (Tq queries, Tk keys), H heads, d head size, D width.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          kernel_init: Callable = default_kernel_init, name: Optional[str] = None) -> nn.Dense:
  """An `nn.Dense` whose kernel (and bias) carry logical axis names for sharding; params fp32."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


def rms_norm(dtype: Dtype = jnp.float32, name: Optional[str] = None, axes: str = "embed") -> nn.RMSNorm:
  """RMS norm with a learned scale (fp32 param, logical axis `axes`)."""
  return nn.RMSNorm(dtype=dtype, param_dtype=jnp.float32, epsilon=1e-6,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axes,)),
                    name=name)


class LayerNorm(nn.Module):
  """Layer norm with learned scale and bias (fp32 params, logical axis 'embed').

  Attributes:
    epsilon: added to the variance (1e-6 here by default; TripoSG / PartCrafter use 1e-5).
    fp32: compute in float32 and cast the result back to `dtype` (TripoSG's FP32LayerNorm);
      False computes in `dtype` (Flax's default handling).
    dtype: output dtype.
  [..., D] -> [..., D]; params `scale` and `bias` [D].
  """
  epsilon: float = 1e-6
  fp32: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    norm = nn.LayerNorm(
        dtype=jnp.float32 if self.fp32 else self.dtype, param_dtype=jnp.float32,
        epsilon=self.epsilon,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name="norm")
    # Flax's LayerNorm keeps its params at the top of this module's scope (see `share_scope`).
    nn.share_scope(self, norm)
    out = norm(x.astype(jnp.float32) if self.fp32 else x)
    return out.astype(self.dtype)


def layer_norm(dtype: Dtype = jnp.float32, name: Optional[str] = None, epsilon: float = 1e-6,
               fp32: bool = False) -> LayerNorm:
  """`LayerNorm` with learned scale and bias (params `scale`, `bias` [D], axis 'embed')."""
  return LayerNorm(epsilon=epsilon, fp32=fp32, dtype=dtype, name=name)


# ----------------------------------------------------------------------------------------
# Fourier position embedding
# ----------------------------------------------------------------------------------------

def fourier_embed(x: Array, num_freqs: int = 8, include_pi: bool = False,
                  include_input: bool = True) -> Array:
  """Fourier features of coordinates.

  Frequencies are 2^0 .. 2^(num_freqs-1), optionally times pi (3DShape2VecSet) or not
  (TripoSG). Output is [x, sin(f x), cos(f x)] with the sin block ordered (dim, freq).

  Args:
    x: [..., c] coordinates.
  Returns:
    [..., c * (2 * num_freqs + include_input)]; 51 for xyz with num_freqs=8.
  """
  freqs = 2.0 ** jnp.arange(num_freqs, dtype=jnp.float32)
  if include_pi:
    freqs = freqs * jnp.pi
  angles = (x[..., :, None].astype(jnp.float32) * freqs).reshape(*x.shape[:-1], -1)
  parts = [x.astype(jnp.float32)] if include_input else []
  parts += [jnp.sin(angles), jnp.cos(angles)]
  return jnp.concatenate(parts, axis=-1)


def fourier_dim(in_dim: int, num_freqs: int, include_input: bool = True) -> int:
  """Output width of `fourier_embed` for `in_dim` input coordinates."""
  return in_dim * (2 * num_freqs + int(include_input))


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------

def attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None,
              implementation: Optional[str] = "xla") -> Array:
  """Scaled dot-product attention: the project's one entry point.

  Args:
    q: [B, Tq, H, d] queries.
    k: [B, Tk, H, d] keys.
    v: [B, Tk, H, d] values.
    mask: optional boolean, broadcastable to [B, H, Tq, Tk]; True = may attend.
      Every query row should keep at least one key (a fully masked row gives a uniform
      average under 'xla', undefined values under 'cudnn').
    implementation: 'xla', 'cudnn' (GPU, fp16/bf16 only) or None (let JAX pick).
  Returns:
    [B, Tq, H, d] in the dtype of q.
  """
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"implementation='cudnn' needs bf16/fp16 inputs, got {q.dtype}")
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
    while mask.ndim < 4:
      mask = mask[None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def naive_attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None) -> Array:
  """Reference softmax attention in plain jnp (fp32 math), same shapes as `attention`."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32)).astype(q.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head self- or cross-attention with RMS-normalised q and k, no qkv bias.

  Attributes:
    num_heads: H.
    head_dim: d; defaults to width // num_heads.
    out_features: output width; defaults to the query width.
    qk_norm: RMS norm on q and k per head (TripoSG / PartCrafter).
    implementation: passed to `attention`.
    dtype: compute dtype (params stay fp32).
  """
  num_heads: int
  head_dim: Optional[int] = None
  out_features: Optional[int] = None
  qk_norm: bool = True
  implementation: Optional[str] = "xla"
  dtype: Dtype = jnp.float32

  def project_qkv(self, x: Array, context: Array) -> tuple[Array, Array, Array]:
    """Projects x [B, Tq, Dq] and context [B, Tk, Dk] to q, k, v [B, T, H, d] (normed q, k)."""
    width = x.shape[-1]
    head_dim = self.head_dim or width // self.num_heads
    inner = self.num_heads * head_dim
    q = dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="query")(x)
    k = dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="key")(context)
    v = dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="value")(context)
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
    q, k, v = split(q), split(k), split(v)
    if self.qk_norm:
      q = rms_norm(self.dtype, name="query_norm", axes="in")(q)
      k = rms_norm(self.dtype, name="key_norm", axes="in")(k)
    return q, k, v

  def project_out(self, out: Array, width: int) -> Array:
    """Merges heads [B, T, H, d] and projects to `out_features` (or `width`)."""
    out = out.reshape(*out.shape[:-2], -1)
    return dense(self.out_features or width, ("heads", "embed"), dtype=self.dtype, name="out")(out)

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None,
               mask: Optional[Array] = None) -> Array:
    """x: [B, Tq, Dq]; context: [B, Tk, Dk] (defaults to x); mask: broadcastable to
    [B, H, Tq, Tk]. Returns [B, Tq, out_features or Dq]."""
    context = x if context is None else context
    q, k, v = self.project_qkv(x, context)
    out = attention(q, k, v, mask=mask, implementation=self.implementation)
    return self.project_out(out, x.shape[-1])


class Mlp(nn.Module):
  """Two-layer GELU MLP: [..., D] -> [..., hidden_ratio * D] -> [..., out_features or D].

  approximate_gelu: the tanh form (default) or the exact erf form (TripoSG / PartCrafter,
  PyTorch's nn.GELU()).
  """
  hidden_ratio: float = 4.0
  out_features: Optional[int] = None
  approximate_gelu: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    hidden = dense(int(width * self.hidden_ratio), ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    hidden = nn.gelu(hidden, approximate=self.approximate_gelu)
    return dense(self.out_features or width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(hidden)


class TransformerBlock(nn.Module):
  """Pre-norm block: self-attention, optional cross-attention to `context`, MLP.

  x: [B, T, D]; context: [B, Tc, Dc] or None; self_mask: broadcastable to [B, H, T, T].
  Returns [B, T, D].
  """
  num_heads: int
  mlp_ratio: float = 4.0
  cross_attention: bool = False
  qk_norm: bool = True
  implementation: Optional[str] = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None,
               self_mask: Optional[Array] = None) -> Array:
    attn = lambda name: MultiHeadAttention(self.num_heads, qk_norm=self.qk_norm,
                                           implementation=self.implementation,
                                           dtype=self.dtype, name=name)
    x = x + attn("self_attn")(layer_norm(self.dtype, "norm1")(x), mask=self_mask)
    if self.cross_attention:
      if context is None:
        raise ValueError("TransformerBlock(cross_attention=True) needs a context")
      x = x + attn("cross_attn")(layer_norm(self.dtype, "norm2")(x), context)
    return x + Mlp(self.mlp_ratio, dtype=self.dtype, name="mlp")(layer_norm(self.dtype, "norm3")(x))


# ----------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------

def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10000.0,
                         order: str = "cos_sin") -> Array:
  """Sinusoidal features of scalars: t [...] -> [..., dim].

  t is expected in [0, 1] (flow time) and is scaled by 1000 (the 0..1000 timestep scale of
  diffusion models), then multiplied by the frequencies exp(-ln(max_period) i / (dim // 2)),
  i = 0 .. dim // 2 - 1. `order` 'cos_sin' gives [cos | sin] (this project's default),
  'sin_cos' gives [sin | cos] (diffusers `Timesteps(flip_sin_to_cos=False,
  downscale_freq_shift=0)`, as TripoSG / PartCrafter use it). An odd `dim` gets a zero last
  feature.
  """
  if order not in ("cos_sin", "sin_cos"):
    raise ValueError(f"order must be 'cos_sin' or 'sin_cos', got {order!r}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  parts = [jnp.cos(args), jnp.sin(args)] if order == "cos_sin" else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


class TimestepEmbedding(nn.Module):
  """t [B] in [0, 1] -> [B, features]: sinusoidal features through a two-layer MLP.

  Attributes:
    features: output width D.
    frequency_dim: width of the sinusoidal features (0: D).
    hidden_dim: MLP hidden width (0: D).
    activation: 'silu' (this project's default) or 'gelu' (exact erf; TripoSG).
    order: sinusoid order, see `sinusoidal_embedding`.
  The MoCA default is 256 features -> D -> SiLU -> D; TripoSG's `time_embed` + `time_proj`
  is frequency_dim=D, hidden_dim=4D, activation='gelu', order='sin_cos'.
  Params fc1 (kernel [frequency_dim, hidden_dim], bias) and fc2 (kernel [hidden_dim, D], bias).
  """
  features: int
  frequency_dim: int = 256
  hidden_dim: int = 0
  activation: str = "silu"
  order: str = "cos_sin"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    if self.activation not in ("silu", "gelu"):
      raise ValueError(f"activation must be 'silu' or 'gelu', got {self.activation!r}")
    emb = sinusoidal_embedding(t, self.frequency_dim or self.features, order=self.order)
    hidden = self.hidden_dim or self.features
    emb = dense(hidden, ("in", "embed"), dtype=self.dtype, name="fc1")(emb)
    emb = nn.silu(emb) if self.activation == "silu" else nn.gelu(emb, approximate=False)
    return dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="fc2")(emb)


def default_attention_implementation() -> str:
  """'cudnn' when the default backend is a GPU, else 'xla'."""
  return "cudnn" if jax.default_backend() == "gpu" else "xla"


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", None)


def resolve_attention_implementation(requested: Optional[str], dtype: Dtype, *,
                                     higher_order: bool = False) -> Optional[str]:
  """The `attention` implementation for a config's request: every fallback decided here.

  Args:
    requested: 'auto' (cuDNN on a GPU when `dtype` is bf16/fp16, else XLA), 'xla', 'cudnn'
      or None (JAX picks, which may be cuDNN).
    dtype: the compute dtype of q, k, v.
    higher_order: the attention's output is differentiated more than once, e.g. the VAE's
      eikonal and normal terms take the SDF's gradient with respect to the query points and
      the loss is differentiated again with respect to the parameters. cuDNN's fused
      attention in `jax.nn.dot_product_attention` has a VJP rule only: its forward and
      backward kernels have no JVP, so a second derivative fails with "Differentiation rule
      for 'dot_product_attention_fwd_wrapper' not implemented". Such an attention gets 'xla'
      (whose plain einsum / softmax graph differentiates to any order) whatever is asked.
  Returns:
    'xla', 'cudnn' or None (only for a first-order request of None).
  Raises:
    ValueError: an unknown implementation name.
  """
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {requested!r}")
  if requested == "auto":
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    requested = default_attention_implementation() if half else "xla"
  if higher_order and requested != "xla":
    return "xla"
  return requested
