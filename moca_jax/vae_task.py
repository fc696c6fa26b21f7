"""The VAE task: the vecset VAE trained on SDF regression (moca_jax.vae.vae_loss).

Same shape as `moca_jax.dit_task`:
  make_task(config)          -> train_lib.Task(model, init_fn, loss_fn)
  make_iterator_fn(config)   -> () -> checkpointable iterator of host batches
  model_batch(batch)         -> the arrays the model reads
  train_and_evaluate(config, workdir, ...)   the run: `train_lib.run_training` + evaluation
and, for the later stages, `load_vae(workdir) -> (model, params, config)` (EMA params).

Data (config.data.source):
  'analytic'  each example is one random primitive (data_pipeline.vae_batches
              .AnalyticShapeSource) placed in the [-1, 1]^3 object frame with a bounding
              radius in data.size_range, so small and large parts both occur; batch `i` is a
              function of (seed, i) only, sampled in data.num_workers grain worker
              processes (`input_workers`: -1 = auto, all but two cores on an accelerator,
              none on the CPU); the checkpointed state is the batch index either way.
  'records'   the data pipeline's 'samples' shards in data.dir, one (or
              data.parts_per_element) real part per object (data_pipeline.vae_batches).
  'mixed'     both in every batch: data.analytic_fraction of its examples analytic, the
              rest records (vae_batches.MixedSource; the state holds both positions), the
              workers split by `mixed_workers`.
Batch layout: see moca_jax.vae.vae_loss.

Writes under workdir (besides run_training's checkpoints/, tb/, config.json):
  metrics.jsonl           the scalars of every log step, one JSON object per line ('step' =
                          steps done)
  loss_curve.png          training loss against step
  eval.json               reconstruction of held-out shapes: IoU / Chamfer by part size
  reconstruction.glb      one extracted component (coarse-to-fine marching cubes)
  reconstruction.png      render: exact shape (left) and reconstruction (right)
A non-finite loss raises train_lib.NonFiniteLossError (a FloatingPointError) naming the step.
Evaluation and `load_vae` use the EMA params (config.optim.ema_decay; with 0 they equal the
raw params).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import trimesh

from data_pipeline import loader, primitives, vae_batches
from moca_jax import checkpointing, distributed, extract, metrics, sharding, train_lib, viz
from moca_jax import io as mio
from moca_jax.machine import describe_host
from moca_jax.vae import VecSetVAE, count_params, is_encoder_param, vae_loss

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Model, loss
# ----------------------------------------------------------------------------------------


def make_task(config: ml_collections.ConfigDict) -> train_lib.Task:
  """Task(model, init_fn, loss_fn) of the vecset VAE for `train_lib.run_training`.

  init_fn(rng, batch) -> flax variables (params boxed with logical names); only the batch
    shapes are used.
  loss_fn(params, batch, rng) -> (loss, metrics): `vae_loss` on the unboxed inner params
    tree (train_lib's TrainState.params; `model.apply` takes {'params': params}).
  Batch: model_batch's keys (moca_jax.vae.vae_loss), leading axis B.
  """
  model = VecSetVAE(ml_collections.FrozenConfigDict(config.model))

  def init_fn(rng, batch):
    return model.init(*init_args(model, rng, *batch["surface_points"].shape[:2]))

  def loss_fn(params, batch, rng):
    return vae_loss({"params": params}, model, batch, rng, config.model)

  return train_lib.Task(model, init_fn, loss_fn)


def init_args(model, rng, b: int = 1, p: Optional[int] = None):
  """(rngs, points [b, p, 3], normals [b, p, 3], queries [b, 16, 3]) for `model.init`:
  spread points, since farthest-point sampling needs p >= num_latents distinct points."""
  p = p or max(model.config.num_points, model.config.num_latents)
  pts = jnp.zeros((b, p, 3), jnp.float32) + jnp.linspace(-1.0, 1.0, p)[None, :, None]
  nrm = jnp.zeros((b, p, 3), jnp.float32).at[..., 2].set(1.0)
  k0, k1, k2 = jax.random.split(rng, 3)
  return {"params": k0, "fps": k1, "noise": k2}, pts, nrm, jnp.zeros((b, 16, 3), jnp.float32)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def make_iterator_fn(config, split: str = "train", shuffle: bool = True) -> Callable[[], Any]:
  """() -> a checkpointable iterator of host batches for this process (see module doc).

  The VAE trains on one split ('train'; evaluation uses held-out analytic shapes).
  """
  if split != "train":
    raise ValueError(f"the VAE task has only the 'train' split, got {split!r}")
  nproc = jax.process_count()
  if config.batch_size % nproc:
    raise ValueError(f"batch_size={config.batch_size} not divisible by {nproc} processes")
  local_batch = config.batch_size // nproc
  d = config.data
  workers = input_workers(d.get("num_workers", 0))
  analytic_seed = config.seed * 1000 + jax.process_index()
  if d.source == "analytic":
    return lambda: vae_batches.AnalyticShapeSource(
        d, local_batch, analytic_seed, num_workers=workers
    )
  if d.source not in ("records", "mixed"):
    raise ValueError(
        f"config.data.source must be 'analytic', 'records' or 'mixed', got {d.source!r}"
    )
  if not d.dir:
    raise ValueError(
        "config.data.dir is empty: point it at the data pipeline's 'samples' "
        "shards (python -m data_pipeline.build)"
    )
  records_batch, analytic_batch = local_batch, 0
  if d.source == "mixed":
    records_batch, analytic_batch = vae_batches.mixed_split(
        local_batch, d.analytic_fraction, d.parts_per_element
    )
  ds = vae_batches.vae_records_dataset(
      d.dir,
      batch_size=records_batch,
      num_points=d.num_points,
      num_near=d.num_near,
      num_volume=d.num_volume,
      parts_per_element=d.parts_per_element,
      n_max=d.max_components,
      seed=d.shuffle_seed,
      shuffle=shuffle,
  )
  if d.source == "records":
    return lambda: loader.make_iterator(ds, workers)
  records_workers, analytic_workers = mixed_workers(workers, d.analytic_fraction)

  def mixed():
    return vae_batches.MixedSource(
        loader.make_iterator(ds, records_workers),
        vae_batches.AnalyticShapeSource(
            d, analytic_batch, analytic_seed, num_workers=analytic_workers
        ),
    )

  return mixed


# host time of an analytic example over that of a records part (see `mixed_workers`)
ANALYTIC_TO_RECORDS_COST_RATIO = 0.5


def mixed_workers(workers: int, analytic_fraction: float) -> tuple[int, int]:
  """(records workers, analytic workers) of a 'mixed' run with `workers` in all (0: both
  sources in the calling process), each source's share in proportion to its host cost.

  Measured on an H200 host's cores (2026-12-02, 'bundle' VAE examples): a records part
  takes about 3 ms of one worker (12 workers fed 62 steps/s of 64 parts), an analytic
  primitive about 1.5 ms (2 workers fed 42 steps/s of 32). So the analytic share of the
  workers is f / (f + 2 (1 - f)) for an analytic fraction f, at least one each when there
  are two or more (with one, it reads the records and the primitives are sampled in the
  calling process). With this split (14 workers: 9 records, 5 analytic at f = 0.5) the same
  host fed 73 steps/s of 32 + 32, against 36-42 with 12 + 2.
  """
  if workers <= 0:
    return 0, 0
  if workers == 1:
    return 1, 0
  f = analytic_fraction
  share = f / (f + (1.0 - f) / ANALYTIC_TO_RECORDS_COST_RATIO)
  analytic = min(workers - 1, max(1, round(workers * share)))
  return workers - analytic, analytic


def input_workers(requested: int) -> int:
  """Worker processes of the input pipeline for config.data.num_workers.

  -1 (auto): none when JAX computes on the CPU (workers would take the cores XLA uses),
  else all but two of the cores this process may use, at most 32 (with several processes on
  one host, set it per process). Other values are taken as given (>= 0).
  """
  if requested >= 0:
    return int(requested)
  if requested != -1:
    raise ValueError(f"config.data.num_workers must be -1 (auto) or >= 0, got {requested}")
  if jax.default_backend() == "cpu":
    return 0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(32, (cores or 1) - 2))


def model_batch(batch: dict) -> dict:
  """The float32 arrays `vae_loss` reads (host-only fields such as 'index' dropped)."""
  keys = (
      "surface_points",
      "surface_normals",
      "near_points",
      "near_sdf",
      "volume_points",
      "volume_sdf",
  )
  return {k: np.asarray(batch[k], np.float32) for k in keys}


# ----------------------------------------------------------------------------------------
# Loading a trained VAE (params only)
# ----------------------------------------------------------------------------------------


def posterior_noise_std(model, params, surface_points, surface_normals) -> list:
  """The mean posterior std of each latent channel over a batch of shapes ([B, P, 3] points
  and normals): the `decode_noise_std` a decoder trained on posterior samples is given at
  inference (see VecSetVAE.decode_features)."""
  _, logvar = model.apply(params, jnp.asarray(surface_points), jnp.asarray(surface_normals),
                          deterministic=True, method=VecSetVAE.encode)
  return [float(x) for x in np.asarray(jnp.exp(0.5 * logvar).mean(axis=(0, 1)))]


def abstract_params(config) -> Any:
  """(VecSetVAE of config.model, its params as ShapeDtypeStructs on one device, without the
  {'params': ...} wrapper), from shapes only (nothing is initialised)."""
  model = VecSetVAE(ml_collections.FrozenConfigDict(config.model))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(
      lambda r: nn.meta.unbox(model.init(*init_args(model, r))["params"]), jax.random.PRNGKey(0)
  )
  return model, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), shapes)


def load_vae(workdir, step: Optional[int] = None, use_ema: bool = True):
  """(model, params, config) from a train_vae workdir (latest step unless given) or a bundle.

  params is the unboxed {'params': ...} tree to pass to `model.apply`: the EMA params
  (train_lib's 'ema' item) unless use_ema=False, which gives the raw trained params.
  Checkpoints of the older train_vae layout (items 'state', 'config' only) are read too
  (their raw params). A model bundle folder (`moca_jax.bundle`, e.g. assets/moca-small) is
  read too: its VAE (EMA) weights and config (step and use_ema do not apply). FileNotFoundError
  / ValueError (bundle.BundleError) name the path.
  """
  from moca_jax import bundle  # pylint: disable=g-import-not-at-top  (bundle imports this module)

  if bundle.is_bundle(workdir):
    b = bundle.read_bundle(str(workdir))
    return VecSetVAE(ml_collections.FrozenConfigDict(b.vae_config.model)), {
        "params": b.vae_params}, b.vae_config
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints directory at {ckpt_dir}")
  cfg_dict, step = checkpointing.read_checkpoint_config(ckpt_dir, step)
  config = ml_collections.ConfigDict(cfg_dict)
  model, abstract = abstract_params(config)
  if os.path.isdir(os.path.join(ckpt_dir, str(step), "ema")):
    inner = checkpointing.restore_params(
        ckpt_dir, abstract, step, item="ema" if use_ema else "state"
    )
  else:  # older layout: state = {step, params: {'params': ...}, opt_state}
    inner = checkpointing.restore_params(ckpt_dir, {"params": abstract}, step, item="state")[
        "params"
    ]
  return model, {"params": inner}, config


# ----------------------------------------------------------------------------------------
# Evaluation: reconstruction quality by part size
# ----------------------------------------------------------------------------------------


def evaluate_reconstruction(
    model, params, shapes: list, config, rng: np.random.Generator, batch_size: int = 8
) -> dict:
  """Encodes (deterministic) and decodes analytic shapes; metrics per shape and by size.

  Per shape: voxel IoU of the decoded occupancy (sdf < 0) against the exact one at the grid
  points of an eval.resolution^3 grid (the grid the mesh is extracted from), and Chamfer
  distance between 4096 points on the extracted mesh and on the exact surface.
  Buckets by bounding radius r: small (r < eval.small_part_radius), large (r >
  eval.large_part_radius), medium otherwise.
  """
  ec = config.eval
  res, bounds = ec.resolution, 1.005
  encode = jax.jit(
      lambda p, x, n: model.apply(p, x, n, deterministic=True, method=VecSetVAE.encode)[0]
  )
  feats = jax.jit(lambda p, z: model.apply(p, z, method=VecSetVAE.decode_features))
  sdf_fn = extract.vae_sdf_fn(model, params)
  grid_pts = extract.grid_coordinates(np.arange((res + 1) ** 3), res, bounds)
  records = []
  for s in range(0, len(shapes), batch_size):
    group = shapes[s : s + batch_size]
    exs = [vae_batches.example_from_shape(sh, rng, config.data.num_points, 1, 1) for sh in group]
    batch = vae_batches.stack_examples(exs)
    z = encode(params, batch["surface_points"], batch["surface_normals"])
    grids = extract.decode_dense_grid(sdf_fn, feats(params, z), res, bounds, ec.chunk_size)
    for sh, grid in zip(group, grids):
      exact = sh.sdf(grid_pts).reshape(grid.shape) < 0
      pred = grid < 0
      union = np.logical_or(exact, pred).sum()
      iou = float(np.logical_and(exact, pred).sum() / max(union, 1))
      with_warnings = extract.mesh_from_grid(grid, res, bounds, name=f"eval shape {len(records)}")
      if len(with_warnings.faces):
        # seeded by the shape's position (the generator `rng` is left as it was, so the
        # shapes' encodings match earlier runs): the same Chamfer on every run
        mesh_pts, _ = trimesh.sample.sample_surface(with_warnings, 4096, seed=len(records))
        ref_pts, _ = primitives.sample_surface(sh, 4096, rng)
        cd = metrics.chamfer_distance(np.asarray(mesh_pts), ref_pts)
      else:
        cd = float("nan")
      records.append(
          {"kind": sh.kind, "radius": float(sh.bounding_radius()), "iou": iou, "chamfer": cd}
      )
  buckets = {"small": [], "medium": [], "large": []}
  for r in records:
    key = (
        "small"
        if r["radius"] < ec.small_part_radius
        else "large"
        if r["radius"] > ec.large_part_radius
        else "medium"
    )
    buckets[key].append(r)
  summary = {}
  for key, rs in buckets.items():
    if rs:
      cds = [r["chamfer"] for r in rs if np.isfinite(r["chamfer"])]
      summary[key] = {
          "count": len(rs),
          "iou_mean": float(np.mean([r["iou"] for r in rs])),
          "chamfer_mean": float(np.mean(cds)) if cds else float("nan"),
          "empty_meshes": len(rs) - len(cds),
      }
  return {
      "by_size": summary,
      "shapes": records,
      "resolution": res,
      "small_part_radius": ec.small_part_radius,
      "large_part_radius": ec.large_part_radius,
  }


# ----------------------------------------------------------------------------------------
# Train and evaluate
# ----------------------------------------------------------------------------------------


def trainable_fn(config) -> Optional[Callable[[Any], Any]]:
  """run_training's trainable_fn: None (all trainable) unless config.train_encoder is False,
  then params -> bool tree that is False on the encoder (`moca_jax.vae.is_encoder_param`)."""
  if config.get("train_encoder", True):
    return None

  def fn(params):
    return {name: jax.tree.map(lambda _, keep=not is_encoder_param(name): keep, sub)
            for name, sub in params.items()}

  return fn


def warm_start_fn(config, workdir: str) -> Optional[Callable]:
  """run_training's start_state_fn for config.init.from_bundle (None without one, or when
  workdir already holds a checkpoint: a resume). The bundle is read and checked against the
  config's architecture here, before training starts (BundleError naming the parameters)."""
  folder = config.get("init", {}).get("from_bundle", "")
  if not folder or checkpointing.latest_checkpoint_step(os.path.join(workdir, "checkpoints")):
    return None
  from moca_jax import bundle  # pylint: disable=g-import-not-at-top  (bundle imports this module)

  _, abstract = abstract_params(config)
  return train_lib.start_from_params(bundle.params_for_training(folder, "vae", abstract))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    num_steps: Optional[int] = None,
    mesh=None,
    show_progress: bool = True,
) -> dict:
  """Trains with `train_lib.run_training` (resuming from the latest checkpoint), then
  evaluates the EMA params and writes the outputs (module docstring).

  Returns a dict: 'step' (final), 'metrics' (last step's scalars), 'eval' (IoU / Chamfer by
  part size), 'outputs' (paths written).
  """
  distributed.initialize(config.get("distributed"))  # multi-process job (config.distributed)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  num_steps = config.num_steps if num_steps is None else num_steps
  model, init_fn, loss_fn = make_task(config)
  start = checkpointing.latest_checkpoint_step(str(workdir / "checkpoints")) or 0
  result = train_lib.run_training(
      config=config,
      workdir=str(workdir),
      init_fn=init_fn,
      loss_fn=loss_fn,
      make_iterator=make_iterator_fn(config),
      mesh=mesh,
      batch_id_fn=lambda b: np.asarray(b["index"]).tolist(),
      prepare_fn=model_batch,
      num_steps=num_steps,
      show_progress=show_progress,
      trainable_fn=trainable_fn(config),
      start_state_fn=warm_start_fn(config, str(workdir)),
  )
  state = result.state
  log.info(
      "VAE '%s': %.2fM parameters, step %d",
      config.model.size,
      count_params(state.params) / 1e6,
      int(state.step),
  )
  metrics_path = workdir / "metrics.jsonl"
  train_lib.write_metrics_jsonl(metrics_path, result.history, start, config.get("log_every", 10), num_steps)
  last = {}
  if result.history:
    last = {**result.history[-1], "step": result.history[-1]["step"] + 1}

  # ---- evaluation and outputs (EMA params) ----
  # Gathered on every process (the params may span processes); process 0 alone evaluates.
  params = {"params": sharding.to_host(state.ema_params)}
  if jax.process_index() != 0:
    return {"step": int(state.step), "metrics": last, "eval": {}, "outputs": {}}
  outputs = {}
  history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
  if history:
    curves = {k: [(h["step"], h[k]) for h in history] for k in ("loss", "near_l1", "volume_l1")}
    viz.loss_curves_png(curves, str(workdir / "loss_curve.png"), log_y=True, title="VAE training")
    outputs["loss_curve"] = str(workdir / "loss_curve.png")
  source = vae_batches.AnalyticShapeSource(config.data, 1, config.seed)
  eval_rng = np.random.default_rng([config.seed, 7, 7])  # 3 words: never a training seed
  shapes = [source.random_shape(eval_rng) for _ in range(config.eval.num_shapes)]
  ev = {"by_size": {}}
  if shapes:
    ev = evaluate_reconstruction(model, params, shapes, config, eval_rng)
    ev["params"] = "ema"
    mio.write_json(workdir / "eval.json", ev)
    outputs["eval"] = str(workdir / "eval.json")
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter

      with SummaryWriter(str(workdir / "tb")) as writer:
        for key, s in ev["by_size"].items():
          writer.add_scalar(f"eval/iou_{key}", s["iou_mean"], int(state.step))
  if config.eval.write_mesh and shapes:
    # the largest held-out shape: the one that makes the clearest picture
    shape = max(shapes, key=lambda s: s.bounding_radius())
    ex = vae_batches.stack_examples(
        [vae_batches.example_from_shape(shape, eval_rng, config.data.num_points, 1, 1)]
    )
    z, _ = model.apply(
        params,
        ex["surface_points"],
        ex["surface_normals"],
        deterministic=True,
        method=VecSetVAE.encode,
    )
    mesh_out = extract.extract_vae_meshes(
        model,
        params,
        z,
        resolution=config.eval.resolution,
        fine_resolution=config.eval.fine_resolution,
        chunk_size=config.eval.chunk_size,
    )[0]
    mio.atomic_write_bytes(workdir / "reconstruction.glb", mesh_out.export(file_type="glb"))
    viz.meshes_png(
        [shape.to_mesh(48), mesh_out],
        [f"exact {shape.kind}", f"VAE ({len(mesh_out.faces)} faces)"],
        workdir / "reconstruction.png",
    )
    outputs.update(
        glb=str(workdir / "reconstruction.glb"), render=str(workdir / "reconstruction.png")
    )
  return {"step": int(state.step), "metrics": last, "eval": ev["by_size"], "outputs": outputs}


