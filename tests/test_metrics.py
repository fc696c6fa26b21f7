"""Properties of moca_jax.metrics: Chamfer, F-score, self-IoU, scene metrics, empties."""

import math

import numpy as np
import pytest
import trimesh

from moca_jax import metrics as M


def _sphere_points(n, r, seed):
  x = np.random.default_rng(seed).normal(size=(n, 3))
  return r * x / np.linalg.norm(x, axis=1, keepdims=True)


def _box(extents=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0)):
  b = trimesh.creation.box(extents=extents)
  b.apply_translation(offset)
  return b


def _naive(pred, gt, taus):
  d = np.linalg.norm(pred[:, None, :] - gt[None, :, :], axis=-1)
  d_pg, d_gp = d.min(1), d.min(0)
  out = {"cd": d_pg.mean() + d_gp.mean()}
  for t in taus:
    p, r = np.mean(d_pg < t), np.mean(d_gp < t)
    out[M.fscore_key(t)] = 0.0 if p + r == 0 else 2 * p * r / (p + r)
  return out


# ----------------------------------------------------------------- Chamfer and F-score


@pytest.mark.parametrize("backend", ["kdtree", "jax"])
def test_point_metrics_match_naive_reference(backend):
  rng = np.random.default_rng(0)
  pred = rng.uniform(-1, 1, (300, 3))
  gt = rng.uniform(-1, 1, (250, 3)) * 0.9 + 0.05
  got = M.point_metrics(pred, gt, taus=(0.1, 0.05, 0.2), nn_backend=backend)
  want = _naive(pred, gt, (0.1, 0.05, 0.2))
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_jax_nn_matches_kdtree_with_padding_and_chunks():
  rng = np.random.default_rng(1)
  q, r = rng.normal(size=(1001, 3)), rng.normal(size=(777, 3))
  np.testing.assert_allclose(
      M.nn_distances_jax(q, r, chunk=64), M.nn_distances_kdtree(q, r), atol=1e-5
  )


def test_chamfer_of_mesh_with_itself_is_zero():
  mesh = trimesh.creation.icosphere(subdivisions=3)
  out = M.shape_metrics([mesh], [mesh.copy()], num_samples=20_000, seed=3)
  assert out["cd"] == 0.0
  assert out["fscore@0.1"] == 1.0 and out["fscore@0.05"] == 1.0
  # Independent samples of the same surface: near zero (about the sample spacing).
  p = M.sample_points([mesh], 20_000, seed=1)
  g = M.sample_points([mesh], 20_000, seed=2)
  assert 0.0 < M.chamfer_distance(p, g) < 0.03


@pytest.mark.parametrize("r1,r2", [(1.0, 0.8), (0.5, 0.9), (1.0, 0.95)])
def test_chamfer_concentric_spheres_is_twice_radius_gap(r1, r2):
  # Exact sphere samples: the only error is the sample spacing (~0.015 at 20k points).
  cd = M.chamfer_distance(_sphere_points(20_000, r1, 0), _sphere_points(20_000, r2, 1))
  assert abs(cd - 2 * abs(r1 - r2)) < 0.01
  # Meshes (icospheres), un-normalised: add the polygonal approximation error.
  s1 = trimesh.creation.icosphere(subdivisions=5, radius=r1)
  s2 = trimesh.creation.icosphere(subdivisions=5, radius=r2)
  out = M.shape_metrics([s1], [s2], num_samples=20_000, normalize=False)
  assert abs(out["cd"] - 2 * abs(r1 - r2)) < 0.01


def test_fscore_zero_when_every_point_is_farther_than_tau():
  p, g = _sphere_points(5000, 1.0, 0), _sphere_points(5000, 0.8, 1)  # every gap >= 0.2
  assert M.f_score(p, g, 0.1) == 0.0
  assert M.f_score(p, g, 0.05) == 0.0
  assert M.f_score(p, g, 0.25) > 0.99  # and it does switch on once tau passes the gap


def test_fscore_harmonic_mean_of_precision_and_recall():
  # gt has extra far points: recall 0.5, precision 1 -> F = 2/3.
  p = _sphere_points(2000, 1.0, 0)
  g = np.concatenate([p, p + 10.0])
  np.testing.assert_allclose(M.f_score(p, g, 0.1), 2 / 3, rtol=1e-9)


def test_metrics_invariant_to_joint_scale_and_translation():
  a, b = _box((1, 0.5, 0.3)), trimesh.creation.icosphere(radius=0.4)
  b.apply_translation((0.3, 0.2, 0.1))
  gt = [_box((1, 0.5, 0.3), (0.05, 0, 0)), trimesh.creation.capsule(0.3, 0.2)]
  base = M.object_metrics([a, b], gt, num_samples=5000)
  moved = []
  for m in (a, b):
    m = m.copy()
    m.apply_scale(3.7)
    m.apply_translation((5.0, -2.0, 1.0))
    moved.append(m)
  out = M.object_metrics(moved, gt, num_samples=5000)
  for k in base:
    np.testing.assert_allclose(out[k], base[k], atol=1e-9, err_msg=k)


def test_normalize_parts_is_joint():
  a, b = _box((1, 1, 1)), _box((1, 1, 1), (3.0, 0, 0))
  na, nb = M.normalize_parts([a, b])
  np.testing.assert_allclose(na.bounds[0, 0], -1.0)
  np.testing.assert_allclose(nb.bounds[1, 0], 1.0)
  # Relative sizes kept: each box is a quarter of the union's length.
  np.testing.assert_allclose(na.extents[0], 0.5)
  np.testing.assert_allclose(nb.extents[0], 0.5)


