"""Per-part samples for the VAE: surface points + normals (with a share on sharp edges) and
SDF supervision points (near the surface at two scales + uniform in [-1, 1]^3).

Shapes per part, with counts from `SampleConfig`:
  surface_points [Ns,3] f32, surface_normals [Ns,3] f32 (unit),
  sdf_points [Nq,3] f32, sdf_values [Nq] f32 (negative inside), Nq = n_near + n_volume:
  first n_near near-surface points (half at scales[0], half at scales[1]) then n_volume uniform.

Surface samples: (1 - sharp_fraction) area-uniform, the rest uniform along "sharp" mesh edges,
edges whose two adjacent faces' normals differ by more than `sharp_angle_deg` (falls back to
area-uniform when a part has no sharp edge).

Signed distance:
  * procedural parts (`primitives.Part`): the exact analytic SDF (min over the union).
  * user meshes (`trimesh.Trimesh`): |d| = the exact distance to the triangles (KD-trees over
    triangle centroids for an upper bound, then exact point-triangle tests on every triangle
    that could be closer; see `unsigned_distance`), and the sign from the generalised winding
    number (Jacobson et al. 2013): inside when > 0.5. It is right where ray parity fails on
    user meshes: on open parts (ray parity flips on every hole a ray passes through, while a
    hole changes the winding number by its solid angle only; across a planar opening its 0.5
    level set is the opening's plane) and on closed parts made of overlapping shells (two
    crossing cylinders: parity calls the overlap outside, the winding number 2 calls it
    inside). libigl computes it: first the Barnes-Hut fast winding number (Barill et al.
    2018, `igl.fast_winding_number`, O((P + F) log F), absolute error ~1e-3 at its default
    accuracy) for every point, then the exact solid-angle sum (`igl.winding_number`, O(P x F)
    in C++) for the points whose fast value lies within `exact_band` of 0.5, so the sign is
    exact for any mesh size (the band is 25x the approximation's error). For 3,072 points
    on a 20k-face part it is as fast as embree ray parity (~0.1 s).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple, Union

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from data_pipeline import primitives as P


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  n_surface: int = 2048
  n_near: int = 2048
  n_volume: int = 1024
  sharp_fraction: float = 0.2
  sharp_angle_deg: float = 30.0
  scales: Tuple[float, float] = (0.005, 0.05)
  mesh_segments: int = 48  # tessellation of analytic parts (sharp edges, sampling)

  @property
  def n_query(self) -> int:
    return self.n_near + self.n_volume


def sharp_edges(mesh: trimesh.Trimesh, angle_deg: float = 30.0):
  """Sharp edges: (segments [E,2,3], mean normal of the two adjacent faces [E,3])."""
  if len(mesh.faces) < 2:
    return np.zeros((0, 2, 3)), np.zeros((0, 3))
  ang = mesh.face_adjacency_angles
  sel = ang > np.deg2rad(angle_deg)
  edges = mesh.face_adjacency_edges[sel]
  fa = mesh.face_adjacency[sel]
  n = mesh.face_normals[fa[:, 0]] + mesh.face_normals[fa[:, 1]]
  n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
  return mesh.vertices[edges], n


def sample_edges(segments: np.ndarray, n: int, rng: np.random.Generator):
  """Length-uniform samples on segments [E,2,3]: (points [n,3], segment index [n])."""
  length = np.linalg.norm(segments[:, 1] - segments[:, 0], axis=-1)
  idx = rng.choice(len(segments), size=n, p=length / length.sum())
  t = rng.random(n)[:, None]
  return segments[idx, 0] + t * (segments[idx, 1] - segments[idx, 0]), idx


def surface_with_edges(shape, n: int, rng, cfg: SampleConfig):
  """Area-uniform + sharp-edge surface samples of a Part or a Trimesh.

  Returns (points [n,3], unit normals [n,3]), float32: n - round(n * cfg.sharp_fraction)
  area-uniform samples, the rest on edges sharper than cfg.sharp_angle_deg (all area
  samples when the part has none); the VAE's encoder input (`sample_part`).
  """
  is_part = isinstance(shape, P.Part)
  mesh = shape.to_mesh(cfg.mesh_segments) if is_part else shape
  seg, seg_n = sharp_edges(mesh, cfg.sharp_angle_deg)
  n_edge = int(round(n * cfg.sharp_fraction)) if len(seg) else 0
  pts, nrm = P.sample_surface(shape, n - n_edge, rng, segments=cfg.mesh_segments)
  if n_edge == 0:
    return pts, nrm
  if is_part:
    # oversample, project onto the exact surface, drop points buried inside the union
    ep, _ = sample_edges(seg, 2 * n_edge + 16, rng)
    ep, en = P._project(shape, ep)
    keep = np.abs(shape.sdf(ep)) < 1e-5
    if keep.sum() < n_edge:  # edges all buried: fall back to area samples
      extra, extra_n = P.sample_surface(shape, n_edge, rng, segments=cfg.mesh_segments)
      return np.concatenate([pts, extra]), np.concatenate([nrm, extra_n])
    ep, en = ep[keep][:n_edge], en[keep][:n_edge]
  else:
    ep, idx = sample_edges(seg, n_edge, rng)
    en = seg_n[idx]
  return (np.concatenate([pts, ep.astype(np.float32)]),
          np.concatenate([nrm, en.astype(np.float32)]))


# ----------------------------------------------------------------------------------------
# distances to meshes
# ----------------------------------------------------------------------------------------
def point_triangle_distance(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
  """Exact distance [P] between points [P,3] and paired triangles [P,3,3] (row i to row i)."""
  a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
  n = np.cross(b - a, c - a)
  nn = np.linalg.norm(n, axis=-1, keepdims=True)
  n_unit = n / np.maximum(nn, 1e-20)
  h = np.sum((points - a) * n_unit, axis=-1)
  proj = points - h[:, None] * n_unit
  def left(u, v):
    return np.sum(np.cross(v - u, proj - u) * n_unit, axis=-1) >= 0
  inside = left(a, b) & left(b, c) & left(c, a) & (nn[:, 0] > 1e-20)
  d = np.where(inside, np.abs(h), np.inf)
  for u, v in ((a, b), (b, c), (c, a)):
    e = v - u
    t = np.clip(np.sum((points - u) * e, -1) / np.maximum(np.sum(e * e, -1), 1e-20), 0, 1)
    d = np.minimum(d, np.linalg.norm(points - (u + t[:, None] * e), axis=-1))
  return d


def unsigned_distance(mesh: trimesh.Trimesh, points: np.ndarray, k: int = 8,
                      chunk: int = 256) -> np.ndarray:
  """Exact distance [P] from points [P,3] to the mesh's triangles.

  A KD-tree over triangle centroids gives an upper bound U (exact distance to the triangles
  of the k nearest centroids). A triangle f can only be closer if its centroid lies within
  U + r_f of the point (r_f: its centroid-to-vertex radius), so triangles are grouped by r_f
  (factor-4 buckets, one KD-tree each) and every candidate found by a ball query of radius
  U + max r in its bucket is tested exactly. Cost ~ points x (k + local candidates).
  """
  pts = np.asarray(points, dtype=np.float64)
  tri = mesh.triangles.astype(np.float64)
  cen = tri.mean(axis=1)
  rad = np.max(np.linalg.norm(tri - cen[:, None], axis=-1), axis=1)
  tree = cKDTree(cen)
  kk = min(k, len(cen))
  _, nb = tree.query(pts, k=kk)
  nb = nb.reshape(len(pts), kk)
  best = np.full(len(pts), np.inf)
  for j in range(kk):
    best = np.minimum(best, point_triangle_distance(pts, tri[nb[:, j]]))
  level = np.floor(np.log(np.maximum(rad, 1e-12) / max(rad.min(), 1e-12)) / np.log(4.0))
  for lv in np.unique(level):
    faces = np.flatnonzero(level == lv)
    sub_tree = cKDTree(cen[faces])
    r_b = float(rad[faces].max())
    for s in range(0, len(pts), chunk):  # bounded memory: chunk points x local candidates
      sl = slice(s, s + chunk)
      cand = sub_tree.query_ball_point(pts[sl], best[sl] + r_b + 1e-12)
      counts = np.fromiter((len(c) for c in cand), dtype=np.int64, count=len(cand))
      if counts.sum() == 0:
        continue
      rows = np.repeat(np.arange(s, s + len(cand)), counts)
      cols = faces[np.concatenate([np.asarray(c, dtype=np.int64) for c in cand])]
      keep = np.linalg.norm(pts[rows] - cen[cols], axis=-1) - rad[cols] <= best[rows]
      rows, cols = rows[keep], cols[keep]
      sub = best[sl].copy()
      np.minimum.at(sub, rows - s, point_triangle_distance(pts[rows], tri[cols]))
      best[sl] = sub
  return best


def winding_number(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
  """Exact generalised winding number [P] of points [P,3] w.r.t. the mesh's triangles
  (sum of signed solid angles / 4 pi; libigl, O(P x F))."""
  import igl  # pylint: disable=g-import-not-at-top
  return np.asarray(igl.winding_number(*_igl_mesh(mesh), np.asarray(points, np.float64)))


def _igl_mesh(mesh: trimesh.Trimesh):
  return (np.ascontiguousarray(mesh.vertices, np.float64),
          np.ascontiguousarray(mesh.faces, np.int64))


def winding_inside(mesh: trimesh.Trimesh, points: np.ndarray, exact_band: float = 0.1):
  """Boolean [P]: generalised winding number > 0.5, exact in sign (see the module docstring).

  The fast (Barnes-Hut) winding number decides every point further than `exact_band` from
  0.5; the rest are recomputed exactly.
  """
  import igl  # pylint: disable=g-import-not-at-top
  pts = np.ascontiguousarray(points, np.float64)
  if len(pts) == 0:
    return np.zeros(0, dtype=bool)
  v, f = _igl_mesh(mesh)
  w = np.asarray(igl.fast_winding_number(v, f, pts), np.float64)
  near = np.flatnonzero(np.abs(w - 0.5) < exact_band)
  if len(near):
    w[near] = igl.winding_number(v, f, pts[near])
  return w > 0.5


def mesh_inside(mesh: trimesh.Trimesh, points: np.ndarray, method: str = "auto"):
  """Boolean [P]: inside test.

  method: 'winding' (= 'auto': generalised winding number > 0.5, exact in sign for open,
  closed and self-overlapping meshes of any size: `winding_inside`) or 'ray' (embree ray
  parity: right only for closed meshes without overlapping shells).
  """
  if method == "auto":
    method = "winding"
  if method == "ray":
    return np.asarray(mesh.contains(points), dtype=bool)
  if method == "winding":
    return winding_inside(mesh, np.asarray(points, np.float64))
  raise ValueError(f"unknown inside-test method {method!r}")


def mesh_sdf(mesh: trimesh.Trimesh, points, method: str = "auto") -> np.ndarray:
  """Signed distance [P] (negative inside) of points [P,3] to a (possibly open) mesh."""
  pts = np.asarray(points, dtype=np.float64)
  d = unsigned_distance(mesh, pts)
  return np.where(mesh_inside(mesh, pts, method), -d, d)


# ----------------------------------------------------------------------------------------
# the per-part sample
# ----------------------------------------------------------------------------------------
def sample_part(shape: Union[P.Part, trimesh.Trimesh], rng: np.random.Generator,
                cfg: SampleConfig = SampleConfig()):
  """All VAE samples of one part (see the module docstring for shapes and layout).

  Returns dict(surface_points [Ns,3] f32, surface_normals [Ns,3] f32,
  sdf_points [Nq,3] f32, sdf_values [Nq] f32).
  """
  pts, nrm = surface_with_edges(shape, cfg.n_surface, rng, cfg)
  sdf_fn = shape.sdf if isinstance(shape, P.Part) else (lambda q: mesh_sdf(shape, q))
  q, d = P.sample_sdf_points(sdf_fn, pts, rng, cfg.n_near, cfg.n_volume, cfg.scales)
  return dict(surface_points=pts, surface_normals=nrm, sdf_points=q, sdf_values=d)


def sample_parts(shapes, rng: np.random.Generator, cfg: SampleConfig = SampleConfig()):
  """Stacks `sample_part` over parts: dict of arrays with a leading [N] axis."""
  per = [sample_part(s, rng, cfg) for s in shapes]
  return {k: np.stack([p[k] for p in per]) for k in per[0]}