def data_source_note(data_config) -> str:
  """How a run's data config names its source in a report, e.g. "'records' (dir)" or
  "'mixed' (dir, 50% analytic primitives)"."""
  source = data_config.source
  if source == "records":
    return f"'records' ({data_config.dir})"
  if source == "mixed":
    return f"'mixed' ({data_config.dir}, {data_config.analytic_fraction:.0%} analytic primitives)"
  return f"'{source}'"


def write_eval_report(stem, result: dict, config, workdir) -> None:
  """Writes <stem>.json and <stem>.md: reconstruction quality by part size of a finished run."""
  ev = mio.read_json(Path(workdir) / "eval.json")
  report = {
      "machine": {
          "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "host": describe_host(),
          "cpu_count": os.cpu_count(),
      },
      "config": config.to_dict(),
      "step": result["step"],
      "final_train_metrics": result["metrics"],
      "eval": ev,
  }
  stem = Path(stem)
  mio.write_json(stem.with_suffix(".json"), report)
  ec = config.eval
  lines = [
      "# VAE reconstruction quality by part size",
      "",
      f"`experiments/train_vae.py`, config size '{config.model.size}', {result['step']} steps of "
      f"batch {config.batch_size} on {report['machine']['device']} "
      f"({report['machine']['backend']}), data source "
      f"{data_source_note(config.data)}, "
      "EMA params. Evaluated on held-out random primitives (kinds "
      f"{', '.join(config.data.kinds)}), bounding radius r in {tuple(config.data.size_range)} "
      "of the [-1, 1]^3 object frame, encoded deterministically.",
      "",
      f"IoU: occupancy of the decoded field on a {ec.resolution + 1}^3 grid against the exact "
      "solid. Chamfer: moca_jax.metrics.chamfer_distance (sum of both mean nearest-neighbour "
      "distances) between 4096 points on the extracted mesh and on the exact surface, in "
      "object-frame units.",
      "",
      "| part size | count | mean IoU | mean Chamfer | empty meshes |",
      "| --- | --- | --- | --- | --- |",
  ]
  names = {
      "small": f"small (r < {ec.small_part_radius})",
      "medium": f"medium ({ec.small_part_radius} <= r <= {ec.large_part_radius})",
      "large": f"large (r > {ec.large_part_radius})",
  }
  for key in ("small", "medium", "large"):
    if key in ev["by_size"]:
      b = ev["by_size"][key]
      lines.append(
          f"| {names[key]} | {b['count']} | {b['iou_mean']:.3f} | "
          f"{b['chamfer_mean']:.4f} | {b['empty_meshes']} |"
      )
  mio.atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
