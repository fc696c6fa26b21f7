r"""Trains the vecset VAE on `moca_jax.train_lib.run_training` (the DiT's machinery).

  python -m experiments.train_vae --config=experiments/configs/vae.py:tiny --workdir=outputs/vae
  python -m experiments.train_vae --config=experiments/configs/vae.py:tiny \
      --config.data.source=records --config.data.dir=outputs/data/tiny --workdir=outputs/vae

Writes under workdir:
  checkpoints/<step>/     orbax Composite (train_lib.Checkpointer): 'state' {step, params,
                          opt_state}, 'ema' (EMA params), 'data' (iterator state), 'config'
  tb/                     TensorBoard events (train/*, memory/*, eval/iou_*)
  metrics.jsonl           the scalars of every log step, one JSON object per line ('step' =
                          steps done)
  loss_curve.png          training loss against step
  eval.json               reconstruction of held-out shapes: IoU / Chamfer by part size
  reconstruction.glb      one extracted component (coarse-to-fine marching cubes)
  reconstruction.png      render: exact shape (left) and reconstruction (right)
A restarted job resumes from the latest checkpoint, data order included. A non-finite loss
raises train_lib.NonFiniteLossError (a FloatingPointError) naming the step. Evaluation and
`load_vae` use the EMA params (config.optim.ema_decay; with 0 they equal the raw params).

Data (config.data.source):
  'analytic'  each example is one random primitive (data_pipeline.primitives) placed in the
              [-1, 1]^3 object frame with a bounding radius in data.size_range, so small and
              large parts both occur; batch `i` is a function of (seed, i) only.
  'records'   the data pipeline's 'samples' shards in data.dir, one (or
              data.parts_per_element) real part per object (data_pipeline.vae_batches).
Batch layout: see moca_jax.vae.vae_loss.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import trimesh

from data_pipeline import primitives
from moca_jax import extract
from moca_jax import distributed, sharding, train_lib
from moca_jax import viz
from moca_jax.vae import VecSetVAE, count_params, vae_loss

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
  """Infinite, checkpointable iterator of batches of random primitives.

  Batch `i` depends on (seed, i) only; `get_state()` / `set_state()` carry i (JSON), so
  train_lib checkpoints it like a grain iterator. Batches add 'index' [B] int64 (= i).
  """

  def __init__(self, data_config, batch_size: int, seed: int):
    self.cfg = data_config
    self.batch_size = batch_size
    self.seed = seed
    self.position = 0

  def random_shape(self, rng: np.random.Generator):
    return primitives.random_primitive(rng, kinds=tuple(self.cfg.kinds),
                                       size_range=tuple(self.cfg.size_range))

  def example(self, shape, rng: np.random.Generator) -> dict:
    c = self.cfg
    return example_from_shape(shape, rng, c.num_points, c.num_near, c.num_volume,
                              tuple(c.near_scales), c.mesh_segments)

  def batch(self, step: int) -> dict:
    rng = np.random.default_rng([self.seed, step])
    out = stack_examples([self.example(self.random_shape(rng), rng)
                          for _ in range(self.batch_size)])
    out["index"] = np.full((self.batch_size,), step, np.int64)
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = self.batch(self.position)
    self.position += 1
    return b

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])


def make_iterator_fn(config, shuffle: bool = True) -> Callable[[], Any]:
  """() -> a checkpointable iterator of host batches for this process (see module doc)."""
  nproc = jax.process_count()
  if config.batch_size % nproc:
    raise ValueError(f"batch_size={config.batch_size} not divisible by {nproc} processes")
  local_batch = config.batch_size // nproc
  d = config.data
  if d.source == "analytic":
    seed = config.seed * 1000 + jax.process_index()
    return lambda: AnalyticShapeSource(d, local_batch, seed)
  if d.source != "records":
    raise ValueError(f"config.data.source must be 'analytic' or 'records', got {d.source!r}")
  if not d.dir:
    raise ValueError("config.data.dir is empty: point it at the data pipeline's 'samples' "
                     "shards (python -m data_pipeline.build)")
  from data_pipeline import loader, vae_batches
  ds = vae_batches.vae_records_dataset(
      d.dir, batch_size=local_batch, num_points=d.num_points, num_near=d.num_near,
      num_volume=d.num_volume, parts_per_element=d.parts_per_element,
      n_max=d.max_components, seed=d.shuffle_seed, shuffle=shuffle)
  return lambda: loader.make_iterator(ds, d.num_workers)


def model_batch(batch: dict) -> dict:
  """The float32 arrays `vae_loss` reads (host-only fields such as 'index' dropped)."""
  keys = ("surface_points", "surface_normals", "near_points", "near_sdf", "volume_points",
          "volume_sdf")
  return {k: np.asarray(batch[k], np.float32) for k in keys}


# ----------------------------------------------------------------------------------------
# The task for train_lib
# ----------------------------------------------------------------------------------------

def make_vae_task(config: ml_collections.ConfigDict):
  """(model, init_fn, loss_fn) for `train_lib.run_training`.

  init_fn(rng, batch) -> flax variables (params boxed with logical names); only the batch
    shapes are used.
  loss_fn(params, batch, rng) -> (loss, metrics): `vae_loss` on the unboxed inner params
    tree (train_lib's TrainState.params; `model.apply` takes {'params': params}).
  Batch: model_batch's keys (moca_jax.vae.vae_loss), leading axis B.
  """
  model = VecSetVAE(ml_collections.FrozenConfigDict(config.model))

  def init_fn(rng, batch):
    return model.init(*_init_args(model, rng, *batch["surface_points"].shape[:2]))

  def loss_fn(params, batch, rng):
    return vae_loss({"params": params}, model, batch, rng, config.model)

  return model, init_fn, loss_fn


# ----------------------------------------------------------------------------------------
# A hand-driven step and checkpoints in the run_training format (tests, notebooks)
# ----------------------------------------------------------------------------------------

def make_optimizer(config) -> optax.GradientTransformation:
  """train_lib's optimizer for config.optim (what run_training uses)."""
  return train_lib.make_optimizer(config.optim)


def create_state(model: VecSetVAE, tx, rng) -> dict:
  """{'step': int32 [], 'params': {'params': ...} (unboxed), 'opt_state', 'ema_params':
  {'params': ...}}: the TrainState of run_training as a dict, params wrapped for apply."""
  inner = nn.meta.unbox(jax.jit(model.init)(*_init_args(model, rng))["params"])
  return {"step": jnp.zeros((), jnp.int32), "params": {"params": inner},
          "opt_state": tx.init(inner),
          "ema_params": {"params": jax.tree.map(jnp.copy, inner)}}  # own buffers: donatable


def _init_args(model, rng, b: int = 1, p: Optional[int] = None):
  """(rngs, points, normals, queries) for model.init: spread points (FPS needs p >= L)."""
  p = p or max(model.config.num_points, model.config.num_latents)
  pts = jnp.zeros((b, p, 3), jnp.float32) + jnp.linspace(-1.0, 1.0, p)[None, :, None]
  nrm = jnp.zeros((b, p, 3), jnp.float32).at[..., 2].set(1.0)
  k0, k1, k2 = jax.random.split(rng, 3)
  return {"params": k0, "fps": k1, "noise": k2}, pts, nrm, jnp.zeros((b, 16, 3), jnp.float32)


def _to_train_state(state: dict) -> train_lib.TrainState:
  ema = state.get("ema_params", state["params"])
  return train_lib.TrainState(step=state["step"], params=state["params"]["params"],
                              opt_state=state["opt_state"], ema_params=ema["params"])


def make_train_step(model: VecSetVAE, tx, config):
  """Pure (state dict, batch, rng) -> (state dict, metrics): `train_lib.train_step` on the
  VAE loss (same update and EMA as run_training); jit it, donating the state."""
  loss_fn = lambda p, b, r: vae_loss({"params": p}, model, b, r, config.model)
  schedule = train_lib.make_schedule(config.optim)

  def step(state, batch, rng):
    new, metrics = train_lib.train_step(_to_train_state(state), batch, rng, loss_fn=loss_fn,
                                        tx=tx, schedule=schedule,
                                        ema_decay=config.optim.ema_decay)
    return {"step": new.step, "params": {"params": new.params}, "opt_state": new.opt_state,
            "ema_params": {"params": new.ema_params}}, metrics

  return step


class _Checkpointer(train_lib.Checkpointer):
  def wait_until_finished(self) -> None:
    self.wait()


def checkpoint_manager(workdir, config) -> train_lib.Checkpointer:
  """run_training's checkpointer for workdir/checkpoints (has wait_until_finished, close)."""
  return _Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                       config.checkpoint.every, config.checkpoint.keep)


