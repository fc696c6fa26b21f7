"""Image preprocessing of the published image-to-3D pipelines (TripoSG, PartCrafter).

The image encoder (DINOv2-L/14) sees what the upstream pipelines feed it:

  TripoSG path ('triposg'; TripoSG's inference script, PartCrafter's with --rmbg):
    `prepare_image`: composite the straight-alpha image on white (float32), crop to the
    foreground's bounding box, pad to a square (10% margin, background value), then uint8 by
    truncation (`(x * 255).astype(uint8)`, as upstream: no rounding);
    then `BitImageProcessor`: shortest edge 256 (PIL bicubic), centre crop 224, rescale 1/255,
    ImageNet mean/std.
  PartCrafter default path ('raw'): the file's pixels go to the processor unchanged; its
    `convert('RGB')` (transformers 4.x) drops alpha, so the colour hidden under transparent
    pixels shows.

Every step reads its settings from the snapshot's `feature_extractor_dinov2/
preprocessor_config.json` (`ProcessorConfig.from_file`): BitImageProcessor's own defaults
(shortest edge 224, CLIP mean/std) differ from the DINOv2 ones, so nothing is defaulted
silently. The functions take the uint8 arrays of `moca_jax.io.load_image` ([H, W, 3], or
[H, W, 4] with `keep_alpha=True`) and return float32 [crop_h, crop_w, 3] (channels last, the
layout of `moca_jax.image_encoder.ImageEncoder`).

Foreground: with a usable alpha channel (TripoSG's rule: at least 1% of the pixels in the
lowest and in the highest of 20 alpha bins) the foreground is alpha > 0. Otherwise (no alpha,
as in most photos) this module does not run TripoSG's background-removal network; it takes the
background colour as the median of the border pixels and the foreground as every pixel that
differs from it by more than `tolerance` levels in some channel. No foreground (all white, one
flat colour, fully transparent) raises `NoForegroundError` unless `allow_empty`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                  5: "hamming"}
# TripoSG's prepare_image downsizes images whose long side exceeds this (before cropping).
MAX_SIDE = 2000


class NoForegroundError(ValueError):
  """The image has no foreground object (blank, one flat colour, or fully transparent)."""


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
  """The settings of a transformers `BitImageProcessor` (its preprocessor_config.json).

  Attributes:
    shortest_edge: resize so that the short side has this many pixels (long side truncated
      to int(shortest_edge * long / short)); None with do_resize False.
    resample: PIL resample code (3 = bicubic).
    crop_height, crop_width: centre crop.
    rescale_factor: multiplies the uint8 values (1/255).
    image_mean, image_std: per-channel normalisation.
  """
  do_resize: bool = True
  shortest_edge: Optional[int] = 256
  resample: int = 3
  do_center_crop: bool = True
  crop_height: int = 224
  crop_width: int = 224
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
  do_convert_rgb: bool = True

  @classmethod
  def from_dict(cls, d: dict, source: str = "preprocessor config") -> "ProcessorConfig":
    """From a preprocessor_config.json dict.

    Raises:
      ValueError: an unsupported resize (no 'shortest_edge'), resample code or missing
        mean/std, naming `source`.
    """
    size = d.get("size", {}) or {}
    if d.get("do_resize", True) and "shortest_edge" not in size:
      raise ValueError(f"{source}: only size={{'shortest_edge': N}} resizing is supported, "
                       f"got size={size}")
    resample = int(d.get("resample", 3))
    if resample not in RESAMPLE_NAMES:
      raise ValueError(f"{source}: unknown PIL resample code {resample}")
    crop = d.get("crop_size", {}) or {}
    if d.get("do_center_crop", True) and not {"height", "width"} <= set(crop):
      raise ValueError(f"{source}: crop_size must give height and width, got {crop}")
    for key in ("image_mean", "image_std"):
      if d.get("do_normalize", True) and len(d.get(key) or ()) != 3:
        raise ValueError(f"{source}: {key} must have 3 values, got {d.get(key)}")
    return cls(
        do_resize=bool(d.get("do_resize", True)),
        shortest_edge=int(size["shortest_edge"]) if "shortest_edge" in size else None,
        resample=resample,
        do_center_crop=bool(d.get("do_center_crop", True)),
        crop_height=int(crop.get("height", 0)), crop_width=int(crop.get("width", 0)),
        do_rescale=bool(d.get("do_rescale", True)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        do_normalize=bool(d.get("do_normalize", True)),
        image_mean=tuple(float(v) for v in d.get("image_mean") or (0.0,) * 3),
        image_std=tuple(float(v) for v in d.get("image_std") or (1.0,) * 3),
        do_convert_rgb=bool(d.get("do_convert_rgb", True)))

  @classmethod
  def from_file(cls, path: str) -> "ProcessorConfig":
    """Reads a preprocessor_config.json (FileNotFoundError / ValueError name the path)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such preprocessor config")
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not a JSON file ({e})") from e
    return cls.from_dict(d, source=path)


