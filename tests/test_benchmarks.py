"""The benchmark scripts' bookkeeping: grids, derived ratios, target verdicts, MFU."""

import json

import pytest

from experiments import benchmark_attention as ba
from experiments import benchmark_train as bt


def test_parse_grid_shared_and_per_kind():
  assert ba.parse_grid("64,128", ["train", "forward"]) == {"train": [64, 128], "forward": [64, 128]}
  assert ba.parse_grid("train:64;forward:128,512", ["train", "forward"]) == {
      "train": [64],
      "forward": [128, 512],
  }
  assert ba.parse_grid("train:64;forward:128", ["forward"]) == {"forward": [128]}
  assert ba.parse_grid("", ["train"]) == {"train": []}


def _row(dense_core, moc_core, routing, context, fwd_moc=None, fwd_dense=None):
  row = {
      "routing_ms": routing,
      "context_hybrid_ms": context,
      "routed_attention_ms": 1.0,
      "moc_total_hybrid_ms": moc_core,
      "dense_attention_ms": dense_core,
      "context_tokens": 10,
  }
  if fwd_moc:
    row["forward_moc"] = {"ms": fwd_moc, "memory_gib": {"total": 1.0}}
    row["forward_dense"] = {"ms": fwd_dense, "memory_gib": {"total": 2.0}}
  return row


def test_derived_ratios():
  d = ba.derived(_row(12.0, 3.0, 0.3, 0.6, fwd_moc=100.0, fwd_dense=250.0), "hybrid")
  assert d["core_speedup"] == pytest.approx(4.0)
  assert d["routing_gather_share"] == pytest.approx(0.3)
  assert d["forward_speedup"] == pytest.approx(2.5)
  assert "train_speedup" not in d


def test_markdown_target_verdicts():
  report = {
      "device": "test",
      "platform": "p",
      "jax": "0",
      "gather": "hybrid",
      "limit_gib": 10.0,
      "rows": {
          "L1024/N32": _row(12.0, 3.0, 0.3, 0.6, fwd_moc=100.0, fwd_dense=150.0),
          "L1024/N64": _row(60.0, 10.0, 0.2, 1.0),
      },
      "largest_n": {
          "train/moc": {"grid": {"64": "5.0", "128": "20.0"}, "largest": 64, "bounded": True}
      },
  }
  text = ba.markdown(report)
  lines = {
      l.split("|")[1].strip(): l
      for l in text.splitlines()
      if l.startswith("| MoC global core")
      or l.startswith("| routing")
      or l.startswith("| whole DiT")
  }
  assert "| met |" in lines["MoC global core >= 4x faster than dense global attention"]  # 4.0x
  assert "missed" in lines["MoC global core >= 7x faster than dense global attention"]  # 6.0x
  assert "missed" in lines["routing + gather <= 15% of the MoC global core"]  # 30 %
  assert "missed" in lines["whole DiT forward >= 1.8x faster than the dense DiT"]  # 1.5x
  assert "| train | moc | 64: 5.0, 128: 20.0 | 64 |" in text


def test_train_report_mfu(tmp_path):
  run = {
      "size": "paper",
      "components": 32,
      "attention": "moc",
      "batch": 1,
      "remat": "dots",
      "params": 2e9,
      "compile_s": 1.0,
      "step_ms": 500.0,
      "tokens_per_s": 1.0,
      "flops_per_step": 0.0,
      "model_flops": 100e12,
      "peak_mem_gib": 1.0,
  }
  dense = dict(run, attention="dense", step_ms=1000.0, model_flops=200e12)
  payload = {
      "device": "gpu:test",
      "host": "h",
      "jax": "0",
      "matmul_peak_tflops": 400.0,
      "runs": [run, dense],
      "sampling": [],
      "skipped": [],
  }
  bt._write(str(tmp_path), "bench", payload)
  text = (tmp_path / "bench.md").read_text()
  assert "| paper | 32 | moc | 1 | 2000 | 1 | 500.0 | 1 | 100.0 | 50% |" in text  # 100/0.5/400
  assert "paper N=32: 2.00x" in text
  assert json.loads((tmp_path / "bench.json").read_text())["runs"][0]["model_flops"] == 100e12
