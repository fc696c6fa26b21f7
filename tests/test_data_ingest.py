"""Ingestion of user meshes written by the test in each format, and of broken inputs."""
import os

import numpy as np
import pytest
import trimesh

from data_pipeline import ingest, make, records, sampling
from data_pipeline import primitives as P

SMALL = make.BuildConfig(
    sample=sampling.SampleConfig(n_surface=128, n_near=64, n_volume=32),
    image_size=32, num_views=1, num_previews=0)


def _scene(parts):
  sc = trimesh.Scene()
  for name, mesh in parts:
    sc.add_geometry(mesh, node_name=name, geom_name=name)
  return sc


def _good_parts():
  return [("seat", P.Box(half_extents=(0.5, 0.1, 0.4)).to_mesh()),
          ("leg", P.Cylinder(0.05, 0.4, translation=[0.4, -0.5, 0.3]).to_mesh(16)),
          ("ball", P.Sphere(0.2, translation=[-0.3, 0.4, 0.0]).to_mesh(16))]


def _nan_part():
  m = P.Sphere(0.2).to_mesh(8)
  v = m.vertices.copy()
  v[3] = np.nan
  return trimesh.Trimesh(v, m.faces, process=False)


def _zero_area_part():
  return trimesh.Trimesh(np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0.0]]), np.array([[0, 1, 2]]),
                         process=False)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("user")
  _scene(_good_parts() + [("bad_nan", _nan_part())]).export(str(d / "chair.glb"))
  _scene(_good_parts()).export(str(d / "gl" / "x.gltf") if False else str(d / "table.gltf"))
  _scene(_good_parts()[:2]).export(str(d / "stool.obj"))
  P.Torus(0.5, 0.1).to_mesh(16).export(str(d / "ring.ply"))
  os.makedirs(d / "lamp")
  P.Box(half_extents=(0.2, 0.05, 0.2)).to_mesh().export(str(d / "lamp" / "base.stl"))
  P.Cone(0.2, 0.05, 0.2, translation=[0, 0.6, 0]).to_mesh(16).export(str(d / "lamp" / "shade.obj"))
  open(d / "lamp" / "wire.obj", "w").write("")  # an empty part file: dropped with a reason
  # broken inputs
  data = open(d / "chair.glb", "rb").read()
  open(d / "truncated.glb", "wb").write(data[: len(data) // 2])
  open(d / "notes.obj", "w").write("this is not a mesh\n")
  _scene([("nan_only", _nan_part())]).export(str(d / "allnan.glb"))
  _scene([("flat", _zero_area_part())]).export(str(d / "flat.glb"))
  os.makedirs(d / "emptyfolder")
  open(d / "emptyfolder" / "readme.txt", "w").write("no parts here")
  many = [(f"p{i}", P.Sphere(0.05, translation=[i * 0.2, 0, 0]).to_mesh(8)) for i in range(5)]
  _scene(many).export(str(d / "many.glb"))
  _scene([("a", P.Box().to_mesh()), ("b", P.Box().to_mesh())]).export(str(d / "dup.glb"))
  return str(d)


def test_formats_load_with_parts_and_normalisation(user_dir):
  for name, n in (("chair.glb", 3), ("table.gltf", 3), ("stool.obj", 2), ("ring.ply", 1),
                  ("lamp", 2)):
    obj = ingest.load_object(os.path.join(user_dir, name))
    assert len(obj.parts) == n, name
    lo = np.min([m.bounds[0] for m in obj.parts], 0)
    hi = np.max([m.bounds[1] for m in obj.parts], 0)
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-6)
    np.testing.assert_allclose(np.max(hi - lo), 2 * ingest.IngestConfig().extent, rtol=1e-6)
  lamp = ingest.load_object(os.path.join(user_dir, "lamp"))
  assert lamp.names == ["base", "shade"]
  assert lamp.dropped == [{"part": "wire", "reason": "empty geometry"}]
  chair = ingest.load_object(os.path.join(user_dir, "chair.glb"))
  assert sorted(chair.names) == ["ball", "leg", "seat"]
  assert chair.dropped == [{"part": "bad_nan", "reason": "non-finite (NaN/inf) vertices"}]
  # parts keep their relative placement: the seat/leg offset is scaled, not moved
  seat = chair.parts[chair.names.index("seat")].bounds.mean(0)
  leg = chair.parts[chair.names.index("leg")].bounds.mean(0)
  np.testing.assert_allclose((leg - seat) / chair.scale, [0.4, -0.5, 0.3], atol=1e-6)


@pytest.mark.parametrize("name, reason", [
    ("truncated.glb", "cannot read mesh file"),
    ("notes.obj", "no geometry"),
    ("allnan.glb", "no valid parts (nan_only: non-finite (NaN/inf) vertices)"),
    ("flat.glb", "no valid parts (flat: zero area)"),
    ("emptyfolder", "folder has no part files"),
    ("dup.glb", "overlap (voxel IoU 1.000"),
])
def test_bad_inputs_give_one_clear_error(user_dir, name, reason):
  path = os.path.join(user_dir, name)
  with pytest.raises(ingest.IngestError) as e:
    ingest.load_object(path)
  assert str(e.value).startswith(path + ": ")
  assert reason in str(e.value)


def test_part_limit_skip_and_merge(user_dir):
  path = os.path.join(user_dir, "many.glb")
  with pytest.raises(ingest.IngestError, match="5 parts exceed the limit of 3"):
    ingest.load_object(path, ingest.IngestConfig(max_parts=3, part_limit_policy="skip"))
  obj = ingest.load_object(path, ingest.IngestConfig(max_parts=3, part_limit_policy="merge"))
  assert len(obj.parts) == 3 and obj.merged == 2
  assert sum(len(m.faces) for m in obj.parts) == 5 * len(P.Sphere(0.05).to_mesh(8).faces)


def test_pairwise_iou_matches_analytic_overlap():
  a = P.Box(half_extents=(0.5, 0.5, 0.5)).to_mesh()
  b = P.Box(half_extents=(0.5, 0.5, 0.5), translation=[0.5, 0, 0]).to_mesh()
  iou = ingest.pairwise_iou([a, b], 64)
  np.testing.assert_allclose(np.diag(iou), 1.0)
  np.testing.assert_allclose(iou[0, 1], 1 / 3, atol=0.03)  # overlap 0.5 / union 1.5


def test_build_from_directory_skips_and_reports(user_dir, tmp_path):
  out = str(tmp_path / "out")
  m = make.build(user_dir, out, num_shards=2, cfg=SMALL, progress=False)
  skipped = {os.path.basename(s["input"]): s["reason"] for s in m["skipped"]}
  assert set(skipped) == {"truncated.glb", "notes.obj", "allnan.glb", "flat.glb",
                          "emptyfolder", "dup.glb"}
  assert not any(r.startswith(user_dir) for r in skipped.values())
  assert m["count"] == 6 and m["complete"]
  recs = [records.decode_record(r) for p in records.shard_paths(out)
          for r in records.read_shard(p)]
  by_key = {r["meta"]["key"]: r for r in recs}
  chair = by_key["user/chair.glb"]
  assert chair["meta"]["num_parts"] == 3 and chair["surface_points"].shape == (3, 128, 3)
  assert chair["meta"]["dropped_parts"][0]["part"] == "bad_nan"
  # user-mesh SDF: negative inside, ~0 on the surface samples, matches the analytic box
  seat = chair["meta"]["part_names"].index("seat")
  pts, d = chair["sdf_points"][seat], chair["sdf_values"][seat]
  obj = ingest.load_object(os.path.join(user_dir, "chair.glb"))
  s = obj.scale
  np.testing.assert_allclose(s, 1.9 / 1.15, rtol=2e-3)  # longest side (y) ~1.15 -> 1.9
  box = P.Box(half_extents=(0.5 * s, 0.1 * s, 0.4 * s), translation=-obj.center * s)
  np.testing.assert_allclose(d, box.sdf(pts), atol=2e-5)


def test_a_missing_module_stops_the_build_instead_of_skipping_every_item(
    user_dir, tmp_path, monkeypatch, capsys):
  """A module the build needs but the machine lacks is not a bad input: one error naming
  the item and the module, exit code 1, and nothing recorded as skipped."""
  from data_pipeline import build

  def no_rtree(w, cfg):
    raise ModuleNotFoundError("No module named 'rtree'")

  monkeypatch.setattr(make, "build_record_with_info", no_rtree)
  work = make.WorkItem(key="user/chair.glb", path=os.path.join(user_dir, "chair.glb"))
  with pytest.raises(ImportError, match="chair.glb: the build needs a Python module.*'rtree'"):
    make.build_safe(work, SMALL)
  out = str(tmp_path / "out")
  assert build.main(["build", f"--source={user_dir}", f"--out={out}", "--num_shards=1",
                     "--progress=false"]) == 1
  err = capsys.readouterr().err
  assert "error:" in err and "'rtree'" in err and "no item was skipped" in err
