r"""Trains the vecset VAE on analytic shapes sampled on the fly.

  python -m experiments.train_vae --config=experiments/configs/vae.py:tiny --workdir=outputs/vae

Writes under workdir:
  checkpoints/<step>/     orbax: 'state' {step, params, opt_state} and 'config' (JSON)
  tensorboard/            event files (tensorboardX)
  metrics.jsonl           the logged scalars, one JSON object per log step
  loss_curve.png          training loss against step
  eval.json               reconstruction of held-out shapes: IoU / Chamfer by part size
  reconstruction.glb      one extracted component (coarse-to-fine marching cubes)
  reconstruction.png      render: exact shape (left) and reconstruction (right)
Resumes from the latest checkpoint in workdir. A non-finite loss raises FloatingPointError
naming the step.

Data: each component is one random primitive (data_pipeline.primitives) placed in the
[-1, 1]^3 object frame with a bounding radius in data.size_range, so small and large parts
both occur. Batch layout: see moca_jax.vae.vae_loss.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX
import tqdm
import trimesh

from data_pipeline import primitives
from moca_jax import extract
from moca_jax import viz
from moca_jax.vae import VecSetVAE, count_params, init_vae, vae_loss

import flax.linen as nn

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------
# Analytic data source
# ----------------------------------------------------------------------------------------

def example_from_shape(shape, rng: np.random.Generator, num_points: int, num_near: int,
                       num_volume: int, near_scales=(0.005, 0.05), segments: int = 32) -> dict:
  """One training example of an analytic shape (a Primitive or Part); arrays float32.

  Returns dict with 'surface_points' [P,3], 'surface_normals' [P,3], 'near_points' [Qn,3],
  'near_sdf' [Qn], 'volume_points' [Qv,3], 'volume_sdf' [Qv] (SDF negative inside).
  """
  pts, nrm = primitives.sample_surface(shape, num_points, rng, segments=segments)
  q, d = primitives.sample_sdf_points(shape.sdf, pts, rng, num_near, num_volume,
                                      scales=near_scales)
  return {"surface_points": pts, "surface_normals": nrm,
          "near_points": q[:num_near], "near_sdf": d[:num_near],
          "volume_points": q[num_near:], "volume_sdf": d[num_near:]}


def stack_examples(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class AnalyticShapeSource:
  """Infinite stream of batches of random primitives; deterministic given (seed, step)."""

  def __init__(self, data_config, batch_size: int, seed: int):
    self.cfg = data_config
    self.batch_size = batch_size
    self.seed = seed

  def random_shape(self, rng: np.random.Generator):
    return primitives.random_primitive(rng, kinds=tuple(self.cfg.kinds),
                                       size_range=tuple(self.cfg.size_range))

  def example(self, shape, rng: np.random.Generator) -> dict:
    c = self.cfg
    return example_from_shape(shape, rng, c.num_points, c.num_near, c.num_volume,
                              tuple(c.near_scales), c.mesh_segments)

  def batch(self, step: int) -> dict:
    rng = np.random.default_rng([self.seed, step])
    return stack_examples([self.example(self.random_shape(rng), rng)
                           for _ in range(self.batch_size)])


# ----------------------------------------------------------------------------------------
# Train state, step, checkpoints
# ----------------------------------------------------------------------------------------

def make_optimizer(config) -> optax.GradientTransformation:
  warmup = max(min(config.warmup_steps, config.num_steps // 2), 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup, max(config.num_steps, warmup + 1),
      end_value=config.end_lr_factor * config.learning_rate)
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay))


def create_state(model: VecSetVAE, tx, rng) -> dict:
  """{'step': int32 [], 'params': {'params': ...} (unboxed), 'opt_state': ...}."""
  params = nn.meta.unbox(init_vae(model, rng))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_train_step(model: VecSetVAE, tx, config):
  """Pure (state, batch, rng) -> (state, metrics); jit it (donating state)."""

  def train_step(state, batch, rng):
    grad_fn = jax.value_and_grad(vae_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state["params"], model, batch, rng, config.model)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


def checkpoint_manager(workdir, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint_every, max_to_keep=config.keep_checkpoints,
      create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "config"))


def save_checkpoint(mngr, step: int, state, config, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())),
      force=force)


def restore_checkpoint(mngr, abstract_state, step: Optional[int] = None):
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def load_vae(workdir, step: Optional[int] = None):
  """(model, params, config) from a train_vae workdir (latest step unless given).

  params is the unboxed {'params': ...} tree to pass to `model.apply`.
  """
  path = Path(workdir).absolute() / "checkpoints"
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoints directory at {path}")
  mngr = ocp.CheckpointManager(path, item_names=("state", "config"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {path}")
  cfg_dict = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = ml_collections.ConfigDict(cfg_dict)
  model = VecSetVAE(ml_collections.FrozenConfigDict(config.model))
  abstract = jax.eval_shape(lambda: create_state(model, make_optimizer(config),
                                                 jax.random.PRNGKey(0)))
  state = restore_checkpoint(mngr, abstract, step)
  mngr.close()
  return model, state["params"], config


# ----------------------------------------------------------------------------------------
# Output helpers (atomic writes)
# ----------------------------------------------------------------------------------------

def _atomic_write_bytes(path: Path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path: Path, obj):
  _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_glb(path: Path, mesh: trimesh.Trimesh):
  _atomic_write_bytes(Path(path), mesh.export(file_type="glb"))


def render_meshes_png(path: Path, meshes: list, titles: list, max_faces: int = 60000):
  """Flat-shaded matplotlib render of meshes side by side in [-1, 1]^3."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from mpl_toolkits.mplot3d.art3d import Poly3DCollection
  fig = plt.figure(figsize=(4 * len(meshes), 4), dpi=100)
  light = np.array([0.4, -0.5, 0.8]) / np.linalg.norm([0.4, -0.5, 0.8])
  for i, (mesh, title) in enumerate(zip(meshes, titles)):
    ax = fig.add_subplot(1, len(meshes), i + 1, projection="3d")
    if len(mesh.faces):
      faces = np.arange(len(mesh.faces))
      if len(faces) > max_faces:  # keep the render fast; drops faces uniformly
        faces = np.random.default_rng(0).choice(faces, max_faces, replace=False)
      tris = mesh.triangles[faces]
      shade = 0.25 + 0.75 * np.clip(mesh.face_normals[faces] @ light, 0, 1)
      colors = np.stack([0.55 * shade, 0.65 * shade, 0.85 * shade, np.ones_like(shade)], -1)
      ax.add_collection3d(Poly3DCollection(tris, facecolors=colors, edgecolors="none"))
    ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
    ax.set_box_aspect((1, 1, 1))
    ax.set_title(title)
    ax.set_axis_off()
  fig.tight_layout()
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Evaluation: reconstruction quality by part size
# ----------------------------------------------------------------------------------------

