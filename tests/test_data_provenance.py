"""Issue 12 §3: each shard records what it was made from; a rerun rebuilds what changed or
refuses with the reason; the manifest never claims what the records do not hold; a killed
build's temporary files are removed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from data_pipeline import encode_latents, make, records, sampling
from data_pipeline import primitives as P
from moca_jax import io as mio

SMALL = make.BuildConfig(
    sample=sampling.SampleConfig(n_surface=64, n_near=32, n_volume=16), image_size=24,
    num_views=1, num_previews=0)


def _mesh_file(path, radius):
  sc = trimesh.Scene()
  sc.add_geometry(P.Box(half_extents=(0.3, 0.1, 0.2)).to_mesh(), node_name="seat")
  sc.add_geometry(P.Sphere(radius, translation=[0, 0.4, 0]).to_mesh(8), node_name="ball")
  sc.export(path)


def _user_dir(root, n):
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    _mesh_file(os.path.join(root, f"obj{i}.glb"), 0.1 + 0.02 * i)
  return root


def _keys(out):
  return sorted(records.decode_record(r)["meta"]["key"] for p in records.shard_paths(out)
                for r in records.read_shard(p))


def test_mesh_added_to_a_built_folder_is_built(tmp_path):
  src = _user_dir(str(tmp_path / "in"), 4)
  out = str(tmp_path / "out")
  make.build(src, out, num_shards=3, cfg=SMALL, progress=False)
  stamps = {p: os.stat(p).st_mtime_ns for p in records.shard_paths(out)}
  _mesh_file(os.path.join(src, "new.glb"), 0.2)
  m = make.build(src, out, num_shards=3, cfg=SMALL, progress=False)
  new_shard = make.shard_of("user/new.glb", 3)
  assert m["built_now"] == [new_shard]
  assert m["rebuilt"] == {str(new_shard): "inputs 1 added (user/new.glb)"}
  assert m["complete"] and m["count"] == 5 == records.load_manifest(out)["count"]
  assert _keys(out) == sorted([f"user/obj{i}.glb" for i in range(4)] + ["user/new.glb"])
  for p, t in stamps.items():  # the other shards were not touched
    if not p.endswith(records.shard_name(new_shard, 3) + ".array_record"):
      assert os.stat(p).st_mtime_ns == t
  # an edited mesh is rebuilt too
  _mesh_file(os.path.join(src, "obj0.glb"), 0.25)
  os.utime(os.path.join(src, "obj0.glb"), ns=(1, 1))
  m = make.build(src, out, num_shards=3, cfg=SMALL, progress=False)
  assert m["built_now"] == [make.shard_of("user/obj0.glb", 3)]
  assert m["rebuilt"][str(m["built_now"][0])] == "inputs 1 changed (user/obj0.glb)"


def test_manifest_never_claims_an_unbuilt_mesh(tmp_path):
  src = _user_dir(str(tmp_path / "in"), 2)
  out = str(tmp_path / "out")
  make.build(src, out, num_shards=2, cfg=SMALL, progress=False)
  _mesh_file(os.path.join(src, "new.glb"), 0.2)
  plan = make.plan_build(src, out, 2, cfg=SMALL)
  m = plan.manifest()  # what a reader sees before the rerun builds the new mesh
  assert not m["complete"] and m["count"] < 3
  assert m["count"] == sum(len(records.read_shard(os.path.join(out, s["file"])))
                           for s in m["shards"])


def test_other_sample_counts_are_refused_and_the_manifest_kept(tmp_path):
  out = str(tmp_path / "out")
  src = _user_dir(str(tmp_path / "in"), 2)
  make.build(src, out, num_shards=2, cfg=SMALL, progress=False)
  before = open(os.path.join(out, "manifest.json")).read()
  bigger = make.BuildConfig(sample=sampling.SampleConfig(n_surface=128, n_near=32, n_volume=16),
                            image_size=24, num_views=1, num_previews=0)
  with pytest.raises(make.BuildConflict, match=r"was built with another config "
                     r"\(sample.n_surface: 64 -> 128\); build into a new --out"):
    make.build(src, out, num_shards=2, cfg=bigger, progress=False)
  assert open(os.path.join(out, "manifest.json")).read() == before
  m = records.load_manifest(out)
  assert m["config"]["sample"]["n_surface"] == 64
  rec = records.decode_record(records.read_shard(records.shard_paths(out)[0])[0])
  assert rec["surface_points"].shape[1] == 64
  with pytest.raises(make.BuildConflict, match="shards of another shard count"):
    make.build(src, out, num_shards=3, cfg=SMALL, progress=False)


def _dead_pid():
  return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True).stdout)


def test_killed_build_leftovers_are_removed(tmp_path):
  src = _user_dir(str(tmp_path / "in"), 2)
  out = str(tmp_path / "out")
  os.makedirs(out)
  pid = _dead_pid()
  name = records.shard_name(0, 2) + ".array_record"
  hidden = os.path.basename(mio.temp_path_for(os.path.join(out, name)))
  hidden = hidden.replace(f".tmp-{os.getpid()}-", f".tmp-{pid}-")
  legacy = f"{name}.tmp-{pid}"
  live = f"{records.shard_name(1, 2)}.array_record.tmp-{os.getppid()}"  # a live process
  for f in (hidden, legacy, live):
    open(os.path.join(out, f), "wb").write(b"partial")
  m = make.build(src, out, num_shards=2, cfg=SMALL, progress=False)
  assert sorted(m["removed_temps"]) == sorted([hidden, legacy])
  assert sorted(f for f in os.listdir(out) if ".tmp-" in f) == [live]


def _fake_encode(pts, nrm):
  return np.stack([pts.mean(1), nrm.mean(1)], axis=1)


def _other_encode(pts, nrm):
  return np.stack([pts.max(1), nrm.max(1)], axis=1)


def test_encode_with_another_vae_is_refused(tiny_shards, tmp_path):
  samples = tiny_shards(num_shards=2, n_near=16, image_size=24)
  out = str(tmp_path / "lat")
  vae_a = {"checkpoint": "/ckpt/a", "step": 10, "num_latents": 2}
  vae_b = {"checkpoint": "/ckpt/b", "step": 10, "num_latents": 2}
  encode_latents.encode_dataset(samples, out, _fake_encode, 48, 8, progress=False,
                                vae_info=vae_a)
  before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  with pytest.raises(records.ProvenanceConflict,
                     match=r'was encoded with another VAE or settings \(vae.checkpoint: '
                           r'"/ckpt/a" -> "/ckpt/b"\)'):
    encode_latents.encode_dataset(samples, out, _other_encode, 48, 8, progress=False,
                                  vae_info=vae_b)
  assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
  assert records.load_manifest(out)["vae"] == vae_a
  with pytest.raises(records.ProvenanceConflict, match="num_points: 48 -> 32"):
    encode_latents.encode_dataset(samples, out, _fake_encode, 32, 8, progress=False,
                                  vae_info=vae_a)


def test_encode_rebuilds_a_shard_whose_samples_changed(tmp_path):
  src = _user_dir(str(tmp_path / "in"), 3)
  samples = str(tmp_path / "samples")
  make.build(src, samples, num_shards=2, cfg=SMALL, progress=False)
  out = str(tmp_path / "lat")
  m = encode_latents.encode_dataset(samples, out, _fake_encode, 48, 8, progress=False)
  assert len(m["built_now"]) == 2
  _mesh_file(os.path.join(src, "new.glb"), 0.2)
  make.build(src, samples, num_shards=2, cfg=SMALL, progress=False)
  m = encode_latents.encode_dataset(samples, out, _fake_encode, 48, 8, progress=False)
  assert m["built_now"] == [records.shard_name(make.shard_of("user/new.glb", 2), 2)]
  assert m["complete"] and m["count"] == 4 and "user/new.glb" in _keys(out)


def test_latents_pairing_with_the_dit_config(tmp_path):
  """Issue 12 §3: latents made by one VAE train a DiT that names another, or another shape."""
  check_latents_pairing = encode_latents.check_latents_pairing
  vae_dir = str(tmp_path / "vae")
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"vae": {"checkpoint": vae_dir, "num_latents": 16, "latent_channels": 8}}))
  check_latents_pairing(str(tmp_path), vae_dir, 16, 8)  # matching: no error
  check_latents_pairing(str(tmp_path), None, 16, 8)  # no VAE named: shapes only
  with pytest.raises(ValueError) as e:
    check_latents_pairing(str(tmp_path), str(tmp_path / "other"), 32, 8)
  assert str(e.value) == (
      f"{tmp_path}: latents do not match the DiT config: latent tokens 16 (latents) vs 32 (DiT); "
      f"encoded by the VAE {vae_dir}, but the config's vae.workdir is {tmp_path / 'other'}")
  (tmp_path / "manifest.json").write_text(json.dumps({"kind": "samples"}))
  check_latents_pairing(str(tmp_path), str(tmp_path / "other"), 32, 8)  # not latents: no record


def test_every_folder_of_a_comma_separated_data_dir_is_checked(tmp_path):
  """data.dir "a,b" trains on both folders, so each must come from the config's VAE."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from moca_jax import dit_task  # pylint: disable=g-import-not-at-top

  vae_dir = str(tmp_path / "vae")
  for name, made_by in (("a", vae_dir), ("b", str(tmp_path / "another_vae"))):
    (tmp_path / name).mkdir()
    (tmp_path / name / "manifest.json").write_text(json.dumps(
        {"vae": {"checkpoint": made_by, "num_latents": 16, "latent_channels": 8}}))
  config = ml_collections.ConfigDict(dict(
      data=dict(source="records", dir=f"{tmp_path / 'a'},{tmp_path / 'b'}", val_dir=""),
      vae=dict(workdir=vae_dir), model=dict(dit=dict(latent_tokens=16, latent_channels=8))))
  with pytest.raises(ValueError, match=f"^{tmp_path / 'b'}: latents do not match"):
    dit_task.check_data_pairing(config)
  config.data.dir = str(tmp_path / "a")
  dit_task.check_data_pairing(config)  # the matching folder alone: no error
