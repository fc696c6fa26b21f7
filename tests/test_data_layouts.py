"""The three input layouts of issue 15, each written by the test: scene-graph GLB/glTF (nested
transforms, instanced meshes, node names), a folder of per-part files, and PartObjaverse-style
per-face labels; then one Beam build over all of them."""
import json
import os
import struct

import numpy as np
import pytest
import trimesh
from trimesh import transformations as tf

from data_pipeline import beam_build, ingest, make, records, sampling
from data_pipeline import primitives as P

SMALL = make.BuildConfig(
    sample=sampling.SampleConfig(n_surface=64, n_near=32, n_volume=16), image_size=24,
    num_views=1, num_previews=0)


def _instanced_chair() -> trimesh.Scene:
  """A seat at the root and two legs: one mesh instanced by two nodes under a 'chair' node
  that is lifted by 1 and scaled by 2 (units: the chair is modelled in half metres)."""
  sc = trimesh.Scene()
  sc.add_geometry(trimesh.creation.box(extents=(1.0, 0.1, 1.0)), node_name="seat",
                  geom_name="seat_mesh")
  sc.graph.update(frame_to="chair", frame_from=sc.graph.base_frame,
                  matrix=tf.translation_matrix([0, 1, 0]) @ tf.scale_matrix(2.0))
  sc.add_geometry(trimesh.creation.box(extents=(0.1, 0.5, 0.1)), node_name="leg_a",
                  geom_name="leg_mesh", parent_node_name="chair",
                  transform=tf.translation_matrix([0.2, 0, 0.2]))
  sc.graph.update(frame_to="leg_b", frame_from="chair", geometry="leg_mesh",
                  matrix=tf.translation_matrix([-0.2, 0, -0.2]) @ tf.rotation_matrix(
                      np.pi / 2, [0, 1, 0]))
  return sc


@pytest.mark.parametrize("ext", ["glb", "gltf"])
def test_scene_graph_parts_keep_transforms_instances_and_names(tmp_path, ext):
  path = str(tmp_path / f"chair.{ext}")
  _instanced_chair().export(path)
  if ext == "glb":  # the file really instances one mesh from two nodes
    data = open(path, "rb").read()
    doc = json.loads(data[20:20 + struct.unpack("<I", data[12:16])[0]])
    assert len(doc["meshes"]) == 2
    assert sorted(n["mesh"] for n in doc["nodes"] if "mesh" in n) == [0, 1, 1]
  obj = ingest.load_object(path)
  assert obj.names == ["leg_a", "leg_b", "seat"]
  # world placement before normalisation: centre of each part, and the legs' scale 2
  world = {n: m.bounds.mean(0) / obj.scale + obj.center for n, m in zip(obj.names, obj.parts)}
  np.testing.assert_allclose(world["leg_a"], [0.4, 1.0, 0.4], atol=1e-6)
  np.testing.assert_allclose(world["leg_b"], [-0.4, 1.0, -0.4], atol=1e-6)
  np.testing.assert_allclose(world["seat"], [0, 0, 0], atol=1e-6)
  leg_size = np.ptp(obj.parts[0].vertices, axis=0) / obj.scale
  np.testing.assert_allclose(leg_size, [0.2, 1.0, 0.2], atol=1e-6)
  # units and scale normalised: the object spans [-extent, extent] on its longest side
  lo = np.min([m.bounds[0] for m in obj.parts], 0)
  hi = np.max([m.bounds[1] for m in obj.parts], 0)
  np.testing.assert_allclose(np.max(hi - lo), 2 * ingest.IngestConfig().extent, rtol=1e-9)
  assert obj.repaired == []  # closed boxes need no repair


def test_folder_of_per_part_files(tmp_path):
  d = tmp_path / "lamp"
  os.makedirs(d)
  P.Box(half_extents=(0.2, 0.05, 0.2)).to_mesh().export(str(d / "base.stl"))
  P.Cylinder(0.03, 0.3, translation=[0, 0.35, 0]).to_mesh(12).export(str(d / "pole.ply"))
  P.Sphere(0.15, translation=[0, 0.8, 0]).to_mesh(12).export(str(d / "shade.obj"))
  obj = ingest.load_object(str(d))
  assert obj.names == ["base", "pole", "shade"]
  centres = np.array([m.bounds.mean(0) for m in obj.parts]) / obj.scale + obj.center
  np.testing.assert_allclose(centres[:, 1], [0, 0.35, 0.8], atol=1e-3)