def chamfer_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Symmetric mean Euclidean nearest-neighbour distance between point sets [N,3], [M,3]."""
  import scipy.spatial
  da, _ = scipy.spatial.cKDTree(b).query(a)
  db, _ = scipy.spatial.cKDTree(a).query(b)
  return float(0.5 * (da.mean() + db.mean()))


def evaluate_reconstruction(model, params, shapes: list, config, rng: np.random.Generator,
                            batch_size: int = 8) -> dict:
  """Encodes (deterministic) and decodes analytic shapes; metrics per shape and by size.

  Per shape: voxel IoU of the decoded occupancy (sdf < 0) against the exact one at the grid
  points of an eval.resolution^3 grid (the grid the mesh is extracted from), and Chamfer
  distance between 4096 points on the extracted mesh and on the exact surface.
  Buckets by bounding radius r: small (r < eval.small_part_radius), large (r >
  eval.large_part_radius), medium otherwise.
  """
  ec = config.eval
  res, bounds = ec.resolution, 1.005
  encode = jax.jit(lambda p, x, n: model.apply(p, x, n, deterministic=True,
                                               method=VecSetVAE.encode)[0])
  feats = jax.jit(lambda p, z: model.apply(p, z, method=VecSetVAE.decode_features))
  sdf_fn = extract.vae_sdf_fn(model, params)
  grid_pts = extract.grid_coordinates(np.arange((res + 1) ** 3), res, bounds)
  records = []
  for s in range(0, len(shapes), batch_size):
    group = shapes[s:s + batch_size]
    exs = [example_from_shape(sh, rng, config.data.num_points, 1, 1) for sh in group]
    batch = stack_examples(exs)
    z = encode(params, batch["surface_points"], batch["surface_normals"])
    grids = extract.decode_dense_grid(sdf_fn, feats(params, z), res, bounds, ec.chunk_size)
    for sh, grid in zip(group, grids):
      exact = sh.sdf(grid_pts).reshape(grid.shape) < 0
      pred = grid < 0
      union = np.logical_or(exact, pred).sum()
      iou = float(np.logical_and(exact, pred).sum() / max(union, 1))
      with_warnings = extract.mesh_from_grid(grid, res, bounds, name=f"eval shape {len(records)}")
      if len(with_warnings.faces):
        mesh_pts = with_warnings.sample(4096)
        ref_pts, _ = primitives.sample_surface(sh, 4096, rng)
        cd = chamfer_distance(np.asarray(mesh_pts), ref_pts)
      else:
        cd = float("nan")
      records.append({"kind": sh.kind, "radius": float(sh.bounding_radius()), "iou": iou,
                      "chamfer": cd})
  buckets = {"small": [], "medium": [], "large": []}
  for r in records:
    key = ("small" if r["radius"] < ec.small_part_radius else
           "large" if r["radius"] > ec.large_part_radius else "medium")
    buckets[key].append(r)
  summary = {}
  for key, rs in buckets.items():
    if rs:
      cds = [r["chamfer"] for r in rs if np.isfinite(r["chamfer"])]
      summary[key] = {"count": len(rs), "iou_mean": float(np.mean([r["iou"] for r in rs])),
                      "chamfer_mean": float(np.mean(cds)) if cds else float("nan"),
                      "empty_meshes": len(rs) - len(cds)}
  return {"by_size": summary, "shapes": records, "resolution": res,
          "small_part_radius": ec.small_part_radius, "large_part_radius": ec.large_part_radius}


# ----------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint), then evaluates and writes the outputs.

  Returns a dict with the final step, the last logged metrics, eval summary and the paths
  of the written files.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model = VecSetVAE(ml_collections.FrozenConfigDict(config.model))
  tx = make_optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)

  # ---- state: fresh or restored ----
  state = create_state(model, tx, init_rng)
  logging.info("VAE '%s': %.2fM parameters", config.model.size,
               count_params(state["params"]) / 1e6)
  mngr = checkpoint_manager(workdir, config)
  start = 0
  if mngr.latest_step() is not None:
    state = restore_checkpoint(mngr, jax.eval_shape(lambda: state))
    start = int(state["step"])
    logging.info("resumed from step %d", start)

  metrics_path = workdir / "metrics.jsonl"
  if metrics_path.exists():  # drop lines logged after the checkpoint we resume from
    kept = [l for l in metrics_path.read_text().splitlines()
            if l and json.loads(l)["step"] <= start]
    _atomic_write_bytes(metrics_path, "".join(l + "\n" for l in kept).encode())

  source = AnalyticShapeSource(config.data, config.batch_size, config.seed)
  train_step = jax.jit(make_train_step(model, tx, config), donate_argnums=(0,))
  writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
  last = {}

  # ---- loop ----
  t0 = time.time()
  bar = tqdm.tqdm(range(start, config.num_steps), initial=start, total=config.num_steps,
                  desc="train_vae", dynamic_ncols=True)
  try:
    for step in bar:
      batch = source.batch(step)
      state, metrics = train_step(state, batch, jax.random.fold_in(train_rng, step))
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite VAE loss {loss} at step {step}")
      done = step + 1
      if done % config.log_every == 0 or done == config.num_steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last["step"] = done
        last["steps_per_s"] = (done - start) / max(time.time() - t0, 1e-9)
        for k, v in last.items():
          if k != "step":
            writer.add_scalar(f"train/{k}", v, done)
        with open(metrics_path, "a") as f:
          f.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{loss:.4f}", near=f"{last['near_l1']:.4f}")
      save_checkpoint(mngr, done, state, config, force=done == config.num_steps)
  finally:  # also on errors: finish pending checkpoint writes, close the files
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()

  # ---- evaluation and outputs ----
  params = state["params"]
  outputs = {}
  history = []
  if metrics_path.exists():
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
  if history:
    curves = {k: [(h["step"], h[k]) for h in history] for k in ("loss", "near_l1", "volume_l1")}
    viz.loss_curves_png(curves, str(workdir / "loss_curve.png"), log_y=True,
                        title="VAE training")
    outputs["loss_curve"] = str(workdir / "loss_curve.png")
  eval_rng = np.random.default_rng([config.seed, 7, 7])  # 3 words: never a training seed
  shapes = [source.random_shape(eval_rng) for _ in range(config.eval.num_shapes)]
  result = {"by_size": {}}
  if shapes:
    result = evaluate_reconstruction(model, params, shapes, config, eval_rng)
    write_json(workdir / "eval.json", result)
    outputs["eval"] = str(workdir / "eval.json")
    for key, s in result["by_size"].items():
      writer.add_scalar(f"eval/iou_{key}", s["iou_mean"], int(state["step"]))
  if config.eval.write_mesh and shapes:
    # the largest held-out shape: the one that makes the clearest picture
    shape = max(shapes, key=lambda s: s.bounding_radius())
    ex = stack_examples([example_from_shape(shape, eval_rng, config.data.num_points, 1, 1)])
    z, _ = model.apply(params, ex["surface_points"], ex["surface_normals"], deterministic=True,
                       method=VecSetVAE.encode)
    mesh = extract.extract_vae_meshes(model, params, z, resolution=config.eval.resolution,
                                      fine_resolution=config.eval.fine_resolution,
                                      chunk_size=config.eval.chunk_size)[0]
    write_glb(workdir / "reconstruction.glb", mesh)
    render_meshes_png(workdir / "reconstruction.png", [shape.to_mesh(48), mesh],
                      [f"exact {shape.kind}", f"VAE ({len(mesh.faces)} faces)"])
    outputs.update(glb=str(workdir / "reconstruction.glb"),
                   render=str(workdir / "reconstruction.png"))
  writer.close()
  return {"step": int(state["step"]), "metrics": last, "eval": result["by_size"],
          "outputs": outputs}


def write_eval_report(stem, result: dict, config, workdir) -> None:
  """Writes <stem>.json and <stem>.md: reconstruction quality by part size of a finished run."""
  import platform
  ev = json.loads((Path(workdir) / "eval.json").read_text())
  report = {"machine": {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                        "host": platform.node(), "cpu_count": os.cpu_count()},
            "config": config.to_dict(), "step": result["step"], "final_train_metrics":
            result["metrics"], "eval": ev}
  stem = Path(stem)
  write_json(stem.with_suffix(".json"), report)
  ec = config.eval
  lines = [
      "# VAE reconstruction quality by part size", "",
      f"`experiments/train_vae.py`, config size '{config.model.size}', {result['step']} steps of "
      f"batch {config.batch_size} on {report['machine']['device']} "
      f"({report['machine']['backend']}). Held-out random primitives (kinds "
      f"{', '.join(config.data.kinds)}), bounding radius r in {tuple(config.data.size_range)} "
      "of the [-1, 1]^3 object frame, encoded deterministically.", "",
      f"IoU: occupancy of the decoded field on a {ec.resolution + 1}^3 grid against the exact "
      "solid. Chamfer: mean nearest-neighbour distance (symmetric average) between 4096 "
      "points on the extracted mesh and on the exact surface, in object-frame units.", "",
      "| part size | count | mean IoU | mean Chamfer | empty meshes |",
      "| --- | --- | --- | --- | --- |"]
  names = {"small": f"small (r < {ec.small_part_radius})",
           "medium": f"medium ({ec.small_part_radius} <= r <= {ec.large_part_radius})",
           "large": f"large (r > {ec.large_part_radius})"}
  for key in ("small", "medium", "large"):
    if key in ev["by_size"]:
      b = ev["by_size"][key]
      lines.append(f"| {names[key]} | {b['count']} | {b['iou_mean']:.3f} | "
                   f"{b['chamfer_mean']:.4f} | {b['empty_meshes']} |")
  _atomic_write_bytes(stem.with_suffix(".md"), ("\n".join(lines) + "\n").encode())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if FLAGS.report:
    write_eval_report(FLAGS.report, result, FLAGS.config, FLAGS.workdir)
  print(json.dumps({k: v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "outputs/vae", "Where checkpoints, metrics and meshes go.")
  flags.DEFINE_string("report", "", "If set, a path stem for the by-part-size report "
                      "(.md and .json), e.g. experiments/results/vae_eval_by_size.")
  config_flags.DEFINE_config_file("config", "experiments/configs/vae.py:tiny",
                                  "VAE training config.", lock_config=True)
  app.run(main)
