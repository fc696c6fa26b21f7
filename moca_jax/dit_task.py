"""The DiT task: image encoder + compositional DiT trained with rectified flow.

Same shape as `moca_jax.vae_task`:
  make_task(config)          -> train_lib.Task(model, init_fn, loss_fn)
  make_iterator_fn(config)   -> () -> checkpointable iterator of host batches
  model_batch(batch)         -> the arrays the model reads
  train_and_evaluate(config, workdir, ...)   the run: `train_lib.run_training` + evaluation

Batch (host numpy, leading axis = global batch B):
  latents         f32 [B, N, L, C]   clean component latents (padding rows arbitrary)
  component_mask  bool [B, N]
  images          uint8 [B, H, W, 3] (objects) or [B, N, H, W, 7] (scenes: instance on white,
                  whole scene, mask; MIDI's per-instance condition)
Data (config.data.source): 'records' reads the latent shards of
`data_pipeline.encode_latents` through `data_pipeline.loader`; 'synthetic' makes
deterministic random latents and images in memory (benchmarks, tests).

Writes under workdir (besides run_training's checkpoints/, tb/, config.json):
  eval.json   flow loss of the EMA and the raw params on fixed batches (fixed noise): held
              out (config.data.val_dir) when given, else the first training batches;
              'eval_split' says which
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moca_jax import checkpointing, distributed, flow, image_encoder, latent_norm, prior_init
from moca_jax import sharding
from moca_jax import train_lib
from moca_jax import io as mio
from moca_jax.dit import CompositionalDiT

Array = jax.Array

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Model, loss
# ----------------------------------------------------------------------------------------


class ImageConditionedDiT(nn.Module):
  """Image encoder + `CompositionalDiT` (moca_jax.dit).

  config: ConfigDict with `encoder` (see `image_encoder.encoder_config`) and `dit`
  (see `dit.dit_config`); dit.cond_dim must equal encoder.width.
  """

  config: Any

  def setup(self):
    if self.config.dit.cond_dim != self.config.encoder.width:
      raise ValueError(
          f"dit.cond_dim={self.config.dit.cond_dim} must equal encoder.width="
          f"{self.config.encoder.width}"
      )
    self.encoder = image_encoder.ImageEncoder(self.config.encoder)
    self.dit = CompositionalDiT(config=self.config.dit)

  def encode(self, images: Array) -> Array:
    """Preprocessed images -> condition tokens.

    images: [B, S, S, C] (object mode, shared by all components) -> [B, T, Dc], or
    [B, N, S, S, C] (scene mode, one input per component) -> [B, N, T, Dc].
    """
    if images.ndim == 5:
      b, n = images.shape[:2]
      tokens = self.encoder(images.reshape(b * n, *images.shape[2:]))
      return tokens.reshape(b, n, *tokens.shape[1:])
    return self.encoder(images)

  def velocity(
      self,
      x_t: Array,
      t: Array,
      cond: Array,
      component_mask: Optional[Array],
      ids: Optional[Array] = None,
      *,
      train: bool,
      return_routing: bool = False,
  ):
    """See `CompositionalDiT.__call__`."""
    return self.dit(x_t, t, cond, component_mask, ids, train=train, return_routing=return_routing)

  def __call__(self, images: Array, x_t: Array, t: Array, component_mask: Array):
    """Used for init only: encode + velocity (eval mode)."""
    return self.velocity(x_t, t, self.encode(images), component_mask, train=False)


def prepare_images(images: Array, encoder_cfg) -> Array:
  """uint8 images [B, H, W, C] or [B, N, H, W, C] -> preprocessed float32 for the encoder."""
  if images.ndim == 5:
    b, n = images.shape[:2]
    out = image_encoder.preprocess(
        images.reshape(b * n, *images.shape[2:]), encoder_cfg.image_size, encoder_cfg.in_channels
    )
    return out.reshape(b, n, *out.shape[1:])
  return image_encoder.preprocess(images, encoder_cfg.image_size, encoder_cfg.in_channels)


def router_statistics(
    importances: Array, selections: Array, component_mask: Array
) -> dict[str, Array]:
  """Load-balance statistics of MoC routing.

  Args:
    importances: [B, G, H, N, N] router importances s_ij (0 on the diagonal and padding).
    selections: [B, G, H, N, k] indices j selected at full resolution for query i.
    component_mask: [B, N].
  Returns:
    'router/selection_freq' [N]: fraction of all selections (over real queries, heads and
      blocks) that picked component slot j (sums to 1);
    'router/selection_max_over_uniform': max_j freq_j * (mean number of real components),
      1 for perfectly balanced routing in a batch of equal sizes;
    'router/importance_entropy': entropy of s_ij / sum_j s_ij over the real j != i,
      divided by log(n_real - 1) (1 = uniform), averaged over real queries with n_real > 2.
  """
  b, g, h, n, k = selections.shape
  maskf = component_mask.astype(jnp.float32)
  q_real = jnp.broadcast_to(maskf[:, None, None, :, None], selections.shape)
  onehot = jax.nn.one_hot(selections, n, dtype=jnp.float32) * q_real[..., None]
  counts = jnp.sum(onehot, axis=(0, 1, 2, 3, 4))  # [N]
  freq = counts / jnp.maximum(jnp.sum(counts), 1.0)
  n_real = jnp.sum(maskf, axis=1)  # [B]
  p = importances / jnp.maximum(jnp.sum(importances, axis=-1, keepdims=True), 1e-12)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)
  norm = jnp.log(jnp.maximum(n_real - 1.0, 2.0))[:, None, None, None]
  ent = ent / norm  # [B, G, H, N]
  valid = (maskf[:, None, None, :] * (n_real > 2)[:, None, None, None]) * jnp.ones_like(ent)
  mean_ent = jnp.sum(ent * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return {
      "router/selection_freq": freq,
      "router/selection_max_over_uniform": jnp.max(freq) * jnp.mean(n_real),
      "router/importance_entropy": mean_ent,
  }


def abstract_params(config) -> Any:
  """The ImageConditionedDiT params of `config` (model.encoder, model.dit) as
  ShapeDtypeStructs on one device, from shapes only (nothing is initialised)."""
  model = ImageConditionedDiT(config.model)
  enc, dit = config.model.encoder, config.model.dit
  s = enc.image_size
  images = (
      jnp.zeros((1, 2, s, s, enc.in_channels))
      if enc.in_channels == 7
      else jnp.zeros((1, s, s, enc.in_channels))
  )
  x = jnp.zeros((1, 2, dit.latent_tokens, dit.latent_channels))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, x, jnp.zeros((1,)), jnp.ones((1, 2), bool))[
          "params"
      ]
  )
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), nn.meta.unbox(shapes)
  )


def make_task(config: ml_collections.ConfigDict) -> train_lib.Task:
  """Task(model, init_fn, loss_fn) of the image-conditioned DiT for `train_lib.run_training`.

  Batch (host numpy, leading axis = global batch B):
    latents         f32 [B, N, L, C]   clean component latents (padding rows arbitrary)
    component_mask  bool [B, N]
    images          uint8 [B, H, W, 3] (objects) or [B, N, H, W, 7] (scenes)
  Config: model.encoder, model.dit, model.latent_norm (the loss diffuses
  `latent_norm.normalize`d latents; statistics filled by `resolve_latent_norm` when
  missing), flow.{cfg_dropout, t_mean, t_std, t_shift}.
  The loss uses rng streams noise (t, eps), cfg (condition dropout), ids, routing.
  """
  config = resolve_latent_norm(config)
  model = ImageConditionedDiT(config.model)
  fcfg = config.flow
  stats = latent_norm.stats_from_config(config.model)

  def init_fn(rng, batch):
    images = prepare_images(batch["images"], config.model.encoder)
    x = batch["latents"]
    return model.init(rng, images, x, jnp.full((x.shape[0],), 0.5), batch["component_mask"])

  def loss_fn(params, batch, rng):
    noise_rng, cfg_rng, ids_rng, routing_rng = jax.random.split(rng, 4)
    variables = {"params": params}
    mask = batch["component_mask"]
    cond = model.apply(
        variables,
        prepare_images(batch["images"], config.model.encoder),
        method=ImageConditionedDiT.encode,
    )
    routing = {}

    def velocity_fn(x_t, t, c):
      v, aux = model.apply(
          variables,
          x_t,
          t,
          c,
          mask,
          train=True,
          return_routing=True,
          rngs={"ids": ids_rng, "routing": routing_rng},
          method=ImageConditionedDiT.velocity,
      )
      routing.update(aux)
      return v

    loss, faux = flow.flow_loss(
        velocity_fn,
        latent_norm.normalize(batch["latents"].astype(jnp.float32), stats),
        cond,
        mask,
        noise_rng=noise_rng,
        cfg_rng=cfg_rng,
        cfg_dropout=fcfg.cfg_dropout,
        t_mean=fcfg.t_mean,
        t_std=fcfg.t_std,
        t_shift=fcfg.t_shift,
    )
    metrics = {
        "t_mean": jnp.mean(faux["t"]),
        "cond_kept": jnp.mean(faux["cond_kept"].astype(jnp.float32)),
        "components": jnp.mean(jnp.sum(mask.astype(jnp.float32), axis=1)),
    }
    if routing and routing["selections"].shape[1] > 0:
      metrics.update(router_statistics(routing["importances"], routing["selections"], mask))
    return loss, metrics

  return train_lib.Task(model, init_fn, loss_fn)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def _image_size(config) -> int:
  return config.data.image_size or config.model.encoder.image_size


def synthetic_example(config, index: int) -> dict:
  """Deterministic random example `index`: 2..N_max real components; padded latents are 0.

  The image is a coarse function of the latents (mean of each component's first channel
  painted into a vertical stripe) so that the condition carries information.
  """
  n_max = config.data.max_components
  dit = config.model.dit
  rng = np.random.default_rng([config.data.shuffle_seed, 7919, index])
  n_real = int(rng.integers(min(2, n_max), n_max + 1))
  latents = np.zeros((n_max, dit.latent_tokens, dit.latent_channels), np.float32)
  latents[:n_real] = rng.normal(size=(n_real, dit.latent_tokens, dit.latent_channels))
  mask = np.arange(n_max) < n_real
  size = _image_size(config)
  stripes = np.clip(128 + 64 * latents[:, :, 0].mean(axis=1), 0, 255)
  cols = np.repeat(stripes, -(-size // n_max))[:size]
  image = np.broadcast_to(cols[None, :, None], (size, size, 3)).astype(np.uint8)
  if config.mode == "scene":
    image = np.concatenate([image, image, np.full((size, size, 1), 255, np.uint8)], -1)
    image = np.broadcast_to(image, (n_max,) + image.shape).copy()
  return {"latents": latents, "component_mask": mask, "images": image, "index": np.int64(index)}


def _data_dir(config, split: str) -> str:
  d = config.data.dir if split == "train" else (config.data.get("val_dir") or "")
  if not d:
    raise ValueError(
        f"config.data.{'dir' if split == 'train' else 'val_dir'} is empty: point "
        "it at the latent shards (data_pipeline.encode_latents output)"
    )
  return d


def check_data_pairing(config) -> None:
  """For 'records' data: the latent shards must come from the VAE the config names
  (vae.workdir, which generation decodes with) and have the DiT's vecset shape
  (`data_pipeline.encode_latents.check_latents_pairing`; ValueError naming the fields)."""
  if config.data.source != "records":
    return
  from data_pipeline import encode_latents, records  # pylint: disable=g-import-not-at-top

  vae_dir = config.get("vae", {}).get("workdir", "") or None
  dit = config.model.dit
  for split in ("train", "val"):
    if split == "train" or config.data.get("val_dir"):
      for folder in records.dataset_dirs(_data_dir(config, split)):
        encode_latents.check_latents_pairing(
            folder, vae_dir, dit.latent_tokens, dit.latent_channels
        )


def resolve_latent_norm(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with model.latent_norm's statistics (`latent_norm.with_stats`): from the
  first parts of config.data.dir ('records') or of the synthetic examples; with
  posterior_noise also the VAE's posterior std (`vae_posterior_std`). Unchanged for kind
  'none' or statistics already present. A warm restart from a bundle
  (config.init.from_bundle, 'dit' among init.bundle_parts) whose DiT used the same kind
  and posterior_noise takes that bundle's statistics: the DiT continues in the space it
  learned. ValueError when they are needed and the records folder (or, for
  posterior_noise, vae.workdir) is not set."""
  if not latent_norm.needs_stats(config):
    return config
  inherited = _bundle_latent_norm(config)
  if inherited is not None:
    return inherited
  if config.data.source == "records" and not config.data.dir:
    raise ValueError("model.latent_norm.kind='part_mean_residual' needs its statistics: "
                     "set config.data.dir (latent shards) or give model.latent_norm.mean / "
                     "between_std / within_std")
  synthetic = None
  if config.data.source != "records":
    examples = (synthetic_example(config, i) for i in range(config.data.synthetic_examples))
    synthetic = (e["latents"][e["component_mask"]] for e in examples)
  return latent_norm.with_stats(config, synthetic, lambda: vae_posterior_std(config))


