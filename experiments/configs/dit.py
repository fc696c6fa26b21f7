"""DiT training configs: `--config=experiments/configs/dit.py:SIZE[,scene]`.

SIZE: 'tiny' (tests and the CPU demo: seconds per step on 2 cores), 'small', 'bundle' (the
model that ships in assets/moca-small: DiT 256 wide x 6 blocks, ViT 192 x 6 at 112 px, VAE
'bundle' with L = 64; trained on the GPU in chunks, see experiments/results/bundle_train.sh),
'paper' (the published size: 21 blocks, width 2048, DINOv2-L-sized encoder).
Append ',scene' for the scene model (7-channel encoder input: instance on white, scene,
mask). Every field can be overridden on the command line (--config.optim.lr=3e-4).
"""

from __future__ import annotations

import ml_collections

from moca_jax.distributed import distributed_config
from moca_jax.dit import dit_config
from moca_jax.image_encoder import encoder_config
from moca_jax.latent_norm import latent_norm_config
from moca_jax.vae import vae_config
from moca_jax.train_lib import default_optim_config

#        DiT    encoder  VAE             batch  steps  N_max  lr     warmup  ckpt_every
_SIZES = {
    "tiny": ("tiny", "tiny", "tiny", 8, 200, 4, 1e-3, 20, 100),
    "small": ("small", "small", "small", 64, 50_000, 16, 1e-4, 1000, 1000),
    "bundle": ("bundle", "bundle", "bundle", 64, 30_000, 16, 3e-4, 500, 2000),
    "paper": ("paper", "large", "triposg-1024", 1024, 40_000, 32, 1e-4, 1000, 1000),
}

# The vecset VAEs of this project put ~99% of the latent variance in the per-part token mean
# (moca_jax.latent_norm); the tiny size keeps raw latents (set from the CPU A/B run below).
_LATENT_NORM = {"tiny": "none", "small": "part_mean_residual", "bundle": "part_mean_residual",
                "paper": "none"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "tiny").split(",") if p]
  size, scene = parts[0], "scene" in parts[1:]
  if size not in _SIZES:
    raise ValueError(f"dit config: unknown size {size!r}; expected one of {sorted(_SIZES)}")
  dit_size, enc_size, vae_size, batch, steps, n_max, lr, warmup, every = _SIZES[size]

  c = ml_collections.ConfigDict()
  c.size = size
  c.mode = "scene" if scene else "object"
  c.seed = 0
  c.batch_size = batch
  c.num_steps = steps
  c.log_every = 10
  # > 0: stop (and save) after this many seconds of training; resume continues exactly
  c.time_limit_s = 0.0
  # > 0: a wall-clock deadline (seconds since the epoch, compilation included): stop and save
  # at the first log step after it (for device calls with a hard wall-clock limit)
  c.stop_at_unix = 0.0
  c.distributed = distributed_config()  # multi-process job: see moca_jax.distributed
  # A fresh run starts from a bundle's DiT + encoder weights (a params-only warm restart:
  # fresh optimizer, step 0; moca_jax.bundle.params_for_training). Not read on resume.
  # init.bundle_parts: which of the bundle's top-level params to take ('encoder', 'dit');
  # ('dit',) starts a fresh image encoder under the bundle's DiT.
  c.init = ml_collections.ConfigDict(dict(from_bundle="", bundle_parts=("encoder", "dit")))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=every, keep=3, async_save=True))

  c.optim = default_optim_config()
  c.optim.lr, c.optim.warmup_steps, c.optim.total_steps = lr, warmup, steps
  c.optim.schedule = "constant"
  c.optim.ema_decay = 0.999 if size in ("tiny", "bundle") else 0.9999

  c.flow = ml_collections.ConfigDict(dict(cfg_dropout=0.1, t_mean=0.0, t_std=1.0, t_shift=1.0))

  c.model = ml_collections.ConfigDict()
  c.model.encoder = encoder_config(enc_size, in_channels=7 if scene else 3)
  c.model.dit = dit_config(dit_size)
  c.model.dit.cond_dim = c.model.encoder.width
  # the latents the DiT models are the VAE's: [L, C] of the matching VAE size
  vae = vae_config(vae_size)
  c.model.dit.latent_tokens, c.model.dit.latent_channels = vae.num_latents, vae.latent_channels
  # The DiT diffuses normalised latents (moca_jax.latent_norm): each part's token mean and the
  # tokens' deviations from it at unit variance, statistics from the training latents when
  # training starts. 'none' for the published size (PartCrafter diffuses raw TripoSG latents).
  c.model.latent_norm = latent_norm_config(_LATENT_NORM[size])
  if size == "paper":
    c.model.encoder.dtype = "bfloat16"
    # XLA attention for the encoder's 257 tokens (cuDNN needs even lengths: the encoder pads
    # when asked for 'cudnn', but that path has not run on a GPU yet).
    c.model.encoder.attention_implementation = "xla"
    c.model.encoder.remat = True
    c.model.dit.remat = "dots"

  # Data: 'records' reads the latent ArrayRecord shards of the data pipeline (data.dir: one
  # encode_latents folder, or several joined by commas, read as one dataset in that order);
  # 'synthetic' makes deterministic random latents and images in memory (benchmarks, tests).
  c.data = ml_collections.ConfigDict(
      dict(
          source="records",
          dir="",
          val_dir="",
          max_components=n_max,
          image_size=0,
          shuffle_seed=0,
          num_workers=0,
          # decode the latent records once into host memory and batch them in
          # read_threads threads (0: loader.DEFAULT_READ_THREADS) instead of decoding every read
          # (data_pipeline.loader.InMemoryRecords; needs num_workers=0)
          in_memory=False,
          read_threads=0,
          synthetic_examples=64,
      )
  )

  # The frozen VAE that decodes the latents (its train_vae workdir); stored in every DiT
  # checkpoint so generation can find it.
  c.vae = ml_collections.ConfigDict(dict(workdir="", size=vae_size))

  c.sample = ml_collections.ConfigDict(
      dict(steps=50, cfg_scale=7.0, method="euler", time_shift=1.0)
  )
  return c
