r"""Trains the image-conditioned compositional DiT with rectified flow.

  python -m experiments.train_dit --config=experiments/configs/dit.py:tiny \
      --config.data.dir=outputs/latents --config.vae.workdir=outputs/vae --workdir=outputs/dit

Writes under workdir:
  checkpoints/<step>/   orbax Composite: state (step, params, opt_state), ema, data iterator
                        state, config JSON (which names the VAE workdir for generation)
  tb/                   TensorBoard events: loss, grad norm, lr, router load balance, memory
  config.json           the resolved config
  eval.json             flow loss of the EMA params on held-out batches (fixed noise)
A restarted job resumes from the latest checkpoint, data order included.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

from absl import app, flags, logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from moca_jax import distributed, image_encoder, sharding, train_lib


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
  chans = config.model.encoder.in_channels
  stripes = np.clip(128 + 64 * latents[:, :, 0].mean(axis=1), 0, 255)
  cols = np.repeat(stripes, -(-size // n_max))[:size]
  image = np.broadcast_to(cols[None, :, None], (size, size, 3)).astype(np.uint8)
  if config.mode == "scene":
    image = np.concatenate([image, image, np.full((size, size, 1), 255, np.uint8)], -1)
    image = np.broadcast_to(image, (n_max,) + image.shape).copy()
  del chans
  return {"latents": latents, "component_mask": mask, "images": image,
          "index": np.int64(index)}


def _data_dir(config, split: str) -> str:
  d = config.data.dir if split == "train" else (config.data.get("val_dir") or "")
  if not d:
    raise ValueError(f"config.data.{'dir' if split == 'train' else 'val_dir'} is empty: point "
                     "it at the latent shards (data_pipeline.encode_latents output)")
  return d


def make_synthetic_dataset(config) -> grain.MapDataset:
  """A grain MapDataset of single synthetic examples (dicts of numpy arrays, with 'index')."""
  n = config.data.synthetic_examples
  return grain.MapDataset.range(n).map(lambda i: synthetic_example(config, int(i)))


def make_iterator_fn(config, split: str = "train", shuffle: bool = True
                     ) -> Callable[[], Any]:
  """() -> a checkpointable iterator of host batches for this process.

  'records': `data_pipeline.loader.latent_dataset` (shuffle -> shard by process -> repeat
  -> decode -> random component order + padding -> batch) and its `make_iterator`.
  'synthetic': the same shape of pipeline over `synthetic_example`.
  Either way the iterator has get_state / set_state (checkpointed with the model).
  """
  nproc = jax.process_count()
  if config.batch_size % nproc:
    raise ValueError(f"batch_size={config.batch_size} not divisible by {nproc} processes")
  local_batch = config.batch_size // nproc
  if config.data.source == "records":
    from data_pipeline import loader
    ds = loader.latent_dataset(_data_dir(config, split), batch_size=local_batch,
                               n_max=config.data.max_components, seed=config.data.shuffle_seed,
                               shuffle=shuffle, per_instance_cond=config.mode == "scene")
    return lambda: loader.make_iterator(ds, config.data.num_workers)
  if config.data.source != "synthetic":
    raise ValueError(f"config.data.source must be 'records' or 'synthetic', got "
                     f"{config.data.source!r}")
  ds = make_synthetic_dataset(config)
  if shuffle:
    ds = ds.shuffle(seed=config.data.shuffle_seed)
  ds = ds.repeat()
  from data_pipeline import loader  # this process's rows of each global batch (multi-process)
  ds = loader.process_blocks(ds, local_batch, jax.process_index(), nproc)
  ds = ds.batch(local_batch, drop_remainder=True)
  iter_ds = ds.to_iter_dataset()
  if config.data.num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return lambda: iter(iter_ds)


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
  return {"latents": np.asarray(batch["latents"], np.float32),
          "component_mask": np.asarray(batch["component_mask"], bool), "images": images}


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
  """Flow loss of the EMA and the raw params on `num_batches` batches (fixed noise)."""
  split = "val" if config.data.source == "records" and config.data.get("val_dir") else "train"
  try:
    it = make_iterator_fn(config, split, shuffle=False)()
  except Exception as e:  # a dataset without a validation split
    logging.warning("evaluation on the train split (%s)", e)
    it = make_iterator_fn(config, "train", shuffle=False)()
  jit_loss = jax.jit(lambda p, b, r: loss_fn(p, b, r)[0])
  losses = {"ema": [], "params": []}
  # Every process runs this (the params may span processes); each feeds its own batch rows.
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  for i in range(num_batches):
    batch = sharding.shard_batch(model_batch(next(it)), mesh)
    rng = jax.random.PRNGKey(10_000 + i)
    losses["ema"].append(float(jit_loss(state.ema_params, batch, rng)))
    losses["params"].append(float(jit_loss(state.params, batch, rng)))
  return {f"eval_loss_{k}": float(np.mean(v)) for k, v in losses.items()}


def _atomic_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       num_steps: Optional[int] = None, mesh=None,
                       show_progress: bool = True, eval_batches: int = 2
                       ) -> train_lib.LoopResult:
  """Trains (resuming from workdir's latest checkpoint) and evaluates the EMA params."""
  distributed.initialize(config.get("distributed"))  # multi-process job (config.distributed)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    _atomic_json(os.path.join(workdir, "config.json"), train_lib.config_to_json(config))
  _, init_fn, loss_fn = train_lib.make_dit_task(config)
  result = train_lib.run_training(
      config=config, workdir=workdir, init_fn=init_fn, loss_fn=loss_fn,
      make_iterator=make_iterator_fn(config), mesh=mesh, trainable_fn=trainable_fn(config),
      batch_id_fn=lambda b: np.asarray(b["index"]).tolist() if "index" in b else None,
      prepare_fn=model_batch, num_steps=num_steps, array_metrics_fn=_router_histograms,
      show_progress=show_progress)
  if eval_batches:
    ev = evaluate(config, result.state, loss_fn, eval_batches)  # all processes take part
    ev["step"] = int(result.state.step)
    if jax.process_index() == 0:
      _atomic_json(os.path.join(workdir, "eval.json"), ev)
    logging.info("eval: %s", ev)
  return result


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def main(argv):
  del argv
  config = FLAGS.config
  logging.info("config:\n%s", config)
  train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", "experiments/configs/dit.py:tiny",
                                  "DiT config file (:tiny | :small | :paper [,scene]).",
                                  lock_config=False)
  flags.DEFINE_string("workdir", "outputs/dit", "Checkpoints, TensorBoard events, eval.json.")
  app.run(main)