# ----------------------------------------------------------------------------------------
# BitImageProcessor (transformers 4.x, PIL)
# ----------------------------------------------------------------------------------------

def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """[H, W] / [H, W, 3] / [H, W, 4] uint8 -> [H, W, 3]; alpha is dropped (PIL convert('RGB'))."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
  if image.ndim == 2:
    return np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f"expected an image [H, W, 3 or 4], got shape {image.shape}")
  return image[..., :3]


def resize_shortest_edge(image: np.ndarray, shortest_edge: int, resample: int = 3) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 resized with PIL so that min(H', W') = shortest_edge and the
  long side is int(shortest_edge * long / short) (transformers' rule)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = image.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = shortest_edge, int(shortest_edge * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_h, new_w) == (h, w):
    return image
  pil = Image.fromarray(image).resize((new_w, new_h), resample=resample, reducing_gap=None)
  return np.asarray(pil, np.uint8)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] -> [height, width, C]: top = (H - height) // 2, left = (W - width) // 2; a side
  shorter than the crop is zero-padded around the image first (transformers' centre crop)."""
  h, w = image.shape[:2]
  if h < height or w < width:
    ph, pw = max(height - h, 0), max(width - w, 0)
    image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    h, w = image.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  return image[top:top + height, left:left + width]


def bit_image_processor(image: np.ndarray, config: ProcessorConfig) -> np.ndarray:
  """transformers' BitImageProcessor (4.x, PIL) on one uint8 image -> float32 [h, w, 3].

  Alpha, if present, is dropped (as its `convert('RGB')` does in transformers 4.x).
  """
  x = _as_rgb_uint8(image)
  if config.do_resize:
    x = resize_shortest_edge(x, config.shortest_edge, config.resample)
  if config.do_center_crop:
    x = center_crop(x, config.crop_height, config.crop_width)
  y = x.astype(np.float32)
  if config.do_rescale:
    y = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
  if config.do_normalize:
    y = (y - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std,
                                                                      np.float32)
  return y.astype(np.float32)


# ----------------------------------------------------------------------------------------
# TripoSG's prepare_image
# ----------------------------------------------------------------------------------------

def has_usable_alpha(alpha: np.ndarray, min_ratio: float = 0.01) -> bool:
  """TripoSG's test: >= min_ratio of the pixels in the lowest and in the highest of 20 equal
  bins of [0, 256) (alpha < 12.8 and alpha >= 243.2)."""
  alpha = np.asarray(alpha, np.float32)
  need = alpha.size * min_ratio
  return bool(np.sum(alpha < 12.8) >= need and np.sum(alpha >= 243.2) >= need)


def foreground_mask(image: np.ndarray, tolerance: int = 8) -> np.ndarray:
  """Boolean [H, W] foreground of a uint8 [H, W, 3|4] image (see the module docstring).

  With a usable alpha channel: alpha > 0. Otherwise: pixels whose colour (composited on
  white when there is an alpha channel) differs from the median border colour by more than
  `tolerance` levels in some channel.
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 4:
    alpha = image[..., 3]
    if has_usable_alpha(alpha):
      return alpha > 0
    rgb = composite(image, (1.0, 1.0, 1.0))
    rgb = (rgb * 255).astype(np.uint8)
  else:
    rgb = _as_rgb_uint8(image)
  border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
  background = np.median(border.astype(np.float32), axis=0)
  return np.max(np.abs(rgb.astype(np.float32) - background), axis=-1) > tolerance


def composite(image: np.ndarray, bg_color: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
  """uint8 [H, W, 3|4] (straight alpha) -> float32 [H, W, 3] in [0, 1]: rgb * a + bg * (1 - a),
  computed in float32 as TripoSG does (rgb / 255, alpha / 255)."""
  image = np.asarray(image)
  rgb = _as_rgb_uint8(image).astype(np.float32) / np.float32(255.0)
  if image.ndim != 3 or image.shape[-1] != 4:
    return rgb
  a = (image[..., 3:].astype(np.float32) / np.float32(255.0))
  bg = np.asarray(bg_color, np.float32)
  return rgb * a + bg * (np.float32(1.0) - a)


def _limit_size(image: np.ndarray) -> np.ndarray:
  """Downsizes an image whose long side exceeds MAX_SIDE (TripoSG does this with OpenCV's
  area filter before everything else; here PIL's box filter, the same average for integer
  factors)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = image.shape[:2]
  scale = MAX_SIDE / max(h, w)
  if scale >= 1:
    return image
  size = (int(w * scale), int(h * scale))
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.BOX),
                    np.uint8)


