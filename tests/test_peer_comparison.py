"""Issue 13's results file: joining our and the peer's benchmark JSONs into targets."""

import json

import pytest

from experiments import peer_comparison as pc


def _ours(moc, dense, core=None):
  rows = {}
  for n in moc:
    r = {"forward_moc": {"ms": moc[n]}, "forward_dense": {"ms": dense[n]}}
    if core and n in core:
      routing, context, attention, dense_attn = core[n]
      r.update(
          routing_ms=routing,
          context_hybrid_ms=context,
          moc_total_hybrid_ms=routing + context + attention,
          dense_attention_ms=dense_attn,
      )
    rows[f"L1024/N{n}"] = r
  rows["L2048/N4"] = {"forward_moc": {"ms": 1.0}}  # another latent length: ignored
  return {"device": "NVIDIA H200 (gpu)", "jax": "0.11.2", "date": "d", "rows": rows}


def _peer(compiled, eager=None):
  res = [{"label": "compile", "N": n, "batch": 1, "median_ms": ms} for n, ms in compiled.items()]
  res += [
      {"label": "eager", "N": n, "batch": 1, "median_ms": ms} for n, ms in (eager or {}).items()
  ]
  res.append({"label": "compile", "N": 4, "batch": 2, "median_ms": 1.0})  # CFG batch: ignored
  return {"info": {"gpu": "NVIDIA H200", "torch": "2.11"}, "results": res}


def _by_name(ts):
  return {t["target"]: t for t in ts}


def test_forward_ratios_and_never_slower_targets():
  ours = _ours({4: 30.0, 32: 200.0}, {4: 29.0, 32: 340.0})
  peer = _peer({4: 27.0, 32: 420.0}, {4: 50.0})
  peer["results"][1]["label"] = "compiled"  # bench_partcrafter.py's own label
  table = {r["N"]: r for r in pc.forward_table(ours, peer)}
  assert table[4]["peer_over_moc"] == pytest.approx(0.9)
  assert table[32]["peer_over_moc"] == pytest.approx(2.1) and table[32]["peer_eager_ms"] is None
  t = _by_name(pc.targets(ours, peer))
  n4 = t["N = 4: PartCrafter compiled / MoC forward >= 1 (never slower)"]
  assert n4["met"] is False and n4["note"] == "missed by 0.1x (gather path)"
  assert t["N = 32: PartCrafter compiled / MoC forward >= 1 (never slower)"]["met"] is True
  half = t["N = 32: MoC forward at most 1/2 of PartCrafter compiled (ratio >= 2)"]
  assert half["met"] is True
  n64 = t["N = 64: PartCrafter compiled / MoC forward >= 1 (never slower)"]
  assert n64["met"] is None and "not measured" in n64["note"]


def test_core_train_and_e2e_targets():
  ours = _ours(
      {32: 200.0, 64: 400.0},
      {32: 340.0, 64: 990.0},
      core={32: (0.1, 1.0, 2.9, 14.7), 64: (0.1, 0.1, 2.8, 40.0)},
  )
  train = {
      "matmul_peak_tflops": 650.0,
      "runs": [
          {
              "size": "paper",
              "components": 32,
              "attention": "moc",
              "batch": 1,
              "step_ms": 1000.0,
              "model_flops": 3.9e14,
          },
          {"size": "paper", "components": 32, "attention": "dense", "batch": 1, "step_ms": 2000.0},
      ],
  }
  t = _by_name(pc.targets(ours, _peer({}), e2e={"image_to_glb_median_s": 31.3}, train=train))
  core32 = t["N = 32: MoC core (routing + context + attention) >= 5x dense global attention"]
  assert core32["value"] == pytest.approx(14.7 / 4.0) and core32["met"] is False
  assert core32["note"].endswith("(gather path)")
  share32 = t["N = 32: routing + gather <= 10% of the MoC core"]
  assert share32["value"] == pytest.approx(1.1 / 4.0) and share32["met"] is False
  assert t["N = 64: routing + gather <= 10% of the MoC core"]["value"] == pytest.approx(0.2 / 3.0)
  assert t["N = 64: routing + gather <= 10% of the MoC core"]["met"] is True
  mfu = t["training step, paper size, N = 32: MFU >= 55% of the measured bf16 matmul peak"]
  assert mfu["value"] == pytest.approx(0.6) and mfu["met"] is True
  assert t["training step, paper size, N = 32: MoC >= 2.2x the dense step"]["met"] is False
  e2e = [v for k, v in t.items() if k.startswith("image to GLB")][0]
  assert e2e["met"] is False and e2e["note"] == "missed by 21.3 s"


