"""Image encoder: a ViT with the DINOv2 layout, so DINOv2 weights can be imported later.

Layout (names follow DINOv2's modules so a converter is a renaming):
  patch_embed   Conv 14x14 stride 14, in_channels -> D (kernel [14, 14, C_in, D], bias)
  cls_token     [1, 1, D];  register_tokens [1, R, D] (optional, R = num_registers)
  pos_embed     [1, 1 + G*G, D] for the configured grid G = image_size // 14 (CLS + patches;
                registers carry no position, as in DINOv2-reg); bicubically resized when
                the input grid differs
  blocks_i      x += ls1 * attn(norm1(x));  x += ls2 * mlp(norm2(x))
                attn: fused qkv (with bias) -> [B, T, 3, H, d] -> attention -> proj
                mlp: fc1 -> exact GELU -> fc2;  ls1/ls2: layer scale 'gamma' [D]
  norm          final LayerNorm
Output: tokens [B, 1 + R + G*G, D] (CLS, registers, patches), all normed.

Inputs: float images [B, H, W, C] already normalised by `preprocess` (RGB channels with the
ImageNet mean/std; a mask channel in {0, 1}). C = 3 for objects, 7 for scenes in MIDI's
layout [instance pixels on white (3), whole scene (3), instance mask (1)].

Training switches: `lora_rank > 0` adds low-rank adapters (B starts at zero, so the encoder
starts as the base model); `freeze` marks the base weights as not trainable
(`trainable_mask`, used by the optimizer in `train_lib`), and with no LoRA also stops the
gradient at the encoder output so no backward pass runs through it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moca_jax.layers import attention, layer_norm

Array = jax.Array

PATCH = 14
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def encoder_config(size: str = "tiny", in_channels: int = 3) -> ml_collections.ConfigDict:
  """Named sizes: 'tiny' (tests, CPU demo), 'small' (ViT-S/14), 'large' (ViT-L/14, DINOv2-L)."""
  sizes = {
      #        width depth heads image registers layer_scale
      "tiny": (64, 2, 2, 56, 0, 0.1),
      "small": (384, 12, 6, 224, 0, 1e-5),
      "large": (1024, 24, 16, 224, 0, 1e-5),
  }
  if size not in sizes:
    raise ValueError(f"encoder_config: unknown size {size!r}; expected one of {sorted(sizes)}")
  width, depth, heads, image, regs, ls = sizes[size]
  return ml_collections.ConfigDict(dict(
      size=size, width=width, depth=depth, num_heads=heads, mlp_ratio=4.0, patch_size=PATCH,
      image_size=image, num_registers=regs, layer_scale_init=ls, in_channels=in_channels,
      lora_rank=0, lora_alpha=16.0, lora_targets=("qkv", "proj"), freeze=False, remat=False,
      dtype="float32", attention_implementation="xla"))


# ----------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------

def preprocess(images: Array, image_size: int, in_channels: int = 3) -> Array:
  """uint8 (or [0, 1] float) images [B, H, W, C] -> float32 [B, S, S, C] for the encoder.

  Bilinear resize to S = image_size; RGB triples normalised with the ImageNet statistics;
  for C = 7 the last channel is a mask and is thresholded to {0, 1}.
  """
  if images.ndim != 4 or images.shape[-1] != in_channels:
    raise ValueError(f"preprocess: expected images [B, H, W, {in_channels}], got {images.shape}")
  x = jnp.asarray(images, jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = x / 255.0
  x = jax.image.resize(x, (x.shape[0], image_size, image_size, in_channels), "bilinear")
  rgb_groups = in_channels // 3
  parts = [(x[..., 3 * g:3 * g + 3] - IMAGENET_MEAN) / IMAGENET_STD for g in range(rgb_groups)]
  if in_channels % 3:
    parts.append((x[..., 3 * rgb_groups:] > 0.5).astype(jnp.float32))
  return jnp.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------------------
# Patch embedding kernel for 3 or 7 channels
# ----------------------------------------------------------------------------------------

def expand_patch_kernel(rgb_kernel: Array, in_channels: int) -> Array:
  """RGB patch kernel [p, p, 3, D] -> [p, p, in_channels, D] (MIDI's scene input).

  For 7 channels [instance RGB, scene RGB, mask]: both RGB triples start as copies of the RGB
  weights and the mask channel starts at zero. Also used to convert pretrained 3-channel
  weights.
  """
  if in_channels == 3:
    return rgb_kernel
  if in_channels != 7:
    raise ValueError(f"expand_patch_kernel: in_channels must be 3 or 7, got {in_channels}")
  zeros = jnp.zeros(rgb_kernel.shape[:2] + (1,) + rgb_kernel.shape[3:], rgb_kernel.dtype)
  return jnp.concatenate([rgb_kernel, rgb_kernel, zeros], axis=2)


def _patch_kernel_init(in_channels: int):
  base = nn.initializers.lecun_normal()

  def init(key, shape, dtype=jnp.float32):
    p, q, _, d = shape
    return expand_patch_kernel(base(key, (p, q, 3, d), dtype), in_channels)
  return init


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------

def encoder_attention(q: Array, k: Array, v: Array, implementation: Optional[str]) -> Array:
  """Self-attention q, k, v [B, T, H, d] -> [B, T, H, d] through `layers.attention`.

  cuDNN rejects odd sequence lengths (257 = CLS + 16 x 16 patches): there the tokens are
  padded by one zero token whose key is masked out, and the padded query row is dropped.
  """
  t = q.shape[1]
  if implementation != "cudnn" or t % 2 == 0:
    return attention(q, k, v, implementation=implementation)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 1), (0, 0), (0, 0)])
  mask = jnp.broadcast_to((jnp.arange(t + 1) < t)[None, None, None, :], (q.shape[0], 1, t + 1, t + 1))
  return attention(pad(q), pad(k), pad(v), mask=mask, implementation=implementation)[:, :t]


class LoRADense(nn.Module):
  """Dense layer y = x W + b (+ alpha / r * x A B when rank > 0), params fp32.

  Same 'kernel'/'bias' names and logical axes as `layers.dense`. A [in, r] starts random,
  B [r, out] starts at zero, so a fresh adapter leaves the layer unchanged.
  """
  features: int
  axes: tuple[str, str]
  rank: int = 0
  alpha: float = 16.0
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    part = nn.with_logical_partitioning
    kernel = self.param("kernel", part(nn.initializers.xavier_uniform(), self.axes),
                        (in_features, self.features), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", part(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    if self.rank > 0:
      a = self.param("lora_a", part(nn.initializers.normal(1.0 / self.rank), (self.axes[0], "in")),
                     (in_features, self.rank), jnp.float32)
      b = self.param("lora_b", part(nn.initializers.zeros_init(), ("in", self.axes[1])),
                     (self.rank, self.features), jnp.float32)
      low = jnp.dot(jnp.dot(x.astype(self.dtype), a.astype(self.dtype)), b.astype(self.dtype))
      y = y + (self.alpha / self.rank) * low
    return y


class LayerScale(nn.Module):
  """x * gamma, gamma [D] initialised to `init_value`."""
  init_value: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("gamma", nn.with_logical_partitioning(
        nn.initializers.constant(self.init_value), ("embed",)), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class EncoderBlock(nn.Module):
  """DINOv2 block on x [B, T, D] -> [B, T, D]."""
  num_heads: int
  mlp_ratio: float
  layer_scale_init: float
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: Sequence[str] = ("qkv", "proj")
  implementation: Optional[str] = "xla"
  dtype: Any = jnp.float32

  def _dense(self, features, axes, name):
    rank = self.lora_rank if name in self.lora_targets else 0
    return LoRADense(features, axes, rank=rank, alpha=self.lora_alpha, dtype=self.dtype,
                     name=name)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    h = self.num_heads
    y = layer_norm(self.dtype, "norm1")(x)
    qkv = self._dense(3 * d, ("embed", "heads"), "qkv")(y).reshape(b, t, 3, h, d // h)
    out = encoder_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.implementation)
    y = self._dense(d, ("heads", "embed"), "proj")(out.reshape(b, t, d))
    x = x + LayerScale(self.layer_scale_init, name="ls1")(y)
    y = layer_norm(self.dtype, "norm2")(x)
    y = self._dense(int(d * self.mlp_ratio), ("embed", "mlp"), "fc1")(y)
    y = self._dense(d, ("mlp", "embed"), "fc2")(nn.gelu(y, approximate=False))
    return x + LayerScale(self.layer_scale_init, name="ls2")(y)


class ImageEncoder(nn.Module):
  """ViT/14 with the DINOv2 layout: images [B, S, S, C] (preprocessed) -> tokens [B, T, D]
  with T = 1 + num_registers + (S // 14)^2."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images: Array) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"ImageEncoder: expected images [B, H, W, {cfg.in_channels}], "
                       f"got {images.shape}")
    p = cfg.patch_size
    part = nn.with_logical_partitioning
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=part(_patch_kernel_init(cfg.in_channels), ("in", "in", "in", "embed")),
                bias_init=part(nn.initializers.zeros_init(), ("embed",)),
                name="patch_embed")(images.astype(dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    grid = cfg.image_size // p
    pos = self.param("pos_embed", part(nn.initializers.normal(0.02), ("in", "in", "embed")),
                     (1, 1 + grid * grid, d), jnp.float32)
    cls = self.param("cls_token", part(nn.initializers.normal(1e-6), ("in", "in", "embed")),
                     (1, 1, d), jnp.float32)
    patch_pos = pos[:, 1:]
    if (gh, gw) != (grid, grid):
      patch_pos = jax.image.resize(patch_pos.reshape(1, grid, grid, d), (1, gh, gw, d),
                                   "bicubic").reshape(1, gh * gw, d)
    tokens = [jnp.broadcast_to(cls + pos[:, :1], (b, 1, d)).astype(dtype)]
    if cfg.num_registers:
      regs = self.param("register_tokens", part(nn.initializers.normal(1e-6), ("in", "in", "embed")),
                        (1, cfg.num_registers, d), jnp.float32)
      tokens.append(jnp.broadcast_to(regs, (b, cfg.num_registers, d)).astype(dtype))
    tokens.append(x + patch_pos.astype(dtype))
    x = jnp.concatenate(tokens, axis=1)
    block = nn.remat(EncoderBlock) if cfg.remat else EncoderBlock
    for i in range(cfg.depth):
      x = block(cfg.num_heads, cfg.mlp_ratio, cfg.layer_scale_init, lora_rank=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha, lora_targets=tuple(cfg.lora_targets),
                implementation=cfg.attention_implementation, dtype=dtype,
                name=f"blocks_{i}")(x)
    x = layer_norm(dtype, "norm")(x)
    if cfg.freeze and cfg.lora_rank == 0:
      x = jax.lax.stop_gradient(x)
    return x


def num_tokens(cfg: ml_collections.ConfigDict) -> int:
  """Number of output tokens T for the configured image size."""
  return 1 + cfg.num_registers + (cfg.image_size // cfg.patch_size) ** 2


def trainable_mask(params: Any, cfg: ml_collections.ConfigDict) -> Any:
  """Bool pytree like the encoder's `params`: True where the optimizer may update.

  Not frozen: everything. Frozen: only LoRA adapters ('lora_a', 'lora_b').
  """
  if not cfg.freeze:
    return jax.tree.map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in path), params)
