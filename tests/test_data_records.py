"""Record schema round trips, ArrayRecord shards, the build (manifest, resume, bad inputs)."""
import json
import os

import numpy as np
import pytest

from data_pipeline import make, procedural, records, render, sampling

SMALL = make.BuildConfig(
    sample=sampling.SampleConfig(n_surface=128, n_near=96, n_volume=32, mesh_segments=24),
    image_size=48, num_views=1, render_segments=16, num_previews=1)


def test_record_round_trip():
  rng = np.random.default_rng(0)
  arrays = {"a": rng.normal(size=(3, 5, 3)).astype(np.float32),
            "b": rng.integers(0, 255, size=(2, 4, 4, 3)).astype(np.uint8)}
  meta = {"key": "x/1", "num_parts": 3, "names": ["é", "b"]}
  rec = records.decode_record(records.encode_record(arrays, meta))
  for k, v in arrays.items():
    np.testing.assert_array_equal(rec[k], v)
    assert rec[k].dtype == v.dtype
  assert rec["meta"]["key"] == "x/1" and rec["meta"]["names"] == ["é", "b"]
  assert rec["meta"]["schema_version"] == records.SCHEMA_VERSION
  with pytest.raises(ValueError):
    records.encode_record({"meta_json": np.zeros(1)}, {})


def test_shard_round_trip_is_atomic(tmp_path):
  path = str(tmp_path / "s.array_record")
  data = [bytes([i]) * (i + 1) for i in range(7)]
  assert records.write_shard(path, iter(data)) == 7
  assert records.read_shard(path) == data
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

  def broken():
    yield b"ok"
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError):
    records.write_shard(str(tmp_path / "t.array_record"), broken())
  assert not os.path.exists(tmp_path / "t.array_record")  # never a partial shard


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tiny"))
  manifest = make.build("procedural:tiny", out, num_shards=3, cfg=SMALL, progress=False)
  return out, manifest


def test_build_manifest_and_records(tiny_build):
  out, m = tiny_build
  n_items = len(procedural.split_items("tiny"))
  on_disk = records.load_manifest(out)
  assert on_disk["count"] == m["count"] == n_items and on_disk["complete"]
  assert on_disk["schema_version"] == records.SCHEMA_VERSION
  assert on_disk["generator_seed"] == 0 and on_disk["skipped"] == []
  assert on_disk["source"] == "procedural:tiny" and len(on_disk["shards"]) == 3
  assert sum(s["count"] for s in on_disk["shards"]) == n_items
  assert on_disk["bytes"] == sum(os.path.getsize(p) for p in records.shard_paths(out))
  keys = []
  for p in records.shard_paths(out):
    side = json.load(open(p[:-len(".array_record")] + ".json"))
    recs = [records.decode_record(r) for r in records.read_shard(p)]
    assert [r["meta"]["key"] for r in recs] == side["keys"]
    keys += side["keys"]
    for r in recs:
      n = r["meta"]["num_parts"]
      assert r["surface_points"].shape == (n, 128, 3)
      assert r["sdf_points"].shape == (n, 128, 3) and r["sdf_values"].shape == (n, 128)
      assert r["images"].shape == (1, 48, 48, 3) and r["masks"].shape == (1, 48, 48)
      assert r["part_colors"].shape == (n, 3) and r["cameras"].shape == (1, 18)
      assert r["masks"].max() <= n
  assert sorted(keys) == sorted(it.key for it in procedural.split_items("tiny"))
  assert os.listdir(os.path.join(out, "previews"))


def _hues_per_component(rec):
  """The median chromaticity (rgb / sum) of each component's pixels in view 0: shading
  scales a material's colour, so one material has one chromaticity."""
  img, ids = rec["images"][0].astype(np.float64), rec["masks"][0]
  out = {}
  for i in np.unique(ids[ids > 0]):
    px = img[ids == i]
    px = px[px.sum(-1) > 60]
    if len(px) >= 5:
      out[int(i)] = np.median(px / px.sum(-1, keepdims=True), axis=0)
  return out


