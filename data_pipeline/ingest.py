"""Ingestion of users' part-annotated meshes.

Inputs (see `list_inputs(directory)`): every supported file directly in the directory is one
object whose separate geometries (scene nodes) are its parts: .glb .gltf .obj .ply (a PLY or
a single-geometry file is a 1-part object); every sub-folder is one object made of its
per-part files (.glb .gltf .obj .ply .stl, each file one part, concatenated if it holds several
geometries).

`load_object(path, cfg)` returns an `IngestedObject` or raises `IngestError` (a ValueError)
whose message starts with the path and gives the reason. Steps:
  1. read the geometries (unreadable / truncated / non-mesh files -> error);
  2. drop degenerate parts with a reason (non-mesh geometry, NaN/inf vertices, empty
     geometry, zero area); no part left -> error;
  3. normalise the whole object by its bounding box: centred, longest side spans
     [-extent, extent] (extent 0.95 as for the procedural data), parts keep their placement;
  4. part limit: more than `max_parts` parts -> 'skip' (error) or 'merge' (repeatedly merge
     the smallest-area part into the part with the nearest bounding-box centre);
  5. overlap filter (as PartCrafter does): pairwise IoU of the parts voxelised at 64^3 over
     [-1,1]^3 and filled; any pair above `max_part_iou` -> error.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import numpy as np
import trimesh

from data_pipeline import primitives, sampling
from data_pipeline.procedural import EXTENT

FILE_EXTS = (".glb", ".gltf", ".obj", ".ply")
PART_EXTS = (".glb", ".gltf", ".obj", ".ply", ".stl")


class IngestError(ValueError):
  """Bad input: the message names the input and the reason."""


@dataclasses.dataclass(frozen=True)
class IngestConfig:
  max_parts: int = 32
  part_limit_policy: str = "merge"  # 'merge' | 'skip'
  max_part_iou: float = 0.5  # objects with a part pair above this are skipped (1 = off)
  iou_resolution: int = 64
  extent: float = EXTENT
  min_area: float = 1e-10


@dataclasses.dataclass
class IngestedObject:
  path: str
  parts: List[trimesh.Trimesh]  # normalised frame
  names: List[str]
  dropped: List[dict]  # {"part": name, "reason": ...}
  center: np.ndarray
  scale: float
  max_iou: float
  merged: int = 0


def list_inputs(directory: str) -> List[str]:
  """Sorted object inputs of a directory: supported files and sub-folders."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: not a directory")
  try:
    names = sorted(os.listdir(directory))
  except OSError as e:
    raise FileNotFoundError(f"{directory}: cannot list directory ({e.strerror})") from e
  out = []
  for n in names:
    p = os.path.join(directory, n)
    if n.startswith("."):
      continue
    if os.path.isdir(p) or n.lower().endswith(FILE_EXTS):
      out.append(p)
  return out


def _fail(path, reason):
  raise IngestError(f"{path}: {reason}")


