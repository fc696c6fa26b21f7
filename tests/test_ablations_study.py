"""experiments.ablations' quality study: --jobs K (variants as concurrent processes sharing
the device, the step timed alone behind a file barrier), the study's md / json / picture,
and the ordering paragraph (a pure function, made-up numbers)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import ablations as A

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ev(cd, f1, f05=0.5, iou=0.01):
  return {"cd": cd, "fscore@0.1": f1, "fscore@0.05": f05, "self_iou": iou}


def test_ordering_holds_states_margins():
  text = A.ordering_paragraph(
      {"G": _ev(0.10, 0.80), "A": _ev(0.20, 0.60), "dense": _ev(0.12, 0.78)}
  )
  assert "F@0.1: G is best of 3 evaluated variants (0.8000)" in text
  assert "ahead of the next, dense (0.7800), by 0.0200" in text
  assert "CD: G is best of 3" in text and "by 0.0200" in text
  assert "Dense global attention is no better than G, as in the paper" in text
  assert "NOT" not in text and "BETTER" not in text
  assert "F@0.1 order here: G > A; in the paper: G > A." in text


def test_ordering_violations_by_how_much_with_paired_errors():
  evals = {
      "G": _ev(0.15, 0.70),
      "F": _ev(0.14, 0.75),
      "B": _ev(0.16, 0.72),
      "dense": _ev(0.13, 0.71),
      "C": None,
  }
  text = A.ordering_paragraph(evals)
  assert "F@0.1: G is NOT best; it ranks 4 of 4 (0.7000)" in text
  assert "Better: F (0.7500), B (0.7200), dense (0.7100); the best, F, by 0.0500" in text
  assert "CD: G is NOT best; it ranks 3 of 4" in text and "the best, dense, by 0.0200" in text
  assert "Dense global attention is BETTER than G on F@0.1 0.7100 vs 0.7000, by 0.0100" in text
  assert "CD 0.1300 vs 0.1500, by 0.0200" in text
  # Paired over items: a difference inside two standard errors is said to be so.
  per_item = {
      "G": {"fscore@0.1": {"a": 0.6, "b": 0.8}, "cd": {"a": 0.1, "b": 0.2}},
      "F": {"fscore@0.1": {"a": 0.9, "b": 0.6}, "cd": {"a": 0.1, "b": 0.18}},
  }
  text = A.ordering_paragraph({"G": _ev(0.15, 0.70), "F": _ev(0.14, 0.75)}, per_item)
  assert "paired over 2 items: standard error 0.2500; within 2 standard errors" in text
  assert "G has no evaluation" not in text
  assert "has no evaluation, so the paper's ordering cannot be checked" in A.ordering_paragraph(
      {"A": _ev(0.1, 0.9)}
  )
  assert "Dense global attention (dense) has no evaluation." in text


def test_helpers_progress_command_failure(tmp_path):
  log = "train:  50%|#####     | 1000/2000 [00:30<00:30]\rtrain:  60%|###   | 1200/2000 [00:3"
  assert A.log_progress(log) == "train 1200/2000"
  assert A.log_progress("evaluate:  10%|#  | 2/20 [01:00<") == "evaluate 2/20"
  assert A.log_progress("nothing yet") == ""
  cmd = A.child_command(["--jobs=8", "--variants=G,A"], "A", "/w/_sync", 8)
  assert cmd[-5:] == [
      "--variants=A", "--jobs=1", "--sync_dir=/w/_sync", "--results_name=", "--concurrent_jobs=8"
  ]
  env = A.child_env(0.1, base={})
  assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.100"
  assert A.auto_mem_fraction(-1, 8) == pytest.approx(0.95 / 8) and A.auto_mem_fraction(0, 8) == 0
  env = A.child_env(base={}, cache_dir="/c")
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/c" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
  assert (
      A.child_env(base={"JAX_COMPILATION_CACHE_DIR": "/mine"}, cache_dir="/c")[
          "JAX_COMPILATION_CACHE_DIR"
      ]
      == "/mine"
  )
  (tmp_path / "B").mkdir()
  (tmp_path / "B" / "log.txt").write_text("...\nRuntimeError: out of memory\n")
  r = A.collect_result(str(tmp_path), "B", -9)
  assert r["error"] == "process exited with -9: RuntimeError: out of memory"
  stats = A.run_stats(
      [
          dict(
              start_step=0,
              end_step=10,
              train_seconds=6.0,
              compile_seconds=2.0,
              device_kind="NVIDIA H200",
              devices=1,
          ),
          dict(
              start_step=10,
              end_step=30,
              train_seconds=12.0,
              compile_seconds=1.0,
              device_kind="NVIDIA H200",
              devices=1,
          ),
      ]
  )
  assert stats == dict(
      train_seconds=18.0,
      compile_seconds=3.0,
      steps=30,
      steps_this_run=30,
      device_kind="NVIDIA H200",
      devices=1,
  )


@pytest.mark.slow
def test_jobs_two_variants_write_the_study(tmp_path, save_untrained_vae):
  """--jobs=2: two variants as concurrent processes (real tiny training, 2 steps, step timed
  alone, each exported as a bundle, no evaluation: the GPU call); then one process
  evaluates both from their bundles (generation on one held-out item: the CPU run after)
  and writes table3.md and the study."""
  vae, work, res = tmp_path / "vae", tmp_path / "w", tmp_path / "results"
  notes = tmp_path / "notes.md"
  notes.write_text("Why the order is what it is.\n")
  save_untrained_vae(str(vae), num_latents=16)
  cmd = [
      sys.executable,
      "-m",
      "experiments.ablations",
      "--config=experiments/configs/dit.py:tiny",
      "--config.data.source=synthetic",
      "--config.num_steps=2",
      "--config.batch_size=2",
      "--config.mesh.data=1",
      "--config.log_every=1",
      "--config.checkpoint.every=2",
      "--config.checkpoint.async_save=False",
      "--config.model.dit.num_blocks=2",
      "--config.model.dit.latent_tokens=16",
      "--config.model.encoder.depth=1",
      "--config.data.max_components=3",
      f"--config.vae.workdir={vae}",
      "--variants=G,dense",
      "--jobs=2",
      f"--workdir={work}",
      "--eval_split=test_tiny",
      "--eval_limit=1",
      "--eval_steps=1",
      "--eval_num_samples=1000",
      "--eval_voxel_resolution=16",
      "--eval_image_size=56",
      "--eval_extract_resolution=16",
      "--eval_batches=0",
      "--time_steps=2",
      "--grid_rows=1",
      f"--results_dir={res}",
      "--results_name=quality_study",
      "--status_every=0",
      f"--study_notes={notes}",
  ]
  # one CPU device per process (not the suite's 8 simulated ones); cheap compilation
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  train_only = [a for a in cmd if not a.startswith("--eval_split")]
  train_only += ["--eval_split=", "--export_bundles"]
  out = subprocess.run(train_only, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "[jobs] G: step timed alone" in out.stdout and "[jobs] dense: exited 0" in out.stdout
  for v in ("G", "dense"):
    assert A.exported_bundle(str(work / v)) and not (work / v / "eval").exists()
  evaluate_only = [a for a in cmd if a != "--jobs=2"] + ["--jobs=1"]
  out = subprocess.run(evaluate_only, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "train:" not in out.stdout + out.stderr  # nothing trained again
  doc = json.load(open(res / "quality_study.json"))
  assert doc["jobs"] == 2 and doc["eval_settings"]["evaluated_on"].startswith("cpu")
  assert "evaluated on cpu" in (res / "quality_study.md").read_text()
  assert list(doc["variants"]) == ["G", "dense"]
  for v in ("G", "dense"):
    r = doc["variants"][v]
    assert r["error"] is None and r["eval_error"] is None, r
    assert r["train"]["step_ms_alone"] > 0 and r["train"]["step_ms_alone_exclusive"] == 1.0
    assert r["run"]["steps"] == 2 and r["run"]["device_kind"]
    assert 0 <= r["eval"]["fscore@0.1"] <= 1
    assert os.path.exists(work / v / "log.txt") and os.listdir(work / v / "eval" / "preds")
  assert doc["setting"]["steps"] == 2 and doc["eval_settings"]["image_size"] == 56
  md = (res / "quality_study.md").read_text()
  assert "step ms alone" in md and "train min (shared device)" in md and "## Ordering" in md
  assert "Dense global attention" in md and doc["ordering"] in md
  assert "## Reading the result\n\nWhy the order is what it is." in md
  assert doc["notes"] == "Why the order is what it is."
  rows = [l for l in md.splitlines() if l.startswith("| ")]
  assert len(rows) == 3
  from PIL import Image

  w, h = Image.open(res / "quality_study_grid.png").size
  assert w == 4 * 160 and h == 160 + 30  # input | G | dense | ground truth, one row
  assert (work / "table3.md").exists() and (work / "ablations.json").exists()
  # A re-run reuses both finished variants without starting a process.
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
  assert out.returncode == 0 and out.stdout.count("reusing") == 2 and "started" not in out.stdout
  assert "2 variants, 2 at a time" in md


def test_loss_ordering_line_orders_by_flow_loss_and_says_which_batches():
  def r(loss, held_out=1.0, **kw):
    return {"error": None, "train": {"eval_loss_ema": loss, "eval_held_out": held_out}, **kw}

  text = A.loss_ordering_line({"G": r(0.52), "A": r(0.53), "dense": r(0.5315)})
  assert text.startswith("Held-out flow loss (")
  assert "G 0.5200 < A 0.5300 < dense 0.5315." in text
  assert "G is the lowest." in text
  assert "dense is 0.0115 (2.2%) above the lowest, G." in text
  text = A.loss_ordering_line({"G": r(0.55), "dense": r(0.50), "B": r(float("nan"))})
  assert "dense 0.5000 < G 0.5500." in text and "B" not in text
  assert "G is 0.0500 (10.0%) above the lowest, dense." in text
  # batches the variants trained on (no data.val_dir) are not called held out
  text = A.loss_ordering_line({"G": r(0.52, held_out=0.0), "dense": r(0.53)})
  assert text.startswith("Flow loss on the first training batches (")
  # a failed variant or one without the number is left out; fewer than two: nothing
  assert A.loss_ordering_line({"G": r(0.5), "A": {"error": "boom", "train": {}}}) == ""


def test_unreadable_study_notes_fail_before_training(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.ablations", "--variants=G",
       f"--workdir={tmp_path / 'w'}", "--eval_split=", "--results_name=q",
       f"--study_notes={tmp_path / 'missing.md'}"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=200,
  )
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("ablations: error: --study_notes=")
  assert "cannot read it" in lines[0]
  assert not (tmp_path / "w" / "G").exists()  # nothing trained