def _bundle_latent_norm(config) -> Optional[ml_collections.ConfigDict]:
  """`config` with the latent_norm of its init.from_bundle's DiT, or None (no bundle, the
  DiT not taken from it, or another kind / posterior_noise setting)."""
  init = config.get("init", {})
  if not init.get("from_bundle", "") or "dit" not in tuple(init.get("bundle_parts", ("dit",))):
    return None
  from moca_jax import bundle  # pylint: disable=g-import-not-at-top  (bundle imports this module)

  theirs = bundle.read_info(init.from_bundle)["dit_config"]["model"].get("latent_norm") or {}
  ours = config.model.latent_norm
  same = (theirs.get("kind", "none") == ours.kind
          and bool(theirs.get("posterior_noise", False)) == bool(ours.get("posterior_noise", False)))
  if not same or not theirs.get("mean"):
    return None
  out = ml_collections.ConfigDict(config.to_dict())
  with out.unlocked():
    for key, value in theirs.items():
      out.model.latent_norm[key] = tuple(value) if isinstance(value, list) else value
  return out


def vae_posterior_std(config, num_shapes: int = 256) -> np.ndarray:
  """[C] mean posterior std per latent channel of the VAE config.vae.workdir names (a
  train_vae workdir or a bundle), over `num_shapes` analytic primitives of its own training
  distribution (`data_pipeline.vae_batches.analytic_batch`, seed 0: deterministic)."""
  workdir = config.get("vae", {}).get("workdir", "")
  if not workdir:
    raise ValueError("model.latent_norm.posterior_noise needs config.vae.workdir (the VAE "
                     "whose posterior std scales the latents)")
  from data_pipeline import vae_batches  # pylint: disable=g-import-not-at-top
  from moca_jax import vae_task  # pylint: disable=g-import-not-at-top

  model, params, vae_cfg = vae_task.load_vae(workdir)
  spec = vae_batches.analytic_spec(vae_cfg.data)
  stds = []
  for index in range(max(1, num_shapes // 64)):
    batch = vae_batches.analytic_batch(spec, 64, seed=0, index=index)
    stds.append(vae_task.posterior_noise_std(model, params, batch["surface_points"],
                                             batch["surface_normals"]))
  return np.mean(np.asarray(stds, np.float64), axis=0)


def make_synthetic_dataset(config) -> grain.MapDataset:
  """A grain MapDataset of single synthetic examples (dicts of numpy arrays, with 'index')."""
  n = config.data.synthetic_examples
  return grain.MapDataset.range(n).map(lambda i: synthetic_example(config, int(i)))


def input_feed(data_config) -> tuple:
  """(in_memory, read_threads) of config.data, checked.

  data.in_memory (default False): decode the latent records once into host memory
  (`data_pipeline.loader.InMemoryRecords`) and make batches with data.read_threads threads
  of the training process (0: `data_pipeline.loader.DEFAULT_READ_THREADS`); the
  batches are the same as without.
  It cannot be combined with data.num_workers > 0 (each worker process would hold its own
  copy of the records): ValueError.
  """
  in_memory = bool(data_config.get("in_memory", False))
  read_threads = int(data_config.get("read_threads", 0))
  if read_threads < 0:
    raise ValueError(f"config.data.read_threads must be >= 0, got {read_threads}")
  if in_memory and data_config.get("num_workers", 0):
    raise ValueError(
        "config.data.in_memory=True makes batches in threads of the training process "
        f"(data.read_threads); set data.num_workers=0 (got {data_config.num_workers})"
    )
  return in_memory, read_threads


def make_iterator_fn(config, split: str = "train", shuffle: bool = True) -> Callable[[], Any]:
  """() -> a checkpointable iterator of host batches for this process.

  'records': `data_pipeline.loader.latent_dataset` (shuffle -> shard by process -> repeat
  -> decode -> random component order + padding -> batch) and its `make_iterator`; with
  data.in_memory the records are decoded once, up front (`input_feed`).
  'synthetic': the same shape of pipeline over `synthetic_example`.
  Either way the iterator has get_state / set_state (checkpointed with the model).
  """
  nproc = jax.process_count()
  if config.batch_size % nproc:
    raise ValueError(f"batch_size={config.batch_size} not divisible by {nproc} processes")
  local_batch = config.batch_size // nproc
  if config.data.source == "records":
    from data_pipeline import loader

    in_memory, read_threads = input_feed(config.data)
    ds = loader.latent_dataset(
        _data_dir(config, split),
        batch_size=local_batch,
        n_max=config.data.max_components,
        seed=config.data.shuffle_seed,
        shuffle=shuffle,
        per_instance_cond=config.mode == "scene",
        in_memory=in_memory,
    )
    return lambda: loader.make_iterator(ds, config.data.num_workers, read_threads=read_threads)
  if config.data.source != "synthetic":
    raise ValueError(
        f"config.data.source must be 'records' or 'synthetic', got {config.data.source!r}"
    )
  ds = make_synthetic_dataset(config)
  if shuffle:
    ds = ds.shuffle(seed=config.data.shuffle_seed)
  ds = ds.repeat()
  from data_pipeline import loader  # this process's rows of each global batch (multi-process)

  ds = loader.process_blocks(ds, local_batch, jax.process_index(), nproc)
  ds = ds.batch(local_batch, drop_remainder=True)
  return lambda: loader.make_iterator(ds, config.data.num_workers,
                                      read_threads=int(config.data.get("read_threads", 0)))


def model_batch(batch: dict) -> dict:
  """The arrays the model needs (host-only fields such as record ids are dropped).

  Accepts the loader's view (image [B,H,W,3] or, for scenes, cond [B,N,H,W,7]) and the
  synthetic one (images).
  """
  if "images" in batch:
    images = batch["images"]
  elif "cond" in batch and batch["cond"].ndim == 5:
    images = batch["cond"]
  else:
    images = batch["image"]
  return {
      "latents": np.asarray(batch["latents"], np.float32),
      "component_mask": np.asarray(batch["component_mask"], bool),
      "images": images,
  }


# ----------------------------------------------------------------------------------------
# Train and evaluate
# ----------------------------------------------------------------------------------------


def trainable_fn(config):
  """params -> bool tree: the encoder's freeze/LoRA switches, everything else trainable."""

  def fn(params):
    mask = jax.tree.map(lambda _: True, params)
    mask["encoder"] = image_encoder.trainable_mask(params["encoder"], config.model.encoder)
    return mask

  return fn


def _router_histograms(writer, step, metrics):
  freq = metrics.get("router/selection_freq")
  if freq is not None:
    writer.add_histogram("router/selection_freq", np.asarray(freq), step)
    for j, f in enumerate(np.asarray(freq)):
      writer.add_scalar(f"router_slot/{j:02d}", float(f), step)


def evaluate(config, state, loss_fn, num_batches: int = 2) -> dict:
  """Flow loss of the EMA and the raw params on `num_batches` batches (fixed noise), and of
  the EMA params with each example conditioned on ANOTHER example's image (the batch's
  images rolled by one; same latents, times, noise and CFG drops).

  The batches are config.data.val_dir's (held out) when it is set for records data, else
  the training data's first batches in stored order: examples the model trained on, so
  then the loss is a training loss, not a held-out one.

  Returns {'eval_split' ('val' | 'train'), 'eval_loss_ema', 'eval_loss_params',
  'eval_loss_ema_wrong_image', 'condition_gain', 'condition_spread'}: condition_gain =
  wrong-image loss - EMA loss, about 0 for a model that ignores its image (it learned the unconditional distribution) and > 0
  once the image informs the prediction; condition_spread = `image_encoder.token_spread` of
  the EMA encoder's tokens over the batch (near 0: the encoder output no longer depends on
  the image). Needs batches of at least 2 examples (else neither is reported).
  """
  split = "val" if config.data.source == "records" and config.data.get("val_dir") else "train"
  try:
    it = make_iterator_fn(config, split, shuffle=False)()
  except Exception as e:  # a dataset without a validation split
    log.warning("evaluation on the train split (%s)", e)
    split = "train"
    it = make_iterator_fn(config, "train", shuffle=False)()
  jit_loss = jax.jit(lambda p, b, r: loss_fn(p, b, r)[0])
  jit_wrong = jax.jit(lambda p, b, r: loss_fn(
      p, dict(b, images=jnp.roll(b["images"], 1, axis=0)), r)[0])
  model = ImageConditionedDiT(config.model)
  jit_spread = jax.jit(lambda p, images: image_encoder.token_spread(model.apply(
      {"params": p}, prepare_images(images, config.model.encoder),
      method=ImageConditionedDiT.encode)))
  losses = {"ema": [], "params": [], "ema_wrong_image": []}
  spreads = []
  # Every process runs this (the params may span processes); each feeds its own batch rows.
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  for i in range(num_batches):
    batch = sharding.shard_batch(model_batch(next(it)), mesh)
    rng = jax.random.PRNGKey(10_000 + i)
    losses["ema"].append(float(jit_loss(state.ema_params, batch, rng)))
    losses["params"].append(float(jit_loss(state.params, batch, rng)))
    if batch["images"].shape[0] > 1:
      losses["ema_wrong_image"].append(float(jit_wrong(state.ema_params, batch, rng)))
      spreads.append(float(jit_spread(state.ema_params, batch["images"])))
  out = {f"eval_loss_{k}": float(np.mean(v)) for k, v in losses.items() if v}
  out["eval_split"] = split
  if "eval_loss_ema_wrong_image" in out:
    out["condition_gain"] = out["eval_loss_ema_wrong_image"] - out["eval_loss_ema"]
    out["condition_spread"] = float(np.mean(spreads))
  return out


def write_loss_outputs(workdir: str, history: list, start: int, config, num_steps=None) -> str:
  """workdir/metrics.jsonl (every log step of every run so far, `train_lib
  .write_metrics_jsonl`) and loss_curve.png (the flow-matching loss against step); returns
  the PNG's path."""
  from moca_jax import viz  # pylint: disable=g-import-not-at-top  (matplotlib-free callers)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  num_steps = config.num_steps if num_steps is None else num_steps
  train_lib.write_metrics_jsonl(metrics_path, history, start, config.get("log_every", 10),
                                num_steps)
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  png = os.path.join(workdir, "loss_curve.png")
  if rows:
    viz.loss_curves_png({"loss": [(r["step"], r["loss"]) for r in rows]}, png, log_y=True,
                        title="DiT training (rectified flow loss)",
                        smooth=max(1, len(rows) // 40))
  return png


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    num_steps: Optional[int] = None,
    mesh=None,
    show_progress: bool = True,
    eval_batches: int = 2,
) -> train_lib.LoopResult:
  """Trains (resuming from workdir's latest checkpoint) and evaluates the EMA params.

  A fresh run with config.init.from_checkpoint starts from that pretrained prior
  (`moca_jax.prior_init`); the prior is checked before anything is written
  (PriorInitError) and not read again on resume. A fresh run with config.init.from_bundle
  starts from that bundle's DiT and encoder weights (params-only warm restart: fresh
  optimizer, step 0; BundleError when the shapes differ from the config's);
  config.init.bundle_parts = ('dit',) takes the DiT alone and starts a fresh image encoder.
  """
  distributed.initialize(config.get("distributed"))  # multi-process job (config.distributed)
  check_data_pairing(config)
  config = resolve_latent_norm(config)  # stored with the checkpoints; the same on resume
  start_state_fn = prior_init.start_state_fn(config)
  fresh = checkpointing.check_resume_config(os.path.join(workdir, "checkpoints"), config) is None
  if start_state_fn is not None and fresh:
    prior_init.check_prior(config)
  from_bundle = config.get("init", {}).get("from_bundle", "")
  if from_bundle and start_state_fn is not None:
    raise ValueError("config.init: give from_bundle or from_checkpoint, not both")
  if from_bundle and fresh:  # params-only warm restart (checked before anything is written)
    from moca_jax import bundle  # pylint: disable=g-import-not-at-top  (bundle imports this module)

    parts = tuple(config.init.get("bundle_parts", ("encoder", "dit")))
    start_state_fn = train_lib.start_from_params(
        bundle.params_for_training(from_bundle, "dit", abstract_params(config), parts))
  _, init_fn, loss_fn = make_task(config)
  start = checkpointing.latest_checkpoint_step(os.path.join(workdir, "checkpoints"))
  result = train_lib.run_training(
      config=config,
      workdir=workdir,
      init_fn=init_fn,
      loss_fn=loss_fn,
      make_iterator=make_iterator_fn(config),
      mesh=mesh,
      trainable_fn=trainable_fn(config),
      batch_id_fn=lambda b: np.asarray(b["index"]).tolist() if "index" in b else None,
      prepare_fn=model_batch,
      num_steps=num_steps,
      array_metrics_fn=_router_histograms,
      show_progress=show_progress,
      start_state_fn=start_state_fn,
  )
  if jax.process_index() == 0:
    write_loss_outputs(workdir, result.history, start or 0, config, num_steps)
  if eval_batches:
    ev = evaluate(config, result.state, loss_fn, eval_batches)  # all processes take part
    ev["step"] = int(result.state.step)
    if jax.process_index() == 0:
      mio.write_json(os.path.join(workdir, "eval.json"), ev)
    log.info("eval: %s", ev)
  return result