def prepare_image_float(image: np.ndarray, bg_color: Sequence[float] = (1.0, 1.0, 1.0),
                        padding_ratio: float = 0.1, tolerance: int = 8,
                        allow_empty: bool = False) -> np.ndarray:
  """TripoSG's `load_image` (scripts/image_process.py): uint8 [H, W, 3|4] -> float32
  [H', W', 3] in [0, 1], about square.

  Composite on `bg_color`, crop to the foreground's bounding box (x, y, w, h), pad by
  p = int(max(w, h) * padding_ratio) on the long axis and int(p + |w - h| / 2) on the short
  one (value bg_color[0]).

  Raises:
    NoForegroundError: nothing differs from the background (unless allow_empty, which keeps
      the whole image as the box).
    ValueError: not a uint8 [H, W, 3|4] image.
  """
  image = _limit_size(np.asarray(image))
  mask = foreground_mask(image, tolerance)
  if not mask.any():
    if not allow_empty:
      raise NoForegroundError("no foreground in the image (blank, one flat colour or fully "
                              "transparent); pass allow_empty to use it anyway")
    mask = np.ones_like(mask)
  rows, cols = np.nonzero(mask)
  y, x = int(rows.min()), int(cols.min())
  h, w = int(rows.max()) - y + 1, int(cols.max()) - x + 1
  rgb = composite(image, bg_color)[y:y + h, x:x + w]
  if w > h:
    pad_x = int(w * padding_ratio)
    pad_y = int(pad_x + (w - h) / 2)
  else:
    pad_y = int(h * padding_ratio)
    pad_x = int(pad_y + (h - w) / 2)
  return np.pad(rgb, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)),
                constant_values=np.float32(bg_color[0]))


def prepare_image(image: np.ndarray, bg_color: Sequence[float] = (1.0, 1.0, 1.0),
                  padding_ratio: float = 0.1, tolerance: int = 8,
                  allow_empty: bool = False) -> np.ndarray:
  """TripoSG's `prepare_image`: `prepare_image_float` then uint8 by truncation
  (`(x * 255).astype(uint8)`, no rounding) -> uint8 [H', W', 3]."""
  padded = prepare_image_float(image, bg_color, padding_ratio, tolerance, allow_empty)
  return (padded * np.float32(255)).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Entry points used by generation
# ----------------------------------------------------------------------------------------

PATHS = ("triposg", "raw")


def preprocess(image: np.ndarray, config: ProcessorConfig, path: str = "triposg", *,
               allow_empty: bool = False) -> np.ndarray:
  """One uint8 image [H, W, 3|4] (from `io.load_image`) -> float32 [crop_h, crop_w, 3].

  Args:
    image: straight-alpha RGBA or RGB uint8.
    config: the processor settings (`ProcessorConfig.from_file`).
    path: 'triposg' (composite on white, crop to the foreground, pad to a square, then the
      processor: nothing is stretched) or 'raw' (PartCrafter's default: the pixels straight
      to the processor, alpha dropped; no foreground check).
    allow_empty: 'triposg' only: accept an image with no foreground.
  Raises:
    NoForegroundError, ValueError (bad path or image).
  """
  if path == "triposg":
    return bit_image_processor(prepare_image(image, allow_empty=allow_empty), config)
  if path == "raw":
    return bit_image_processor(image, config)
  raise ValueError(f"unknown preprocessing path {path!r}; expected one of {PATHS}")


def preprocess_batch(images: Sequence[np.ndarray], config: ProcessorConfig,
                     path: str = "triposg", *, allow_empty: bool = False) -> np.ndarray:
  """`preprocess` over a list of images -> float32 [B, crop_h, crop_w, 3]."""
  return np.stack([preprocess(im, config, path, allow_empty=allow_empty) for im in images])
