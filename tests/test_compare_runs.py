"""experiments.compare_runs: checkpoints compared pairwise on the same held-out items; runs
that are not comparable are refused with one line and exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import cfg_sweep, compare_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"cfg": 7.0, "steps": 50, "num_samples": 1000, "seed": 0, "voxel_resolution": 64,
        "object_frame": "instance", "source": "split val", "machine": "test"}


def _write_run(folder, cds, names=None, checkpoint="ckpt", **meta):
  os.makedirs(folder, exist_ok=True)
  names = names or [f"item{i}" for i in range(len(cds))]
  rows = [{"name": n, "kind": "object", "cd": cd, "fscore@0.1": 1.0 - cd,
           "fscore@0.05": 0.5 - cd / 2, "self_iou": 0.01, "num_parts_gt": 4.0,
           "num_parts_pred": 3.0} for n, cd in zip(names, cds)]
  doc = {"kind": "object", "rows": rows, "mean": {},
         "meta": dict(META, checkpoint=checkpoint, **meta)}
  with open(os.path.join(folder, "metrics.json"), "w") as f:
    json.dump(doc, f)
  return str(folder)


def test_paired_differences_match_numpy(tmp_path):
  old = np.array([0.30, 0.25, 0.40, 0.35])
  new = np.array([0.28, 0.20, 0.41, 0.30])
  runs = [cfg_sweep.load_run(_write_run(tmp_path / "a", old, checkpoint="old")),
          cfg_sweep.load_run(_write_run(tmp_path / "b", new, checkpoint="new"))]
  doc = compare_runs.compare(runs, ["old", "new"], "old")
  ref, cand = doc["runs"]
  d = new - old
  assert cand["cd"] == pytest.approx(new.mean())
  assert cand["cd_diff"] == pytest.approx(d.mean())
  assert cand["cd_diff_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
  assert cand["cd_median"] == pytest.approx(np.median(new))
  assert cand["fscore@0.1_diff"] == pytest.approx(-d.mean())
  assert ref["cd_diff"] == 0.0 and ref["checkpoint"] == "old" and cand["checkpoint"] == "new"
  assert cand["empty_parts"] == pytest.approx(1.0)
  text = compare_runs.markdown(doc)
  assert f"{d.mean():+.4f} ± {d.std(ddof=1) / 2:.4f}" in text and "`new`" in text


def test_runs_of_other_items_are_refused(tmp_path):
  a = cfg_sweep.load_run(_write_run(tmp_path / "a", [0.1] * 4))
  b = cfg_sweep.load_run(_write_run(tmp_path / "b", [0.2] * 4, names=["x0", "x1", "x2", "x3"]))
  with pytest.raises(ValueError, match="other items"):
    compare_runs.compare([a, b], ["a", "b"], "a")


def test_settings_that_differ_are_shown_per_run(tmp_path):
  a = cfg_sweep.load_run(_write_run(tmp_path / "a", [0.1, 0.2], weights_sha256="f" * 64))
  b = cfg_sweep.load_run(_write_run(tmp_path / "b", [0.2, 0.2], cfg_interval=[0.8, 1.0],
                                    weights_sha256="f" * 64))
  doc = compare_runs.compare([a, b], ["all steps", "t >= 0.8"], "all steps")
  assert doc["differs"] == ["cfg_interval"] and "cfg_interval" not in doc["sampling"]
  assert [r["differs"]["cfg_interval"] for r in doc["runs"]] == [None, [0.8, 1.0]]
  text = compare_runs.markdown(doc)
  assert "| run | CFG interval | cd" in text
  assert "| all steps | every step | 0.1500 |" in text and "| t >= 0.8 | [0.8, 1.0] |" in text
  c = cfg_sweep.load_run(_write_run(tmp_path / "c", [0.3, 0.2], weights_sha256="e" * 64))
  assert compare_runs.compare([a, c], ["a", "c"], "a")["differs"] == ["weights_sha256"]
  # a setting of several words shows its values whole; one a run did not record says so
  d = cfg_sweep.load_run(_write_run(tmp_path / "d", [0.3, 0.2], weights_sha256="f" * 64,
                                    image_size=112))
  text = compare_runs.markdown(compare_runs.compare([a, d], ["old", "new"], "old"))
  assert "| run | input render px | cd" in text
  assert "| old | not recorded | 0.1500 |" in text and "| new | 112 | 0.2500 (" in text
  # the sampler time shift: a run from before evaluate recorded it says so
  e = cfg_sweep.load_run(_write_run(tmp_path / "e", [0.3, 0.2], weights_sha256="f" * 64,
                                    time_shift=3.0))
  text = compare_runs.markdown(compare_runs.compare([a, e], ["uniform", "shifted"], "uniform"))
  assert "| run | sampler time shift | cd" in text
  assert "| uniform | not recorded | 0.1500 |" in text and "| shifted | 3 | 0.2500 (" in text


def test_a_vae_reconstruction_run_compares_with_a_generation_run(tmp_path):
  """evaluate --reconstruct records no CFG: compare_runs reads it (cfg_sweep still refuses
  it) and shows '-' for the sampler settings that did not run."""
  gen = _write_run(tmp_path / "gen", [0.3, 0.2], cfg_interval=[0.8, 1.0])
  folder = _write_run(tmp_path / "rec", [0.1, 0.1], reconstruct=True)
  path = os.path.join(folder, "metrics.json")
  doc = json.load(open(path))
  for key in ("cfg", "steps"):
    del doc["meta"][key]
  json.dump(doc, open(path, "w"))
  with pytest.raises(ValueError, match="no CFG scale recorded"):
    cfg_sweep.load_run(folder)
  runs = [cfg_sweep.load_run(gen), cfg_sweep.load_run(folder, need_cfg=False)]
  assert runs[1]["cfg"] is None
  doc = compare_runs.compare(runs, ["generation", "VAE alone"], "generation")
  assert doc["differs"] == ["cfg", "cfg_interval", "steps", "reconstruct"]
  text = compare_runs.markdown(doc)
  assert "| generation | 7 | [0.8, 1.0] | 50 | no | 0.2500 |" in text
  assert "| VAE alone | - | - | - | yes | 0.1000 (-0.1500 ± 0.0500) |" in text
  assert doc["by_category"] == []  # no run recorded categories


def test_by_category_groups_the_items_of_any_run_that_names_them(tmp_path):
  old = _write_run(tmp_path / "old", [0.3, 0.1, 0.5])  # before categories were recorded
  new = _write_run(tmp_path / "new", [0.2, 0.1, 0.1])
  path = os.path.join(new, "metrics.json")
  doc = json.load(open(path))
  for row, category in zip(doc["rows"], ("table", "mug", "table")):
    row["category"] = category
  json.dump(doc, open(path, "w"))
  runs = [cfg_sweep.load_run(old), cfg_sweep.load_run(new)]
  doc = compare_runs.compare(runs, ["old", "new"], "old")
  mug, table = doc["by_category"]
  assert (mug["category"], mug["items"], table["items"]) == ("mug", 1, 2)
  assert table["old: cd"] == pytest.approx(0.4) and table["new: cd"] == pytest.approx(0.15)
  assert table["new: fscore@0.1"] == pytest.approx(0.85)
  assert "| table | 2 | 0.4000 | 0.6000 | 0.1500 | 0.8500 |" in compare_runs.markdown(doc)


def test_labels_must_match_the_runs(tmp_path):
  a = cfg_sweep.load_run(_write_run(tmp_path / "a", [0.1] * 3))
  b = cfg_sweep.load_run(_write_run(tmp_path / "b", [0.2] * 3))
  for labels, ref in ((["a"], "a"), (["a", "a"], "a"), (["a", "b"], "c")):
    with pytest.raises(ValueError):
      compare_runs.compare([a, b], labels, ref)
  with pytest.raises(ValueError, match="at least two runs"):
    compare_runs.compare([a], ["a"], "a")


def test_command_writes_the_table_and_refuses_a_missing_run(tmp_path):
  a = _write_run(tmp_path / "a", [0.3, 0.2, 0.4])
  b = _write_run(tmp_path / "b", [0.2, 0.2, 0.3])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "experiments.compare_runs", f"--runs={a},{b}",
                        "--labels=old,new", f"--out={tmp_path / 'cmp'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  doc = json.loads((tmp_path / "cmp.json").read_text())
  assert [r["label"] for r in doc["runs"]] == ["old", "new"]
  assert "| new | 0.2333 (-0.0667 ±" in (tmp_path / "cmp.md").read_text()
  bad = subprocess.run([sys.executable, "-m", "experiments.compare_runs",
                        f"--runs={a},{tmp_path / 'nope'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr
