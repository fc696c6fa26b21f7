r"""Trains the image-conditioned compositional DiT with rectified flow (moca_jax.dit_task).

  python -m experiments.train_dit --config=experiments/configs/dit.py:tiny \
      --config.data.dir=outputs/latents --config.vae.workdir=outputs/vae --workdir=outputs/dit

Writes under workdir: checkpoints/<step>/ (orbax; the stored config names the VAE for
generation), tb/ (TensorBoard), config.json, eval.json. A restarted job resumes from the
latest checkpoint, data order included; a config that differs from the stored one outside
the fields that may change on resume (moca_jax.checkpointing) is refused before anything is
written; a resume with another config exits with code 2 and one line, as do latent shards
made by another VAE than config.vae.workdir or of another vecset shape than the DiT's.

Fine-tuning MoCA from a pretrained prior (an experiments.import_weights --out folder):
  python -m experiments.train_dit --config=experiments/configs/dit_finetune.py:outputs/partcrafter \
      --config.data.dir=outputs/latents --workdir=outputs/moca_ft
A prior that cannot start the model (not a DiT checkpoint, tensors that do not fit) exits
with code 2 and one line, before anything is written.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from data_pipeline import encode_latents, loader
from moca_jax import checkpointing, cli, dit_task, prior_init


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
  except (checkpointing.ConfigMismatchError, encode_latents.LatentsMismatchError,
          prior_init.PriorInitError, loader.EmptyDataError, FileNotFoundError) as e:
    # a resume with another config, latents of another VAE, a prior that cannot start the
    # model, training data that give no batch or a data folder (one of data.dir's) that is
    # not there: one line, no checkpoint written
    print(f"train_dit: error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """`cli.parse_flags_or_exit` (a flag that cannot be parsed: one line, exit code 2), except
  that a config file that cannot read its prior (experiments/configs/dit_finetune.py:PRIOR)
  is named by the prior's own error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cause = e.__context__
    while cause is not None and cause.__context__ is not None:
      cause = cause.__context__  # the config file's own exception
    if isinstance(cause, prior_init.PriorInitError):
      print(f"train_dit: error: {cause}", file=sys.stderr)
      sys.exit(2)
    return cli.parse_flags_or_exit(argv)  # one line, exit code 2


if __name__ == "__main__":
  define_flags()
  cli.run(main, flags_parser=parse_flags)
