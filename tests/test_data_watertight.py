"""Open parts: exact SDF signs (issue 12 §4) and watertight repair before sampling (issue 15)."""
import os

import numpy as np
import pytest
import trimesh

from data_pipeline import ingest, make, records, sampling
from data_pipeline import primitives as P
from moca_jax import metrics


def _lidless_box(subdivisions: int) -> trimesh.Trimesh:
  """The unit cube [-0.5, 0.5]^3 without its top (+y) side: 12 * 4^s * 5 / 6 faces."""
  box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
  for _ in range(subdivisions):
    box = box.subdivide()
  keep = box.triangles_center[:, 1] < 0.5 - 1e-9
  return trimesh.Trimesh(box.vertices, box.faces[keep], process=True)


def test_open_box_with_10240_faces_has_no_wrong_sdf_sign():
  mesh = _lidless_box(5)
  assert len(mesh.faces) == 10240 and not mesh.is_watertight
  cfg = sampling.SampleConfig()
  assert cfg.n_query == 3072
  out = sampling.sample_part(mesh, np.random.default_rng(0), cfg)
  q, d = out["sdf_points"], out["sdf_values"]
  ref = P.Box(half_extents=(0.5, 0.5, 0.5)).sdf(q)  # the closed box: the opening's plane
  decided = np.abs(ref) > 1e-7  # is the 0.5 level set of the open box's winding number
  at_opening = decided & (np.abs(q[:, 1] - 0.5) < 0.05) & np.all(np.abs(q[:, [0, 2]]) < 0.5, 1)
  assert at_opening.sum() > 50  # the samples that used to get the wrong sign are there
  assert int(np.sum((d[decided] < 0) != (ref[decided] < 0))) == 0


def test_winding_sign_is_exact_near_the_opening_of_a_large_open_mesh():
  mesh = _lidless_box(6)  # 40,960 faces
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.uniform(-0.49, 0.49, (2000, 3)) * [1, 0, 1] + [0, 0.5, 0]
                      + rng.normal(0, 1e-3, (2000, 1)) * [0, 1, 0],
                      rng.uniform(-1, 1, (2000, 3))])
  ref = P.Box(half_extents=(0.5, 0.5, 0.5)).sdf(x)
  ok = np.abs(ref) > 1e-7
  inside = sampling.mesh_inside(mesh, x)
  assert np.array_equal(inside[ok], ref[ok] < 0)
  np.testing.assert_allclose(sampling.winding_number(mesh, x[:20]),
                             _winding_reference(mesh, x[:20]), atol=1e-9)


def _winding_reference(mesh, x):
  """Sum of signed solid angles / 4 pi (Van Oosterom & Strackee 1983), plain numpy."""
  r = mesh.triangles[None] - x[:, None, None, :]  # [P,F,3,3]
  a, b, c = r[..., 0, :], r[..., 1, :], r[..., 2, :]
  la, lb, lc = (np.linalg.norm(v, axis=-1) for v in (a, b, c))
  det = np.sum(a * np.cross(b, c), -1)
  den = (la * lb * lc + np.sum(a * b, -1) * lc + np.sum(b * c, -1) * la
         + np.sum(c * a, -1) * lb)
  return np.sum(np.arctan2(det, den), -1) / (2 * np.pi)


