r"""MoCA fine-tuned from a pretrained prior: `--config=experiments/configs/dit_finetune.py:PRIOR`.

Append ',scene' (`...dit_finetune.py:PRIOR,scene`) for the scene model: 7-channel encoder
input (instance on white, scene, mask), its patch kernel started from the prior's RGB one.

PRIOR is an `experiments.import_weights --out` folder (TripoSG or PartCrafter) or any
train_dit workdir. The model is the prior's DiT with the MoC layout on top and the prior's
image encoder, frozen (`moca_jax.prior_init`, which also says how the new parts start):

  python -m experiments.import_weights --source=partcrafter --path=PartCrafter \
      --out=outputs/partcrafter
  python -m experiments.train_dit --config=experiments/configs/dit_finetune.py:outputs/partcrafter \
      --config.data.dir=outputs/latents --workdir=outputs/moca_ft

The rest is the `paper` run config (experiments/configs/dit.py) at the paper's fine-tuning
learning rate (4e-5 for 10K steps). Overrides as usual, e.g. --config.model.dit.top_k=8,
--config.model.encoder.lora_rank=8 (LoRA adapters on the frozen encoder),
--config.model.encoder.freeze=False, --config.init.router_bias=20 (gates exactly 1 at the
start), --config.init.params=params (the prior's raw weights instead of its EMA).
On a CPU set --config.model.dit.dtype=float32 --config.model.dit.attention_implementation=xla.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import dit
from moca_jax import prior_init


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError("dit_finetune config: name the prior, "
                     "--config=experiments/configs/dit_finetune.py:PATH (an import_weights "
                     "--out folder or a train_dit workdir)")
  path, scene = arg, False
  if arg.endswith(",scene"):
    path, scene = arg[:-len(",scene")], True
  c = prior_init.finetune_config(dit.get_config("paper"), path, scene=scene)
  c.optim.lr = 4e-5  # paper: the 10K-step fine-tuning stages run at 4e-5
  c.num_steps = c.optim.total_steps = 10_000
  return c
