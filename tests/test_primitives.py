"""Properties of data_pipeline.primitives: exact SDFs, signs, surface samples, normals."""

import numpy as np
import pytest
import trimesh

from data_pipeline import primitives as P


def _point_triangle_distance(points, tris):
  """Brute-force Euclidean distance [P] from points [P,3] to a triangle soup [F,3,3]."""
  best = np.full(len(points), np.inf)
  a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
  n = np.cross(b - a, c - a)
  nn = np.linalg.norm(n, axis=-1)
  good = nn > 1e-14
  a, b, c, n, nn = a[good], b[good], c[good], n[good], nn[good]
  n = n / nn[:, None]
  for i in range(0, len(points), 16):
    p = points[i : i + 16, None, :]  # [p,1,3]
    # distance to the plane when the projection falls inside the triangle
    h = np.einsum("pfk,fk->pf", p - a[None], n)
    proj = p - h[..., None] * n[None]

    def inside_edge(u, v):
      return np.einsum("pfk,fk->pf", np.cross(v - u, proj - u[None]), n) >= 0

    inside = inside_edge(a, b) & inside_edge(b, c) & inside_edge(c, a)
    d = np.where(inside, np.abs(h), np.inf)
    # distance to the three edges
    for u, v in ((a, b), (b, c), (c, a)):
      e = v - u
      t = np.einsum("pfk,fk->pf", p - u[None], e) / np.einsum("fk,fk->f", e, e)[None]
      t = np.clip(t, 0, 1)
      q = u[None] + t[..., None] * e[None]
      d = np.minimum(d, np.linalg.norm(p - q, axis=-1))
    best[i : i + 16] = d.min(axis=1)
  return best


def _sagitta(prim, segments):
  """Upper bound of the distance between a tessellation and the true curved surface."""
  r = max(prim.bounding_radius(), 1e-3)
  return 2.0 * r * (1.0 - np.cos(np.pi / segments)) + 1e-6


@pytest.mark.parametrize("kind", P.KINDS)
def test_sdf_matches_bruteforce_mesh_distance_and_sign(kind):
  rng = np.random.default_rng(1 + P.KINDS.index(kind))
  prim = P.random_primitive(rng, kinds=(kind,), size_range=(0.4, 0.8))
  segments = 96
  mesh = prim.to_mesh(segments)
  assert mesh.is_watertight and mesh.volume > 0
  x = rng.uniform(-1, 1, size=(400, 3))
  # also near the surface, where the SDF is most delicate
  s, _ = P.sample_surface(prim, 200, rng)
  x = np.concatenate([x, s + rng.normal(scale=0.03, size=s.shape)])
  d = prim.sdf(x)
  tol = 1.5 * _sagitta(prim, segments)
  far = np.abs(d) > 2 * tol
  # sign agrees with the mesh's ray-parity containment (embree)
  np.testing.assert_array_equal(mesh.contains(x[far]), d[far] < 0)
  # magnitude equals the distance to the surface (single primitive: exact in and out)
  sub = np.where(far)[0][:150]
  ref = _point_triangle_distance(x[sub], mesh.triangles)
  np.testing.assert_allclose(np.abs(d[sub]), ref, atol=tol)


@pytest.mark.parametrize("kind", P.KINDS)
def test_surface_samples_on_surface_and_normals_match_fd_gradient(kind):
  rng = np.random.default_rng(10 + P.KINDS.index(kind))
  prim = P.random_primitive(rng, kinds=(kind,))
  pts, nrm = P.sample_surface(prim, 1000, rng)
  assert pts.shape == (1000, 3) and nrm.shape == (1000, 3)
  assert pts.dtype == np.float32 and nrm.dtype == np.float32
  assert np.abs(prim.sdf(pts)).max() < 1e-5
  np.testing.assert_allclose(np.linalg.norm(nrm, axis=-1), 1.0, atol=1e-5)
  # central finite differences of the SDF value only (independent of sdf_grad)
  p = pts.astype(np.float64)
  h = 1e-6
  fd = np.stack([(prim.sdf(p + h * e) - prim.sdf(p - h * e)) / (2 * h) for e in np.eye(3)], -1)
  fd /= np.linalg.norm(fd, axis=-1, keepdims=True)
  cos = np.sum(fd * nrm, axis=-1)
  assert np.median(cos) > 0.9999
  assert np.mean(cos > 0.99) > 0.98  # a few samples may sit on a box/cylinder edge


