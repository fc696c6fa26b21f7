"""Evaluation the way the paper does it (Tables 1 and 2): items, predictors, scores, reports.

Items (`EvalItem`: ground-truth component meshes, a conditioning image, scene masks) come
from a procedural split (`items_from_split`) or a folder of user meshes
(`items_from_glb_dir`, read by data_pipeline.ingest). A predictor is any
`predict_fn(item) -> list of trimesh parts`: `pipeline_predict_fn` runs the generation
pipeline (moca_jax.pipeline), `perturbed_gt_predict_fn` jitters the ground truth (tests and
sanity checks without a model). `evaluate_items` predicts and scores every item
(moca_jax.metrics: Chamfer distance, F-score, self-IoU), skipping and reporting failures;
`write_report` writes metrics.json, table.md (paper-shaped `table1_markdown` /
`table2_markdown`), grid.png, router.png and TensorBoard scalars. `benchmark_nn` times the
nearest-neighbour backends of the metrics. experiments/evaluate.py is the command line.

Cost per item (the bundled model, 10 ODE steps, 2 CPU cores): generation was about 50 s
per object, mostly decoding the dense 64^3 grid; the pipeline now decodes it level by level
(same meshes) and compiles its sampler and decoder once per component bucket, not per part
count (moca_jax.pipeline.DEFAULT_COMPONENT_BUCKETS). Scoring takes about 1 s per object and
~0.7 s per scene instance (100k-point Chamfer / F-score each). Scenes give the pipeline
the instance masks (as an id image) and always generate one component per instance; objects
generate `num_components` parts (default: the ground-truth count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import trimesh

from moca_jax import io as mio
from moca_jax import metrics as M
from moca_jax import pipeline
from moca_jax import viz
from moca_jax.machine import describe_host

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalItem:
  """One evaluation case.

  name: identifier; kind: 'object' | 'scene'; gt_parts: N trimesh components (parts or
  instances); image: uint8 [H,W,3] conditioning render (object: the object; scene: the
  scene); masks: scenes only, bool [N,H,W] instance masks in component order.
  """

  name: str
  kind: str
  gt_parts: List[trimesh.Trimesh]
  image: np.ndarray
  masks: Optional[np.ndarray] = None
  view: Optional[Tuple[float, float]] = None  # (azimuth, elevation) deg of the render
  category: Optional[str] = None  # procedural items: the generator's category (e.g. 'table')


def _render_condition(
    parts: Sequence[trimesh.Trimesh],
    kind: str,
    seed: int,
    size: int,
    colors: Optional[np.ndarray] = None,
    background=(),
):
  """One conditioning view, rendered by the data pipeline: (rgb, masks | None, view)."""
  from data_pipeline import render  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  if colors is None:
    colors = (np.asarray([viz.part_colour(i) for i in range(len(parts))]) * 255).astype(np.uint8)
  # one material per object, as the training renders (data_pipeline.render.material_colors)
  colors = render.material_colors(kind, colors, np.random.default_rng([seed, 3]))
  if kind == "object":  # framed as data_pipeline.make frames training views
    radius = max(
        float(np.linalg.norm(np.asarray(m.vertices), axis=1).max())
        for m in parts
        if not M.is_empty(m)
    )
    cams = render.object_cameras(rng, 1, radius=radius)
  else:
    cams = render.scene_cameras(rng, 1)
  rgb, ids = render.render_views(list(parts), colors, cams, size=size, background=background)
  masks = None
  if kind == "scene":
    masks = np.stack([ids[0] == i + 1 for i in range(len(parts))])
  return rgb[0], masks, _camera_view(cams[0].cam_to_world)


def _camera_view(cam_to_world: np.ndarray) -> Tuple[float, float]:
  """(azimuth, elevation) in degrees of a camera looking at the origin (y up)."""
  eye = np.asarray(cam_to_world, np.float64)[:3, 3]
  r = float(np.linalg.norm(eye))
  return (
      float(np.degrees(np.arctan2(eye[0], eye[2]))),
      float(np.degrees(np.arcsin(eye[1] / max(r, 1e-12)))),
  )


def items_from_split(
    split: str,
    kind: str = "object",
    limit: Optional[int] = None,
    image_size: int = 224,
    base_seed: int = 0,
    indices: Optional[Sequence[int]] = None,
) -> Iterator[EvalItem]:
  """Items of a procedural split (data_pipeline.procedural.split_items) of one kind.

  The ground-truth component meshes are the parts' tessellations; the conditioning image is
  one view rendered with data_pipeline.render (seeded by the item index). indices: only these
  positions among the split's items of `kind` (0-based, in the given order; `limit` then
  applies to them); ValueError names one past the end.
  """
  from data_pipeline import procedural  # pylint: disable=g-import-not-at-top

  if kind not in ("object", "scene"):
    raise ValueError(f"kind: expected 'object' or 'scene', got {kind!r}")
  items = procedural.split_items(split, base_seed=base_seed, kinds=(kind,))
  if indices is not None:
    outside = [i for i in indices if not 0 <= int(i) < len(items)]
    if outside:
      raise ValueError(f"item index {outside[0]} is outside split {split!r}, which has "
                       f"{len(items)} {kind}s (0-{len(items) - 1})")
    items = [items[int(i)] for i in indices]
  return _rendered_items(items[:limit], kind, image_size)


def _rendered_items(items, kind: str, image_size: int) -> Iterator[EvalItem]:
  """`items_from_split`'s items, generated and rendered one at a time."""
  for it in items:
    sample = it.generate()
    parts = [p.to_mesh() for p in sample.parts]
    rgb, masks, view = _render_condition(
        parts,
        kind,
        seed=it.index,
        size=image_size,
        colors=sample.colors,
        background=sample.background,
    )
    yield EvalItem(name=it.key, kind=kind, gt_parts=parts, image=rgb, masks=masks, view=view,
                   category=getattr(sample, "category", None))