def _load_geometries(path: str) -> List[Tuple[str, object]]:
  """(name, geometry in world placement) for every geometry node of a file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  kw = {}
  if path.lower().endswith(".obj"):  # each OBJ object ('o') / group ('g') is a part
    kw = dict(split_objects=True, split_groups=True, group_material=False)
  try:
    loaded = trimesh.load(path, force="scene", process=False, **kw)
  except Exception as e:  # trimesh raises many types for corrupt files
    _fail(path, f"cannot read mesh file ({type(e).__name__}: {e})")
  out = []
  for node in sorted(loaded.graph.nodes_geometry):
    transform, gname = loaded.graph[node]
    g = loaded.geometry[gname].copy()
    if hasattr(g, "apply_transform"):
      g.apply_transform(transform)
    out.append((str(node), g))
  return out


def read_parts(path: str) -> Tuple[List[Tuple[str, object]], Optional[str]]:
  """Raw parts of a file or a folder of per-part files."""
  if os.path.isdir(path):
    try:
      files = sorted(f for f in os.listdir(path) if f.lower().endswith(PART_EXTS))
    except OSError as e:
      _fail(path, f"cannot read folder ({e.strerror})")
    if not files:
      _fail(path, f"folder has no part files ({', '.join(PART_EXTS)})")
    parts = []
    for f in files:
      geoms = _load_geometries(os.path.join(path, f))
      meshes = [g for _, g in geoms if isinstance(g, trimesh.Trimesh)]
      name = os.path.splitext(f)[0]
      if not meshes:
        parts.append((name, geoms[0][1] if geoms else None))
      else:
        parts.append((name, meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)))
    return parts, None
  return _load_geometries(path), None


def check_part(name: str, g) -> Optional[str]:
  """Reason why a part is degenerate, or None when it is fine."""
  if g is None:
    return "empty geometry"
  if not isinstance(g, trimesh.Trimesh):
    return f"not a triangle mesh ({type(g).__name__})"
  if len(g.faces) == 0 or len(g.vertices) == 0:
    return "empty geometry"
  if not np.all(np.isfinite(g.vertices)):
    return "non-finite (NaN/inf) vertices"
  if not np.isfinite(g.area) or g.area <= 0:
    return "zero area"
  return None


def _merge_to_limit(meshes, names, limit):
  meshes, names = list(meshes), list(names)
  merged = 0
  while len(meshes) > limit:
    areas = np.array([m.area for m in meshes])
    i = int(np.argmin(areas))
    c = np.array([m.bounds.mean(0) for m in meshes])
    d = np.linalg.norm(c - c[i], axis=-1)
    d[i] = np.inf
    j = int(np.argmin(d))
    meshes[j] = trimesh.util.concatenate([meshes[j], meshes[i]])
    names[j] = f"{names[j]}+{names[i]}"
    del meshes[i], names[i]
    merged += 1
  return meshes, names, merged


def filled_voxels(mesh: trimesh.Trimesh, resolution: int = 64) -> np.ndarray:
  """Boolean [R,R,R] occupancy on the voxel grid of [-1,1]^3: a voxel is filled when its
  centre is inside the mesh (embree ray parity if watertight, else a 7-ray parity vote) or
  it holds a surface sample (so thin and open parts still occupy their shell)."""
  pitch = 2.0 / resolution
  grid = np.zeros((resolution,) * 3, dtype=bool)
  lo = np.clip(np.floor((mesh.bounds[0] + 1.0) / pitch).astype(int), 0, resolution - 1)
  hi = np.clip(np.ceil((mesh.bounds[1] + 1.0) / pitch).astype(int), 1, resolution)
  axes = [np.arange(a, b) for a, b in zip(lo, hi)]
  ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
  centres = (ijk + 0.5) * pitch - 1.0
  method = "ray" if mesh.is_watertight else "ray_vote"
  inside = sampling.mesh_inside(mesh, centres, method)
  grid[tuple(ijk[inside].T)] = True
  n = int(min(2_000_000, max(1000, 8 * mesh.area / pitch ** 2)))
  pts, _ = primitives.sample_mesh_surface(mesh, n, np.random.default_rng(0))
  idx = np.clip(np.floor((pts + 1.0) / pitch).astype(int), 0, resolution - 1)
  grid[tuple(idx.T)] = True
  return grid


def pairwise_iou(meshes, resolution: int = 64) -> np.ndarray:
  """[N,N] IoU of filled voxelisations (diagonal 1)."""
  grids = np.stack([filled_voxels(m, resolution).reshape(-1) for m in meshes]).astype(np.float32)
  inter = grids @ grids.T
  size = grids.sum(1)
  union = size[:, None] + size[None] - inter
  return inter / np.maximum(union, 1.0)


def load_object(path: str, cfg: IngestConfig = IngestConfig()) -> IngestedObject:
  """Reads, cleans, normalises and filters one object (see the module docstring)."""
  raw, _ = read_parts(path)
  if not raw:
    _fail(path, "no geometry in file")
  keep, names, dropped = [], [], []
  for name, g in raw:
    reason = check_part(name, g)
    if reason is None and g.area < cfg.min_area:
      reason = "zero area"
    if reason:
      dropped.append({"part": name, "reason": reason})
    else:
      keep.append(g)
      names.append(name)
  if not keep:
    why = "; ".join(f"{d['part']}: {d['reason']}" for d in dropped)
    _fail(path, f"no valid parts ({why})")
  merged = 0
  if len(keep) > cfg.max_parts:
    if cfg.part_limit_policy == "skip":
      _fail(path, f"{len(keep)} parts exceed the limit of {cfg.max_parts}")
    if cfg.part_limit_policy != "merge":
      raise ValueError(f"part_limit_policy must be 'merge' or 'skip', got {cfg.part_limit_policy!r}")
    keep, names, merged = _merge_to_limit(keep, names, cfg.max_parts)
  lo = np.min([m.bounds[0] for m in keep], axis=0)
  hi = np.max([m.bounds[1] for m in keep], axis=0)
  center = (lo + hi) / 2
  size = float(np.max(hi - lo))
  if size <= 0:
    _fail(path, "zero-size bounding box")
  scale = 2.0 * cfg.extent / size
  parts = []
  for m in keep:
    m = trimesh.Trimesh(vertices=(m.vertices - center) * scale, faces=m.faces, process=True)
    parts.append(m)
  max_iou = 0.0
  if len(parts) > 1 and cfg.max_part_iou < 1.0:
    iou = pairwise_iou(parts, cfg.iou_resolution)
    np.fill_diagonal(iou, 0.0)
    max_iou = float(iou.max())
    if max_iou > cfg.max_part_iou:
      i, j = np.unravel_index(np.argmax(iou), iou.shape)
      _fail(path, f"parts {names[i]!r} and {names[j]!r} overlap (voxel IoU {max_iou:.3f} > "
                  f"{cfg.max_part_iou})")
  return IngestedObject(path=path, parts=parts, names=names, dropped=dropped, center=center,
                        scale=scale, max_iou=max_iou, merged=merged)