@pytest.mark.parametrize("kind", P.KINDS)
def test_area_matches_dense_mesh(kind):
  rng = np.random.default_rng(20 + P.KINDS.index(kind))
  prim = P.random_primitive(rng, kinds=(kind,))
  np.testing.assert_allclose(prim.area(), prim.to_mesh(128).area, rtol=2e-3)


def test_box_samples_are_area_uniform():
  rng = np.random.default_rng(3)
  box = P.Box(half_extents=(0.6, 0.3, 0.1))
  pts, nrm = P.sample_surface(box, 20000, rng)
  axis = np.argmax(np.abs(nrm), axis=-1)
  frac = np.bincount(axis, minlength=3) / len(axis)
  hx, hy, hz = 0.6, 0.3, 0.1
  face = np.array([hy * hz, hx * hz, hx * hy])
  np.testing.assert_allclose(frac, face / face.sum(), atol=0.015)


# Shapes whose sampler is checked: one random instance per kind plus the special profiles.
_SAMPLED_SHAPES = {
    **{
        k: P.random_primitive(np.random.default_rng(30 + i), kinds=(k,))
        for i, k in enumerate(P.KINDS)
    },
    "frustum": P.Cone(radius_bottom=0.5, radius_top=0.2, half_height=0.4),
    "inverted_cone": P.Cone(radius_bottom=0.0, radius_top=0.4, half_height=0.5),
    "flat_box": P.Box(half_extents=(0.6, 0.3, 0.1)),
    "thin_torus": P.Torus(major_radius=0.3, minor_radius=0.25),
}


def test_sampled_shapes_cover_every_kind():
  assert {p.kind for p in _SAMPLED_SHAPES.values()} == set(P.KINDS)


@pytest.mark.parametrize("name", sorted(_SAMPLED_SHAPES))
def test_exact_samples_on_surface_with_the_sdf_gradient_as_normal(name):
  prim = _SAMPLED_SHAPES[name]
  pts, nrm = prim.sample_surface(2000, np.random.default_rng(1))
  assert pts.dtype == np.float64 and pts.shape == nrm.shape == (2000, 3)
  d, g = prim.sdf_grad(pts)
  assert np.abs(d).max() < 1e-9  # on the exact surface, up to float64 rounding
  np.testing.assert_allclose(nrm, g, atol=1e-8)


@pytest.mark.parametrize("name", sorted(_SAMPLED_SHAPES))
def test_sdf_value_path_equals_sdf_grad_value(name):
  prim = _SAMPLED_SHAPES[name]
  rng = np.random.default_rng(2)
  surf, _ = prim.sample_surface(300, rng)
  x = np.concatenate(
      [
          rng.uniform(-1, 1, (600, 3)),
          surf,
          surf + rng.normal(scale=0.02, size=surf.shape),
          [prim.translation],
      ]
  )
  np.testing.assert_allclose(prim.sdf(x), prim.sdf_grad(x)[0], rtol=0, atol=1e-12)


def _surface_cells(local, extent):
  """Cell index in [0, 72) of local points [P,3]: 6 height bins x 3 radial bins x 4 quadrants,
  extent = (max radial distance, max |z|) of the shape."""
  rho = np.hypot(local[:, 0], local[:, 1]) / extent[0]
  z_bin = np.clip(((local[:, 2] / extent[1] + 1.0) * 3.0).astype(int), 0, 5)
  rho_bin = np.clip((rho * 2.5).astype(int), 0, 2)
  quadrant = (local[:, 0] >= 0) * 2 + (local[:, 1] >= 0)
  return (z_bin * 3 + rho_bin) * 4 + quadrant


def _uniformity_excess(prim, n=20000, seed=0):
  """Two-sample chi-square of the cell counts of `sample_surface` against 4n area-uniform
  samples of a dense tessellation (an independent reference), in standard deviations of the
  chi-square distribution above its mean (~N(0, 1) for a correct sampler)."""
  rng = np.random.default_rng(seed)
  mesh = prim.to_mesh(128)
  v = prim.to_local(mesh.vertices)
  extent = np.array([np.hypot(v[:, 0], v[:, 1]).max(), np.abs(v[:, 2]).max()]) * (1 + 1e-6)
  ref, _ = P.sample_mesh_surface(mesh, 4 * n, rng)
  got, _ = P.sample_surface(prim, n, rng)
  k_got = np.bincount(_surface_cells(prim.to_local(got), extent), minlength=72)
  k_ref = np.bincount(_surface_cells(prim.to_local(ref), extent), minlength=72)
  used = (k_got + k_ref) > 20
  chi2 = np.sum((2.0 * k_got[used] - 0.5 * k_ref[used]) ** 2 / (k_got[used] + k_ref[used]))
  dof = used.sum() - 1
  return (chi2 - dof) / np.sqrt(2.0 * dof)


