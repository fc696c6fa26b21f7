"""Pictures for people: router heatmaps, loss curves, mesh grids (matplotlib, Agg backend).

  router_heatmap_png(importances [H,N,N], selections [H,N,k], path, ...)
      one panel per head: the router's importance s^h_ij (row i = query component, column j =
      key component; the diagonal is masked since a component never routes to itself), the
      selected components S^h_i outlined.
  loss_curves_png(curves, path, ...)
      curves: {name: [(step, value), ...]}, a plain [(step, value), ...] list, or a
      TensorBoard log dir (read with `read_tensorboard_scalars`).
  render_parts(parts, size=256, ...) -> uint8 [size, size, 3]
      CPU ray-cast picture of a list of trimesh parts (embree via trimesh when available),
      one colour per part, Lambert shading, orthographic camera.
  mesh_grid_png(rows, path, ...)
      one row per sample: input image | generated parts in colour | ground truth.
  meshes_png(meshes, titles, path)
      flat-shaded matplotlib render of a few meshes side by side (VAE reconstructions).

Every writer is atomic (moca_jax.io.save_figure) and returns the path. Image sizes are
fixed by the arguments (no tight bounding boxes), so the pixel size of each file is known.
"""

from __future__ import annotations

import glob
import os
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import trimesh  # pylint: disable=g-import-not-at-top,wrong-import-position

from moca_jax import io as mio  # pylint: disable=g-import-not-at-top,wrong-import-position

