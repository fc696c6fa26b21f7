r"""Imports a published TripoSG or PartCrafter snapshot as this project's checkpoint.

  python -m experiments.import_weights --source=partcrafter --path=PartCrafter \
      --out=outputs/partcrafter
  python -m experiments.import_weights --source=triposg --path=TripoSG --out=outputs/triposg

--path is a local snapshot laid out as published (VAST-AI/TripoSG, wgsxm/PartCrafter on the
Hugging Face hub): transformer/, vae/, image_encoder_dinov2/ (config.json + *.safetensors),
feature_extractor_dinov2/preprocessor_config.json, scheduler/scheduler_config.json. The
weights are read with numpy (no torch). --out becomes a train_dit workdir (its VAE in
--out/vae) that `experiments.generate --checkpoint=OUT` loads like a trained model.

Exit codes: 0 imported; 2 bad arguments or a snapshot that cannot be imported (one line
naming the folder or file and the reason; nothing is written).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

from absl import flags, logging

from moca_jax import cli
import ml_collections
from tqdm import tqdm

from moca_jax.convert import snapshot
from moca_jax.convert.common import ConversionError

FLAGS = flags.FLAGS


def build_config(imported: snapshot.ImportedModel, out_dir: str, path: str
                 ) -> ml_collections.ConfigDict:
  """The train_dit config stored with the checkpoint: the paper-size run config with the
  imported DiT, encoder, VAE location, sampler settings and provenance."""
  from experiments.configs.dit import get_config  # pylint: disable=import-outside-toplevel
  c = get_config("paper")
  c.size = imported.source
  c.model.encoder = imported.encoder_config
  c.model.dit = imported.dit_config
  c.vae = ml_collections.ConfigDict(dict(workdir=os.path.join(os.path.abspath(out_dir), "vae"),
                                         size=imported.source))
  c.sample.time_shift = imported.scheduler["time_shift"]
  c.data.max_components = max(imported.dit_config.id_codebook, 1)
  processor = dataclasses.asdict(imported.processor)
  # TripoSG's pipeline composites on white and crops; PartCrafter's default passes the pixels.
  processor["path"] = "triposg" if imported.source == "triposg" else "raw"
  c.preprocess = ml_collections.ConfigDict(processor)
  c.imported_from = ml_collections.ConfigDict(dict(source=imported.source,
                                                   path=os.path.abspath(path)))
  return c


def run(source: str, path: str, out: str, progress: bool = True,
        latent_tokens: Optional[int] = None) -> str:
  """Imports `path` into `out`; returns `out`. Raises ConversionError / FileExistsError."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"{out}: exists and is not empty")
  bar = tqdm(total=snapshot.weight_bytes(path) if os.path.isdir(path) else 0, unit="B",
             unit_scale=True, desc=f"import {source}", disable=not progress)
  with bar:
    def done(component, size):
      bar.set_postfix_str(component)
      bar.update(size)
    imported = snapshot.read_snapshot(path, source, progress=done, latent_tokens=latent_tokens)
    bar.set_postfix_str("writing checkpoint")
    return snapshot.write_checkpoint(out, build_config(imported, out, path), imported)


def main(argv) -> Optional[int]:
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if len(argv) > 1:
    print(f"import_weights: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  missing = [n for n in ("source", "path", "out") if not getattr(FLAGS, n)]
  if missing:
    print(f"import_weights: error: missing --{', --'.join(missing)}", file=sys.stderr)
    return 2
  if FLAGS.source not in snapshot.SOURCES:
    print(f"import_weights: error: --source={FLAGS.source!r} is not one of "
          f"{', '.join(snapshot.SOURCES)}", file=sys.stderr)
    return 2
  try:
    out = run(FLAGS.source, FLAGS.path, FLAGS.out, progress=FLAGS.progress,
              latent_tokens=FLAGS.latent_tokens)
  except (ConversionError, FileExistsError) as e:
    print(f"import_weights: error: {e}", file=sys.stderr)
    return 2
  print(f"imported {FLAGS.source} from {os.path.abspath(FLAGS.path)} into {out}")
  return 0


def _define_flags():
  flags.DEFINE_string("source", None, "Which published model: triposg or partcrafter.")
  flags.DEFINE_string("path", None, "Local snapshot folder (transformer/, vae/, ...).")
  flags.DEFINE_string("out", None, "Output checkpoint folder (must not exist or be empty).")
  flags.DEFINE_bool("progress", True, "Show a progress bar over the weight files.")
  flags.DEFINE_integer("latent_tokens", None, "Vecset tokens per part to generate (default: "
                       "the upstream pipeline's, 2048 TripoSG, 1024 PartCrafter).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