def _labelled_object():
  """A table as one mesh (top + 2 legs) with per-face labels; a few faces unlabelled."""
  top = P.Box(half_extents=(0.5, 0.05, 0.3), translation=[0, 0.5, 0]).to_mesh()
  legs = [P.Box(half_extents=(0.04, 0.25, 0.04), translation=[x, 0.2, 0]).to_mesh()
          for x in (-0.4, 0.4)]
  mesh = trimesh.util.concatenate([top] + legs)
  labels = np.repeat([0, 3, 7], [len(top.faces), len(legs[0].faces), len(legs[1].faces)])
  return mesh, labels


def test_partobjaverse_style_per_face_labels(tmp_path):
  mesh, labels = _labelled_object()
  mesh.export(str(tmp_path / "table.glb"))
  np.save(tmp_path / "table.npy", labels)
  os.makedirs(tmp_path / "desk")
  mesh.export(str(tmp_path / "desk" / "mesh.obj"))
  lab = labels.copy()
  lab[:2] = -1
  np.save(tmp_path / "desk" / "face_labels.npy", lab)
  assert ingest.list_inputs(str(tmp_path)) == [str(tmp_path / "desk"), str(tmp_path / "table.glb")]
  table = ingest.load_object(str(tmp_path / "table.glb"))
  assert table.names == ["part_0", "part_3", "part_7"] and table.dropped == []
  assert [len(m.faces) for m in table.parts] == [12, 12, 12]
  centres = np.array([m.bounds.mean(0) for m in table.parts]) / table.scale + table.center
  np.testing.assert_allclose(centres, [[0, 0.5, 0], [-0.4, 0.2, 0], [0.4, 0.2, 0]], atol=1e-6)
  desk = ingest.load_object(str(tmp_path / "desk"))
  assert desk.dropped == [{"part": "unlabelled", "reason": "negative label (2 faces)"}]
  assert len(desk.parts[0].faces) == 10
  assert desk.repaired[0]["part"] == "part_0" and desk.repaired[0]["method"] == "pymeshfix"


@pytest.mark.parametrize("labels, reason", [
    (np.zeros(5, np.int64), "label array bad.npy has 5 entries, the mesh has 36 faces"),
    (np.zeros(36, np.float32), "label array bad.npy must be integer [F], got float32 [36]"),
])
def test_bad_label_arrays_give_one_clear_error(tmp_path, labels, reason):
  mesh, _ = _labelled_object()
  mesh.export(str(tmp_path / "bad.glb"))
  np.save(tmp_path / "bad.npy", labels)
  with pytest.raises(ingest.IngestError) as e:
    ingest.load_object(str(tmp_path / "bad.glb"))
  assert str(e.value) == f"{tmp_path / 'bad.glb'}: {reason}"


def test_beam_build_over_all_layouts(tmp_path):
  src = tmp_path / "in"
  os.makedirs(src / "lamp")
  _instanced_chair().export(str(src / "chair.glb"))
  P.Box(half_extents=(0.2, 0.05, 0.2)).to_mesh().export(str(src / "lamp" / "base.stl"))
  P.Sphere(0.15, translation=[0, 0.8, 0]).to_mesh(12).export(str(src / "lamp" / "shade.obj"))
  mesh, labels = _labelled_object()
  mesh.export(str(src / "table.glb"))
  np.save(src / "table.npy", labels)
  out = str(tmp_path / "out")
  m = beam_build.run(make.plan_build(str(src), out, 2, cfg=SMALL),
                     ["--runner=DirectRunner", "--direct_running_mode=in_memory"])
  assert m["complete"] and m["count"] == 3 and m["skipped"] == []
  recs = {records.decode_record(r)["meta"]["key"]: records.decode_record(r)
          for p in records.shard_paths(out) for r in records.read_shard(p)}
  assert recs["user/chair.glb"]["meta"]["part_names"] == ["leg_a", "leg_b", "seat"]
  assert recs["user/lamp"]["meta"]["part_names"] == ["base", "shade"]
  assert recs["user/table.glb"]["meta"]["part_names"] == ["part_0", "part_3", "part_7"]
  assert recs["user/table.glb"]["sdf_values"].shape == (3, 48)
