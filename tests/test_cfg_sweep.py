"""experiments/cfg_sweep.py: paired differences over the same items, errors."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments import cfg_sweep as cs


def _run(tmp_path, cfg, cds, names=None, weights=None, folder=None, **sampling):
  names = names or [f"item{i}" for i in range(len(cds))]
  rows = [{"name": n, "cd": cd, "fscore@0.1": 1 - cd, "fscore@0.05": 0.5 - cd / 2,
           "self_iou": 0.01, "num_parts_gt": 4, "num_parts_pred": 4 - (cd > 0.5)}
          for n, cd in zip(names, cds)]
  d = tmp_path / (folder or f"cfg{cfg:g}")
  d.mkdir()
  (d / "metrics.json").write_text(json.dumps({
      "kind": "object", "rows": rows,
      "meta": {"cfg": cfg, "steps": 50, "source": "split val", "machine": "m",
               "date_utc": "d", "weights_sha256": weights, **sampling}}))
  return str(d)


def test_paired_differences_to_the_reference(tmp_path):
  runs = [cs.load_run(_run(tmp_path, 7.0, [0.2, 0.4, 0.6])),
          cs.load_run(_run(tmp_path, 3.0, [0.3, 0.5, 0.9]))]
  doc = cs.summarize(runs, 7.0)
  assert [e["cfg"] for e in doc["settings"]] == [3.0, 7.0]
  low, ref = doc["settings"]
  assert ref["cd_diff"] == 0.0 and low["cd"] == pytest.approx(0.5666667)
  assert low["cd_diff"] == pytest.approx(0.1666667)
  # differences 0.1, 0.1, 0.3: sample std 0.11547, standard error 0.066667
  assert low["cd_diff_se"] == pytest.approx(0.0666667, rel=1e-5)
  assert low["empty_parts"] == pytest.approx(1 / 3) and low["empty_parts_diff"] == 0.0
  md = cs.markdown(doc)
  assert "| 3 | 50 | 0.5667 (+0.1667 ± 0.0667) |" in md and "| 7 | 50 | 0.4000 |" in md
  assert cs.paired([1.0], [0.5])[0] == 0.5


def test_errors(tmp_path):
  a = cs.load_run(_run(tmp_path, 7.0, [0.2, 0.4]))
  b = cs.load_run(_run(tmp_path, 3.0, [0.2, 0.4], names=["x", "y"]))
  with pytest.raises(ValueError, match="different items"):
    cs.summarize([a, b], 7.0)
  with pytest.raises(ValueError, match="reference CFG scale 5"):
    cs.summarize([a], 5.0)
  with pytest.raises(ValueError, match="not a readable"):
    cs.load_run(str(tmp_path / "missing"))


def test_cli_writes_md_json_png_and_rejects_bad_runs(tmp_path):
  runs = [_run(tmp_path, 7.0, [0.2, 0.4]), _run(tmp_path, 10.0, [0.1, 0.5])]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = "from absl import app; from experiments import cfg_sweep as c; c.define_flags(); app.run(c.main)"
  out = tmp_path / "sweep"
  res = subprocess.run([sys.executable, "-c", code, f"--runs={','.join(runs)}", f"--out={out}"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert json.loads(out.with_suffix(".json").read_text())["settings"][1]["cfg"] == 10.0
  assert out.with_suffix(".png").stat().st_size > 0 and "sweep.png" in out.with_suffix(".md").read_text()
  res = subprocess.run([sys.executable, "-c", code, f"--runs={tmp_path / 'nope'}", f"--out={out}2"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2 and "cfg_sweep: error:" in res.stderr


def test_scene_runs_use_table2_keys_and_count_empty_instances(tmp_path):
  def scene_run(cfg, cds, preds, prefix="scene"):
    rows = [{"name": f"{prefix}{i}", "cd_scene": cd, "fscore_scene@0.1": 1 - cd,
             "fscore_scene@0.05": 0.5, "cd_obj": 2 * cd, "fscore_obj@0.1": 0.3,
             "self_iou": 0.001, "num_instances": 5.0, "num_parts_gt": 5.0,
             "num_parts_pred": p} for i, (cd, p) in enumerate(zip(cds, preds))]
    d = tmp_path / f"scene_cfg{cfg:g}"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({
        "kind": "scene", "rows": rows,
        "meta": {"cfg": cfg, "steps": 50, "source": "split val", "machine": "m"}}))
    return cs.load_run(str(d))

  doc = cs.summarize([scene_run(7.0, [0.4, 0.6], [2, 3]), scene_run(3.0, [0.5, 0.5], [4, 5])],
                     7.0)
  low, ref = doc["settings"]
  assert doc["kind"] == "scene" and "cd" not in low
  assert low["cd_scene"] == pytest.approx(0.5) and low["cd_obj_diff"] == pytest.approx(0.0)
  assert ref["empty_parts"] == 2.5 and low["empty_parts_diff"] == pytest.approx(-2.0)
  md = cs.markdown(doc)
  assert "cd_scene ↓" in md and "fscore_obj@0.1 ↑" in md and "| 7 | 50 | 0.5000 |" in md
  assert os.path.exists(cs.plot(doc, str(tmp_path / "scene.png")))
  obj = cs.load_run(_run(tmp_path, 7.0, [0.2, 0.4]))
  with pytest.raises(ValueError, match=r"different kinds of items: .*cfg7.* \(object\)"):
    cs.summarize([obj, scene_run(10.0, [0.1, 0.2], [1, 1])], 7.0)
  with pytest.raises(ValueError, match="more than once"):
    cs.summarize([obj, obj], 7.0)


def test_a_run_without_counts_shows_no_empty_parts(tmp_path):
  path = _run(tmp_path, 7.0, [0.2, 0.4])
  doc = json.load(open(os.path.join(path, "metrics.json")))
  for row in doc["rows"]:
    del row["num_parts_pred"]
  json.dump(doc, open(os.path.join(path, "metrics.json"), "w"))
  out = cs.summarize([cs.load_run(path)], 7.0)
  assert math.isnan(out["settings"][0]["empty_parts"])
  assert cs.markdown(out).splitlines()[6].endswith("| - |")


def test_runs_of_different_weights_are_refused(tmp_path):
  a = cs.load_run(_run(tmp_path, 7.0, [0.2, 0.4], weights="aaa"))
  same = cs.load_run(_run(tmp_path, 3.0, [0.3, 0.4], weights="aaa"))
  other = cs.load_run(_run(tmp_path, 5.0, [0.3, 0.4], weights="bbb"))
  unknown = cs.load_run(_run(tmp_path, 10.0, [0.3, 0.4]))  # a run older than the fingerprint
  assert len(cs.summarize([a, same], 7.0)["settings"]) == 2
  assert len(cs.summarize([a, other, unknown], 7.0)["settings"]) == 3
  with pytest.raises(ValueError, match="different model weights"):
    cs.summarize([a, same, other], 7.0)


def test_runs_of_other_samplers_are_refused(tmp_path):
  """A CFG sweep varies the scale alone: runs under another guidance interval or time shift
  are refused (a run from before the time shift was recorded is not checked for it)."""
  a = cs.load_run(_run(tmp_path, 7.0, [0.2, 0.4], cfg_interval=[0.8, 1.0], time_shift=1.0))
  b = cs.load_run(_run(tmp_path, 3.0, [0.3, 0.4], cfg_interval=[0.8, 1.0], time_shift=1.0))
  every_step = cs.load_run(_run(tmp_path, 5.0, [0.3, 0.4], time_shift=1.0))
  shifted = cs.load_run(_run(tmp_path, 10.0, [0.3, 0.4], cfg_interval=[0.8, 1.0],
                             time_shift=3.0))
  old = cs.load_run(_run(tmp_path, 14.0, [0.3, 0.4], cfg_interval=[0.8, 1.0]))
  assert len(cs.summarize([a, b, old], 7.0)["settings"]) == 3
  with pytest.raises(ValueError, match="differ in cfg_interval"):
    cs.summarize([a, every_step], 7.0)
  with pytest.raises(ValueError, match="differ in time_shift"):
    cs.summarize([a, shifted], 7.0)
