r"""Trains the image-conditioned compositional DiT with rectified flow (moca_jax.dit_task).

  python -m experiments.train_dit --config=experiments/configs/dit.py:tiny \
      --config.data.dir=outputs/latents --config.vae.workdir=outputs/vae --workdir=outputs/dit

Writes under workdir: checkpoints/<step>/ (orbax; the stored config names the VAE for
generation), tb/ (TensorBoard), config.json, eval.json. A restarted job resumes from the
latest checkpoint, data order included; a config that differs from the stored one outside
the fields that may change on resume (moca_jax.checkpointing) is refused before anything is
written; a resume with another config exits with code 2 and one line, as do latent shards
made by another VAE than config.vae.workdir or of another vecset shape than the DiT's.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from data_pipeline import encode_latents
from moca_jax import checkpointing, dit_task


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config",
      "experiments/configs/dit.py:tiny",
      "DiT config file (:tiny | :small | :paper [,scene]).",
      lock_config=False,
  )
  flags.DEFINE_string("workdir", "outputs/dit", "Checkpoints, TensorBoard events, eval.json.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  try:
    dit_task.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (checkpointing.ConfigMismatchError, encode_latents.LatentsMismatchError) as e:
    # a resume with another config, or latents of another VAE: one line, nothing written
    print(f"train_dit: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