def _companion(path: str, suffixes: Sequence[str]) -> Optional[str]:
  """NAME.ext -> NAME<suffix> if it exists; a folder -> folder/render<suffix>."""
  stem = os.path.join(path, "render") if os.path.isdir(path) else os.path.splitext(path)[0]
  return next((stem + e for e in suffixes if os.path.isfile(stem + e)), None)


def items_from_glb_dir(
    folder: str,
    kind: str = "object",
    limit: Optional[int] = None,
    image_size: int = 224,
    skipped: Optional[list] = None,
) -> Iterator[EvalItem]:
  """Items from a folder of user meshes, read by the data pipeline's ingestion.

  Inputs are those of data_pipeline.ingest.list_inputs: each NAME.glb/.gltf/.obj/.ply is an
  object whose geometries are its parts; each sub-folder is an object of per-part files.
  Optional companions: NAME.png/.jpg (folder: render.png) is the conditioning render, else
  one is rendered here as the data pipeline renders training views; scenes: NAME.masks.npy
  (folder: render.masks.npy), [N,H,W] bool in part order, else rendered with the image.
  The parts are ingested like training data (normalised, > 32 parts merged; the overlap
  filter is off). Bad inputs are skipped and appended to `skipped` as {'name', 'reason'}
  (or raised when skipped is None).
  """
  from data_pipeline import ingest  # pylint: disable=g-import-not-at-top

  inputs = ingest.list_inputs(folder)
  if not inputs:
    exts = "/".join(ingest.FILE_EXTS)
    raise FileNotFoundError(f"{folder}: no {exts} files or part folders")
  cfg = ingest.IngestConfig(max_part_iou=1.0)
  for i, path in enumerate(inputs[:limit]):
    name = os.path.basename(path.rstrip("/"))
    try:
      parts = list(ingest.load_object(path, cfg).parts)
      img_path = _companion(path, IMAGE_EXTS)
      image = mio.load_image(img_path) if img_path else None
      masks = None
      mask_path = _companion(path, (".masks.npy",))
      if kind == "scene" and mask_path:
        masks = np.load(mask_path).astype(bool)
        if masks.ndim != 3 or len(masks) != len(parts):
          raise ValueError(f"{mask_path}: expected [{len(parts)}, H, W], got {masks.shape}")
      view = None
      if image is None or (kind == "scene" and masks is None):
        image, masks, view = _render_condition(parts, kind, seed=i, size=image_size)
      yield EvalItem(name=name, kind=kind, gt_parts=parts, image=image, masks=masks, view=view)
    except (ValueError, FileNotFoundError) as e:
      if skipped is None:
        raise
      skipped.append({"name": name, "reason": str(e)})