def test_condition_images_use_one_material_per_object(tiny_build):
  """Objects are rendered in one colour (the parts are not given away by colour); scene
  instances each keep their own; `part_colors` stays a distinct colour per component."""
  out, _ = tiny_build
  objects = scenes = 0
  for p in records.shard_paths(out):
    for raw in records.read_shard(p):
      rec = records.decode_record(raw)
      hues = np.stack(list(_hues_per_component(rec).values()))
      spread = np.abs(hues - hues.mean(0)).max()
      if rec["meta"]["type"] == "object":
        objects += 1
        assert len(hues) < 2 or spread < 0.03, rec["meta"]["key"]
        assert len(np.unique(rec["part_colors"], axis=0)) == rec["meta"]["num_parts"]
      elif len(hues) >= 3:
        scenes += 1
        assert spread > 0.05, rec["meta"]["key"]
  assert objects == procedural.SPLITS["tiny"]["objects"] and scenes >= 1


def test_material_colors():
  rng = np.random.default_rng(0)
  parts = procedural.random_colors(rng, 5)
  one = render.material_colors("object", parts, np.random.default_rng(1))
  assert one.shape == (5, 3) and one.dtype == np.uint8 and (one == one[0]).all()
  np.testing.assert_array_equal(one, render.material_colors("object", parts, np.random.default_rng(1)))
  np.testing.assert_array_equal(render.material_colors("scene", parts, rng), parts)


def test_build_is_deterministic(tiny_build, tmp_path):
  out, _ = tiny_build
  out2 = str(tmp_path / "again")
  make.build("procedural:tiny", out2, num_shards=3, shard_index=1, cfg=SMALL, progress=False)
  name = records.shard_name(1, 3) + ".array_record"
  a = records.read_shard(os.path.join(out, name))
  b = records.read_shard(os.path.join(out2, name))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    rx, ry = records.decode_record(x), records.decode_record(y)
    for k in records.SAMPLE_KEYS + ("images", "masks"):
      np.testing.assert_array_equal(rx[k], ry[k])


def test_resume_skips_finished_shards_without_duplicates(tmp_path):
  out = str(tmp_path / "r")
  m = make.build("procedural:tiny", out, num_shards=4, shard_index=2, cfg=SMALL,
                 progress=False)
  assert m["built_now"] == [2] and not m["complete"]
  s2 = os.path.join(out, records.shard_name(2, 4) + ".array_record")
  stamp = os.stat(s2).st_mtime_ns
  # a build killed in shard 0: a leftover temp file, and a shard file without sidecar
  open(os.path.join(out, records.shard_name(0, 4) + ".array_record.tmp-999"), "wb").write(b"x")
  open(os.path.join(out, records.shard_name(1, 4) + ".array_record"), "wb").write(b"junk")
  m = make.build("procedural:tiny", out, num_shards=4, cfg=SMALL, progress=False)
  assert m["built_now"] == [0, 1, 3] and m["complete"]
  assert os.stat(s2).st_mtime_ns == stamp
  keys = []
  for p in records.shard_paths(out):
    keys += [records.decode_record(r)["meta"]["key"] for r in records.read_shard(p)]
  assert len(keys) == len(set(keys)) == len(procedural.split_items("tiny"))
  m = make.build("procedural:tiny", out, num_shards=4, cfg=SMALL, progress=False)
  assert m["built_now"] == []


def test_source_kinds():
  objs = make.resolve_source("procedural:tiny:objects")
  scenes = make.resolve_source("procedural:tiny:scenes")
  both = make.resolve_source("procedural:tiny")
  assert [w.key for w in both] == [w.key for w in objs + scenes]
  assert all(w.procedural.kind == "scene" for w in scenes) and scenes
  with pytest.raises(ValueError, match="expected procedural:SPLIT"):
    make.resolve_source("procedural:tiny:chairs")


def test_bad_source_and_sharding_raise(tmp_path):
  with pytest.raises(ValueError, match="unknown split"):
    make.build("procedural:nope", str(tmp_path / "a"), cfg=SMALL)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    make.build(str(tmp_path / "missing"), str(tmp_path / "b"), cfg=SMALL)
  with pytest.raises(ValueError, match="bad sharding"):
    make.build("procedural:tiny", str(tmp_path / "c"), num_shards=2, shard_index=2, cfg=SMALL)
