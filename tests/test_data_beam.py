"""The Apache Beam build: same records as the in-process build, dead letters, resume, CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from data_pipeline import beam_build, make, procedural, records, sampling
from data_pipeline import primitives as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = make.BuildConfig(
    sample=sampling.SampleConfig(n_surface=64, n_near=32, n_volume=16, mesh_segments=16),
    image_size=32, num_views=1, render_segments=12, num_previews=1)
IN_PROCESS = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
TWO_PROCESSES = ["--runner=DirectRunner", "--direct_num_workers=2"]


def _decoded(out):
  """{shard file: [decoded records]} of a dataset folder."""
  return {os.path.basename(p): [records.decode_record(r) for r in records.read_shard(p)]
          for p in records.shard_paths(out)}


def _assert_same_records(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    assert [r["meta"] for r in a[name]] == [r["meta"] for r in b[name]], name
    for ra, rb in zip(a[name], b[name]):
      assert sorted(ra) == sorted(rb)
      for k in ra:
        if k != "meta":
          np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{name} {k}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ref"))
  return out, make.build("procedural:tiny", out, num_shards=2, cfg=SMALL, progress=False)


def test_beam_two_processes_equals_in_process_build(reference, tmp_path):
  ref_out, ref_m = reference
  out = str(tmp_path / "beam")
  m = beam_build.run(make.plan_build("procedural:tiny", out, 2, cfg=SMALL), TWO_PROCESSES)
  assert m["complete"] and m["count"] == ref_m["count"] == len(procedural.split_items("tiny"))
  _assert_same_records(_decoded(ref_out), _decoded(out))
  for name in ("manifest.json",) + tuple(records.shard_name(i, 2) + ".json" for i in range(2)):
    a, b = records.read_sidecar(os.path.join(ref_out, name)), records.read_sidecar(
        os.path.join(out, name))
    for k in ("keys", "count", "skipped", "repaired", "provenance", "config_hash"):
      if k in a or k in b:
        assert a[k] == b[k], (name, k)
  assert sorted(os.listdir(os.path.join(out, "previews"))) == sorted(
      os.listdir(os.path.join(ref_out, "previews")))
  assert sorted(os.listdir(out)) == sorted(os.listdir(ref_out))  # plan files removed


def _user_dir(root):
  os.makedirs(root)
  for i in range(3):
    sc = trimesh.Scene()
    sc.add_geometry(P.Box(half_extents=(0.3, 0.1, 0.2)).to_mesh(), node_name="seat")
    sc.add_geometry(P.Sphere(0.1 + 0.05 * i, translation=[0, 0.4, 0]).to_mesh(8),
                    node_name="ball")
    sc.export(os.path.join(root, f"obj{i}.glb"))
  open(os.path.join(root, "broken.glb"), "wb").write(b"glTF not really")
  open(os.path.join(root, "empty.obj"), "w").write("")
  return root


def test_dead_letters_are_listed_and_do_not_stop_the_job(tmp_path):
  src = _user_dir(str(tmp_path / "in"))
  out = str(tmp_path / "out")
  m = beam_build.run(make.plan_build(src, out, 2, cfg=SMALL), IN_PROCESS)
  assert m["complete"] and m["count"] == 3
  dead = {os.path.basename(s["input"]): s["reason"] for s in m["skipped"]}
  assert set(dead) == {"broken.glb", "empty.obj"}
  assert dead["broken.glb"].startswith("cannot read mesh file")
  on_disk = records.load_manifest(out)
  assert on_disk["skipped"] == m["skipped"]
  ref = str(tmp_path / "ref")
  make.build(src, ref, 2, cfg=SMALL, progress=False)
  _assert_same_records(_decoded(ref), _decoded(out))


def test_rerun_after_a_kill_has_no_duplicates(tmp_path):
  out = str(tmp_path / "r")
  plan = make.plan_build("procedural:tiny", out, 4, cfg=SMALL)
  # a run killed after shard 2 was finished, in the middle of shard 0 (its temporary file,
  # named as moca_jax.io names it, by a writer that is dead now) and of shard 1 (written,
  # sidecar missing)
  make.build_shard(plan.shards[2], plan.base(2) + ".array_record", SMALL, progress=False)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  temp = os.path.join(out, f".{records.shard_name(0, 4)}.array_record.tmp-{dead}-0123abcd")
  open(temp, "wb").write(b"half a shard")
  open(plan.base(1) + ".array_record", "wb").write(b"junk")
  stamp = os.stat(plan.base(2) + ".array_record").st_mtime_ns
  m = beam_build.run(make.plan_build("procedural:tiny", out, 4, cfg=SMALL), IN_PROCESS)
  assert m["built_now"] == [0, 1, 3] and m["complete"]
  assert m["removed_temps"] == [os.path.basename(temp)] and not os.path.exists(temp)
  assert os.stat(plan.base(2) + ".array_record").st_mtime_ns == stamp
  keys = [r["meta"]["key"] for rs in _decoded(out).values() for r in rs]
  assert len(keys) == len(set(keys)) == len(procedural.split_items("tiny"))
  again = beam_build.run(make.plan_build("procedural:tiny", out, 4, cfg=SMALL), IN_PROCESS)
  assert again["built_now"] == [] and again["count"] == m["count"]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "data_pipeline.build", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


SMALL_FLAGS = ["--n_surface=64", "--n_near=32", "--n_volume=16", "--image_size=32",
               "--num_views=1", "--num_previews=0", "--num_shards=2"]


def test_cli_beam_build_and_its_errors(tmp_path):
  out = str(tmp_path / "cli")
  r = _cli("--source=procedural:tiny:objects", f"--out={out}", *SMALL_FLAGS,
           "--runner=DirectRunner", "--direct_running_mode=in_memory")
  assert r.returncode == 0, r.stderr[-2000:]
  n_objects = len(procedural.split_items("tiny", kinds=("object",)))
  assert records.load_manifest(out)["count"] == n_objects
  r = _cli("--source=procedural:tiny:objects", f"--out={out}", *SMALL_FLAGS,
           "--runner=DirectRunner", "--direct_running_mode=in_memory", "--n_near=64")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: {out}: was built with another config (sample.n_near: 32 -> 64); build into a "
      "new --out or delete it")
  r = _cli("--source=procedural:tiny", f"--out={tmp_path / 'x'}", "--bogus=1")
  assert r.returncode == 2
  assert "unknown arguments --bogus=1 (Beam options need --runner)" in r.stderr
  r = _cli("--source=procedural:nope", f"--out={tmp_path / 'y'}", "--runner=DirectRunner")
  assert r.returncode == 2 and "unknown split 'nope'" in r.stderr
  assert "Traceback" not in r.stderr


def _fake_encode(pts, nrm):
  return np.stack([pts.mean(1), pts.max(1), nrm.mean(1)], axis=1)


def _fake_encoder_factory():
  return _fake_encode


def test_beam_latent_encoding_equals_in_process(tiny_shards, tmp_path):
  from data_pipeline import encode_latents
  samples = tiny_shards(num_shards=2, n_near=16, image_size=24)
  ref = str(tmp_path / "ref")
  encode_latents.encode_dataset(samples, ref, _fake_encode, 48, 8, progress=False,
                                vae_info={"name": "fake"})
  out = str(tmp_path / "beam")
  plan = encode_latents.plan_encode(samples, out, 48, 8, vae_info={"name": "fake"})
  m = beam_build.run_encode(plan, _fake_encoder_factory, IN_PROCESS)
  assert m["complete"] and m["vae"] == {"name": "fake"}
  assert m["built_now"] == [records.shard_name(i, 2) for i in range(2)]
  _assert_same_records(_decoded(ref), _decoded(out))
  again = beam_build.run_encode(encode_latents.plan_encode(samples, out, 48, 8,
                                                           vae_info={"name": "fake"}),
                                _fake_encoder_factory, IN_PROCESS)
  assert again["built_now"] == [] and again["count"] == m["count"]


def test_pipeline_options_default_to_local_processes_and_pass_the_rest_through():
  from apache_beam.options import pipeline_options as po
  opts = beam_build.pipeline_options(["--runner=DirectRunner"])
  assert opts.view_as(po.DirectOptions).direct_running_mode == "multi_processing"
  assert opts.view_as(po.DirectOptions).direct_num_workers == (os.cpu_count() or 1)
  opts = beam_build.pipeline_options(IN_PROCESS)
  assert opts.view_as(po.DirectOptions).direct_running_mode == "in_memory"
  args = ["--runner=DataflowRunner", "--project=p", "--region=europe-west4",
          "--temp_location=gs://b/tmp", "--num_workers=100"]
  opts = beam_build.pipeline_options(args)
  assert opts.get_all_options(drop_default=True) == po.PipelineOptions(args).get_all_options(
      drop_default=True)
  assert opts.view_as(po.GoogleCloudOptions).project == "p"
  assert opts.view_as(po.WorkerOptions).num_workers == 100
