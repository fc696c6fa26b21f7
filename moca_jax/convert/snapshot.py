"""A published TripoSG / PartCrafter snapshot folder -> this project's checkpoint.

A snapshot is laid out as published on the Hugging Face hub (VAST-AI/TripoSG,
wgsxm/PartCrafter), one folder per component:
  transformer/               config.json + *.safetensors  (TripoSGDiTModel / PartCrafterDiTModel)
  vae/                       config.json + *.safetensors  (TripoSGVAEModel)
  image_encoder_dinov2/      config.json + *.safetensors  (transformers Dinov2Model)
  feature_extractor_dinov2/  preprocessor_config.json     (BitImageProcessor settings)
  scheduler/                 scheduler_config.json        (RectifiedFlowScheduler)
`read_snapshot` converts every component (all checks, one ConversionError naming the folder
and reason); `write_checkpoint` writes the result where this project's generation looks for a
trained model (the one place to re-point when the checkpoint layout moves).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import shutil
from typing import Any, Callable, Optional

import jax.numpy as jnp
import ml_collections

from moca_jax import io as io_lib
from moca_jax import preprocess
from moca_jax.convert import dinov2, scheduler, triposg_dit, triposg_vae
from moca_jax.convert.common import ConversionError

SOURCES = {"triposg": triposg_dit.TRIPOSG_CLASSES, "partcrafter": triposg_dit.PARTCRAFTER_CLASSES}
COMPONENTS = ("transformer", "vae", "image_encoder_dinov2", "feature_extractor_dinov2",
              "scheduler")
WEIGHT_COMPONENTS = ("transformer", "vae", "image_encoder_dinov2")
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass
class ImportedModel:
  """Every component of a snapshot in this project's layout.

  dit_params / encoder_params / vae_params are {'params': ...} trees of jnp arrays for
  `dit.CompositionalDiT`, `image_encoder.ImageEncoder`, `vae.VecSetVAE`.
  """
  source: str
  dit_config: ml_collections.ConfigDict
  dit_params: dict
  encoder_config: ml_collections.ConfigDict
  encoder_params: dict
  vae_config: ml_collections.ConfigDict
  vae_params: dict
  processor: preprocess.ProcessorConfig
  processor_json: str
  scheduler: dict


def weight_bytes(path: str) -> int:
  """Total size of the snapshot's *.safetensors files (for a progress bar)."""
  return sum(os.path.getsize(f) for c in WEIGHT_COMPONENTS
             for f in glob.glob(os.path.join(path, c, "*.safetensors")))


def read_snapshot(path: str, source: str,
                  progress: Optional[Callable[[str, int], Any]] = None) -> ImportedModel:
  """Reads and converts a snapshot folder.

  Args:
    path: the snapshot root (folders in the module docstring).
    source: 'triposg' or 'partcrafter' (the transformer class that is accepted).
    progress: called as progress(component, bytes of its weight files) after each component.
  Raises:
    ConversionError: a missing folder or file, an unknown class, a missing / unmapped / wrongly
      shaped tensor, a non-float dtype, or components that do not fit together (all named).
  """
  if source not in SOURCES:
    raise ConversionError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such snapshot folder")
  missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
  if missing:
    raise ConversionError(f"{path}: missing component folders: {', '.join(missing)}")
  done = progress or (lambda component, size: None)
  folder = lambda c: os.path.join(path, c)
  size = lambda c: sum(os.path.getsize(f) for f in glob.glob(os.path.join(folder(c), "*.safetensors")))

  processor_path = os.path.join(folder("feature_extractor_dinov2"), PREPROCESSOR_FILE)
  try:
    processor = preprocess.ProcessorConfig.from_file(processor_path)
  except (OSError, ValueError) as e:
    raise ConversionError(str(e)) from e
  with open(processor_path, encoding="utf-8") as f:
    processor_json = f.read()
  if processor.crop_height != processor.crop_width or not processor.do_center_crop:
    raise ConversionError(f"{processor_path}: the image encoder needs a square centre crop, "
                          f"got {processor.crop_height} x {processor.crop_width}")
  sched = scheduler.load(folder("scheduler"))
  done("scheduler", 0)

  dit_config, dit_params = triposg_dit.load(folder("transformer"), expected_classes=SOURCES[source])
  done("transformer", size("transformer"))
  vae_config, vae_params = triposg_vae.load(folder("vae"), num_latents=dit_config.latent_tokens)
  done("vae", size("vae"))
  encoder_config, encoder_params = dinov2.load(folder("image_encoder_dinov2"),
                                               image_size=processor.crop_height)
  done("image_encoder_dinov2", size("image_encoder_dinov2"))

  if dit_config.cond_dim != encoder_config.width:
    raise ConversionError(
        f"{path}: transformer cross_attention_dim {dit_config.cond_dim} does not match the "
        f"image encoder's hidden_size {encoder_config.width}")
  if dit_config.latent_channels != vae_config.latent_channels:
    raise ConversionError(
        f"{path}: transformer in_channels {dit_config.latent_channels} does not match the "
        f"VAE's latent_channels {vae_config.latent_channels}")
  return ImportedModel(source, dit_config, dit_params, encoder_config, encoder_params,
                       vae_config, vae_params, processor, processor_json, sched)


def write_checkpoint(out_dir: str, config: ml_collections.ConfigDict, imported: ImportedModel
                     ) -> str:
  """Writes `imported` as a train_dit workdir at `out_dir` (its VAE as a train_vae workdir in
  `out_dir/vae`), atomically: built in a temporary folder next to `out_dir`, renamed at the end;
  nothing is left on failure.

  Layout (what `experiments.generate.load_generator` and `train_lib.read_checkpoint_config` /
  `restore_params` read): checkpoints/0 with items 'state' (params, no optimizer state),
  'ema' (the same params: {'encoder': ..., 'dit': ...}), 'data' (none), 'config' (`config`,
  whose vae.workdir must name `out_dir/vae`); vae/checkpoints/0 likewise with the VecSetVAE
  params and {'model': vae config}; plus the snapshot's preprocessor_config.json.

  Raises:
    FileExistsError: `out_dir` exists and is not empty.
  """
  from moca_jax import train_lib  # pylint: disable=import-outside-toplevel

  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise FileExistsError(f"{out_dir}: exists and is not empty")
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty: replaced by the finished folder

  def save(directory, params, cfg):
    state = train_lib.TrainState(step=jnp.int32(0), params=params, opt_state={},
                                 ema_params=params)
    ckpt = train_lib.Checkpointer(os.path.join(directory, "checkpoints"), save_every=1, keep=1,
                                  async_save=False)
    ckpt.save(0, state, None, cfg, force=True)
    ckpt.close()

  with io_lib.atomic_path(out_dir) as tmp:
    try:
      dit = {"encoder": imported.encoder_params["params"], "dit": imported.dit_params["params"]}
      save(tmp, dit, config)
      save(os.path.join(tmp, "vae"), imported.vae_params["params"],
           ml_collections.ConfigDict({"model": imported.vae_config.to_dict()}))
      io_lib.atomic_write_text(os.path.join(tmp, PREPROCESSOR_FILE), imported.processor_json)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)  # atomic_path removes files, not folders
      raise
  return out_dir