# ---------------------------------------------------------------------------------------
# Predictors
# ---------------------------------------------------------------------------------------

PredictFn = Callable[[EvalItem], List[trimesh.Trimesh]]


def pipeline_predict_fn(
    checkpoint_dir: Optional[str],
    steps: Optional[int] = None,
    cfg: Optional[float] = None,
    seed: int = 0,
    num_components: Optional[int] = None,
    pipe=None,
    on_result: Optional[Callable] = None,
    cfg_interval: Optional[tuple] = None,
    time_shift: Optional[float] = None,
) -> PredictFn:
  """Wraps `moca_jax.pipeline.Pipeline` as predict_fn(item) -> predicted parts.

  num_components: parts to generate (default: the item's ground-truth count, as in the
  paper's evaluation where the part / instance count is given; scenes always use the
  number of instances in the mask (a scene model gets the masks, an object-mode model
  trained with scenes mixed in only the image); a ground-truth count above the model's trained maximum
  is generated anyway, `Pipeline.check_num_components` with force). Scenes pass the instance masks as an id image
  [1, H, W]; the pipeline rejects a mask where an instance is not visible at all (the
  item is then skipped and reported). steps / cfg default to the checkpoint's
  config.sample (a scene: its scene_cfg_scale where set); cfg_interval (guidance only at
  flow times lo <= t <= hi, `moca_jax.flow.sample_ode`) and time_shift (the sampler's
  time grid, `moca_jax.flow.time_grid`) too. `pipe`: an already loaded pipeline (tests, the demo). `on_result(item,
  output)` is called with every PipelineOutput (the demo writes files with it). The
  routing maps of the last call are kept in predict_fn.last_routing.
  """
  if pipe is None:
    pipe = pipeline.load_pipeline(checkpoint_dir)

  def predict(item: EvalItem) -> List[trimesh.Trimesh]:
    image = np.asarray(item.image)[..., :3].astype(np.uint8)
    if item.kind == "scene" and pipe.scene:
      if item.masks is None:
        raise ValueError(f"{item.name}: a scene needs instance masks")
      n = len(item.masks)
      masks = pipeline.masks_to_ids(item.masks)[None]
    elif item.kind == "scene":  # an object-mode model trained with scenes mixed in: the
      n = len(item.gt_parts)    # scene image alone conditions one component per instance
      masks = None
    else:
      n = num_components or len(item.gt_parts)
      masks = None
    # The protocol gives the ground-truth count, so it is used even above the number of
    # components the model was trained with (up to what its ID table can represent).
    res = pipe(
        image[None],
        num_components=n,
        masks=masks,
        steps=steps,
        cfg_scale=cfg,
        seed=seed,
        force=num_components is None,
        kind=item.kind,
        cfg_interval=cfg_interval,
        time_shift=time_shift,
    )
    if on_result is not None:
      on_result(item, res)
    predict.last_routing = getattr(res, "routing", None)
    return list(res.meshes[0])

  predict.last_routing = None
  return predict


def perturbed_gt_predict_fn(
    noise: float = 0.0, drop_last: bool = False, seed: int = 0
) -> PredictFn:
  """A model-free predictor for tests and sanity checks: the ground truth, jittered.

  Each vertex moves by Gaussian noise of std `noise` (in the item's units); drop_last
  replaces the last part with an empty mesh.
  """

  def predict(item: EvalItem) -> List[trimesh.Trimesh]:
    rng = np.random.default_rng(seed)
    out = []
    for p in item.gt_parts:
      v = np.asarray(p.vertices) + rng.normal(scale=noise, size=p.vertices.shape)
      out.append(trimesh.Trimesh(v, np.asarray(p.faces), process=False))
    if drop_last and out:
      out[-1] = trimesh.Trimesh()
    return out

  return predict


