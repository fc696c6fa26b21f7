"""Vecset VAE (TripoSG / 3DShape2VecSet style): surface points -> L latent tokens -> SDF.

Sign convention: the decoded field is a signed distance, NEGATIVE INSIDE the solid,
positive outside, zero on the surface (the same as `data_pipeline.primitives`); its gradient
points outwards. Every component is encoded in its object's frame (the whole object
normalised to [-1, 1]^3), so decoded parts land in place.

Encoder (paper eq. 1):
  P [B, P, 3] (+ normals) --FPS of a random 4x subset--> queries P_s [B, L, 3]
  X = SelfAttn^(n)(CrossAttn(PE(P_s), PE(P)))   -> linear -> (mean, logvar) [B, L, C]
Decoder (paper eq. 2):
  F = SelfAttn^(m)(Linear(z)) [B, L, D]          (`decode_features`, run once per shape)
  sdf(q) = Linear(CrossAttn(PE(q), F) [+ MLP]) [B, Q]   (`query_sdf`, per chunk of queries;
                                                        the MLP is config.query_mlp)

PE is `layers.fourier_embed` (2^0..2^(F-1), no pi, with the input: 51 dims for F = 8, the
published size; the tiny config uses F = 4, which fits in a few hundred CPU steps),
concatenated with the normal on the encoder side (54 dims), then a linear layer.
All attention goes through `layers.MultiHeadAttention` (optional q/k RMS norm, no q/k/v bias,
implementation 'auto' = cudnn on GPU with bf16, else xla). The query cross-attention is
always XLA (`layers.resolve_attention_implementation(..., higher_order=True)`): `vae_loss`
differentiates the SDF with respect to the queries and then the result with respect to the
parameters, and cuDNN's attention kernels have no second derivative. The encoder and the
decoder's self-attention stack are differentiated once and keep the requested backend.

Layout switches (config keys; the defaults are this project's layout, the 'triposg' size and
`vae_config_from_triposg` set the published TripoSG layout exactly, see
`moca_jax.convert.triposg_vae`):
  norm_eps            LayerNorm epsilon (1e-6; TripoSG 1e-5)
  gelu_exact          erf GELU in the MLPs (False = tanh approximation; TripoSG True)
  qk_norm             RMS norm on q and k per head (TripoSG's VAE: False)
  dec_features_norm   LayerNorm after the decoder's self-attention stack (TripoSG: False)
  query_mlp           MLP after the decoder's query cross-attention (TripoSG: True)
  query_out_norm      LayerNorm before the output projection (TripoSG: True)
  negate_output       the decoder returns -Linear(...) (TripoSG's `logits * -1`: True)
The key/value LayerNorm of every cross-attention ('norm_context') is in both layouts.

Randomness (rng streams): 'fps' (random subset and random FPS start, encoder with
deterministic=False), 'noise' (posterior sample). deterministic=True uses FPS over all input
points from the point farthest from the centroid: the result does not depend on the order of
the input points.

Usage:
  cfg = vae_config('tiny'); model = VecSetVAE(cfg)
  params = init_vae(model, key)   # = model.init({'params', 'fps', 'noise'}, pts, nrm, queries);
                                  # leaves are logically partitioned (nn.meta.unbox for plain)
  mean, logvar = model.apply(params, pts, nrm, deterministic=True, method=VecSetVAE.encode)
  sdf = model.apply(params, mean, queries, chunk_size=4096, method=VecSetVAE.decode)
  loss, metrics = vae_loss(params, model, batch, rng, cfg)
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moca_jax import layers
from moca_jax.fps import farthest_from_centroid, farthest_point_sampling

Array = jax.Array

SIZES = ("tiny", "small", "bundle", "triposg")


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

def vae_config(size: str = "tiny", num_latents: Optional[int] = None) -> ml_collections.ConfigDict:
  """Named VAE sizes.

  Args:
    size: 'tiny' (CPU tests, seconds), 'small' (CPU/GPU-trainable), 'bundle' (the bundled
      model's: 'small' with 64 tokens and a smaller decoder), 'triposg' (the published
      TripoSG size). A suffix '-512' / '-1024' / '-2048' picks the number of latent tokens
      (e.g. 'triposg-1024'); so does `num_latents`.
  Returns:
    ConfigDict with the architecture, the input sizes and `loss` weights.
  """
  base, _, suffix = size.partition("-")
  if base not in SIZES:
    raise ValueError(f"unknown VAE size {size!r}; expected one of {SIZES} (optionally '-<L>')")
  c = ml_collections.ConfigDict()
  c.size = base
  c.num_freqs = 8
  c.include_pi = False
  c.subset_factor = 4            # FPS runs over a random subset of subset_factor * L points
  c.mlp_ratio = 4.0
  c.qk_norm = True
  c.logvar_min = -30.0
  c.logvar_max = 20.0
  c.logvar_offset = 0.0          # added to the predicted logvar (< 0: the posterior starts narrow;
                                 # -6 gave no gain over 0 in a 500-step tiny run)
  c.dtype = "float32"            # compute dtype; params stay fp32 ('bfloat16' on GPU)
  c.attention_implementation = "auto"   # 'auto' -> cudnn on GPU with bf16, else xla (the
                                        # query cross-attention: always xla, see module doc)
  c.sample_posterior = True      # training: z = mean + sigma * eps; eval uses the mean
  c.decode_mean_fraction = 0.0   # training: this fraction of the examples decodes the posterior
                                 # mean instead of a sample (the DiT generates means: see vae_loss)
  c.train_random_fps = True      # training: FPS of a random subset from a random start
  c.enc_cross_layers = 1
  c.norm_eps = 1e-6
  c.gelu_exact = False
  c.dec_features_norm = True
  c.query_out_norm = False
  c.negate_output = False
  c.decode_noise_std = ()        # per-channel noise added to latents before decoding (inference)
  c.decode_noise_seed = 0
  if base == "tiny":
    c.num_freqs = 4              # fewer octaves: converges in a few hundred CPU steps
    c.num_latents, c.latent_channels = 32, 8
    c.enc_width, c.enc_heads, c.enc_self_layers = 64, 2, 1
    c.dec_width, c.dec_heads, c.dec_layers = 64, 2, 2
    c.query_mlp = True
    c.num_points = 512           # surface points fed to the encoder
  elif base == "small":
    c.num_freqs = 6
    c.num_latents, c.latent_channels = 256, 32
    c.enc_width, c.enc_heads, c.enc_self_layers = 128, 4, 2
    c.dec_width, c.dec_heads, c.dec_layers = 256, 4, 4
    c.query_mlp = True
    c.num_points = 2048
  elif base == "bundle":  # the bundled model's VAE (assets/moca-small): 'small', 64 tokens,
    c.num_freqs = 6       # a 192-wide 3-layer decoder
    c.num_latents, c.latent_channels = 64, 32
    c.enc_width, c.enc_heads, c.enc_self_layers = 128, 4, 2
    c.dec_width, c.dec_heads, c.dec_layers = 192, 4, 3
    c.query_mlp = True
    c.num_points = 2048
  else:  # triposg: encoder 512 wide, 8 heads, 1 cross + 8 self; decoder 1024 wide, 16 layers.
    c.num_latents, c.latent_channels = 2048, 64
    c.enc_width, c.enc_heads, c.enc_self_layers = 512, 8, 8
    c.dec_width, c.dec_heads, c.dec_layers = 1024, 8, 16
    c.num_points = 8192
    _set_triposg_layout(c)
  if suffix:
    if not suffix.isdigit():
      raise ValueError(f"bad VAE size suffix in {size!r}; expected e.g. 'triposg-1024'")
    c.num_latents = int(suffix)
  if num_latents is not None:
    c.num_latents = int(num_latents)
  c.decode_chunk_size = 8192

  c.loss = ml_collections.ConfigDict()
  c.loss.near_weight = 1.0        # L1 on near-surface SDF samples
  c.loss.volume_weight = 0.5      # L1 on uniform volume SDF samples
  c.loss.surface_weight = 1.0     # |sdf| on surface points (the zero level set)
  c.loss.normal_weight = 0.1      # 1 - cos(grad sdf, normal) on surface points
  c.loss.eikonal_weight = 0.01    # (|grad sdf| - 1)^2 on near + volume points
  c.loss.kl_weight = 1e-4         # KL(q(z|x) || N(0, I)), mean over latent elements
  c.loss.num_normal_points = 256  # surface points (the first ones) used for surface/normal terms
  c.loss.sdf_clip = 0.0           # > 0: clip targets and predictions to [-clip, clip] for L1
  return c


def _set_triposg_layout(c: ml_collections.ConfigDict) -> None:
  """Switches `c` to the published TripoSG VAE layout (TripoSGVAEModel, fc5c409)."""
  c.num_freqs, c.include_pi = 8, False
  c.mlp_ratio = 4.0
  c.qk_norm = False
  c.norm_eps = 1e-5
  c.gelu_exact = True
  c.dec_features_norm = False
  c.query_mlp = True
  c.query_out_norm = True
  c.negate_output = True
  c.logvar_min, c.logvar_max, c.logvar_offset = -30.0, 20.0, 0.0


def vae_config_from_triposg(upstream: dict, num_latents: Optional[int] = None
                            ) -> ml_collections.ConfigDict:
  """The config of a TripoSG VAE `config.json` (TripoSGVAEModel constructor kwargs).

  Args:
    upstream: the parsed config.json (keys in_channels, latent_channels, num_attention_heads,
      width_encoder, width_decoder, num_layers_encoder, num_layers_decoder, embedding_type,
      embed_frequency, embed_include_pi; missing keys take the upstream defaults).
    num_latents: latent tokens L (upstream's `num_tokens` at encode time; default 2048).
  Raises:
    ValueError: a layout this module cannot express (in_channels != 3, embedding_type not
      'frequency', width not divisible by the heads).
  """
  get = lambda k, d: upstream.get(k, d)
  if get("in_channels", 3) != 3:
    raise ValueError(f"TripoSG VAE in_channels must be 3 (xyz), got {get('in_channels', 3)}")
  if get("embedding_type", "frequency") != "frequency":
    raise ValueError(f"TripoSG VAE embedding_type {get('embedding_type', None)!r} is not "
                     "supported (only 'frequency')")
  c = vae_config("triposg")
  c.latent_channels = int(get("latent_channels", 64))
  c.enc_heads = c.dec_heads = int(get("num_attention_heads", 8))
  c.enc_width = int(get("width_encoder", 512))
  c.dec_width = int(get("width_decoder", 1024))
  c.enc_self_layers = int(get("num_layers_encoder", 8))
  c.dec_layers = int(get("num_layers_decoder", 16))
  _set_triposg_layout(c)
  c.num_freqs = int(get("embed_frequency", 8))
  c.include_pi = bool(get("embed_include_pi", False))
  for width in (c.enc_width, c.dec_width):
    if width % c.enc_heads:
      raise ValueError(f"TripoSG VAE width {width} is not divisible by "
                       f"{c.enc_heads} attention heads")
  if num_latents is not None:
    c.num_latents = int(num_latents)
  return c


def _dtype(config) -> Any:
  return jnp.dtype(config.dtype)


def _implementation(config, higher_order: bool = False) -> Optional[str]:
  """The attention backend of config.attention_implementation (layers.
  resolve_attention_implementation); higher_order=True for the query cross-attention, whose
  output `vae_loss` differentiates twice (its eikonal and normal terms)."""
  return layers.resolve_attention_implementation(config.attention_implementation,
                                                 _dtype(config), higher_order=higher_order)


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------

class PointEmbed(nn.Module):
  """Fourier features of xyz (+ optional extra features such as normals) -> linear to width.

  points [..., 3], extra [..., E] or None -> [..., width].
  """
  width: int
  num_freqs: int = 8
  include_pi: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, points: Array, extra: Optional[Array] = None) -> Array:
    feats = layers.fourier_embed(points, self.num_freqs, include_pi=self.include_pi)
    if extra is not None:
      feats = jnp.concatenate([feats, extra.astype(feats.dtype)], axis=-1)
    return layers.dense(self.width, ("in", "embed"), dtype=self.dtype, name="proj")(feats)


def _layer_norm(dtype: Any, eps: float, name: str) -> nn.LayerNorm:
  """LayerNorm with learned scale and bias (fp32 params, statistics in fp32, axis 'embed')."""
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, epsilon=eps,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("embed",)),
                      name=name)


class Mlp(nn.Module):
  """Two-layer GELU MLP [..., D] -> [..., mlp_ratio * D] -> [..., D] (params 'fc1', 'fc2').

  gelu_exact: erf GELU (TripoSG / diffusers `FeedForward(activation_fn='gelu')`), else the
  tanh approximation.
  """
  mlp_ratio: float = 4.0
  gelu_exact: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    h = layers.dense(int(width * self.mlp_ratio), ("embed", "mlp"), dtype=self.dtype,
                     name="fc1")(x)
    h = nn.gelu(h, approximate=not self.gelu_exact)
    return layers.dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class SelfAttentionBlock(nn.Module):
  """Pre-norm self-attention + MLP: x [B, T, D] -> [B, T, D] (params norm1, self_attn,
  norm3, mlp: the same tree as `layers.TransformerBlock`)."""
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  implementation: Optional[str] = "xla"
  dtype: Any = jnp.float32
  norm_eps: float = 1e-6
  gelu_exact: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x + layers.MultiHeadAttention(
        self.num_heads, qk_norm=self.qk_norm, implementation=self.implementation,
        dtype=self.dtype, name="self_attn")(_layer_norm(self.dtype, self.norm_eps, "norm1")(x))
    h = _layer_norm(self.dtype, self.norm_eps, "norm3")(x)
    return x + Mlp(self.mlp_ratio, self.gelu_exact, self.dtype, name="mlp")(h)


class CrossAttentionBlock(nn.Module):
  """Pre-norm cross-attention + optional MLP: x [B, T, D], context [B, S, Dc] -> [B, T, D].

  The context (keys/values) has its own LayerNorm 'norm_context' (TripoSG's `norm_cross`).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  use_mlp: bool = True
  qk_norm: bool = True
  implementation: Optional[str] = "xla"
  dtype: Any = jnp.float32
  norm_eps: float = 1e-6
  gelu_exact: bool = False

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    ctx = _layer_norm(self.dtype, self.norm_eps, "norm_context")(context)
    x = x + layers.MultiHeadAttention(
        self.num_heads, qk_norm=self.qk_norm, implementation=self.implementation,
        dtype=self.dtype, name="cross_attn")(
            _layer_norm(self.dtype, self.norm_eps, "norm1")(x), ctx)
    if self.use_mlp:
      x = x + Mlp(self.mlp_ratio, self.gelu_exact, self.dtype, name="mlp")(
          _layer_norm(self.dtype, self.norm_eps, "norm2")(x))
    return x


class VecSetVAE(nn.Module):
  """The vecset VAE. `config` is a `vae_config(...)` ConfigDict; it is stored frozen
  (FrozenConfigDict), so the module is hashable and jit caches keyed on it work."""
  config: Any

  def __post_init__(self):
    if isinstance(self.config, ml_collections.ConfigDict):
      object.__setattr__(self, "config", ml_collections.FrozenConfigDict(self.config))
    super().__post_init__()

  def setup(self):
    c = self.config
    dt, impl = _dtype(c), _implementation(c)
    eps, exact = c.get("norm_eps", 1e-6), c.get("gelu_exact", False)
    self.point_embed = PointEmbed(c.enc_width, c.num_freqs, c.include_pi, dt)
    self.enc_cross = [
        CrossAttentionBlock(c.enc_heads, c.mlp_ratio, True, c.qk_norm, impl, dt, eps, exact,
                            name=f"enc_cross_{i}") for i in range(c.enc_cross_layers)]
    self.enc_blocks = [
        SelfAttentionBlock(c.enc_heads, c.mlp_ratio, c.qk_norm, impl, dt, eps, exact,
                           name=f"enc_self_{i}") for i in range(c.enc_self_layers)]
    self.enc_norm = _layer_norm(dt, eps, "enc_norm")
    self.enc_moments = layers.dense(2 * c.latent_channels, ("embed", "in"), dtype=dt,
                                    name="enc_moments")
    self.dec_in = layers.dense(c.dec_width, ("in", "embed"), dtype=dt, name="dec_in")
    self.dec_blocks = [
        SelfAttentionBlock(c.dec_heads, c.mlp_ratio, c.qk_norm, impl, dt, eps, exact,
                           name=f"dec_self_{i}") for i in range(c.dec_layers)]
    if c.get("dec_features_norm", True):
      self.dec_norm = _layer_norm(dt, eps, "dec_norm")
    self.query_embed = PointEmbed(c.dec_width, c.num_freqs, c.include_pi, dt)
    # The loss differentiates the SDF with respect to the queries and then again with
    # respect to the parameters: this attention needs one that differentiates twice.
    self.query_cross = CrossAttentionBlock(c.dec_heads, c.mlp_ratio, c.query_mlp, c.qk_norm,
                                           _implementation(c, higher_order=True), dt, eps,
                                           exact)
    if c.get("query_out_norm", False):
      self.out_norm = _layer_norm(dt, eps, "out_norm")
    self.out_proj = layers.dense(1, ("embed", "in"), dtype=dt, name="out_proj")

  # --- encoder -------------------------------------------------------------------------
  def select_queries(self, points: Array, normals: Array, *, deterministic: bool):
    """FPS query points: [B, P, 3] x2 -> (query points, query normals) [B, L, 3] each.

    Training (deterministic=False): FPS of a random subset of min(P, subset_factor * L)
    points from a random start (rng stream 'fps'). Eval: FPS over all points from the point
    farthest from the centroid (independent of the input order).
    """
    c = self.config
    b, p, _ = points.shape
    num = c.num_latents
    if p < num:
      raise ValueError(f"encode needs at least num_latents={num} surface points, got {p}")
    if deterministic:
      cand_pts, cand_nrm = points, normals
      start = farthest_from_centroid(points)
    else:
      m = min(p, c.subset_factor * num)
      k_sub, k_start = jax.random.split(self.make_rng("fps"))
      if m < p:
        keys = jax.random.split(k_sub, b)
        sub = jax.vmap(lambda k: jax.random.permutation(k, p)[:m])(keys)
        cand_pts = jnp.take_along_axis(points, sub[..., None], axis=1)
        cand_nrm = jnp.take_along_axis(normals, sub[..., None], axis=1)
      else:
        cand_pts, cand_nrm = points, normals
      start = jax.random.randint(k_start, (b,), 0, m)
    idx = farthest_point_sampling(jax.lax.stop_gradient(cand_pts), num, start)
    return (jnp.take_along_axis(cand_pts, idx[..., None], axis=1),
            jnp.take_along_axis(cand_nrm, idx[..., None], axis=1))

  def encode(self, points: Array, normals: Array, *, deterministic: bool = True,
             query_index: Optional[Array] = None):
    """Surface points [B, P, 3] and unit normals [B, P, 3] -> (mean, logvar) [B, L', C] fp32.

    Args:
      points, normals: the encoder input (TripoSG's `surface[..., :3]`, `surface[..., 3:]`).
      deterministic: FPS mode of `select_queries` (ignored when `query_index` is given).
      query_index: optional int [B, L'] rows of `points` used as the query tokens, in this
        order, instead of FPS (e.g. the exact subset an upstream run used); L' may differ
        from config.num_latents.
    Returns:
      mean and logvar, logvar clamped to [logvar_min, logvar_max] (TripoSG: [-30, 20]).
    Raises:
      ValueError: fewer than num_latents points (FPS), or a query_index of the wrong rank.
    """
    c = self.config
    if query_index is None:
      q_pts, q_nrm = self.select_queries(points, normals, deterministic=deterministic)
    else:
      if query_index.ndim != 2 or query_index.shape[0] != points.shape[0]:
        raise ValueError(f"query_index must have shape [B={points.shape[0]}, L], "
                         f"got {tuple(query_index.shape)}")
      idx = query_index.astype(jnp.int32)[..., None]
      q_pts = jnp.take_along_axis(points, idx, axis=1)
      q_nrm = jnp.take_along_axis(normals, idx, axis=1)
    context = self.point_embed(points, normals)
    x = self.point_embed(q_pts, q_nrm)
    for blk in self.enc_cross:
      x = blk(x, context)
    for blk in self.enc_blocks:
      x = blk(x)
    moments = self.enc_moments(self.enc_norm(x)).astype(jnp.float32)
    self.sow("intermediates", "moments", moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = logvar + c.get("logvar_offset", 0.0)
    return mean, jnp.clip(logvar, c.logvar_min, c.logvar_max)

  def sample_latent(self, mean: Array, logvar: Array) -> Array:
    """Reparameterised posterior sample mean + exp(logvar / 2) * eps (rng stream 'noise')."""
    eps = jax.random.normal(self.make_rng("noise"), mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps

  # --- decoder -------------------------------------------------------------------------
  def decode_features(self, latents: Array, *, decode_noise: bool = True) -> Array:
    """Latents [B, L, C] -> decoder features F [B, L, dec_width] (the self-attention stack).

    With config.decode_noise_std (one std per channel, e.g. measured by
    `vae_task.posterior_noise_std`) and decode_noise=True, a fixed draw of that noise
    (seed config.decode_noise_seed, shape [L, C]) is added first: a decoder trained only on
    posterior samples may need the noise of its uninformative channels to decode posterior
    means (what the DiT generates). The training loss passes decode_noise=False.
    """
    std = tuple(self.config.get("decode_noise_std", ()) or ())
    if decode_noise and std:
      eps = jax.random.normal(jax.random.PRNGKey(int(self.config.get("decode_noise_seed", 0))),
                              latents.shape[-2:], jnp.float32)
      latents = latents.astype(jnp.float32) + eps * jnp.asarray(std, jnp.float32)
    x = self.dec_in(latents.astype(_dtype(self.config)))
    for blk in self.dec_blocks:
      x = blk(x)
    return self.dec_norm(x) if self.config.get("dec_features_norm", True) else x

  def query_sdf(self, features: Array, queries: Array) -> Array:
    """Features [B, L, D] and query points [B, Q, 3] -> SDF [B, Q] fp32 (negative inside).

    With `negate_output` (TripoSG layout) the value is TripoSG's `decode().sample`, which is
    positive inside (its extraction keeps `logits > 0` as occupied): imported TripoSG weights
    give the opposite sign of this project's convention.

    Queries do not interact: the value at one query depends on that query and F only.
    """
    c = self.config
    h = self.query_embed(queries)
    h = self.query_cross(h, features)
    if c.get("query_out_norm", False):
      h = self.out_norm(h)
    out = self.out_proj(h)[..., 0].astype(jnp.float32)
    return -out if c.get("negate_output", False) else out

  def decode(self, latents: Array, queries: Array, chunk_size: int = 8192) -> Array:
    """Latents [B, L, C], queries [B, Q, 3] -> SDF [B, Q], decoded `chunk_size` queries at a
    time (static; Q is padded to a multiple of it)."""
    features = self.decode_features(latents)
    return self.query_sdf_chunked(features, queries, chunk_size)

  def query_sdf_chunked(self, features: Array, queries: Array, chunk_size: int) -> Array:
    """`query_sdf` over chunks of `chunk_size` queries under one `nn.scan` (static shapes)."""
    b, q, _ = queries.shape
    chunk = int(min(chunk_size, q))
    n = -(-q // chunk)
    padded = jnp.pad(queries, ((0, 0), (0, n * chunk - q), (0, 0)))
    chunks = padded.reshape(b, n, chunk, 3).transpose(1, 0, 2, 3)  # [n, B, chunk, 3]

    def body(mdl, carry, x):
      return carry, mdl.query_sdf(features, x)

    if self.is_initializing():
      out = jnp.stack([self.query_sdf(features, x) for x in chunks[:1]])
      out = jnp.concatenate([out, jnp.zeros((n - 1, b, chunk), out.dtype)], axis=0)
    else:
      _, out = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                       length=n)(self, None, chunks)
    return out.transpose(1, 0, 2).reshape(b, n * chunk)[:, :q]

  # --- full pass (used by init) ----------------------------------------------------------
  def __call__(self, points: Array, normals: Array, queries: Array, *,
               deterministic: bool = True):
    """Encode, (sample), decode: returns (sdf [B, Q], mean, logvar)."""
    mean, logvar = self.encode(points, normals, deterministic=deterministic)
    z = mean if deterministic else self.sample_latent(mean, logvar)
    return self.query_sdf(self.decode_features(z), queries), mean, logvar


def init_vae(model: VecSetVAE, rng: Array, batch_size: int = 1,
             num_points: Optional[int] = None, num_queries: int = 16):
  """Initial variables for `model` from dummy inputs (shapes only matter for P >= L); jitted."""
  c = model.config
  p = num_points or max(c.num_points, c.num_latents)
  pts = jnp.zeros((batch_size, p, 3), jnp.float32) + jnp.linspace(-1, 1, p)[None, :, None]
  nrm = jnp.zeros((batch_size, p, 3), jnp.float32).at[..., 2].set(1.0)
  qs = jnp.zeros((batch_size, num_queries, 3), jnp.float32)
  k0, k1, k2 = jax.random.split(rng, 3)
  return jax.jit(model.init)({"params": k0, "fps": k1, "noise": k2}, pts, nrm, qs)


def count_params(params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------

def kl_divergence(mean: Array, logvar: Array) -> Array:
  """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1)); shapes [B, L, C] -> []."""
  return jnp.mean(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))


# Top-level VecSetVAE param names of the encoder (VecSetVAE.setup); the rest is the decoder.
ENCODER_PARAMS = ("point_embed", "enc_")


def is_encoder_param(name: str) -> bool:
  """True for a top-level VecSetVAE param name that belongs to the encoder (point embedding,
  cross/self blocks, norm, moments head); False for the decoder's (dec_*, query_*, out_*)."""
  return name == ENCODER_PARAMS[0] or name.startswith(ENCODER_PARAMS[1])


def mix_in_means(samples: Array, means: Array, fraction: float, rng: Array) -> Array:
  """[B, L, C] posterior samples with a random `fraction` of the B examples replaced by
  their means (each example independently with probability `fraction`; 0 -> samples)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"decode_mean_fraction: expected a value in [0, 1], got {fraction}")
  if fraction == 0.0:
    return samples
  use_mean = jax.random.uniform(rng, (samples.shape[0],) + (1,) * (samples.ndim - 1)) < fraction
  return jnp.where(use_mean, means, samples)


def vae_loss(params, model: VecSetVAE, batch: dict, rng: Array, config) -> tuple[Array, dict]:
  """Training loss of the VAE.

  Args:
    params: variables ({'params': ...}).
    model: the VecSetVAE.
    batch: dict of float32 arrays
      'surface_points' [B, P, 3], 'surface_normals' [B, P, 3]   encoder input (on the surface)
      'near_points' [B, Qn, 3], 'near_sdf' [B, Qn]               near-surface SDF samples
      'volume_points' [B, Qv, 3], 'volume_sdf' [B, Qv]           uniform SDF samples in [-1,1]^3
      The encoder runs in training mode (random FPS) unless config.train_random_fps is False;
      the latent is a posterior sample when config.sample_posterior, else the mean; with
      config.decode_mean_fraction = f > 0 a random fraction f of the examples decode the mean
      even then. Why: the DiT is trained on (and generates) posterior means
      (data_pipeline.encode_latents), and a decoder that only ever saw samples decodes a
      mean to a nearly unsigned field wherever channels carry no information (their
      posterior is the N(0, 1) prior, so a sample is noise there and the mean is 0).
      The first `loss.num_normal_points` surface points also supervise the field's zero level
      and its gradient direction (surface points should come in random order).
    rng: PRNG key (split into the 'fps' and 'noise' streams).
    config: the VAE config (its `.loss` holds the weights) or the loss ConfigDict itself.
  Returns:
    (scalar loss, metrics dict of scalars).
  """
  lc = config.loss if "loss" in config else config
  k_fps, k_noise = jax.random.split(rng)
  mean, logvar = model.apply(params, batch["surface_points"], batch["surface_normals"],
                             deterministic=not model.config.train_random_fps,
                             method=VecSetVAE.encode, rngs={"fps": k_fps})
  if model.config.sample_posterior:
    z = model.apply(params, mean, logvar, method=VecSetVAE.sample_latent,
                    rngs={"noise": k_noise})
    z = mix_in_means(z, mean, float(model.config.get("decode_mean_fraction", 0.0)),
                     jax.random.fold_in(k_noise, 1))
  else:
    z = mean
  features = model.apply(params, z, decode_noise=False, method=VecSetVAE.decode_features)

  ns = min(int(lc.num_normal_points), batch["surface_points"].shape[1])
  surf = batch["surface_points"][:, :ns]
  surf_n = batch["surface_normals"][:, :ns]
  near, vol = batch["near_points"], batch["volume_points"]
  qn, qv = near.shape[1], vol.shape[1]
  queries = jnp.concatenate([near, vol, surf], axis=1)

  field = lambda q: model.apply(params, features, q, method=VecSetVAE.query_sdf)
  pred, vjp = jax.vjp(field, queries)
  (grad,) = vjp(jnp.ones_like(pred))  # each prediction depends on its own query only
  p_near, p_vol, p_surf = pred[:, :qn], pred[:, qn:qn + qv], pred[:, qn + qv:]

  def l1(p, t):
    if lc.sdf_clip > 0:
      p, t = jnp.clip(p, -lc.sdf_clip, lc.sdf_clip), jnp.clip(t, -lc.sdf_clip, lc.sdf_clip)
    return jnp.mean(jnp.abs(p - t))

  near_l = l1(p_near, batch["near_sdf"])
  vol_l = l1(p_vol, batch["volume_sdf"])
  surf_l = jnp.mean(jnp.abs(p_surf))
  g_surf = grad[:, qn + qv:]
  g_norm = jnp.linalg.norm(g_surf, axis=-1)
  cos = jnp.sum(g_surf * surf_n, axis=-1) / jnp.maximum(g_norm, 1e-8)
  normal_l = jnp.mean(1.0 - cos)
  eik_l = jnp.mean(jnp.square(jnp.linalg.norm(grad[:, :qn + qv], axis=-1) - 1.0))
  kl = kl_divergence(mean, logvar)
  loss = (lc.near_weight * near_l + lc.volume_weight * vol_l + lc.surface_weight * surf_l
          + lc.normal_weight * normal_l + lc.eikonal_weight * eik_l + lc.kl_weight * kl)
  metrics = {"loss": loss, "near_l1": near_l, "volume_l1": vol_l, "surface_l1": surf_l,
             "normal_cos": jnp.mean(cos), "eikonal": eik_l, "kl": kl,
             "latent_std": jnp.std(mean)}
  return loss, metrics