def test_sampling_is_seeded():
  m = trimesh.creation.icosphere()
  np.testing.assert_array_equal(M.sample_points([m], 100, 7), M.sample_points([m], 100, 7))
  assert not np.array_equal(M.sample_points([m], 100, 7), M.sample_points([m], 100, 8))


# ----------------------------------------------------------------------------- Self-IoU


def test_self_iou_disjoint_boxes_is_zero():
  assert M.self_iou([_box(), _box(offset=(1.5, 0, 0))]) == 0.0


def test_self_iou_identical_boxes_is_one():
  assert M.self_iou([_box(), _box()]) == 1.0


@pytest.mark.parametrize("shift", [0.5, 0.25])
def test_self_iou_overlapping_boxes_matches_analytic(shift):
  # Unit cubes shifted along x: intersection 1 - s, union 1 + s.
  iou = M.self_iou([_box(), _box(offset=(shift, 0, 0))])
  analytic = (1 - shift) / (1 + shift)
  # Voxel error: at pitch 2/64 over a joint extent of 1 + s, the surface voxels add at most
  # about one voxel per face: bound the IoU by dilating both boxes by one pitch.
  pitch = (1 + shift) / 32
  lo = (1 - shift - pitch) * (1 + pitch) ** 2 / ((1 + shift + pitch) * (1 + pitch) ** 2)
  hi = (1 - shift + 2 * pitch) / (1 + shift + 2 * pitch)
  assert min(lo, analytic) - 1e-9 <= iou <= max(hi, analytic) + 1e-9, (iou, analytic)
  assert abs(iou - analytic) < 0.04


def test_voxelize_fills_the_interior():
  # A sphere of radius 1 in [-1,1]^3 fills pi/6 of the cube (plus the surface voxels).
  occ = M.voxelize_filled(trimesh.creation.icosphere(subdivisions=4), 64)
  frac = occ.mean() * (65 / 64) ** 3
  assert abs(frac - math.pi / 6) < 0.05
  assert occ[32, 32, 32]  # centre is filled, not just the shell


def test_self_iou_non_watertight_fails_safe():
  # A box missing one face (fill leaks: shell only) never reports more overlap than the
  # watertight box, and stays defined.
  box = _box()
  open_box = trimesh.Trimesh(box.vertices, box.faces[2:], process=False)
  assert not open_box.is_watertight
  other = _box(offset=(0.5, 0, 0))
  iou_open = M.self_iou([open_box, other])
  assert 0.0 < iou_open <= M.self_iou([box, other]) + 1e-9


def test_pairwise_iou_matches_sets():
  rng = np.random.default_rng(0)
  grids = [rng.random((5, 5, 5)) < 0.4 for _ in range(3)]
  got = M.pairwise_iou(grids)
  for i in range(3):
    for j in range(3):
      a, b = grids[i], grids[j]
      np.testing.assert_allclose(got[i, j], (a & b).sum() / (a | b).sum())


# ------------------------------------------------------------------------------ Empties


def test_empty_meshes_have_defined_values():
  empty = trimesh.Trimesh()
  box = _box()
  out = M.shape_metrics([empty], [box], num_samples=1000)
  assert out["cd"] == M.EMPTY_CHAMFER and out["fscore@0.1"] == 0.0
  out = M.shape_metrics([empty], [empty], num_samples=1000)
  assert out["cd"] == 0.0 and out["fscore@0.1"] == 1.0
  # An empty part is ignored: sampling, normalisation and self-IoU pairs.
  assert M.self_iou([box, empty]) == 0.0
  assert M.self_iou([box, empty, box.copy()]) == 1.0
  a = M.object_metrics([box, empty], [box], num_samples=1000)
  assert a["cd"] == 0.0 and a["num_parts_pred"] == 1.0


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="meshes\\[1\\]"):
    M.as_mesh_list([_box(), "not a mesh"])
  with pytest.raises(ValueError, match="nn_backend"):
    M.nn_distances(np.zeros((1, 3)), np.zeros((1, 3)), backend="faiss")


# ------------------------------------------------------------------------------- Scenes


def _scene():
  return [
      _box((1, 1, 1)),
      _box((0.5, 2, 0.5), (2, 0, 0)),
      trimesh.creation.icosphere(radius=0.5).apply_translation((0, 0, 2)),
  ]


@pytest.mark.parametrize("frame", ["instance", "scene"])
def test_scene_metrics_identical_and_index_matching(frame):
  gt = _scene()
  same = M.scene_metrics(gt, [m.copy() for m in gt], num_samples=4000, object_frame=frame)
  assert same["cd_scene"] == 0.0 and same["cd_obj"] == 0.0
  assert same["fscore_scene@0.1"] == 1.0 and same["fscore_obj@0.1"] == 1.0
  assert same["self_iou"] == 0.0
  # Permuting the instances leaves the fused scene alone but breaks index matching.
  perm = [gt[1], gt[2], gt[0]]
  out = M.scene_metrics(perm, gt, num_samples=4000, object_frame=frame)
  assert out["cd_scene"] < 0.05
  assert out["cd_obj"] > 0.1


def test_scene_missing_instance_counts_as_empty():
  gt = _scene()
  out = M.scene_metrics(gt[:2], gt, num_samples=2000)
  np.testing.assert_allclose(out["cd_obj"], M.EMPTY_CHAMFER / 3, rtol=1e-9)
  assert out["num_instances"] == 3.0
  assert out["num_parts_pred"] == 2.0 and out["num_parts_gt"] == 3.0
  out = M.scene_metrics([gt[0], trimesh.Trimesh(), gt[2]], gt, num_samples=2000)
  assert out["num_parts_pred"] == 2.0  # an empty mesh is an empty instance


def test_mean_metrics_skips_nan():
  out = M.mean_metrics([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": 2.0}])
  assert out == {"a": 2.0, "b": 2.0, "count": 2.0}
