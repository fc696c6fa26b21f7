"""Ingestion of users' part-annotated meshes.

Inputs (see `list_inputs(directory)`), three layouts, which may be mixed in one directory:
  * scene-graph files: every .glb .gltf .obj .ply file directly in the directory is one object
    whose geometry nodes are its parts: each node's world transform (the product down the
    scene graph) is applied, a mesh instanced by several nodes gives one part per node, and a
    part is named after its node (OBJ: each 'o' object / 'g' group is a part; a PLY or a
    single-geometry file is a 1-part object);
  * per-part files: every sub-folder is one object made of its per-part files (.glb .gltf
    .obj .ply .stl, each file one part named after the file, concatenated if it holds several
    geometries);
  * per-face labels (PartObjaverse style): a mesh file with a sibling `<stem>.npy`, or a
    sub-folder holding exactly one mesh file and one .npy file. The .npy is an integer [F]
    array, one part label per face of the mesh loaded as one concatenated mesh
    (`trimesh.load(force="mesh", process=False)`, the face order of PartObjaverse's labels);
    part `part_<label>` is the faces with that label; negative labels (unlabelled faces) are
    dropped with a reason.

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
     [-1,1]^3 and filled; any pair above `max_part_iou` -> error;
  6. watertight parts for the SDF (`make_watertight`): a part that is not closed (boundary
     or non-manifold edges) or has flipped faces is repaired by MeshFix (Attene 2010,
     through `pymeshfix`, maintained by the PyVista project): it removes degenerate faces
     and self-intersections, fills holes with minimal patches and orients the faces
     consistently, so the part moves as little as possible (a voxel remesh would move every
     surface by up to half a voxel). The repaired part and its Chamfer distance to the
     original (`moca_jax.metrics.chamfer_distance`) are recorded; renders keep the original
     parts. Closed parts whose shells overlap (self-intersecting, common when a part is
     modelled from several closed pieces) are not repaired: MeshFix would delete the
     intersecting triangles and change the shape, while their SDF sign, the winding number
     (`sampling.mesh_inside`), is already right for them. If MeshFix cannot close a part,
     the part is kept as it is and the winding number signs its SDF too.
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
LABEL_EXT = ".npy"
REPAIR_CHAMFER_SAMPLES = 10_000


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
  parts: List[trimesh.Trimesh]  # normalised frame, as read (renders)
  names: List[str]
  dropped: List[dict]  # {"part": name, "reason": ...}
  center: np.ndarray
  scale: float
  max_iou: float
  merged: int = 0
  solid_parts: List[trimesh.Trimesh] = dataclasses.field(default_factory=list)  # watertight
  repaired: List[dict] = dataclasses.field(default_factory=list)  # see make_watertight


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


def label_file(path: str) -> Optional[str]:
  """The per-face label array of an input (see the module docstring), or None."""
  if os.path.isdir(path):
    try:
      names = os.listdir(path)
    except OSError:
      return None
    labels = sorted(n for n in names if n.lower().endswith(LABEL_EXT))
    return os.path.join(path, labels[0]) if labels else None
  sibling = os.path.splitext(path)[0] + LABEL_EXT
  return sibling if os.path.isfile(sibling) else None


def read_labelled(path: str, mesh_path: str, labels_path: str):
  """Parts of a mesh split by its per-face label array: [(name, Trimesh)], dropped list."""
  try:
    mesh = trimesh.load(mesh_path, force="mesh", process=False)
  except Exception as e:  # trimesh raises many types for corrupt files
    _fail(path, f"cannot read mesh file ({type(e).__name__}: {e})")
  if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
    _fail(path, "no geometry in file")
  try:
    labels = np.load(labels_path, allow_pickle=False)
  except (OSError, ValueError) as e:
    _fail(path, f"cannot read label array {os.path.basename(labels_path)} ({e})")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    _fail(path, f"label array {os.path.basename(labels_path)} must be integer [F], got "
                f"{labels.dtype} {list(labels.shape)}")
  if len(labels) != len(mesh.faces):
    _fail(path, f"label array {os.path.basename(labels_path)} has {len(labels)} entries, the "
                f"mesh has {len(mesh.faces)} faces")
  parts = []
  for lab in np.unique(labels[labels >= 0]):
    sub = mesh.submesh([np.flatnonzero(labels == lab)], append=True)
    parts.append((f"part_{int(lab)}", sub))
  dropped = []
  unlabelled = int(np.sum(labels < 0))
  if unlabelled:
    dropped.append({"part": "unlabelled", "reason": f"negative label ({unlabelled} faces)"})
  return parts, dropped


def read_parts(path: str) -> Tuple[List[Tuple[str, object]], List[dict]]:
  """Raw parts of an input in any layout, and the parts dropped while reading."""
  labels = label_file(path)
  if os.path.isdir(path):
    try:
      files = sorted(f for f in os.listdir(path) if f.lower().endswith(PART_EXTS))
    except OSError as e:
      _fail(path, f"cannot read folder ({e.strerror})")
    if labels is not None:
      if len(files) != 1:
        _fail(path, f"folder has a label array and {len(files)} mesh files (a labelled object "
                    "is one mesh file and one .npy)")
      return read_labelled(path, os.path.join(path, files[0]), labels)
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
    return parts, []
  if labels is not None:
    return read_labelled(path, path, labels)
  return _load_geometries(path), []


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
  centre is inside the mesh (`sampling.mesh_inside`: the generalised winding number) or it
  holds a surface sample (so thin and open parts still occupy their shell)."""
  pitch = 2.0 / resolution
  grid = np.zeros((resolution,) * 3, dtype=bool)
  lo = np.clip(np.floor((mesh.bounds[0] + 1.0) / pitch).astype(int), 0, resolution - 1)
  hi = np.clip(np.ceil((mesh.bounds[1] + 1.0) / pitch).astype(int), 1, resolution)
  axes = [np.arange(a, b) for a, b in zip(lo, hi)]
  ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
  centres = (ijk + 0.5) * pitch - 1.0
  inside = sampling.mesh_inside(mesh, centres)
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
  raw, dropped = read_parts(path)
  if not raw:
    _fail(path, "no geometry in file")
  keep, names = [], []
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
      raise ValueError(
          f"part_limit_policy must be 'merge' or 'skip', got {cfg.part_limit_policy!r}")
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
  solid_parts, repaired = [], []
  for name, m in zip(names, parts):
    solid, info = make_watertight(m)
    solid_parts.append(solid)
    if info is not None:
      repaired.append({"part": name, **info})
  return IngestedObject(path=path, parts=parts, names=names, dropped=dropped, center=center,
                        scale=scale, max_iou=max_iou, merged=merged, solid_parts=solid_parts,
                        repaired=repaired)


