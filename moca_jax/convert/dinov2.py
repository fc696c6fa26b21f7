"""DINOv2 (transformers `Dinov2Model`, 4.x state-dict names) -> `moca_jax.image_encoder`.

Mapping (torch Linear weight [out, in] -> kernel [in, out]):
  embeddings.cls_token [1, 1, D]                     cls_token
  embeddings.position_embeddings [1, 1 + G*G, D]     pos_embed (G = 518 // 14 = 37)
  embeddings.patch_embeddings.projection [D, C, p, p] patch_embed kernel [p, p, C, D]
  embeddings.mask_token                              read and dropped: it only replaces
                                                     masked patches in DINOv2's training
  encoder.layer.i.norm1 / norm2                      blocks_i/norm1 / norm2
  encoder.layer.i.attention.attention.{query,key,value}  blocks_i/qkv (kernel columns
                                                     [q | k | v], each split into heads in
                                                     order, as Dinov2SelfAttention does)
  encoder.layer.i.attention.output.dense             blocks_i/proj
  encoder.layer.i.layer_scale{1,2}.lambda1           blocks_i/ls{1,2}/gamma
  encoder.layer.i.mlp.fc1 / fc2                      blocks_i/fc1 / fc2
  layernorm                                          norm
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moca_jax import image_encoder
from moca_jax.convert.common import (ConversionError, TensorMap, nest, read_component,
                                     read_fixture_io)

CLASS_NAMES = ("Dinov2Model",)


def convert(tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict,
            source: str = "DINOv2") -> dict:
  """Upstream state dict -> ImageEncoder params tree.

  Raises:
    ConversionError: missing / unmapped tensors or a shape mismatch (named).
  """
  c = config
  if c.in_channels != 3 or c.num_registers or c.lora_rank:
    raise ConversionError(f"{source}: DINOv2 import needs in_channels=3, no registers and no "
                          "LoRA in the target config")
  tm = TensorMap(tensors, source)
  d, p = c.width, c.patch_size
  grid = c.pos_image_size // p
  hidden = int(d * c.mlp_ratio)
  out: dict[str, np.ndarray] = {
      "cls_token": tm.take("embeddings.cls_token", (1, 1, d)),
      "pos_embed": tm.take("embeddings.position_embeddings", (1, 1 + grid * grid, d)),
      "patch_embed/kernel": tm.take("embeddings.patch_embeddings.projection.weight",
                                    (d, 3, p, p)).transpose(2, 3, 1, 0),
      "patch_embed/bias": tm.take("embeddings.patch_embeddings.projection.bias", (d,)),
      "norm/scale": tm.take("layernorm.weight", (d,)),
      "norm/bias": tm.take("layernorm.bias", (d,)),
  }
  tm.take("embeddings.mask_token", (1, d))
  for i in range(c.depth):
    src, dst = f"encoder.layer.{i}", f"blocks_{i}"
    for n in ("norm1", "norm2"):
      out[f"{dst}/{n}/scale"] = tm.take(f"{src}.{n}.weight", (d,))
      out[f"{dst}/{n}/bias"] = tm.take(f"{src}.{n}.bias", (d,))
    att = f"{src}.attention.attention"
    out[f"{dst}/qkv/kernel"] = np.concatenate(
        [tm.take(f"{att}.{n}.weight", (d, d)).T for n in ("query", "key", "value")], axis=1)
    out[f"{dst}/qkv/bias"] = np.concatenate(
        [tm.take(f"{att}.{n}.bias", (d,)) for n in ("query", "key", "value")])
    out[f"{dst}/proj/kernel"] = tm.take(f"{src}.attention.output.dense.weight", (d, d)).T
    out[f"{dst}/proj/bias"] = tm.take(f"{src}.attention.output.dense.bias", (d,))
    for k in (1, 2):
      out[f"{dst}/ls{k}/gamma"] = tm.take(f"{src}.layer_scale{k}.lambda1", (d,))
    out[f"{dst}/fc1/kernel"] = tm.take(f"{src}.mlp.fc1.weight", (hidden, d)).T
    out[f"{dst}/fc1/bias"] = tm.take(f"{src}.mlp.fc1.bias", (hidden,))
    out[f"{dst}/fc2/kernel"] = tm.take(f"{src}.mlp.fc2.weight", (d, hidden)).T
    out[f"{dst}/fc2/bias"] = tm.take(f"{src}.mlp.fc2.bias", (d,))
  tm.finish()
  return nest(out)


def load(folder: str, image_size: int = 224) -> tuple[ml_collections.ConfigDict, dict]:
  """A DINOv2 folder (`image_encoder_dinov2/`) -> (ImageEncoder config, {'params': ...}).

  Raises:
    ConversionError: unreadable folder, wrong class, unsupported variant, tensor problems.
  """
  upstream, tensors = read_component(folder, CLASS_NAMES)
  try:
    config = image_encoder.encoder_config_from_dinov2(upstream, image_size=image_size)
  except ValueError as e:
    raise ConversionError(f"{os.path.join(folder, 'config.json')}: {e}") from e
  params = convert(tensors, config, source=folder)
  return config, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


def parity(fixture_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Runs the converted fixture encoder on `dinov2/io.npz:pixel_values` (NCHW).

  Returns:
    {array name: (ours, reference)} for every stored output (debug arrays included).
  """
  io = read_fixture_io(fixture_dir)
  pixels = io["pixel_values"]
  config, variables = load(fixture_dir, image_size=pixels.shape[-1])
  model = image_encoder.ImageEncoder(config)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  run = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                         mutable=["intermediates"]))
  tokens, state = run(variables, images)
  inter = state["intermediates"]
  got = {"last_hidden_state": tokens, "pooler_output": tokens[:, 0],
         "dbg_pos_embed_interpolated": inter["pos_embed"][0],
         "dbg_embeddings_out": inter["embeddings"][0]}
  for i in range(config.depth):
    got[f"dbg_layer{i}_out"] = inter[f"blocks_{i}"]["__call__"][0]
  missing = sorted(set(io) - {"pixel_values"} - set(got))
  if missing:
    raise ConversionError(f"{fixture_dir}: no comparison for stored arrays {missing}")
  return {name: (np.asarray(v, np.float32), io[name]) for name, v in got.items()}
