"""Training config for the vecset VAE (experiments/train_vae.py).

Usage: --config=experiments/configs/vae.py:tiny  (or :small, :bundle, :triposg, :triposg-1024).
Fields:
  model                the architecture and loss weights (moca_jax.vae.vae_config)
  data                 source 'analytic' (random primitives sampled on the fly,
                       data_pipeline.primitives), 'records' (the data pipeline's 'samples'
                       ArrayRecord shards in data.dir, data_pipeline.vae_batches) or 'mixed'
                       (both in every batch, data.analytic_fraction of it analytic)
  optim                moca_jax.train_lib optimizer: AdamW, linear warmup then cosine decay,
                       global-norm clipping, EMA (ema_decay; 0 turns it off)
                       optim.total_steps follows num_steps; optim.lr and optim.warmup_steps
                       follow the older names learning_rate / warmup_steps (setting either
                       name sets both)
  mesh, checkpoint, log_every   as in experiments/configs/dit.py
  eval                 reconstruction after training: meshes, IoU/Chamfer by part size
  train_encoder        False freezes the encoder (a decoder-only fine-tune)
  init.from_bundle     a bundle folder a fresh run starts from (warm restart)
"""

import ml_collections

from moca_jax.distributed import distributed_config
from moca_jax.train_lib import default_optim_config
from moca_jax.vae import vae_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = vae_config(arg)
  size = c.model.size
  c.seed = 0
  # The DiT trains on posterior means: the shipped sizes also decode means in training.
  if size in ("small", "bundle"):
    c.model.decode_mean_fraction = 0.5
  # False: the encoder (and so the latent space) stays as initialised; only the decoder
  # trains (e.g. a decoder fine-tune of a bundle whose latents a DiT was trained on).
  c.train_encoder = True
  # A fresh run starts from a bundle's VAE weights (params-only warm restart, fresh
  # optimizer, step 0; moca_jax.bundle.params_for_training). Not read on resume.
  c.init = ml_collections.ConfigDict(dict(from_bundle=""))

  # --- data -----------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "analytic"  # 'analytic' | 'records' | 'mixed'
  # mixed: the share of each batch's examples that are analytic primitives (the rest are
  # records parts; vae_batches.mixed_split rounds it to whole examples)
  c.data.analytic_fraction = 0.5
  c.data.num_points = c.model.num_points
  c.data.num_near = {"tiny": 512, "small": 2048, "bundle": 2048, "triposg": 8192}[size]
  c.data.num_volume = {"tiny": 256, "small": 1024, "bundle": 1024, "triposg": 4096}[size]
  # analytic: random primitives placed in the [-1, 1]^3 object frame
  c.data.kinds = ("sphere", "box", "cylinder", "capsule", "torus", "cone")
  c.data.size_range = (0.1, 0.9)  # bounding radius of a part: small parts included
  c.data.near_scales = (0.005, 0.05)
  c.data.mesh_segments = 32  # unused by the analytic sampler (exact per-primitive samplers); kept so older stored configs resume
  # records: data_pipeline 'samples' shards (data_pipeline.build / make)
  c.data.dir = ""
  c.data.parts_per_element = 1  # real parts drawn from each object per batch
  c.data.max_components = 32  # n_max of the loader (objects with more keep a random n_max)
  c.data.shuffle_seed = 0
  # input worker processes (grain mp_prefetch), both sources: -1 = auto (none on the CPU, all
  # cores but two, at most 32, on an accelerator: moca_jax.vae_task.input_workers)
  c.data.num_workers = -1

  # --- optimisation ---------------------------------------------------------------------
  c.batch_size = {"tiny": 8, "small": 16, "bundle": 64, "triposg": 32}[size]
  c.num_steps = {"tiny": 300, "small": 4000, "bundle": 12000, "triposg": 100_000}[size]
  c.learning_rate = {"tiny": 2e-3, "small": 1e-3, "bundle": 1e-3, "triposg": 1e-4}[size]
  c.warmup_steps = {"tiny": 50, "small": 200, "bundle": 300, "triposg": 2000}[size]
  c.optim = default_optim_config()
  c.optim.lr = c.get_ref("learning_rate")
  c.optim.warmup_steps = c.get_ref("warmup_steps")
  c.optim.total_steps = c.get_ref("num_steps")
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.01  # cosine decay ends at this fraction of the peak
  c.optim.weight_decay = 0.01
  c.optim.b1, c.optim.b2 = 0.9, 0.99
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = {"tiny": 0.999, "small": 0.9995, "bundle": 0.9995, "triposg": 0.9999}[size]

  # --- bookkeeping ----------------------------------------------------------------------
  c.log_every = {"tiny": 10, "small": 50, "bundle": 50, "triposg": 100}[size]
  # > 0: stop (and save) after this many seconds of training; resume continues exactly
  c.time_limit_s = 0.0
  # > 0: a wall-clock deadline (seconds since the epoch, compilation included): stop and save
  # at the first log step after it (for device calls with a hard wall-clock limit)
  c.stop_at_unix = 0.0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.distributed = distributed_config()  # multi-process job: see moca_jax.distributed
  every = {"tiny": 100, "small": 500, "bundle": 2000, "triposg": 5000}[size]
  c.checkpoint = ml_collections.ConfigDict(dict(every=every, keep=3, async_save=True))

  # --- evaluation after training ----------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.num_shapes = {"tiny": 12, "small": 48, "bundle": 96, "triposg": 96}[size]  # held-out, by part size
  c.eval.resolution = {"tiny": 48, "small": 96, "bundle": 128, "triposg": 256}[size]
  c.eval.fine_resolution = {"tiny": 96, "small": 192, "bundle": 256, "triposg": 512}[size]  # demo mesh only
  c.eval.chunk_size = 16384
  c.eval.small_part_radius = 0.3  # bounding radius below which a part counts as small
  c.eval.large_part_radius = 0.6  # ... and above which it counts as large
  c.eval.write_mesh = True  # GLB + PNG render of one reconstructed component
  return c