def closure_problem(mesh: trimesh.Trimesh) -> Optional[str]:
  """Why a mesh is not a closed, consistently oriented surface, or None when it is."""
  if not mesh.is_watertight:
    edges = mesh.edges_sorted
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return (f"not closed ({int(np.sum(counts == 1))} boundary edges, "
            f"{int(np.sum(counts > 2))} non-manifold edges)")
  if not mesh.is_winding_consistent:
    return "inconsistent face winding (flipped faces)"
  return None


def make_watertight(mesh: trimesh.Trimesh, seed: int = 0
                    ) -> Tuple[trimesh.Trimesh, Optional[dict]]:
  """A closed version of a part for SDF sampling (see step 6 of the module docstring).

  Returns (mesh, None) when the part is already closed and consistently oriented, else
  (repaired mesh, info) with info = {problem, method ('pymeshfix' | 'none'), faces_before,
  faces_after, chamfer, chamfer_floor}: `chamfer` is `moca_jax.metrics.chamfer_distance`
  between 10,000 area-uniform samples of the repaired part and of the original (normalised
  frame, [-1, 1]^3), `chamfer_floor` the same between two independent samplings of the
  original, i.e. what an unmoved part scores; both None when not repaired.
  """
  from moca_jax import metrics  # pylint: disable=g-import-not-at-top
  import pymeshfix  # pylint: disable=g-import-not-at-top
  problem = closure_problem(mesh)
  if problem is None:
    return mesh, None
  fixer = pymeshfix.MeshFix(np.asarray(mesh.vertices, np.float64),
                            np.asarray(mesh.faces, np.int32))
  fixer.repair(joincomp=False, remove_smallest_components=False)
  fixed = trimesh.Trimesh(np.asarray(fixer.points, np.float64),
                          np.asarray(fixer.faces, np.int64), process=False)
  info = dict(problem=problem, faces_before=int(len(mesh.faces)))
  if len(fixed.faces) == 0 or closure_problem(fixed) is not None:
    return mesh, dict(info, method="none", faces_after=int(len(mesh.faces)), chamfer=None,
                      chamfer_floor=None)
  if fixed.volume < 0:  # MeshFix orients consistently; make the normals point outwards
    fixed.invert()
  original = metrics.sample_points([mesh], REPAIR_CHAMFER_SAMPLES, seed)
  chamfer = metrics.chamfer_distance(
      metrics.sample_points([fixed], REPAIR_CHAMFER_SAMPLES, seed + 1), original)
  floor = metrics.chamfer_distance(
      metrics.sample_points([mesh], REPAIR_CHAMFER_SAMPLES, seed + 1), original)
  return fixed, dict(info, method="pymeshfix", faces_after=int(len(fixed.faces)),
                     chamfer=float(chamfer), chamfer_floor=float(floor))
