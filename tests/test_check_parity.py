"""experiments.check_parity: passes on a fixture, fails (exit 1) on a corrupted copy, refuses
bad input (exit 2)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import check_parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_FIXTURE = os.path.join(ROOT, "tests", "golden", "triposg_vae")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.check_parity", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


def test_vae_fixture_passes_and_a_corrupted_copy_fails(tmp_path):
  ok = _run(f"--fixture={VAE_FIXTURE}")
  assert ok.returncode == 0, ok.stderr
  assert "all 18 arrays within tolerance" in ok.stdout
  assert "logits_from_z_rand" in ok.stdout and "FAIL" not in ok.stdout

  broken = tmp_path / "triposg_vae"  # the folder name tells the fixture kind
  shutil.copytree(VAE_FIXTURE, broken)
  arrays = dict(np.load(broken / "io.npz"))
  arrays["logits_from_z_rand"] = arrays["logits_from_z_rand"] * np.float32(1.001)
  np.savez(broken / "io.npz", **arrays)
  bad = _run(f"--fixture={broken}")
  assert bad.returncode == 1, bad.stdout + bad.stderr
  fails = [line for line in bad.stdout.splitlines() if "FAIL" in line]
  assert fails[0].startswith("logits_from_z_rand ")
  assert "FAILED: 1 of 18 arrays above tolerance: logits_from_z_rand" in bad.stdout


def test_bad_input_exits_2(tmp_path):
  odd = tmp_path / "my_vae"
  odd.mkdir()
  res = _run(f"--fixture={odd}")
  assert res.returncode == 2
  assert "unknown fixture name 'my_vae'" in res.stderr and "Traceback" not in res.stderr
  with pytest.raises(check_parity.ParityInputError, match="no such fixture folder"):
    check_parity.check(str(tmp_path / "nope"))
  broken = tmp_path / "dinov2"
  broken.mkdir()
  with pytest.raises(ValueError, match=r"dinov2: no io\.npz"):
    check_parity.check(str(broken))


def test_missing_parity_code_is_named(monkeypatch):
  monkeypatch.setitem(check_parity.ENTRY_POINTS, "scheduler",
                      ("moca_jax.convert.not_written", "parity"))
  with pytest.raises(check_parity.ParityInputError,
                     match=r"no parity code for fixture 'scheduler' yet: module "
                     r"moca_jax\.convert\.not_written does not exist"):
    check_parity.entry_point("scheduler")
  monkeypatch.setitem(check_parity.ENTRY_POINTS, "scheduler",
                      ("moca_jax.convert.common", "parity"))
  with pytest.raises(check_parity.ParityInputError,
                     match=r"moca_jax\.convert\.common\.parity does not exist"):
    check_parity.entry_point("scheduler")


def test_compare_rules():
  ref = np.array([1.0, -2.0], np.float32)
  rows = check_parity.compare("triposg_vae", {
      "a": (ref + np.float32(1e-4), ref),        # rel 5e-5: ok
      "b": (ref + np.float32(4e-4), ref),        # rel 2e-4: above 1e-4
      "c": (ref[:1], ref),                       # shape mismatch
      "d": (np.zeros(2), np.zeros(2)),           # zero reference, zero error
      "e": (np.array([np.nan, 0.0]), ref)})      # non-finite output
  got = {r.name: r for r in rows}
  assert got["a"].ok and got["a"].relative_error == pytest.approx(5e-5, rel=1e-3)
  assert not got["b"].ok and got["b"].tolerance == 1e-4
  assert not got["c"].ok and "shape (1,) != reference (2,)" in got["c"].note
  assert got["d"].ok and got["d"].relative_error == 0.0
  assert not got["e"].ok
  e2e = check_parity.compare("partcrafter_pipeline_e2e", {
      "final_latents": (ref * np.float32(1.0005), ref), "step_guided": (ref, ref)})
  assert [(r.name, r.tolerance, r.ok) for r in e2e] == [("final_latents", 1e-3, True),
                                                        ("step_guided", 1e-4, True)]
  assert not check_parity.compare("triposg_vae", {"b": (ref * 1.0005, ref)}, 1e-4)[0].ok
