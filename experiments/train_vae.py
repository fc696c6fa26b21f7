r"""Trains the vecset VAE (moca_jax.vae_task) on `train_lib.run_training`.

  python -m experiments.train_vae --config=experiments/configs/vae.py:tiny --workdir=outputs/vae
  python -m experiments.train_vae --config=experiments/configs/vae.py:tiny \
      --config.data.source=records --config.data.dir=outputs/data/tiny --workdir=outputs/vae

Writes under workdir: checkpoints/<step>/ (orbax), tb/, config.json, metrics.jsonl,
loss_curve.png, eval.json (IoU / Chamfer by part size), reconstruction.glb / .png; with
--report also <report>.md / .json. A restarted job resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from moca_jax import cli
from data_pipeline import loader
from moca_jax import checkpointing, vae_task


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", "experiments/configs/vae.py:tiny", "VAE training config.", lock_config=False
  )
  flags.DEFINE_string("workdir", "outputs/vae", "Where checkpoints, metrics and meshes go.")
  flags.DEFINE_string(
      "report",
      "",
      "If set, a path stem for the by-part-size report "
      "(.md and .json), e.g. experiments/results/vae_eval_by_size.",
  )


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  try:
    result = vae_task.train_and_evaluate(f.config, f.workdir)
  except (checkpointing.ConfigMismatchError, loader.EmptyDataError) as e:
    # a resume with another config, or training data that give no batch: one line
    print(f"train_vae: error: {e}", file=sys.stderr)
    sys.exit(2)
  if f.report:
    vae_task.write_eval_report(f.report, result, f.config, f.workdir)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