def vae_reconstruction_predict_fn(pipe, seed: int = 0) -> PredictFn:
  """No DiT: the ceiling that a checkpoint's VAE puts on any generation with it.

  Each ground-truth part is sampled as the training data is (`data_pipeline.sampling.
  surface_with_edges`: the VAE's `num_points` surface points with normals, a fifth on
  sharp edges), encoded to its posterior mean (as `data_pipeline.encode_latents` makes
  the DiT's training latents) and decoded by `pipe.decode`, the SDF grid and marching
  cubes of generated latents; the meshes come back in the ground truth's order, so
  scoring them measures the VAE alone. An empty ground-truth part gives an empty mesh.
  pipe: a `pipeline.Pipeline` (its VAE and component buckets are used, its DiT is not).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipeline import sampling  # pylint: disable=g-import-not-at-top

  model, params = pipe.vae_model, pipe.vae_params
  num_points = int(model.config.num_points)
  sample_cfg = sampling.SampleConfig(n_surface=num_points)

  @jax.jit
  def encode(points, normals):
    mean, _ = model.apply(params, points, normals, deterministic=True,
                          method=type(model).encode)
    return mean

  def predict(item: EvalItem) -> List[trimesh.Trimesh]:
    rng = np.random.default_rng([seed, len(item.gt_parts)])
    kept = [i for i, p in enumerate(item.gt_parts) if not M.is_empty(p)]
    if not kept:
      return [trimesh.Trimesh() for _ in item.gt_parts]
    samples = [sampling.surface_with_edges(item.gt_parts[i], num_points, rng, sample_cfg)
               for i in kept]
    points = np.stack([s[0] for s in samples])
    normals = np.stack([s[1] for s in samples])
    # padded to a component bucket with copies of the first part: one compilation a bucket
    size = pipeline.padded_count(len(kept), pipe.component_buckets)
    fill = np.arange(size) % len(kept)
    latents = np.asarray(encode(points[fill], normals[fill]))[: len(kept)]
    meshes = pipe.decode(latents[None])[0]
    out = [trimesh.Trimesh() for _ in item.gt_parts]
    for i, mesh in zip(kept, meshes):
      out[i] = mesh
    return out

  return predict


# ---------------------------------------------------------------------------------------
# Scoring, tables, report
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class MetricSettings:
  num_samples: int = M.DEFAULT_NUM_SAMPLES
  seed: int = 0
  taus: Sequence[float] = M.DEFAULT_TAUS
  voxel_resolution: int = M.DEFAULT_VOXEL_RESOLUTION
  nn_backend: str = "kdtree"
  object_frame: str = "instance"


def score(pred_parts, item: EvalItem, settings: MetricSettings) -> Dict[str, float]:
  """Metrics of one item: Table 1 keys for objects, Table 2 keys for scenes."""
  kw = dict(
      num_samples=settings.num_samples,
      seed=settings.seed,
      taus=settings.taus,
      voxel_resolution=settings.voxel_resolution,
      nn_backend=settings.nn_backend,
  )
  if item.kind == "object":
    return M.object_metrics(pred_parts, item.gt_parts, **kw)
  return M.scene_metrics(pred_parts, item.gt_parts, object_frame=settings.object_frame, **kw)


def evaluate_items(
    items: Iterable[EvalItem],
    predict_fn: PredictFn,
    settings: MetricSettings = MetricSettings(),
    grid_rows: int = 4,
    skipped: Optional[list] = None,
    progress: bool = True,
    total: Optional[int] = None,
) -> dict:
  """Predicts and scores every item; failing items are skipped and reported.

  total: the number of items for the progress bar when `items` has no len() (a
  generator such as `items_from_split`'s; an upper bound is fine).

  Returns {'rows': [{'name', ...metrics, 'seconds_predict', 'seconds_score'}], 'mean': {...},
  'skipped':
  [{'name', 'reason'}], 'grid': [viz.mesh_grid_png rows], 'routing': first routing maps}.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  rows, grid, routing = [], [], None
  skipped = [] if skipped is None else skipped
  it = tqdm(items, desc="evaluate", unit="item", disable=not progress, total=total)
  for item in it:
    try:
      t0 = time.perf_counter()
      pred = M.as_mesh_list(predict_fn(item))
      dt = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except  (batch job: skip and report)
      skipped.append({"name": item.name, "reason": f"prediction failed: {type(e).__name__}: {e}"})
      traceback.print_exc(file=sys.stderr)
      continue
    row = {"name": item.name, "kind": item.kind}
    if item.category is not None:
      row["category"] = item.category
    t0 = time.perf_counter()
    row.update(score(pred, item, settings))
    row["seconds_predict"] = dt
    row["seconds_score"] = time.perf_counter() - t0
    rows.append(row)
    if routing is None and getattr(predict_fn, "last_routing", None) is not None:
      routing = predict_fn.last_routing
    if len(grid) < grid_rows:
      grid.append(
          dict(
              image=item.image,
              pred=pred,
              gt=item.gt_parts,
              view=item.view,
              label=f"{item.name}  CD {row.get('cd', row.get('cd_scene')):.3f}",
          )
      )
  mean = M.mean_metrics([{k: v for k, v in r.items() if isinstance(v, float)} for r in rows])
  return {"rows": rows, "mean": mean, "skipped": skipped, "grid": grid, "routing": routing}


def _fmt(v) -> str:
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


# The paper's rows, for reading our numbers beside theirs (different data: PartObjaverse-Tiny
# and 3D-FRONT, not our procedural splits, so the numbers are not comparable one to one).
PAPER_TABLE1 = {
    "MoCA (paper, PartObjaverse-Tiny)": dict(self_iou=0.0125, cd=0.1010, f1=0.8708, f05=0.6882),
    "PartCrafter (paper)": dict(self_iou=0.0224, cd=0.1195, f1=0.8169, f05=0.6236),
}
PAPER_TABLE2 = {
    "MoCA (paper, 3D-FRONT)": dict(
        self_iou=0.0006, cd_scene=0.1201, f_scene=0.8637, cd_obj=0.1163, f_obj=0.8380
    ),
    "MIDI (paper)": dict(
        self_iou=0.0011, cd_scene=0.1548, f_scene=0.8238, cd_obj=0.1442, f_obj=0.7996
    ),
}


def table1_markdown(results: Dict[str, dict], with_paper: bool = True) -> str:
  """Paper Table 1 shape: Method | Self-IoU | CD | Fscore-0.1 | Fscore-0.05.

  results: {method name: mean metrics dict (keys self_iou, cd, fscore@0.1, fscore@0.05)}.
  Lower is better for Self-IoU and CD, higher for F-scores.
  """
  lines = [
      "| Method | Self-IoU ↓ | CD ↓ | Fscore-0.1 ↑ | Fscore-0.05 ↑ | N |",
      "|---|---|---|---|---|---|",
  ]
  for name, m in results.items():
    lines.append(
        f"| {name} | {_fmt(m.get('self_iou'))} | {_fmt(m.get('cd'))} | "
        f"{_fmt(m.get('fscore@0.1'))} | {_fmt(m.get('fscore@0.05'))} | "
        f"{int(m.get('count', 0))} |"
    )
  if with_paper:
    for name, p in PAPER_TABLE1.items():
      lines.append(
          f"| {name} | {p['self_iou']:.4f} | {p['cd']:.4f} | {p['f1']:.4f} | "
          f"{p['f05']:.4f} | 200 |"
      )
  return "\n".join(lines) + "\n"


def table2_markdown(results: Dict[str, dict], tau: float = 0.1, with_paper: bool = True) -> str:
  """Paper Table 2 shape: Method | Self-IoU | CD-Scene | Fscore-Scene | CD-Obj | Fscore-Obj.

  F-scores at `tau` (0.1 by default).
  """
  t = f"{tau:g}"
  lines = [
      "| Method | Self-IoU ↓ | CD-Scene ↓ | Fscore-Scene ↑ | CD-Obj ↓ | Fscore-Obj ↑ | N |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, m in results.items():
    lines.append(
        f"| {name} | {_fmt(m.get('self_iou'))} | {_fmt(m.get('cd_scene'))} | "
        f"{_fmt(m.get('fscore_scene@' + t))} | {_fmt(m.get('cd_obj'))} | "
        f"{_fmt(m.get('fscore_obj@' + t))} | {int(m.get('count', 0))} |"
    )
  if with_paper:
    for name, p in PAPER_TABLE2.items():
      lines.append(
          f"| {name} | {p['self_iou']:.4f} | {p['cd_scene']:.4f} | "
          f"{p['f_scene']:.4f} | {p['cd_obj']:.4f} | {p['f_obj']:.4f} | - |"
      )
  return "\n".join(lines) + "\n"


def machine_description() -> str:
  """One line naming this machine (see moca_jax.machine.describe_host)."""
  return describe_host()


def write_report(
    out_dir: str,
    result: dict,
    kind: str,
    method: str = "moca-jax",
    meta: Optional[dict] = None,
    grid_png: bool = True,
    tensorboard: bool = True,
) -> Dict[str, str]:
  """Writes metrics.json, table.md, grid.png (and router.png, tb/) into out_dir.

  result: the dict of `evaluate_items`. Returns {name: path} of what was written.
  """
  os.makedirs(out_dir, exist_ok=True)
  meta = dict(meta or {})
  meta.setdefault("machine", machine_description())
  meta.setdefault("date_utc", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
  written = {}
  doc = {
      "method": method,
      "kind": kind,
      "meta": meta,
      "mean": result["mean"],
      "rows": result["rows"],
      "skipped": result["skipped"],
  }
  p = os.path.join(out_dir, "metrics.json")
  mio.write_json(p, doc, indent=1)
  written["json"] = p
  table = (
      table1_markdown({method: result["mean"]})
      if kind == "object"
      else table2_markdown({method: result["mean"]})
  )
  lines = [
      f"# Evaluation: {method} ({kind}s)",
      "",
      ", ".join(f"{k}: {v}" for k, v in meta.items()),
      "",
      table,
  ]
  if kind == "scene":
    lines += [
        f"Fscore-Scene/Obj at tau = 0.1; at 0.05: scene "
        f"{_fmt(result['mean'].get('fscore_scene@0.05'))}, obj "
        f"{_fmt(result['mean'].get('fscore_obj@0.05'))}.",
        "",
    ]
  lines += [
      "Paper rows are on different data (PartObjaverse-Tiny / 3D-FRONT) and are shown "
      "only for scale.",
      "",
  ]
  if result["skipped"]:
    lines += ["## Skipped", ""] + [f"- {s['name']}: {s['reason']}" for s in result["skipped"]]
  p = os.path.join(out_dir, "table.md")
  mio.atomic_write_text(p, "\n".join(lines) + "\n")
  written["markdown"] = p
  if grid_png and result["grid"]:
    written["grid"] = viz.mesh_grid_png(
        result["grid"],
        os.path.join(out_dir, "grid.png"),
        # evaluate --reconstruct: the middle column is the VAE's, nothing was generated
        title=(f"{method}: input | reconstructed | ground truth" if meta.get("reconstruct")
               else f"{method}: input | generated | ground truth"),
        pred_header="reconstructed parts" if meta.get("reconstruct") else "generated parts",
    )
  routing = result.get("routing")
  if isinstance(routing, dict) and np.asarray(routing.get("importances", [])).size == 0:
    routing = None  # no MoC block (dense global attention): nothing to draw
  if routing is not None:
    try:
      written["router"] = write_router_png(routing, os.path.join(out_dir, "router.png"))
    except (ValueError, KeyError, TypeError, IndexError) as e:
      print(f"router.png not written: {e}", file=sys.stderr)
  if tensorboard:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    w = SummaryWriter(os.path.join(out_dir, "tb"))
    for k, v in result["mean"].items():
      if isinstance(v, float) and not math.isnan(v):
        w.add_scalar("eval/" + k.replace("@", "_"), v, 0)
    w.close()
    written["tensorboard"] = os.path.join(out_dir, "tb")
  return written


def _router_slice(a: np.ndarray, sample: int, block: int, step: int) -> np.ndarray:
  """[S, B, G, H, ...] / [B, G, H, ...] / [G, H, ...] / [H, ...] -> [H, ...] (3-D result)."""
  if a.ndim == 6:
    a = a[step]
  if a.ndim == 5:
    a = a[sample]
  if a.ndim == 4:
    a = a[block]
  if a.ndim != 3:
    raise ValueError(f"routing array: expected 3 to 6 dims, got shape {a.shape}")
  return a


def write_router_png(routing, path: str, sample: int = 0, block: int = 0, step: int = -1) -> str:
  """Router heatmap of one sample from a GenerationResult.routing.

  routing: a dict with 'importances' [B, G, H, N, N] and 'selections' [B, G, H, N, k] (the
  DiT's aux over its G MoC blocks; an extra leading ODE-step axis S is allowed, and
  `step` picks one), and optionally 'component_mask' [B, N]. Picks batch `sample`, MoC
  block `block`.
  """
  if not isinstance(routing, dict) or "importances" not in routing:
    raise ValueError("routing: expected a dict with importances [B, G, H, N, N]")
  imp = _router_slice(np.asarray(routing["importances"]), sample, block, step)
  sel = routing.get("selections")
  if sel is not None:
    sel = np.asarray(sel)
    sel = _router_slice(sel, sample, block, step) if sel.size else None
  mask = routing.get("component_mask")
  if mask is not None:
    mask = np.asarray(mask)
    mask = mask[sample] if mask.ndim == 2 else mask
  return viz.router_heatmap_png(
      imp,
      sel,
      path,
      component_mask=mask,
      title=f"router importance, sample {sample}, MoC block {block} (red: selected)",
  )


# ---------------------------------------------------------------------------------------
# Nearest-neighbour benchmark
# ---------------------------------------------------------------------------------------


def benchmark_nn(
    sizes: Sequence[int] = (10_000, 30_000, 100_000),
    repeats: int = 3,
    jax_max_size: int = 100_000,
    seed: int = 0,
) -> List[dict]:
  """Times the Chamfer distance's two NN searches (M points each way) with both backends.

  Returns rows {'points', 'backend', 'median_s', 'runs', 'compile_s', 'max_abs_diff'}; the
  JAX timing excludes compilation (reported separately) and includes host transfers.
  """
  rows = []
  rng = np.random.default_rng(seed)
  for n in sizes:
    a = rng.normal(size=(n, 3))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.normal(size=(n, 3))
    b *= 0.8 / np.linalg.norm(b, axis=1, keepdims=True)
    ref = None
    for backend in M.NN_BACKENDS:
      if backend == "jax" and n > jax_max_size:
        continue
      compile_s = 0.0
      if backend == "jax":
        t0 = time.perf_counter()
        M.nn_distances(a[:8], b, backend)  # compile for this ref size and chunk
        compile_s = time.perf_counter() - t0
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        d1 = M.nn_distances(a, b, backend)
        d2 = M.nn_distances(b, a, backend)
        times.append(time.perf_counter() - t0)
      d = np.concatenate([d1, d2])
      diff = 0.0 if ref is None else float(np.abs(d - ref).max())
      ref = d if ref is None else ref
      rows.append(
          {
              "points": n,
              "backend": backend,
              "median_s": statistics.median(times),
              "runs": repeats,
              "compile_s": compile_s,
              "max_abs_diff": diff,
              "load_avg_1min": os.getloadavg()[0],
          }
      )
      print(
          f"{n:>8d} {backend:>7s} {statistics.median(times):9.3f} s  "
          f"(compile {compile_s:.2f} s, max |diff| {diff:.1e})",
          flush=True,
      )
  return rows


def write_nn_benchmark(rows: List[dict], out_dir: str = "experiments/results") -> None:
  """experiments/results/nn_benchmark.{md,json}, naming the machine."""
  machine = machine_description()
  import jax  # pylint: disable=g-import-not-at-top
  import scipy  # pylint: disable=g-import-not-at-top

  meta = {
      "machine": machine,
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "scipy": scipy.__version__,
      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
  }
  mio.atomic_write_text(
      os.path.join(out_dir, "nn_benchmark.json"),
      json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n",
  )
  lines = [
      "# Nearest-neighbour search for Chamfer / F-score: scipy cKDTree vs chunked JAX",
      "",
      f"Machine: {machine}; jax {meta['jax']} ({meta['jax_backend']}), scipy "
      f"{meta['scipy']}; {meta['date_utc']} UTC.",
      "",
      "Both directions of one Chamfer distance (M points to M points, unit and 0.8 "
      "spheres), median wall time; JAX excludes compilation.",
      "",
      "The load average (1 min) after each row shows how busy the shared machine was.",
      "",
      "| points per set | backend | median s | runs | JAX compile s | max abs diff vs "
      "kdtree | load avg |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['points']} | {r['backend']} | {r['median_s']:.3f} | {r['runs']} | "
        f"{r['compile_s']:.2f} | {r['max_abs_diff']:.1e} | "
        f"{r.get('load_avg_1min', float('nan')):.1f} |"
    )
  mio.atomic_write_text(os.path.join(out_dir, "nn_benchmark.md"), "\n".join(lines) + "\n")
