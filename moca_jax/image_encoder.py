"""Image encoder: a ViT with the DINOv2 layout, so DINOv2 weights can be imported later.

Layout (names follow DINOv2's modules so a converter is a renaming):
  patch_embed   Conv 14x14 stride 14, in_channels -> D (kernel [14, 14, C_in, D], bias)
  cls_token     [1, 1, D];  register_tokens [1, R, D] (optional, R = num_registers)
  pos_embed     [1, 1 + G*G, D] for the grid G = pos_image_size // 14 (CLS + patches;
                registers carry no position, as in DINOv2-reg); when the input grid differs
                the patch part is resized with torch's bicubic (Keys a = -0.75,
                align_corners off, size-based, fp32, no antialias), exactly as transformers'
                `Dinov2Embeddings.interpolate_pos_encoding` does (`bicubic_resize_torch`)
  blocks_i      x += ls1 * attn(norm1(x));  x += ls2 * mlp(norm2(x))
                attn: fused qkv (with bias) -> [B, T, 3, H, d] -> attention -> proj
                mlp: fc1 -> exact GELU -> fc2;  ls1/ls2: layer scale 'gamma' [D]
  norm          final LayerNorm (all LayerNorms use config.norm_eps, 1e-6 as in DINOv2)
Output: tokens [B, 1 + R + g*g, D] (CLS, registers, patches; g = input size // 14), all normed:
the `last_hidden_state` of transformers' Dinov2Model. Size 'dinov2-large' (or
`encoder_config_from_dinov2` on a transformers config.json) is the published DINOv2-L/14 fed
224 x 224 crops, the image encoder of TripoSG and PartCrafter; its weights are imported by
`moca_jax.convert.dinov2`.

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

from moca_jax.layers import attention

Array = jax.Array

PATCH = 14
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def encoder_config(size: str = "tiny", in_channels: int = 3) -> ml_collections.ConfigDict:
  """Named sizes: 'tiny' (tests, CPU demo), 'small' (ViT-S/14), 'bundle' (the bundled model:
  ViT 192 wide, 6 blocks, 112 x 112 input), 'large' (ViT-L/14, DINOv2-L
  shape with its position table at 224), 'dinov2-large' (the published DINOv2-L/14: position
  table for 518 x 518, fed 224 x 224, layer scale 1.0 at init)."""
  sizes = {
      #               width depth heads image pos_image registers layer_scale
      "tiny": (64, 2, 2, 56, 56, 0, 0.1),
      "small": (384, 12, 6, 224, 224, 0, 1e-5),
      # trained from scratch: CaiT's 0.1 for shallow stacks (Touvron et al. 2021); at 1e-5
      # the residual branches of the first bundle stayed near 0.005 after 16k steps
      "bundle": (192, 6, 3, 112, 112, 0, 0.1),
      "large": (1024, 24, 16, 224, 224, 0, 1e-5),
      "dinov2-large": (1024, 24, 16, 224, 518, 0, 1.0),
  }
  if size not in sizes:
    raise ValueError(f"encoder_config: unknown size {size!r}; expected one of {sorted(sizes)}")
  width, depth, heads, image, pos_image, regs, ls = sizes[size]
  return ml_collections.ConfigDict(dict(
      size=size, width=width, depth=depth, num_heads=heads, mlp_ratio=4.0, patch_size=PATCH,
      image_size=image, pos_image_size=pos_image, num_registers=regs, layer_scale_init=ls,
      norm_eps=1e-6, in_channels=in_channels, lora_rank=0, lora_alpha=16.0,
      lora_targets=("qkv", "proj"), freeze=False, remat=False, dtype="float32",
      attention_implementation="xla"))


def encoder_config_from_dinov2(hf_config: dict, image_size: int = 224,
                               in_channels: int = 3) -> ml_collections.ConfigDict:
  """The config of a transformers `Dinov2Model` config.json (e.g. the pipelines'
  `image_encoder_dinov2/config.json`), fed `image_size` x `image_size` images.

  Raises:
    ValueError: a variant this module does not implement (SwiGLU FFN, an activation other
      than exact GELU, a patch size other than 14, no q/k/v bias) or bad sizes.
  """
  get = hf_config.get
  if get("use_swiglu_ffn", False):
    raise ValueError("DINOv2 with use_swiglu_ffn=True (ViT-g) is not supported")
  if get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"DINOv2 hidden_act {get('hidden_act')!r} is not supported (only 'gelu')")
  if get("patch_size", PATCH) != PATCH:
    raise ValueError(f"DINOv2 patch_size must be {PATCH}, got {get('patch_size')}")
  if not get("qkv_bias", True):
    raise ValueError("DINOv2 with qkv_bias=False is not supported")
  width, heads = int(get("hidden_size", 768)), int(get("num_attention_heads", 12))
  if width % heads:
    raise ValueError(f"DINOv2 hidden_size {width} is not divisible by {heads} heads")
  if image_size % PATCH:
    raise ValueError(f"image_size must be a multiple of {PATCH}, got {image_size}")
  c = encoder_config("dinov2-large", in_channels=in_channels)
  c.size = "dinov2"
  c.width, c.num_heads = width, heads
  c.depth = int(get("num_hidden_layers", 12))
  c.mlp_ratio = float(get("mlp_ratio", 4))
  c.pos_image_size = int(get("image_size", 518))
  c.image_size = int(image_size)
  c.layer_scale_init = float(get("layerscale_value", 1.0))
  c.norm_eps = float(get("layer_norm_eps", 1e-6))
  return c


# ----------------------------------------------------------------------------------------
# Torch-compatible bicubic resize (position-embedding interpolation)
# ----------------------------------------------------------------------------------------

def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a` (torch uses a = -0.75)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights_torch(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] float32 matrix of `torch.nn.functional.interpolate(mode='bicubic',
  align_corners=False, size=...)` along one axis (no antialias).

  Output sample o reads source position (o + 0.5) * in/out - 0.5 (not clamped), its 4
  neighbours floor-1 .. floor+2 with indices clamped to the border, weighted by the Keys
  kernel. (jax.image.resize's 'bicubic' uses a = -0.5 and other border handling.)
  """
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k in range(-1, 3):
    idx = np.clip(base.astype(np.int64) + k, 0, in_size - 1)
    np.add.at(w, (rows, idx), _keys_cubic(t - k, a))
  return w.astype(np.float32)