def test_make_watertight_closes_holes_and_fixes_flipped_faces():
  closed = P.Box(half_extents=(0.5, 0.5, 0.5)).to_mesh()
  same, info = ingest.make_watertight(closed)
  assert same is closed and info is None
  # a lid-less box: MeshFix adds the lid, the part moves by about the lid's Chamfer share
  open_box = _lidless_box(2)
  fixed, info = ingest.make_watertight(open_box)
  assert fixed.is_watertight and fixed.is_winding_consistent and fixed.volume > 0
  np.testing.assert_allclose(fixed.volume, 1.0, rtol=1e-6)
  assert info["method"] == "pymeshfix"
  assert info["problem"] == "not closed (16 boundary edges, 0 non-manifold edges)"
  original = metrics.sample_points([open_box], 10_000, 0)
  expect = metrics.chamfer_distance(metrics.sample_points([fixed], 10_000, 1), original)
  assert info["chamfer"] == pytest.approx(expect)
  assert info["chamfer_floor"] == pytest.approx(
      metrics.chamfer_distance(metrics.sample_points([open_box], 10_000, 1), original))
  # moved: the lid (1/6 of the area) lies on average 1/6 from the walls (the mean distance
  # from a point of the unit square to its boundary), the rest does not move
  assert info["chamfer"] - info["chamfer_floor"] == pytest.approx(1 / 36, abs=0.006)
  # flipped faces on a closed surface: reoriented, nothing moves
  faces = closed.faces.copy()
  faces[:3] = faces[:3, ::-1]
  flipped = trimesh.Trimesh(closed.vertices, faces, process=False)
  fixed, info = ingest.make_watertight(flipped)
  assert info["problem"] == "inconsistent face winding (flipped faces)"
  assert fixed.is_winding_consistent and fixed.volume == pytest.approx(1.0)
  assert info["chamfer"] == pytest.approx(info["chamfer_floor"], rel=0.2)
  # two disjoint open spheres stay two components
  a, b = P.Sphere(0.3).to_mesh(16), P.Sphere(0.3, translation=[1, 0, 0]).to_mesh(16)
  two = trimesh.util.concatenate([trimesh.Trimesh(a.vertices, a.faces[5:]),
                                  trimesh.Trimesh(b.vertices, b.faces[7:])])
  fixed, info = ingest.make_watertight(two)
  assert fixed.is_watertight and len(fixed.split(only_watertight=False)) == 2


def test_build_repairs_open_parts_and_lists_them(tmp_path):
  src = tmp_path / "in"
  os.makedirs(src / "cup")
  _lidless_box(2).export(str(src / "cup" / "body.ply"))
  P.Sphere(0.2, translation=[0, 0.9, 0]).to_mesh(12).export(str(src / "cup" / "lid.ply"))
  cfg = make.BuildConfig(sample=sampling.SampleConfig(n_surface=256, n_near=256, n_volume=256),
                         image_size=24, num_views=1, num_previews=0)
  m = make.build(str(src), str(tmp_path / "out"), cfg=cfg, progress=False)
  assert m["count"] == 1 and len(m["repaired"]) == 1
  rep = m["repaired"][0]
  assert rep["key"] == "user/cup" and rep["part"] == "body" and rep["method"] == "pymeshfix"
  assert records.load_manifest(str(tmp_path / "out"))["repaired"] == m["repaired"]
  rec = records.decode_record(records.read_shard(records.shard_paths(str(tmp_path / "out"))[0])[0])
  assert rec["meta"]["repaired_parts"][0]["part"] == "body"
  obj = ingest.load_object(str(src / "cup"))
  body = rec["meta"]["part_names"].index("body")
  s, c = obj.scale, obj.center
  box = P.Box(half_extents=(0.5 * s,) * 3, translation=-c * s)  # the closed box, normalised
  q, d = rec["sdf_points"][body], rec["sdf_values"][body]
  ok = np.abs(box.sdf(q)) > 1e-6
  np.testing.assert_allclose(d[ok], box.sdf(q)[ok], atol=1e-5)
  # surface samples lie on the repaired (closed) surface: some on the new lid
  top = rec["surface_points"][body][:, 1]
  assert np.sum(np.abs(top - (0.5 - c[1]) * s) < 1e-5) > 10


def test_closed_part_of_overlapping_shells_is_inside_where_they_overlap():
  rng = np.random.default_rng(2)
  a = P.Cylinder(0.1, 0.5)
  b = P.Cylinder(0.1, 0.5, rotation=P.random_rotation(rng))
  part = trimesh.util.concatenate([a.to_mesh(48), b.to_mesh(48)])
  assert part.is_watertight and part.is_winding_consistent
  assert ingest.make_watertight(part) == (part, None)  # MeshFix would cut it up: not repaired
  x = np.concatenate([rng.normal(0, 0.04, (200, 3)), rng.uniform(-0.6, 0.6, (800, 3))])
  union = np.minimum(a.sdf(x), b.sdf(x))
  far = np.abs(union) > 0.01  # off the tessellation's error
  d = sampling.mesh_sdf(part, x)
  assert np.sum(union[far] < 0) > 150
  np.testing.assert_array_equal(d[far] < 0, union[far] < 0)
