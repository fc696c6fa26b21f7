"""experiments/profile_forward.py: kernel categories, busy time and a CPU smoke run."""

import json
import os
import subprocess
import sys

import pytest

from experiments import profile_forward as pf


@pytest.mark.parametrize(
    "name,hlo_op,cat",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "", "matmul"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "custom-call.12", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0", "", "attention"),
        ("loop_multiply_fusion_3", "multiply_fusion.3", "elementwise fusion"),
        ("input_reduce_fusion_12", "", "reduction / norm fusion"),
        ("wrapped_transpose_4", "", "copy / transpose / concat"),
        ("loop_concatenate_fusion", "", "copy / transpose / concat"),
        ("Memset (Device)", "", "memcpy / memset"),
        ("some_custom_kernel", "", "other"),
    ],
)
def test_kernel_category(name, hlo_op, cat):
  assert pf.kernel_category(name, hlo_op) == cat
  assert cat in pf.CATEGORIES


def test_busy_time_is_the_union_of_overlapping_kernels():
  assert pf.union_ms([]) == 0.0
  # [0, 2] and [1, 3] overlap (3 ms of union), [5, 6] is apart, [5.5, 5.8] inside it
  ivs = [(0, 2e6), (1e6, 3e6), (5e6, 6e6), (5.5e6, 5.8e6)]
  assert pf.union_ms(ivs) == pytest.approx(4.0)
  events = [{"name": "gemm_a", "start_ns": s, "dur_ns": e - s} for s, e in ivs[:2]]
  events += [{"name": "loop_add_fusion", "start_ns": s, "dur_ns": e - s} for s, e in ivs[2:]]
  r = pf.summarize(events, calls=2, top=1)
  assert r["busy_ms"] == pytest.approx(2.0) and r["kernel_ms"] == pytest.approx(2.65)
  assert r["by_category_ms"]["matmul"] == pytest.approx(2.0)
  assert r["by_category_ms"]["elementwise fusion"] == pytest.approx(0.65)
  assert r["kernels_per_call"] == 2 and r["top"] == [
      {"name": "gemm_a", "category": "matmul", "ms": pytest.approx(2.0), "launches": 1.0,
       "ops": []}
  ]
  with pytest.raises(ValueError, match="calls"):
    pf.summarize(events, calls=0)


def _run_cli(*args):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  code = ("from absl import app; from experiments import profile_forward as pf; "
          "pf.define_flags(); app.run(pf.main)")
  return subprocess.run([sys.executable, "-c", code, *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_profiles_a_tiny_forward_on_cpu(tmp_path):
  out = tmp_path / "prof"
  res = _run_cli("--size=tiny", "--seq_len=8", "--ns=2", "--modes=moc", "--iters=1",
                 f"--out={out}")
  assert res.returncode == 0, res.stderr[-2000:]
  doc = json.loads(out.with_suffix(".json").read_text())
  (run,) = doc["runs"]
  assert "error" not in run, run
  assert run["kernels_per_call"] > 0 and run["busy_ms"] > 0 and run["wall_ms"] > 0
  assert run["source"].startswith("host XLA ops")
  assert sum(run["by_category_ms"].values()) == pytest.approx(run["kernel_ms"])
  md = out.with_suffix(".md").read_text()
  assert "| 2 | moc |" in md and "top kernels" in md
  assert any(k["ops"] for k in run["top"]), run["top"]  # kernels point at JAX ops


def test_cli_rejects_bad_flags(tmp_path):
  res = _run_cli("--modes=sparse", f"--out={tmp_path / 'x'}")
  assert res.returncode == 2 and "--modes" in res.stderr
  assert not (tmp_path / "x.json").exists()


def test_op_names_map_kernels_to_jax_ops():
  import jax
  import jax.numpy as jnp

  def f(a, b):
    return (jnp.concatenate([jnp.tanh(a), b], axis=0) @ a.T).sum()

  text = jax.jit(f).lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile().as_text()
  ops = pf.op_names(text)
  assert ops and all(k == pf.kernel_key(k) for k in ops)
  assert any(v.endswith("concatenate") for v in ops.values()), ops
  assert pf.kernel_key("input_concatenate_fusion.35") == "input_concatenate_fusion_35"
  line = '  ROOT %loop_add_fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(g)/blk/add" x=1}'
  assert pf.op_names(line) == {"loop_add_fusion_2": "jit(g)/blk/add"}
  assert pf._short("a" * 10, 6) == "...aaa"