def bicubic_resize_torch(grid: Array, out_hw: tuple[int, int]) -> Array:
  """Resizes grid [..., H, W, D] to [..., out_h, out_w, D] like torch's bicubic interpolate
  (align_corners off, size-based, fp32 math)."""
  h, w = grid.shape[-3], grid.shape[-2]
  wh = jnp.asarray(bicubic_weights_torch(h, out_hw[0]))
  ww = jnp.asarray(bicubic_weights_torch(w, out_hw[1]))
  g = grid.astype(jnp.float32)
  g = jnp.einsum("oh,...hwd->...owd", wh, g, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,...owd->...opd", ww, g, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------

def preprocess(images: Array, image_size: int, in_channels: int = 3) -> Array:
  """uint8 (or [0, 1] float) images [B, H, W, C] -> float32 [B, S, S, C] for the encoder.

  A non-square batch is first padded to a square (centred; white for the RGB channels, 0 for
  a mask channel) so nothing is stretched; then bilinear resize to S = image_size; RGB
  triples normalised with the ImageNet statistics; for C = 7 the last channel is a mask and
  is thresholded to {0, 1}. (The published pipelines' exact preprocessing, with the crop to
  the foreground, is `moca_jax.preprocess`.)
  """
  if images.ndim != 4 or images.shape[-1] != in_channels:
    raise ValueError(f"preprocess: expected images [B, H, W, {in_channels}], got {images.shape}")
  x = jnp.asarray(images, jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = x / 255.0
  h, w = x.shape[1:3]
  if h != w:
    side = max(h, w)
    pads = ((0, 0), ((side - h) // 2, side - h - (side - h) // 2),
            ((side - w) // 2, side - w - (side - w) // 2))
    rgb = 3 * (in_channels // 3)
    parts = [jnp.pad(x[..., :rgb], pads + ((0, 0),), constant_values=1.0)]
    if in_channels > rgb:
      parts.append(jnp.pad(x[..., rgb:], pads + ((0, 0),), constant_values=0.0))
    x = jnp.concatenate(parts, axis=-1)
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
  mask = jnp.broadcast_to((jnp.arange(t + 1) < t)[None, None, None, :],
                          (q.shape[0], 1, t + 1, t + 1))
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


def _layer_norm(dtype: Any, eps: float, name: str) -> nn.LayerNorm:
  """LayerNorm with learned scale and bias (fp32 params, axis 'embed')."""
  part = nn.with_logical_partitioning
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, epsilon=eps,
                      scale_init=part(nn.initializers.ones_init(), ("embed",)),
                      bias_init=part(nn.initializers.zeros_init(), ("embed",)), name=name)


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
  norm_eps: float = 1e-6

  def _dense(self, features, axes, name):
    rank = self.lora_rank if name in self.lora_targets else 0
    return LoRADense(features, axes, rank=rank, alpha=self.lora_alpha, dtype=self.dtype,
                     name=name)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, d = x.shape
    h = self.num_heads
    y = _layer_norm(self.dtype, self.norm_eps, "norm1")(x)
    qkv = self._dense(3 * d, ("embed", "heads"), "qkv")(y).reshape(b, t, 3, h, d // h)
    out = encoder_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.implementation)
    y = self._dense(d, ("heads", "embed"), "proj")(out.reshape(b, t, d))
    x = x + LayerScale(self.layer_scale_init, name="ls1")(y)
    y = _layer_norm(self.dtype, self.norm_eps, "norm2")(x)
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
    grid = cfg.get("pos_image_size", cfg.image_size) // p
    pos = self.param("pos_embed", part(nn.initializers.normal(0.02), ("in", "in", "embed")),
                     (1, 1 + grid * grid, d), jnp.float32)
    cls = self.param("cls_token", part(nn.initializers.normal(1e-6), ("in", "in", "embed")),
                     (1, 1, d), jnp.float32)
    patch_pos = pos[:, 1:]
    if (gh, gw) != (grid, grid):
      patch_pos = bicubic_resize_torch(patch_pos.reshape(1, grid, grid, d),
                                       (gh, gw)).reshape(1, gh * gw, d)
    tokens = [jnp.broadcast_to(cls + pos[:, :1], (b, 1, d)).astype(dtype)]
    if cfg.num_registers:
      regs = self.param("register_tokens",
                        part(nn.initializers.normal(1e-6), ("in", "in", "embed")),
                        (1, cfg.num_registers, d), jnp.float32)
      tokens.append(jnp.broadcast_to(regs, (b, cfg.num_registers, d)).astype(dtype))
    tokens.append(x + patch_pos.astype(dtype))
    x = jnp.concatenate(tokens, axis=1)
    self.sow("intermediates", "pos_embed", jnp.concatenate([pos[:, :1], patch_pos], axis=1))
    self.sow("intermediates", "embeddings", x)
    block = nn.remat(EncoderBlock) if cfg.remat else EncoderBlock
    for i in range(cfg.depth):
      x = block(cfg.num_heads, cfg.mlp_ratio, cfg.layer_scale_init, lora_rank=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha, lora_targets=tuple(cfg.lora_targets),
                implementation=cfg.attention_implementation, dtype=dtype,
                norm_eps=cfg.get("norm_eps", 1e-6), name=f"blocks_{i}")(x)
    x = _layer_norm(dtype, cfg.get("norm_eps", 1e-6), "norm")(x)
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


def token_spread(tokens: Array) -> Array:
  """How much condition tokens depend on the image: for tokens [B, T, D] (or [B, N, T, D]) of
  B different images, the root of the summed per-channel variance over the images, averaged
  over token positions, relative to the mean token norm. A scalar.

  0 when the encoder's output does not depend on its input (a collapsed encoder). On 16
  held-out procedural renders: 0.43 for a freshly initialised 'bundle' encoder, 0.36 for
  the bundled model's (2026-12-01). Needs B >= 2.
  """
  if tokens.shape[0] < 2:
    raise ValueError(f"token_spread: needs at least 2 images, got {tokens.shape[0]}")
  x = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).astype(jnp.float32)
  spread = jnp.sqrt(jnp.sum(jnp.var(x, axis=0), axis=-1)).mean()
  return spread / jnp.maximum(jnp.linalg.norm(x, axis=-1).mean(), 1e-12)