def test_the_faster_core_counts_fused_or_gather():
  """A faster fused kernel replaces the gather path in the core targets; its share is the
  routing alone (it gathers nothing)."""
  ours = _ours({32: 200.0}, {32: 340.0}, core={32: (0.1, 1.0, 2.9, 14.7)})
  ours["rows"]["L1024/N32"]["moc_total_fused_ms"] = 2.0
  t = _by_name(pc.targets(ours, _peer({})))
  core32 = t["N = 32: MoC core (routing + context + attention) >= 5x dense global attention"]
  assert core32["value"] == pytest.approx(14.7 / 2.0) and core32["met"] is True
  assert core32["note"] == "met (fused kernel)"
  share = t["N = 32: routing + gather <= 10% of the MoC core"]
  assert share["value"] == pytest.approx(0.05) and share["met"] is True
  ours["rows"]["L1024/N32"]["moc_total_fused_ms"] = 9.0  # slower: the gather path counts
  core32 = _by_name(pc.targets(ours, _peer({})))[
      "N = 32: MoC core (routing + context + attention) >= 5x dense global attention"
  ]
  assert core32["value"] == pytest.approx(14.7 / 4.0)


def test_fused_runs_merge_and_the_faster_forward_counts(tmp_path):
  """peer_comparison.sh times the fused kernel in processes of its own: their fused keys and
  a gather='fused' forward join the main run's rows; the faster MoC forward is scored and
  named; the core table shows both paths or the kernel's error."""
  ours = _ours({4: 30.0, 32: 200.0}, {4: 29.0, 32: 340.0}, core={32: (0.1, 1.0, 2.9, 14.7)})
  core_run = {"gather": "hybrid", "rows": {
      "L1024/N32": {"moc_total_fused_ms": 2.0, "fused_rel_err": 3e-3, "routing_ms": 9.9,
                    "moc_total_hybrid_ms": 99.0},
      "L1024/N4": {"fused_error": "XlaRuntimeError: bad"}}}
  forward_run = {"gather": "fused", "rows": {"L1024/N4": {"forward_moc": {"ms": 25.0}},
                                             "L1024/N32": {"forward_moc": {"ms": 210.0}}}}
  merged = pc.merge_runs(ours, [core_run, forward_run])
  assert "forward_moc_fused" not in ours["rows"]["L1024/N4"]  # a copy
  r32 = merged["rows"]["L1024/N32"]
  assert r32["moc_total_fused_ms"] == 2.0 and r32["routing_ms"] == 0.1  # only fused keys
  assert r32["moc_total_hybrid_ms"] == pytest.approx(4.0)
  table = {r["N"]: r for r in pc.forward_table(merged, _peer({4: 27.0, 32: 420.0}))}
  assert table[4]["moc_ms"] == 25.0 and table[4]["moc_path"] == "fused kernel"
  assert table[32]["moc_ms"] == 200.0 and table[32]["moc_path"] == "gather path"
  t = _by_name(pc.targets(merged, _peer({4: 27.0, 32: 420.0})))
  assert t["N = 4: PartCrafter compiled / MoC forward >= 1 (never slower)"]["note"] == (
      "met (fused kernel)")
  pc.write(str(tmp_path / "cmp"), merged, _peer({4: 27.0}), notes="Why: *because*.")
  md = (tmp_path / "cmp.md").read_text()
  assert md.endswith("## Notes\n\nWhy: *because*.\n")
  assert "| 4 | 30.0 | 25.0 | 29.0 | 27.0 | - | 1.08 |" in md
  assert "| 32 | 14.700 | 4.000 | 2.000 | 7.35 (fused kernel) | 5% |" in md
  assert "3.0e-03 |" in md


def test_write_and_cli_errors(tmp_path):
  ours = _ours({4: 30.0}, {4: 29.0})
  peer = _peer({4: 27.0})
  doc = pc.write(str(tmp_path / "cmp"), ours, peer)
  md = (tmp_path / "cmp.md").read_text()
  assert "| 4 | 30.0 | - | 29.0 | 27.0 | - | 0.90 |" in md
  assert "NVIDIA H200" in md and "not measured" in md
  assert json.loads((tmp_path / "cmp.json").read_text())["forward"] == doc["forward"]
  bad = tmp_path / "bad.json"
  bad.write_text("{")
  with pytest.raises(ValueError, match="unreadable"):
    pc._load(str(bad))