@pytest.mark.parametrize("name", sorted(_SAMPLED_SHAPES))
def test_surface_samples_are_area_uniform_against_a_dense_mesh(name):
  assert _uniformity_excess(_SAMPLED_SHAPES[name]) < 6.0


def _uniform_angles_sphere(self, n, rng):  # clusters at the poles
  theta, phi = 2 * np.pi * rng.random(n), np.pi * rng.random(n)
  g = np.stack([np.sin(phi) * np.cos(theta), np.sin(phi) * np.sin(theta), np.cos(phi)], -1)
  return self.radius * g, g


def _faces_by_count_box(self, n, rng):  # every face equally likely, whatever its area
  h = np.asarray(self.half_extents)
  face = rng.integers(0, 6, n)
  p = (2 * rng.random((n, 3)) - 1) * h
  p[np.arange(n), face // 2] = np.where(face % 2 == 0, 1.0, -1.0) * h[face // 2]
  return p, np.zeros((n, 3))


def _uniform_minor_angle_torus(self, n, rng):  # no area weight on the minor angle
  theta, phi = 2 * np.pi * rng.random(n), 2 * np.pi * rng.random(n)
  rho = self.major_radius + self.minor_radius * np.cos(phi)
  p = np.stack([rho * np.cos(theta), rho * np.sin(theta), self.minor_radius * np.sin(phi)], -1)
  return p, np.zeros((n, 3))


def _linear_radius_caps_cylinder(self, n, rng):  # caps with radius r u, not r sqrt(u)
  p, g = P._frustum_surface_samples(self.radius, self.radius, self.half_height, n, rng)
  cap = np.abs(g[:, 2]) > 0.5
  p[cap, :2] *= np.hypot(p[cap, 0], p[cap, 1])[:, None] / self.radius
  return p, g


def _uniform_height_cone(self, n, rng):  # lateral height uniform, not area weighted
  p, g = P._frustum_surface_samples(self.radius_bottom, self.radius_top, self.half_height, n, rng)
  side = np.abs(g[:, 2]) < 0.999
  t = rng.random(side.sum())
  rho = self.radius_bottom + (self.radius_top - self.radius_bottom) * t
  theta = np.arctan2(p[side, 1], p[side, 0])
  p[side] = np.stack([rho * np.cos(theta), rho * np.sin(theta), self.half_height * (2 * t - 1)], -1)
  return p, g


_EXACT_CAPSULE_SAMPLES = P.Capsule._local_surface_samples


def _half_and_half_capsule(self, n, rng):  # tube and end caps equally likely, whatever area
  p, g = _EXACT_CAPSULE_SAMPLES(self, 8 * n, rng)
  tube = np.abs(g[:, 2]) < 1e-12
  take = np.concatenate([np.flatnonzero(tube)[: n // 2], np.flatnonzero(~tube)[: n - n // 2]])
  assert len(take) == n
  return p[take], g[take]


@pytest.mark.parametrize(
    "name,biased",
    [
        ("sphere", _uniform_angles_sphere),
        ("flat_box", _faces_by_count_box),
        ("torus", _uniform_minor_angle_torus),
        ("cylinder", _linear_radius_caps_cylinder),
        ("cone", _uniform_height_cone),
        ("capsule", _half_and_half_capsule),
    ],
)
def test_area_uniformity_check_rejects_biased_samplers(monkeypatch, name, biased):
  prim = _SAMPLED_SHAPES[name]
  monkeypatch.setattr(type(prim), "_local_surface_samples", biased)
  assert _uniformity_excess(prim) > 10.0


def test_part_union_sdf_and_samples():
  rng = np.random.default_rng(4)
  a = P.Box(half_extents=(0.4, 0.1, 0.1))
  b = P.Sphere(radius=0.2, translation=np.array([0.4, 0.0, 0.0]))
  part = P.Part((a, b), name="stick")
  x = rng.uniform(-1, 1, size=(500, 3))
  np.testing.assert_allclose(part.sdf(x), np.minimum(a.sdf(x), b.sdf(x)))
  d, g = part.sdf_grad(x)
  np.testing.assert_allclose(d, part.sdf(x))
  pts, nrm = P.sample_surface(part, 3000, rng)
  # on the union's boundary: zero SDF, and not strictly inside either piece
  assert np.abs(part.sdf(pts)).max() < 1e-5
  assert np.minimum(a.sdf(pts), b.sdf(pts)).min() > -1e-5
  assert (np.maximum(a.sdf(pts), b.sdf(pts)) > 1e-3).mean() > 0.9
  # union sign vs ray parity on the concatenated mesh is not meaningful; use each piece
  inside = a.to_mesh().contains(x) | b.to_mesh(96).contains(x)
  far = np.abs(part.sdf(x)) > 0.01
  np.testing.assert_array_equal(inside[far], part.sdf(x)[far] < 0)


def test_part_samples_area_uniform_for_disjoint_pieces():
  rng = np.random.default_rng(5)
  a = P.Sphere(radius=0.2, translation=np.array([-0.5, 0, 0]))
  b = P.Sphere(radius=0.4, translation=np.array([0.4, 0, 0]))
  pts, _ = P.sample_surface(P.Part((a, b)), 10000, rng)
  frac_b = np.mean(np.abs(b.sdf(pts)) < 1e-4)
  np.testing.assert_allclose(frac_b, 0.16 / 0.20, atol=0.015)


def test_trimesh_samples_use_face_normals():
  rng = np.random.default_rng(6)
  mesh = trimesh.creation.box(extents=(1.0, 2.0, 0.5))
  pts, nrm = P.sample_surface(mesh, 500, rng)
  assert pts.shape == (500, 3)
  # on a box face, the normal axis coordinate is at the face's extreme
  ax = np.argmax(np.abs(nrm), axis=-1)
  half = np.array([0.5, 1.0, 0.25])
  np.testing.assert_allclose(np.abs(pts[np.arange(500), ax]), half[ax], atol=1e-6)


def test_sample_sdf_points_layout():
  rng = np.random.default_rng(7)
  s = P.Sphere(radius=0.5)
  surf, _ = P.sample_surface(s, 256, rng)
  pts, d = P.sample_sdf_points(s.sdf, surf, rng, n_near=1001, n_volume=300)
  assert pts.shape == (1301, 3) and d.shape == (1301,)
  assert pts.dtype == np.float32 and d.dtype == np.float32
  np.testing.assert_allclose(d, s.sdf(pts), atol=1e-6)
  near_small, near_large, vol = d[:501], d[501:1001], pts[1001:]
  assert np.std(near_small) < 0.015 < np.std(near_large) < 0.15
  assert np.abs(vol).max() <= 1.0 and np.std(vol) > 0.4


def test_random_primitive_fits_cube_and_is_seeded():
  for seed in range(12):
    p1 = P.random_primitive(np.random.default_rng(seed))
    p2 = P.random_primitive(np.random.default_rng(seed))
    assert P.primitive_to_dict(p1) == P.primitive_to_dict(p2)
    b = p1.to_mesh(32).bounds
    assert b.min() >= -1.0 - 1e-9 and b.max() <= 1.0 + 1e-9
    q = P.primitive_from_dict(P.primitive_to_dict(p1))
    x = np.random.default_rng(0).uniform(-1, 1, (50, 3))
    np.testing.assert_allclose(q.sdf(x), p1.sdf(x))


def test_rigid_transform_equivariance():
  rng = np.random.default_rng(8)
  prim = P.make_primitive("cone", 0.6, np.array([0.5, 0.8, 0.3]))
  r, t = P.random_rotation(rng), rng.normal(size=3) * 0.2
  moved = prim.with_transform(r, t)
  x = rng.uniform(-1, 1, size=(200, 3))
  np.testing.assert_allclose(moved.sdf(x @ r.T + t), prim.sdf(x), atol=1e-12)


def test_bad_parameters_raise():
  with pytest.raises(ValueError):
    P.Sphere(radius=float("nan"))
  with pytest.raises(ValueError):
    P.Torus(major_radius=0.2, minor_radius=0.3)
  with pytest.raises(ValueError):
    P.Box(rotation=np.diag([1.0, 1.0, -1.0]))