DPI = 100
_PALETTE = np.asarray(plt.get_cmap("tab20").colors)[
    [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
]
_GT_COLOUR = np.array([0.75, 0.75, 0.75])


def part_colour(i: int) -> np.ndarray:
  """RGB in [0,1] for part index i (20 distinct colours, then repeats)."""
  return _PALETTE[i % len(_PALETTE)]


def _save_figure(fig, path: str) -> str:
  """Writes a matplotlib figure as PNG atomically (moca_jax.io) and closes it."""
  return mio.save_figure(fig, path, format="png", dpi=DPI)


# ---------------------------------------------------------------------------------------
# Router heatmaps
# ---------------------------------------------------------------------------------------


def router_heatmap_png(
    importances: np.ndarray,
    selections: Optional[np.ndarray],
    path: str,
    component_mask: Optional[np.ndarray] = None,
    title: Optional[str] = None,
    panel_px: int = 240,
    shared_scale: bool = False,
) -> str:
  """Heatmap per head of the router importances with the selected components outlined.

  Args:
    importances: [H, N, N] float, s^h_ij (query i, key j) for one sample.
    selections: [H, N, k] int, the indices j chosen for each query i, or None.
    path: output PNG path.
    component_mask: [N] bool, real components (padding rows/columns are hidden), or None.
    title: figure title.
    panel_px: pixel size of one head's panel; the figure is (min(H,4) * panel_px) wide and
      (ceil(H/4) * panel_px + 40) tall.
    shared_scale: one colour scale for all heads (compares heads); default: each head its
      own scale (shows the ranking inside a head), its range in the panel title.
  """
  imp = np.asarray(importances, np.float64)
  if imp.ndim != 3 or imp.shape[1] != imp.shape[2]:
    raise ValueError(f"importances: expected [H, N, N], got shape {imp.shape}")
  h, n, _ = imp.shape
  if selections is not None:
    sel = np.asarray(selections)
    if sel.ndim != 3 or sel.shape[:2] != (h, n):
      raise ValueError(f"selections: expected [{h}, {n}, k], got shape {sel.shape}")
  if component_mask is None:
    keep = np.arange(n)
  else:
    cm = np.asarray(component_mask, bool)
    if cm.shape != (n,):
      raise ValueError(f"component_mask: expected [{n}], got shape {cm.shape}")
    keep = np.flatnonzero(cm)
  remap = {int(j): a for a, j in enumerate(keep)}
  cols = min(h, 4)
  rows = -(-h // cols)
  fig = plt.figure(figsize=(cols * panel_px / DPI, (rows * panel_px + 40) / DPI), dpi=DPI)
  finite = imp[:, keep][:, :, keep]
  off = ~np.eye(len(keep), dtype=bool)
  vmax = float(finite[:, off].max()) if off.any() else 1.0
  vmin = float(finite[:, off].min()) if off.any() else 0.0
  if vmax <= vmin:
    vmax = vmin + 1e-6
  for head in range(h):
    ax = fig.add_subplot(rows, cols, head + 1)
    m = np.ma.masked_array(finite[head], mask=~off)
    lo, hi = vmin, vmax
    if not shared_scale and off.any():
      lo, hi = float(finite[head][off].min()), float(finite[head][off].max())
      hi = max(hi, lo + 1e-6)
    ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    if selections is not None:
      for i in keep:
        for j in sel[head, i]:
          if int(j) in remap and int(j) != int(i):
            ax.add_patch(
                plt.Rectangle(
                    (remap[int(j)] - 0.5, remap[int(i)] - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="red",
                    linewidth=1.5,
                )
            )
    if len(keep) <= 16:
      ax.set_xticks(range(len(keep)), [str(j) for j in keep])
      ax.set_yticks(range(len(keep)), [str(j) for j in keep])
    ax.set_title(f"head {head}" + ("" if shared_scale else f" [{lo:.2f}, {hi:.2f}]"), fontsize=8)
    ax.set_xlabel("key component j", fontsize=7)
    ax.set_ylabel("query i", fontsize=7)
    ax.tick_params(labelsize=6)
  scale = (
      f"colour scale [{vmin:.2f}, {vmax:.2f}] for all heads"
      if shared_scale
      else "colour scale per head"
  )
  fig.suptitle(f"{title or 'router importance (red: selected)'}; {scale}", fontsize=9)
  fig.subplots_adjust(
      left=0.08,
      right=0.98,
      bottom=0.08,
      top=1 - 40 / (rows * panel_px + 40) - 0.04,
      wspace=0.35,
      hspace=0.45,
  )
  return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------------------


def read_tensorboard_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """Scalars of every TensorBoard event file under logdir: {tag: [(step, value), ...]}.

  Reads the TFRecord framing directly and decodes events with tensorboardX's protobufs.
  A truncated last record (a writer still running) is ignored; CRCs are not checked.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(logdir):
    raise FileNotFoundError(f"{logdir}: not a directory of TensorBoard event files")
  files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
  out: Dict[str, List[Tuple[int, float]]] = {}
  for f in files:
    with open(f, "rb") as fh:
      data = fh.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      end = pos + 12 + length + 4
      if end > len(data):
        break
      ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos = end
      for v in ev.summary.value:
        if v.HasField("simple_value"):
          val = float(v.simple_value)
        elif v.HasField("tensor") and v.tensor.float_val:
          val = float(v.tensor.float_val[0])
        else:
          continue
        out.setdefault(v.tag, []).append((int(ev.step), val))
  for tag in out:
    out[tag].sort(key=lambda sv: sv[0])
  return out


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
  """[T] -> [T]: the mean of the last `window` values at each point (fewer at the start)."""
  values = np.asarray(values, np.float64)
  sums = np.cumsum(np.concatenate([[0.0], values]))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (sums[idx] - sums[lo]) / (idx - lo)


def loss_curves_png(
    curves: Union[str, Sequence[Tuple[int, float]], Mapping[str, Sequence[Tuple[int, float]]]],
    path: str,
    tags: Optional[Iterable[str]] = None,
    log_y: bool = False,
    title: Optional[str] = None,
    width_px: int = 640,
    height_px: int = 400,
    smooth: int = 0,
) -> str:
  """Line plot of one or more (step, value) series; width_px x height_px PNG.

  curves: {name: [(step, value), ...]}, one [(step, value), ...] list (named 'loss'), or a
  TensorBoard log dir. tags: keep only these names (default: all). smooth > 1: each series is
  drawn faint and its trailing mean over `smooth` points on top (`trailing_mean`).
  """
  if isinstance(curves, (str, os.PathLike)):
    series = read_tensorboard_scalars(os.fspath(curves))
    if not series:
      raise ValueError(f"{curves}: no scalar summaries found")
  elif isinstance(curves, Mapping):
    series = {k: list(v) for k, v in curves.items()}
  else:
    series = {"loss": list(curves)}
  if tags is not None:
    tags = list(tags)
    missing = [t for t in tags if t not in series]
    if missing:
      raise ValueError(f"tags: {missing} not among {sorted(series)}")
    series = {t: series[t] for t in tags}
  fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
  ax = fig.add_subplot(1, 1, 1)
  for name, pts in series.items():
    if not pts:
      continue
    arr = np.asarray(pts, np.float64).reshape(-1, 2)
    if smooth > 1 and len(arr) > smooth:
      raw = ax.plot(arr[:, 0], arr[:, 1], linewidth=0.6, alpha=0.3)[0]
      ax.plot(arr[:, 0], trailing_mean(arr[:, 1], smooth), color=raw.get_color(),
              label=f"{name} (mean of {smooth})", linewidth=1.6)
    else:
      ax.plot(arr[:, 0], arr[:, 1], label=name, linewidth=1.2)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("value")
  ax.grid(True, alpha=0.3)
  if len(series) > 0:
    ax.legend(fontsize=8)
  ax.set_title(title or "training curves", fontsize=10)
  fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
  return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# Mesh rendering (CPU ray casting)
# ---------------------------------------------------------------------------------------


def _camera_basis(azimuth_deg: float, elevation_deg: float):
  az, el = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
  # y is up; the camera looks from `eye` toward the origin.
  eye = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
  forward = -eye
  right = np.cross(forward, [0.0, 1.0, 0.0])
  right /= np.linalg.norm(right)
  up = np.cross(right, forward)
  return eye, forward, right, up


def _intersector(mesh: trimesh.Trimesh):
  try:
    from trimesh.ray import ray_pyembree  # pylint: disable=g-import-not-at-top

    return ray_pyembree.RayMeshIntersector(mesh)
  except Exception:  # pylint: disable=broad-except
    from trimesh.ray import ray_triangle  # pylint: disable=g-import-not-at-top

    return ray_triangle.RayMeshIntersector(mesh)


def render_parts(
    parts: Sequence[Optional[trimesh.Trimesh]],
    size: int = 256,
    colours: Optional[Sequence[np.ndarray]] = None,
    azimuth: float = 45.0,
    elevation: float = 25.0,
    normalize: bool = True,
    background: Tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
  """Ray-cast picture of the parts: uint8 [size, size, 3].

  Parts are jointly normalised to [-1, 1] (as in the metrics) unless normalize=False; empty
  parts are skipped; part i gets colours[i] (default: part_colour(i)). Orthographic camera
  on a sphere (azimuth around y, elevation above the xz plane) framing the projected
  vertices around the origin, head light, Lambert shading.
  """
  from moca_jax import metrics  # pylint: disable=g-import-not-at-top

  parts = metrics.as_mesh_list(parts)
  if normalize:
    parts = metrics.normalize_parts(parts)
  meshes, ids = [], []
  for i, p in enumerate(parts):
    if not metrics.is_empty(p):
      meshes.append(p)
      ids.append(np.full(len(p.faces), i))
  img = np.empty((size, size, 3))
  img[:] = background
  if not meshes:
    return (img * 255).round().astype(np.uint8)
  fused = trimesh.util.concatenate(meshes) if len(meshes) > 1 else meshes[0]
  face_part = np.concatenate(ids)
  eye, forward, right, up = _camera_basis(azimuth, elevation)
  # Frame the projected vertices (with a margin); at most the [-1,1] cube's half-diagonal.
  v = np.asarray(fused.vertices)
  half = 1.08 * max(float(np.abs(v @ right).max()), float(np.abs(v @ up).max()), 1e-3)
  half = min(half, 1.8)
  t = (np.arange(size) + 0.5) / size * 2 * half - half
  xs, ys = np.meshgrid(t, -t)  # row 0 at the top
  origins = (eye * 4.0)[None] + xs.reshape(-1, 1) * right + ys.reshape(-1, 1) * up
  dirs = np.broadcast_to(forward, origins.shape).copy()
  tri = _intersector(fused).intersects_first(origins, dirs)
  hit = tri >= 0
  if hit.any():
    normals = np.asarray(fused.face_normals)[tri[hit]]
    shade = 0.25 + 0.75 * np.abs(normals @ forward)
    pidx = face_part[tri[hit]]
    cols = (
        np.stack([np.asarray(colours[k]) if colours is not None else part_colour(k) for k in pidx])
        if len(pidx)
        else np.zeros((0, 3))
    )
    img.reshape(-1, 3)[hit] = cols[:, :3] * shade[:, None]
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _display_image(image: np.ndarray) -> np.ndarray:
  """uint8 [H,W,C] (C in 1, 3, 4, 7) -> something imshow shows: RGB (first 3 channels)."""
  im = np.asarray(image)
  if im.ndim == 2:
    return im
  if im.ndim != 3:
    raise ValueError(f"image: expected [H, W, C], got shape {im.shape}")
  if im.shape[-1] == 1:
    return im[..., 0]
  if im.shape[-1] >= 3:
    return im[..., :3]
  raise ValueError(f"image: expected 1, 3, 4 or 7 channels, got {im.shape[-1]}")


def image_panel(fig, rect, image, title: Optional[str] = None, title_size: int = 9):
  """One borderless grid cell of a figure: `image` (H x W x 3, or H x W grey) in the axes at
  `rect` ([left, bottom, width, height], figure fractions), or 'n/a' when it is None; an
  optional column title. Returns the axes (for labels)."""
  ax = fig.add_axes(rect)
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_visible(False)
  if image is None:
    ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=9, color="grey")
  else:
    ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None, interpolation="nearest")
  if title is not None:
    ax.set_title(title, fontsize=title_size)
  return ax


def mesh_grid_png(
    rows: Sequence[Mapping],
    path: str,
    panel_px: int = 256,
    render_px: Optional[int] = None,
    title: Optional[str] = None,
    pred_header: str = "generated parts",
) -> str:
  """Grid PNG: one row per sample, columns input image | generated parts | ground truth
  (`pred_header` names the middle column, e.g. 'reconstructed parts').

  rows: dicts with optional keys 'image' (uint8 [H,W,C]; scenes: first 3 channels shown),
    'pred' (list of trimesh parts, one colour each), 'gt' (list of trimesh parts, grey
    unless gt_colour_parts=True in the row), 'label' (str for the row), 'view'
    ((azimuth, elevation) degrees of the camera for both renders, e.g. the input's;
    default (45, 25)).
  The file is (3 * panel_px) wide and (len(rows) * panel_px + header) tall, header = 30
  pixels, 50 with a title.
  """
  if not rows:
    raise ValueError("rows: need at least one row")
  render_px = render_px or panel_px
  n = len(rows)
  header = 50 if title else 30
  height = n * panel_px + header
  fig = plt.figure(figsize=(3 * panel_px / DPI, height / DPI), dpi=DPI)
  top = 1 - header / height
  headers = ("input", pred_header, "ground truth")
  for r, row in enumerate(rows):
    panels = []
    image = row.get("image")
    panels.append(_display_image(image) if image is not None else None)
    pred = row.get("pred")
    az, el = row.get("view") or (45.0, 25.0)
    panels.append(
        render_parts(pred, render_px, azimuth=az, elevation=el) if pred is not None else None
    )
    gt = row.get("gt")
    if gt is not None:
      gt_list = trimesh_list(gt)
      cols = None if row.get("gt_colour_parts") else [_GT_COLOUR] * len(gt_list)
      panels.append(render_parts(gt_list, render_px, colours=cols, azimuth=az, elevation=el))
    else:
      panels.append(None)
    for c, im in enumerate(panels):
      ax = image_panel(
          fig,
          [c / 3, top - (r + 1) * top / n, 1 / 3, top / n],
          im,
          title=headers[c] if r == 0 else None,
      )
      if c == 0 and row.get("label"):
        ax.text(
            0.02,
            0.02,
            str(row["label"]),
            transform=ax.transAxes,
            fontsize=7,
            color="black",
            backgroundcolor="white",
        )
  if title:
    fig.text(0.5, 1 - 6 / height, title, ha="center", va="top", fontsize=9)
  return _save_figure(fig, path)


def meshes_png(
    meshes: Sequence[trimesh.Trimesh], titles: Sequence[str], path: str, max_faces: int = 60000
) -> str:
  """Flat-shaded matplotlib render of meshes side by side in [-1, 1]^3 (400 x 400 px each).

  Meshes above `max_faces` faces are drawn with a uniform random subset of their faces.
  Returns `path`.
  """
  from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # pylint: disable=g-import-not-at-top

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
  return _save_figure(fig, path)


def trimesh_list(meshes) -> List[trimesh.Trimesh]:
  """A Trimesh / Scene / sequence -> list of parts (see metrics.as_mesh_list)."""
  from moca_jax import metrics  # pylint: disable=g-import-not-at-top

  return metrics.as_mesh_list(meshes)
