"""Analytic primitives with exact signed distance functions (numpy only).

Sign convention (used everywhere in moca-jax): an SDF is NEGATIVE INSIDE the solid,
POSITIVE OUTSIDE, and zero on the surface. Its gradient is the outward unit normal.

Primitives (each a small frozen dataclass, sizes as parameters, placed by a rigid transform
`world = rotation @ local + translation`; no non-uniform scale, so every SDF stays exact):

  Sphere(radius)                         centred at the origin
  Box(half_extents=(hx, hy, hz))         axis-aligned in local frame
  Cylinder(radius, half_height)          axis = local z, capped at z = +-half_height
  Capsule(radius, half_height)           segment z in [-half_height, half_height], radius r
  Torus(major_radius, minor_radius)      ring in the local xy plane
  Cone(radius_bottom, radius_top, half_height)
                                         capped cone / frustum along local z: radius_bottom at
                                         z = -half_height, radius_top (may be 0) at +half_height

  prim.sdf(points [P,3]) -> [P]                 exact signed distance (float64)
  prim.sdf_grad(points [P,3]) -> ([P], [P,3])   distance and its analytic gradient (unit)
  prim.to_mesh(segments=48) -> trimesh.Trimesh   watertight tessellation, outward normals
  prim.sample_surface(n, rng) -> ([n,3], [n,3])  exact area-uniform points, unit normals
  prim.area(), prim.bounding_radius()           exact area; radius of a ball holding it
  prim.with_transform(rotation, translation)    a placed copy (composes with the current one)
  prim.scaled(s)                                uniformly scaled copy about the world origin

A `Part` is one component of an object: one or more primitives whose union (min of SDFs) is
the part's solid. `Part.sdf`, `Part.sdf_grad`, `Part.to_mesh` (concatenated, not boolean-
merged: each piece is watertight, the union may contain inner faces; use the SDF for inside
tests), `Part.area_estimate()`.

Helpers:
  sample_surface(mesh_or_primitive_or_part, n, rng) -> (points [n,3] f32, normals [n,3] f32)
      area-uniform. For analytic shapes exact samplers per kind (`prim.sample_surface`: sphere
      by normalised Gaussians, box by a face chosen by area, cylinder / cone / capsule by
      area-weighted parametrisations, torus by rejection on its area element), normals the
      analytic SDF gradient, and for a Part the points that lie inside another primitive of
      the union are rejected (so they cover exactly the union's surface). For a plain
      trimesh: barycentric sampling, face normals.
  sample_sdf_points(sdf_fn, surface_points, rng, n_near, n_volume, scales=(0.005, 0.05))
      -> (points [n_near+n_volume, 3] f32, sdf [n_near+n_volume] f32): near-surface points
      (surface points plus Gaussian noise, half at each scale) then uniform in [-1,1]^3.
  random_rotation(rng) -> [3,3];  random_primitive(rng, kinds=..., ...) -> Primitive

All randomness goes through an explicit `numpy.random.Generator`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, Union

import numpy as np
import trimesh

_EPS = 1e-12
KINDS = ("sphere", "box", "cylinder", "capsule", "torus", "cone")


def _as_points(points) -> np.ndarray:
  p = np.asarray(points, dtype=np.float64)
  if p.ndim != 2 or p.shape[1] != 3:
    raise ValueError(f"points must have shape [P, 3], got {p.shape}")
  return p


def _normalize(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
  """Row-normalises v [P,k]; rows with ~zero length take `fallback` [P,k] (already unit)."""
  n = np.linalg.norm(v, axis=-1, keepdims=True)
  ok = n > 1e-12
  return np.where(ok, v / np.where(ok, n, 1.0), fallback)


def _radial_dir(xy: np.ndarray) -> np.ndarray:
  """Unit direction of xy [P,2] in the plane; (1, 0) on the axis."""
  fb = np.zeros_like(xy)
  fb[:, 0] = 1.0
  return _normalize(xy, fb)


def _revolve_sdf_grad(rho: np.ndarray, z: np.ndarray, profile: np.ndarray, xy: np.ndarray):
  """Exact SDF of a convex solid of revolution about z from its (rho, z) profile.

  profile [K,2]: polyline from the axis (rho=0) around the cross-section back to the axis,
  counter-clockwise in the (rho, z) half-plane; the closing segment on the axis is not part
  of the surface and is skipped. Distance to the surface in 3D equals the 2D distance from
  (rho, z) to this polyline (rotational symmetry); the sign comes from a convex inside test.
  Returns (d [P], grad [P,3]).
  """
  q = np.stack([rho, z], axis=-1)  # [P,2]
  a = profile[:-1]  # [S,2]
  b = profile[1:]
  ab = b - a
  t = (
      np.einsum("psk,sk->ps", q[:, None, :] - a[None], ab)
      / np.maximum(np.einsum("sk,sk->s", ab, ab), _EPS)[None]
  )
  t = np.clip(t, 0.0, 1.0)
  c = a[None] + t[..., None] * ab[None]  # [P,S,2] closest points per segment
  dist2 = np.sum((q[:, None, :] - c) ** 2, axis=-1)
  j = np.argmin(dist2, axis=1)
  idx = np.arange(len(q))
  dist = np.sqrt(dist2[idx, j])
  closest = c[idx, j]
  # outward normal of each segment of a counter-clockwise polygon: (dz, -drho) / len
  seg_n = np.stack([ab[:, 1], -ab[:, 0]], axis=-1)
  seg_n = seg_n / np.maximum(np.linalg.norm(seg_n, axis=-1, keepdims=True), _EPS)
  # inside: on the inner side of every segment (convex polygon incl. the axis edge)
  full = np.concatenate([profile, profile[:1]], axis=0)
  fa, fb = full[:-1], full[1:]
  fn = np.stack([fb[:, 1] - fa[:, 1], -(fb[:, 0] - fa[:, 0])], axis=-1)
  side = np.einsum("psk,sk->ps", q[:, None, :] - fa[None], fn)
  valid = np.linalg.norm(fn, axis=-1) > _EPS
  inside = np.all((side <= 0.0) | ~valid[None], axis=1)
  sign = np.where(inside, -1.0, 1.0)
  g2 = _normalize(sign[:, None] * (q - closest), seg_n[j])
  r = _radial_dir(xy)
  grad = np.concatenate([g2[:, :1] * r, g2[:, 1:]], axis=-1)
  return sign * dist, grad


def _unit_gaussian(n: int, rng: np.random.Generator) -> np.ndarray:
  """[n,3] directions uniform on the unit sphere (normalised isotropic Gaussians)."""
  fb = np.zeros((n, 3))
  fb[:, 2] = 1.0
  return _normalize(rng.normal(size=(n, 3)), fb)


def _choose(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """[n] i.i.d. indices into weights [K] (>= 0, positive sum), P(k) = weights[k] / sum."""
  cdf = np.cumsum(weights, dtype=np.float64)
  k = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
  return np.minimum(k, len(weights) - 1)


def _segment_dist2(rho: np.ndarray, z: np.ndarray, a: tuple, b: tuple) -> np.ndarray:
  """Squared distance [P] from (rho, z) points to the 2D segment a-b (a == b allowed)."""
  ex, ez = b[0] - a[0], b[1] - a[1]
  dx, dz = rho - a[0], z - a[1]
  t = np.clip((dx * ex + dz * ez) / max(ex * ex + ez * ez, _EPS), 0.0, 1.0)
  return (dx - t * ex) ** 2 + (dz - t * ez) ** 2


def _frustum_sdf(
    rho: np.ndarray, z: np.ndarray, r_bottom: float, r_top: float, half_height: float
) -> np.ndarray:
  """Exact SDF [P] of a capped frustum about z, from radial distance rho [P] and height z [P].

  The value of `_revolve_sdf_grad` on the profile (0,-h), (r_b,-h), (r_t,h), (0,h) without
  its gradient: distance to the bottom cap, lateral and top cap segments of the (rho, z)
  half-plane, negative inside (between the caps and on the axis side of the lateral line).
  """
  rb, rt, hh = float(r_bottom), float(r_top), float(half_height)
  d2 = np.minimum(
      _segment_dist2(rho, z, (0.0, -hh), (rb, -hh)), _segment_dist2(rho, z, (rb, -hh), (rt, hh))
  )
  d2 = np.minimum(d2, _segment_dist2(rho, z, (rt, hh), (0.0, hh)))
  inside = (np.abs(z) <= hh) & (2.0 * hh * (rho - rb) + (rb - rt) * (z + hh) <= 0.0)
  return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


def _frustum_surface_samples(
    r_bottom: float, r_top: float, half_height: float, n: int, rng: np.random.Generator
):
  """Area-uniform samples of a capped frustum (cylinder when the radii agree) about z.

  Lateral surface (area pi (r_b + r_t) slant): the area element is proportional to the
  radius r(t) = r_b + (r_t - r_b) t, t in [0, 1] from bottom to top, i.e. a mixture of the
  densities 2 (1 - t) (weight r_b) and 2 t (weight r_t), each sampled by a square root.
  Caps (areas pi r^2): radius r sqrt(u). Returns (points [n,3], unit normals [n,3]).
  """
  rb, rt, hh = float(r_bottom), float(r_top), float(half_height)
  slant = np.hypot(rb - rt, 2.0 * hh)
  region = _choose(np.array([(rb + rt) * slant, rb * rb, rt * rt]), n, rng)
  theta = 2.0 * np.pi * rng.random(n)
  c, s = np.cos(theta), np.sin(theta)
  u, v = rng.random(n), rng.random(n)
  # lateral
  root = np.sqrt(v)
  t = np.where(u * (rb + rt) < rt, root, 1.0 - root)
  rho = rb + (rt - rb) * t
  z = hh * (2.0 * t - 1.0)
  n_rho, n_z = 2.0 * hh / max(slant, _EPS), (rb - rt) / max(slant, _EPS)
  # caps: region 1 bottom (z = -hh, radius rb), region 2 top (z = +hh, radius rt)
  cap_top = region == 2
  on_cap = region > 0
  rho = np.where(on_cap, np.where(cap_top, rt, rb) * root, rho)
  z = np.where(on_cap, np.where(cap_top, hh, -hh), z)
  p = np.stack([rho * c, rho * s, z], axis=-1)
  g_rho = np.where(on_cap, 0.0, n_rho)
  g = np.stack([g_rho * c, g_rho * s, np.where(on_cap, np.where(cap_top, 1.0, -1.0), n_z)], axis=-1)
  return p, g


@dataclasses.dataclass(frozen=True, eq=False)
class Primitive:
  """Base class: rigid transform + local SDF. Subclasses define _local_sdf_grad, _mesh."""

  rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3), kw_only=True)
  translation: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3), kw_only=True)

  kind = "primitive"

  def __post_init__(self):
    r = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)
    if not np.abs(r @ r.T - np.eye(3)).max() <= 1e-6 or np.linalg.det(r) < 0:
      raise ValueError("rotation must be a proper rotation matrix")
    object.__setattr__(self, "rotation", r)
    object.__setattr__(
        self, "translation", np.asarray(self.translation, dtype=np.float64).reshape(3)
    )
    for f in dataclasses.fields(self):
      if f.name in ("rotation", "translation"):
        continue
      v = np.asarray(getattr(self, f.name), dtype=np.float64)
      if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{type(self).__name__}.{f.name} must be finite and >= 0, got {v}")

  # --- transform -----------------------------------------------------------------------
  def to_local(self, points) -> np.ndarray:
    """World points [P,3] -> local frame [P,3] (inverse rigid transform)."""
    return (_as_points(points) - self.translation) @ self.rotation

  def with_transform(self, rotation=None, translation=None) -> "Primitive":
    """Returns a copy placed by (rotation, translation) applied AFTER the current pose."""
    r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    t = np.zeros(3) if translation is None else np.asarray(translation, dtype=np.float64)
    return dataclasses.replace(
        self, rotation=r @ self.rotation, translation=r @ self.translation + t
    )

  def scaled(self, s: float) -> "Primitive":
    """Uniformly scaled copy about the world origin (sizes and translation times s > 0)."""
    if not s > 0:
      raise ValueError(f"scale must be > 0, got {s}")
    kw = {
        f.name: (np.asarray(getattr(self, f.name), dtype=np.float64) * s).tolist()
        for f in dataclasses.fields(self)
        if f.name not in ("rotation", "translation")
    }
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    return dataclasses.replace(self, translation=self.translation * s, **kw)

  @property
  def matrix(self) -> np.ndarray:
    """4x4 homogeneous local-to-world transform."""
    m = np.eye(4)
    m[:3, :3] = self.rotation
    m[:3, 3] = self.translation
    return m

  # --- fields --------------------------------------------------------------------------
  def sdf(self, points) -> np.ndarray:
    """Exact signed distance [P] (negative inside) of world points [P,3]."""
    return self._local_sdf(self.to_local(points))

  def sdf_grad(self, points):
    """(sdf [P], outward unit gradient [P,3]) at world points [P,3]."""
    d, g = self._local_sdf_grad(self.to_local(points))
    return d, g @ self.rotation.T

  def to_mesh(self, segments: int = 48) -> trimesh.Trimesh:
    """Watertight triangle mesh of the placed primitive (`segments` around curves).

    Meshes are cached per instance (primitives are immutable); a fresh copy is returned.
    """
    cache = self.__dict__.setdefault("_mesh_cache", {})
    key = int(segments)
    if key not in cache:
      m = self._mesh(key)
      m.apply_transform(self.matrix)
      cache[key] = m
    return cache[key].copy()

  def center(self) -> np.ndarray:
    return self.translation.copy()

  def sample_surface(self, n: int, rng: np.random.Generator):
    """Exact area-uniform surface samples: (points [n,3] f64, outward unit normals [n,3]).

    Drawn i.i.d. from the analytic parametrisation of the local surface (no tessellation),
    then placed by the rigid transform; the points lie on the exact surface up to float64
    rounding and the normals equal the SDF gradient there.
    """
    p, g = self._local_surface_samples(int(n), rng)
    return p @ self.rotation.T + self.translation, g @ self.rotation.T

  # subclasses
  def _local_sdf_grad(self, p):
    raise NotImplementedError

  def _local_surface_samples(self, n, rng):
    """(points [n,3], unit normals [n,3]) area-uniform on the surface, local frame."""
    raise NotImplementedError

  def _local_sdf(self, p):
    """Signed distance [P] of local points [P,3] (subclasses: a value-only fast path)."""
    return self._local_sdf_grad(p)[0]

  def _mesh(self, segments):
    raise NotImplementedError

  def area(self) -> float:
    raise NotImplementedError

  def bounding_radius(self) -> float:
    raise NotImplementedError

  def params(self) -> dict:
    """Size parameters (JSON-friendly)."""
    return {
        f.name: np.asarray(getattr(self, f.name)).tolist()
        for f in dataclasses.fields(self)
        if f.name not in ("rotation", "translation")
    }


@dataclasses.dataclass(frozen=True, eq=False)
class Sphere(Primitive):
  radius: float = 0.5
  kind = "sphere"

  def _local_sdf_grad(self, p):
    n = np.linalg.norm(p, axis=-1)
    fb = np.zeros_like(p)
    fb[:, 2] = 1.0
    return n - self.radius, _normalize(p, fb)

  def _mesh(self, segments):
    return trimesh.creation.uv_sphere(radius=self.radius, count=[segments, segments])

  def _local_sdf(self, p):
    return np.sqrt(np.einsum("pk,pk->p", p, p)) - self.radius

  def _local_surface_samples(self, n, rng):
    g = _unit_gaussian(n, rng)
    return self.radius * g, g

  def area(self):
    return 4.0 * np.pi * self.radius**2

  def bounding_radius(self):
    return float(self.radius)


@dataclasses.dataclass(frozen=True, eq=False)
class Box(Primitive):
  half_extents: tuple = (0.5, 0.5, 0.5)
  kind = "box"

  def _local_sdf_grad(self, p):
    h = np.asarray(self.half_extents, dtype=np.float64)
    q = np.abs(p) - h
    s = np.where(p < 0, -1.0, 1.0)
    qpos = np.maximum(q, 0.0)
    outside_len = np.linalg.norm(qpos, axis=-1)
    qmax = np.max(q, axis=-1)
    d = outside_len + np.minimum(qmax, 0.0)
    axis = np.argmax(q, axis=-1)
    g_in = np.zeros_like(p)
    g_in[np.arange(len(p)), axis] = s[np.arange(len(p)), axis]
    g_out = qpos * s / np.maximum(outside_len, _EPS)[:, None]
    g = np.where((outside_len > 1e-12)[:, None], g_out, g_in)
    return d, g

  def _mesh(self, segments):
    return trimesh.creation.box(extents=2.0 * np.asarray(self.half_extents, dtype=np.float64))

  def _local_sdf(self, p):
    q = np.abs(p) - np.asarray(self.half_extents, dtype=np.float64)
    qpos = np.maximum(q, 0.0)
    return np.sqrt(np.einsum("pk,pk->p", qpos, qpos)) + np.minimum(np.max(q, axis=-1), 0.0)

  def _local_surface_samples(self, n, rng):
    h = np.asarray(self.half_extents, dtype=np.float64)
    face_area = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]])
    # six faces, (+x, -x, +y, -y, +z, -z), chosen with probability proportional to area
    face = _choose(np.repeat(face_area, 2), n, rng)
    axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
    p = (2.0 * rng.random((n, 3)) - 1.0) * h
    idx = np.arange(n)
    p[idx, axis] = sign * h[axis]
    g = np.zeros((n, 3))
    g[idx, axis] = sign
    return p, g

  def area(self):
    hx, hy, hz = np.asarray(self.half_extents, dtype=np.float64)
    return 8.0 * (hx * hy + hy * hz + hx * hz)

  def bounding_radius(self):
    return float(np.linalg.norm(self.half_extents))


@dataclasses.dataclass(frozen=True, eq=False)
class Cylinder(Primitive):
  radius: float = 0.5
  half_height: float = 0.5
  kind = "cylinder"

  def _profile(self):
    r, h = self.radius, self.half_height
    return np.array([[0.0, -h], [r, -h], [r, h], [0.0, h]])

  def _local_sdf_grad(self, p):
    xy = p[:, :2]
    return _revolve_sdf_grad(np.linalg.norm(xy, axis=-1), p[:, 2], self._profile(), xy)

  def _mesh(self, segments):
    return trimesh.creation.cylinder(
        radius=self.radius, height=2.0 * self.half_height, sections=segments
    )

  def _local_sdf(self, p):
    return _frustum_sdf(
        np.hypot(p[:, 0], p[:, 1]), p[:, 2], self.radius, self.radius, self.half_height
    )

  def _local_surface_samples(self, n, rng):
    return _frustum_surface_samples(self.radius, self.radius, self.half_height, n, rng)

  def area(self):
    return 2.0 * np.pi * self.radius * (self.radius + 2.0 * self.half_height)

  def bounding_radius(self):
    return float(np.hypot(self.radius, self.half_height))


@dataclasses.dataclass(frozen=True, eq=False)
class Capsule(Primitive):
  radius: float = 0.25
  half_height: float = 0.5
  kind = "capsule"

  def _local_sdf_grad(self, p):
    c = np.zeros_like(p)
    c[:, 2] = np.clip(p[:, 2], -self.half_height, self.half_height)
    v = p - c
    fb = np.zeros_like(p)
    fb[:, :2] = _radial_dir(p[:, :2])
    return np.linalg.norm(v, axis=-1) - self.radius, _normalize(v, fb)

  def _mesh(self, segments):
    return trimesh.creation.capsule(
        height=2.0 * self.half_height, radius=self.radius, count=[segments, segments]
    )

  def _local_sdf(self, p):
    dz = p[:, 2] - np.clip(p[:, 2], -self.half_height, self.half_height)
    return np.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2 + dz**2) - self.radius

  def _local_surface_samples(self, n, rng):
    r, hh = self.radius, self.half_height
    # tube (area 4 pi r hh) or the two hemispheres (together a sphere, area 4 pi r^2)
    on_tube = rng.random(n) * (r + hh) < hh
    theta = 2.0 * np.pi * rng.random(n)
    tube_n = np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], axis=-1)
    tube_p = r * tube_n
    tube_p[:, 2] = hh * (2.0 * rng.random(n) - 1.0)
    ball_n = _unit_gaussian(n, rng)
    ball_p = r * ball_n
    ball_p[:, 2] += np.where(ball_n[:, 2] >= 0.0, hh, -hh)  # each half on its own end
    sel = on_tube[:, None]
    return np.where(sel, tube_p, ball_p), np.where(sel, tube_n, ball_n)

  def area(self):
    return 4.0 * np.pi * self.radius**2 + 4.0 * np.pi * self.radius * self.half_height

  def bounding_radius(self):
    return float(self.radius + self.half_height)


@dataclasses.dataclass(frozen=True, eq=False)
class Torus(Primitive):
  major_radius: float = 0.5
  minor_radius: float = 0.15
  kind = "torus"

  def __post_init__(self):
    super().__post_init__()
    if self.minor_radius >= self.major_radius:
      raise ValueError("Torus needs minor_radius < major_radius (no self-intersecting torus)")

  def _local_sdf_grad(self, p):
    xy = p[:, :2]
    rho = np.linalg.norm(xy, axis=-1)
    q = np.stack([rho - self.major_radius, p[:, 2]], axis=-1)
    fb = np.zeros_like(q)
    fb[:, 0] = 1.0
    g2 = _normalize(q, fb)
    r = _radial_dir(xy)
    g = np.concatenate([g2[:, :1] * r, g2[:, 1:]], axis=-1)
    return np.linalg.norm(q, axis=-1) - self.minor_radius, g

  def _mesh(self, segments):
    return trimesh.creation.torus(
        self.major_radius, self.minor_radius, major_sections=2 * segments, minor_sections=segments
    )

  def _local_sdf(self, p):
    return np.hypot(np.hypot(p[:, 0], p[:, 1]) - self.major_radius, p[:, 2]) - self.minor_radius

  def _local_surface_samples(self, n, rng):
    big, small = self.major_radius, self.minor_radius
    # area element small * (big + small cos(phi)) dtheta dphi: theta uniform, phi by
    # rejection against the bound big + small (acceptance >= (big - small) / (big + small))
    phis, have = [], 0
    while have < n:
      m = int(1.2 * (n - have) * (big + small) / big) + 16
      phi = 2.0 * np.pi * rng.random(m)
      phi = phi[rng.random(m) * (big + small) < big + small * np.cos(phi)]
      phis.append(phi)
      have += len(phi)
    phi = np.concatenate(phis)[:n]
    theta = 2.0 * np.pi * rng.random(n)
    ct, st, cp, sp = np.cos(theta), np.sin(theta), np.cos(phi), np.sin(phi)
    g = np.stack([cp * ct, cp * st, sp], axis=-1)
    rho = big + small * cp
    p = np.stack([rho * ct, rho * st, small * sp], axis=-1)
    return p, g

  def area(self):
    return 4.0 * np.pi**2 * self.major_radius * self.minor_radius

  def bounding_radius(self):
    return float(self.major_radius + self.minor_radius)


@dataclasses.dataclass(frozen=True, eq=False)
class Cone(Primitive):
  radius_bottom: float = 0.5
  radius_top: float = 0.0
  half_height: float = 0.5
  kind = "cone"

  def __post_init__(self):
    super().__post_init__()
    if self.radius_bottom <= 0 and self.radius_top <= 0:
      raise ValueError("Cone needs a positive radius at one end at least")

  def _profile(self):
    r1, r2, h = self.radius_bottom, self.radius_top, self.half_height
    pts = [[0.0, -h]]
    if r1 > 0:
      pts.append([r1, -h])
    if r2 > 0:
      pts.append([r2, h])
    pts.append([0.0, h])
    return np.array(pts)

  def _local_sdf_grad(self, p):
    xy = p[:, :2]
    return _revolve_sdf_grad(np.linalg.norm(xy, axis=-1), p[:, 2], self._profile(), xy)

  def _mesh(self, segments):
    prof = self._profile()
    m = trimesh.creation.revolve(prof, sections=segments)
    if m.volume < 0:
      m.invert()
    return m

  def _local_sdf(self, p):
    return _frustum_sdf(
        np.hypot(p[:, 0], p[:, 1]), p[:, 2], self.radius_bottom, self.radius_top, self.half_height
    )

  def _local_surface_samples(self, n, rng):
    return _frustum_surface_samples(self.radius_bottom, self.radius_top, self.half_height, n, rng)

  def area(self):
    r1, r2, h = self.radius_bottom, self.radius_top, self.half_height
    slant = np.hypot(r1 - r2, 2.0 * h)
    return np.pi * (r1**2 + r2**2 + (r1 + r2) * slant)

  def bounding_radius(self):
    return float(
        max(
            np.hypot(self.radius_bottom, self.half_height),
            np.hypot(self.radius_top, self.half_height),
        )
    )


_CLASSES = {c.kind: c for c in (Sphere, Box, Cylinder, Capsule, Torus, Cone)}


def primitive_from_dict(d: dict) -> Primitive:
  """Inverse of `primitive_to_dict`."""
  cls = _CLASSES[d["kind"]]
  return cls(
      rotation=np.asarray(d["rotation"]), translation=np.asarray(d["translation"]), **d["params"]
  )


def primitive_to_dict(p: Primitive) -> dict:
  """JSON-friendly description {kind, params, rotation, translation}."""
  return {
      "kind": p.kind,
      "params": p.params(),
      "rotation": p.rotation.tolist(),
      "translation": p.translation.tolist(),
  }


# ----------------------------------------------------------------------------------------
# Parts: unions of primitives
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Part:
  """One component: the union of `primitives` (SDF = min over them). `name` is free text."""

  primitives: tuple
  name: str = "part"

  def __post_init__(self):
    prims = tuple(self.primitives)
    if not prims:
      raise ValueError(f"Part {self.name!r} has no primitives")
    object.__setattr__(self, "primitives", prims)

  def sdf_grad(self, points):
    """(sdf [P], gradient [P,3]) of the union: the values of the nearest primitive."""
    ds, gs = zip(*(p.sdf_grad(points) for p in self.primitives))
    ds = np.stack(ds, axis=0)
    j = np.argmin(ds, axis=0)
    idx = np.arange(ds.shape[1])
    return ds[j, idx], np.stack(gs, axis=0)[j, idx]

  def sdf(self, points) -> np.ndarray:
    """Signed distance [P] of the union (min of SDFs: exact outside, a bound inside)."""
    return np.min(np.stack([p.sdf(points) for p in self.primitives], axis=0), axis=0)

  def to_mesh(self, segments: int = 48) -> trimesh.Trimesh:
    """Concatenated primitive meshes (each watertight; the union is not boolean-merged)."""
    ms = [p.to_mesh(segments) for p in self.primitives]
    return ms[0] if len(ms) == 1 else trimesh.util.concatenate(ms)

  def area_estimate(self) -> float:
    """Sum of primitive areas (an upper bound of the union's area)."""
    return float(sum(p.area() for p in self.primitives))

  def transformed(self, rotation=None, translation=None) -> "Part":
    """Copy placed by (rotation, translation) applied after the current poses."""
    return Part(tuple(p.with_transform(rotation, translation) for p in self.primitives), self.name)

  def scaled(self, s: float) -> "Part":
    """Uniformly scaled copy about the world origin (SDF scales by s, stays exact)."""
    return Part(tuple(p.scaled(s) for p in self.primitives), self.name)

  def bounds(self, segments: int = 16) -> np.ndarray:
    """[2,3] axis-aligned bounds (from a coarse mesh; curved pieces may stick out a little)."""
    lo, hi = [], []
    for p in self.primitives:
      r = p.bounding_radius()
      lo.append(p.translation - r)
      hi.append(p.translation + r)
    mb = self.to_mesh(segments).bounds
    return np.stack(
        [np.maximum(np.min(lo, 0), mb[0] - 0.02), np.minimum(np.max(hi, 0), mb[1] + 0.02)]
    )


Shape = Union[Primitive, Part, trimesh.Trimesh]


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------
def sample_mesh_surface(mesh: trimesh.Trimesh, n: int, rng: np.random.Generator):
  """Area-uniform samples on a triangle mesh: (points [n,3] f64, face_index [n] int)."""
  tri = mesh.triangles
  area = mesh.area_faces
  total = float(area.sum())
  if not np.isfinite(total) or total <= 0:
    raise ValueError("cannot sample a mesh with zero or non-finite area")
  face = rng.choice(len(area), size=n, p=area / total)
  u = rng.random((n, 2))
  flip = u.sum(-1) > 1.0
  u[flip] = 1.0 - u[flip]
  t = tri[face]
  pts = t[:, 0] + u[:, :1] * (t[:, 1] - t[:, 0]) + u[:, 1:] * (t[:, 2] - t[:, 0])
  return pts, face


def _project(shape, pts: np.ndarray, iters: int = 3):
  """Moves points onto the zero level set of an exact SDF (Newton steps along the gradient)."""
  for _ in range(iters):
    d, g = shape.sdf_grad(pts)
    pts = pts - d[:, None] * g
  d, g = shape.sdf_grad(pts)
  return pts, g


def _sample_primitive(prim: Primitive, n: int, rng):
  return prim.sample_surface(n, rng)


def sample_surface(shape: Shape, n: int, rng: np.random.Generator, segments: int = 64):
  """Area-uniform surface samples of a primitive, a Part or a trimesh.

  Returns (points [n,3] float32, unit normals [n,3] float32), i.i.d. in random order.
  Analytic shapes: exact samplers per primitive kind (`Primitive.sample_surface`, no
  tessellation), so points lie on the exact surface (|sdf| ~ 1e-7, float32 rounding) and
  normals are the analytic SDF gradient; for a Part, samples inside another primitive of
  the union are rejected. Meshes: barycentric samples, face normals. `segments` is
  accepted for callers that still pass a tessellation size and no longer used.
  """
  del segments  # analytic samplers need no tessellation
  if n <= 0:
    return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
  if isinstance(shape, trimesh.Trimesh):
    pts, face = sample_mesh_surface(shape, n, rng)
    return pts.astype(np.float32), shape.face_normals[face].astype(np.float32)
  if isinstance(shape, Primitive):
    p, g = _sample_primitive(shape, n, rng)
    return p.astype(np.float32), g.astype(np.float32)
  if not isinstance(shape, Part):
    raise TypeError(f"sample_surface: unsupported shape type {type(shape).__name__}")
  prims = shape.primitives
  if len(prims) == 1:
    return sample_surface(prims[0], n, rng)
  areas = np.array([p.area() for p in prims])
  got_p, got_g, have = [], [], 0
  for _ in range(8):  # rejection rounds; each oversamples by the observed keep rate
    m = max(64, int(1.5 * (n - have)) + 64)
    counts = rng.multinomial(m, areas / areas.sum())
    for k, (prim, c) in enumerate(zip(prims, counts)):
      if c == 0:
        continue
      p, g = _sample_primitive(prim, c, rng)
      others = [q for j, q in enumerate(prims) if j != k]
      d_other = np.min(np.stack([q.sdf(p) for q in others]), axis=0)
      keep = d_other > -1e-6
      got_p.append(p[keep])
      got_g.append(g[keep])
      have += int(keep.sum())
    if have >= n:
      break
  p = np.concatenate(got_p)
  g = np.concatenate(got_g)
  if len(p) < n:
    raise ValueError(f"Part {shape.name!r}: surface sampling kept too few points")
  sel = rng.permutation(len(p))[:n]
  return p[sel].astype(np.float32), g[sel].astype(np.float32)


def sample_sdf_points(
    sdf_fn: Callable[[np.ndarray], np.ndarray],
    surface_points,
    rng: np.random.Generator,
    n_near: int,
    n_volume: int,
    scales: Sequence[float] = (0.005, 0.05),
):
  """SDF supervision points.

  Args:
    sdf_fn: points [P,3] -> signed distance [P] (negative inside).
    surface_points: [S,3] points on the surface (S >= 1).
    n_near: points near the surface: random surface points + N(0, scale^2) noise, split
      evenly over `scales` (the first scales get the remainder).
    n_volume: points uniform in [-1, 1]^3.
  Returns:
    (points [n_near + n_volume, 3] float32, sdf [n_near + n_volume] float32); near points
    first (grouped by scale, in order), then the volume points.
  """
  surf = _as_points(surface_points)
  if len(surf) == 0 and n_near > 0:
    raise ValueError("sample_sdf_points needs at least one surface point")
  k = len(scales)
  per = [n_near // k + (1 if i < n_near % k else 0) for i in range(k)]
  chunks = []
  for s, m in zip(scales, per):
    base = surf[rng.integers(0, len(surf), size=m)]
    chunks.append(base + rng.normal(scale=s, size=(m, 3)))
  chunks.append(rng.uniform(-1.0, 1.0, size=(n_volume, 3)))
  pts = np.concatenate(chunks, axis=0)
  d = np.asarray(sdf_fn(pts), dtype=np.float64).reshape(-1)
  return pts.astype(np.float32), d.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Random shapes
# ----------------------------------------------------------------------------------------
def random_rotation(rng: np.random.Generator) -> np.ndarray:
  """Uniformly random rotation matrix [3,3] (normalised Gaussian quaternion)."""
  q = rng.normal(size=4)
  q /= np.linalg.norm(q)
  w, x, y, z = q
  return np.array(
      [
          [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
          [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
          [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
      ]
  )


def make_primitive(
    kind: str, size: float, aspect: np.ndarray, rotation=None, translation=None
) -> Primitive:
  """Primitive of `kind` whose characteristic size is `size` (its bounding radius is ~size).

  aspect: 3 numbers in (0, 1] shaping the primitive (thin/flat variants).
  """
  a = np.asarray(aspect, dtype=np.float64)
  kw = dict(
      rotation=np.eye(3) if rotation is None else rotation,
      translation=np.zeros(3) if translation is None else translation,
  )
  if kind == "sphere":
    return Sphere(radius=size, **kw)
  if kind == "box":
    h = size * a / np.linalg.norm(a)
    return Box(half_extents=tuple(h), **kw)
  if kind == "cylinder":
    r, hh = size * a[0], size * a[1]
    s = size / np.hypot(r, hh)
    return Cylinder(radius=r * s, half_height=hh * s, **kw)
  if kind == "capsule":
    r = size * 0.5 * a[0]
    return Capsule(radius=r, half_height=max(size - r, 1e-3), **kw)
  if kind == "torus":
    minor = size * (0.1 + 0.3 * a[0])
    return Torus(major_radius=size - minor, minor_radius=minor, **kw)
  if kind == "cone":
    r1, r2, hh = size * a[0], size * a[0] * (a[2] if a[2] < 0.7 else 0.0), size * a[1]
    s = size / np.hypot(max(r1, r2), hh)
    return Cone(radius_bottom=r1 * s, radius_top=r2 * s, half_height=hh * s, **kw)
  raise ValueError(f"unknown primitive kind {kind!r}; expected one of {KINDS}")


def random_primitive(
    rng: np.random.Generator,
    kinds: Sequence[str] = KINDS,
    size_range=(0.25, 0.9),
    random_pose: bool = True,
) -> Primitive:
  """A random primitive that fits inside [-1, 1]^3.

  Kind uniform over `kinds`, bounding radius uniform in `size_range` (<= 1), aspect ratios
  uniform in [0.25, 1], uniformly random rotation, translation such that the bounding ball
  stays inside the cube (when `random_pose`; otherwise identity pose at the origin).
  """
  kind = kinds[int(rng.integers(len(kinds)))]
  size = float(rng.uniform(*size_range))
  size = min(size, 1.0)
  aspect = rng.uniform(0.25, 1.0, size=3)
  prim = make_primitive(kind, size, aspect)
  if not random_pose:
    return prim
  br = prim.bounding_radius()
  slack = max(1.0 - br, 0.0)
  return prim.with_transform(random_rotation(rng), rng.uniform(-slack, slack, size=3))