def save_checkpoint(mngr, step: int, state: dict, config, force: bool = False) -> bool:
  """Saves a `create_state` dict in run_training's layout (no data iterator state)."""
  return mngr.save(step, _to_train_state(state), None, config, force=force)


def _abstract_inner_params(config) -> Any:
  model = VecSetVAE(ml_collections.FrozenConfigDict(config.model))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(model.init(*_init_args(model, r))["params"]),
                          jax.random.PRNGKey(0))
  return model, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                             shapes)


def load_vae(workdir, step: Optional[int] = None, use_ema: bool = True):
  """(model, params, config) from a train_vae workdir (latest step unless given).

  params is the unboxed {'params': ...} tree to pass to `model.apply`: the EMA params
  (train_lib's 'ema' item) unless use_ema=False, which gives the raw trained params.
  Checkpoints of the older train_vae layout (items 'state', 'config' only) are read too
  (their raw params). FileNotFoundError / ValueError name the path.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints directory at {ckpt_dir}")
  cfg_dict, step = train_lib.read_checkpoint_config(ckpt_dir, step)
  config = ml_collections.ConfigDict(cfg_dict)
  model, abstract = _abstract_inner_params(config)
  if os.path.isdir(os.path.join(ckpt_dir, str(step), "ema")):
    inner = train_lib.restore_params(ckpt_dir, abstract, step, item="ema" if use_ema else "state")
  else:  # older layout: state = {step, params: {'params': ...}, opt_state}
    inner = train_lib.restore_params(ckpt_dir, {"params": abstract}, step, item="state")["params"]
  return model, {"params": inner}, config


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
# Train and evaluate
# ----------------------------------------------------------------------------------------

def _write_metrics_jsonl(path: Path, history: list, start: int, log_every: int,
                         num_steps: int) -> None:
  """Keeps the lines of steps <= start, appends this run's log steps ('step' = steps done)."""
  kept = []
  if path.exists():
    kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= start]
  for h in history:
    done = h["step"] + 1
    if done % log_every == 0 or done == num_steps:
      kept.append(json.dumps({**h, "step": done}))
  _atomic_write_bytes(path, "".join(l + "\n" for l in kept).encode())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       num_steps: Optional[int] = None, mesh=None,
                       show_progress: bool = True) -> dict:
  """Trains with `train_lib.run_training` (resuming from the latest checkpoint), then
  evaluates the EMA params and writes the outputs (module docstring).

  Returns a dict: 'step' (final), 'metrics' (last step's scalars), 'eval' (IoU / Chamfer by
  part size), 'outputs' (paths written).
  """
  distributed.initialize(config.get("distributed"))  # multi-process job (config.distributed)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  num_steps = config.num_steps if num_steps is None else num_steps
  model, init_fn, loss_fn = make_vae_task(config)
  ckpt_dir = workdir / "checkpoints"
  start = 0
  if ckpt_dir.is_dir():
    steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
    start = max(steps, default=0)
  result = train_lib.run_training(
      config=config, workdir=str(workdir), init_fn=init_fn, loss_fn=loss_fn,
      make_iterator=make_iterator_fn(config), mesh=mesh,
      batch_id_fn=lambda b: np.asarray(b["index"]).tolist(), prepare_fn=model_batch,
      num_steps=num_steps, show_progress=show_progress)
  state = result.state
  logging.info("VAE '%s': %.2fM parameters, step %d", config.model.size,
               count_params(state.params) / 1e6, int(state.step))
  metrics_path = workdir / "metrics.jsonl"
  _write_metrics_jsonl(metrics_path, result.history, start, config.get("log_every", 10),
                       num_steps)
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
    viz.loss_curves_png(curves, str(workdir / "loss_curve.png"), log_y=True,
                        title="VAE training")
    outputs["loss_curve"] = str(workdir / "loss_curve.png")
  source = AnalyticShapeSource(config.data, 1, config.seed)
  eval_rng = np.random.default_rng([config.seed, 7, 7])  # 3 words: never a training seed
  shapes = [source.random_shape(eval_rng) for _ in range(config.eval.num_shapes)]
  ev = {"by_size": {}}
  if shapes:
    ev = evaluate_reconstruction(model, params, shapes, config, eval_rng)
    ev["params"] = "ema"
    write_json(workdir / "eval.json", ev)
    outputs["eval"] = str(workdir / "eval.json")
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      with SummaryWriter(str(workdir / "tb")) as writer:
        for key, s in ev["by_size"].items():
          writer.add_scalar(f"eval/iou_{key}", s["iou_mean"], int(state.step))
  if config.eval.write_mesh and shapes:
    # the largest held-out shape: the one that makes the clearest picture
    shape = max(shapes, key=lambda s: s.bounding_radius())
    ex = stack_examples([example_from_shape(shape, eval_rng, config.data.num_points, 1, 1)])
    z, _ = model.apply(params, ex["surface_points"], ex["surface_normals"], deterministic=True,
                       method=VecSetVAE.encode)
    mesh_out = extract.extract_vae_meshes(model, params, z, resolution=config.eval.resolution,
                                          fine_resolution=config.eval.fine_resolution,
                                          chunk_size=config.eval.chunk_size)[0]
    write_glb(workdir / "reconstruction.glb", mesh_out)
    render_meshes_png(workdir / "reconstruction.png", [shape.to_mesh(48), mesh_out],
                      [f"exact {shape.kind}", f"VAE ({len(mesh_out.faces)} faces)"])
    outputs.update(glb=str(workdir / "reconstruction.glb"),
                   render=str(workdir / "reconstruction.png"))
  return {"step": int(state.step), "metrics": last, "eval": ev["by_size"], "outputs": outputs}


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
      f"({report['machine']['backend']}), data source '{config.data.source}'"
      f"{' (' + str(config.data.dir) + ')' if config.data.source == 'records' else ''}, "
      "EMA params. Evaluated on held-out random primitives (kinds "
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
