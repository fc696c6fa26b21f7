r"""Issue 13's results file: this project against PartCrafter, measured side by side.

  python -m experiments.peer_comparison \
      --ours=OUT/attention_scaling.json --peer=OUT/partcrafter_bench_compile.json \
      [--e2e=OUT/e2e_latency.json] [--train=OUT/benchmark_train.json] \
      --out=experiments/results/peer_comparison

Reads what the benchmarks wrote in one device call (experiments/results/peer_comparison.sh
runs them: `experiments/benchmark_attention.py --jobs core,forward`, PartCrafter's own
`bench_partcrafter.py --compile` from ../shared/peer, and optionally
`experiments/benchmark_e2e.py` and `experiments/benchmark_train.py`) and writes
`<out>.md` and `<out>.json`:
  - the forward table: N | MoC ms | dense ms | PartCrafter compiled ms | eager ms | ratios;
  - every target of issue 13 with the measured value, the threshold, met / missed (by how
    much) or 'not measured' (which input is missing);
  - the machines and dates of both sides, so a reader sees whether they shared a GPU.
Nothing here measures: it only joins the JSONs. Exit 2 on a missing or unreadable input.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import app, flags

from moca_jax import cli
from moca_jax import io as mio

NS = (4, 8, 16, 32, 64)
# bench_partcrafter.py labels its torch.compile rows 'compiled' (an older copy: 'compile').
PEER_LABELS = {"compile": "compiled"}


def _load(path: Optional[str]) -> Optional[dict]:
  if not path:
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable benchmark JSON ({e})") from e


def peer_times(peer: dict, label: str) -> Dict[int, float]:
  """{N: median forward ms} of PartCrafter's runs with `label` ('compile', also read as
  'compiled', or 'eager'), one object and no CFG batch (batch 1)."""
  labels = {label, PEER_LABELS.get(label, label)}
  out = {}
  for r in peer.get("results", []):
    if r.get("label") in labels and int(r.get("batch", 1)) == 1 and r.get("finite", True):
      out[int(r["N"])] = float(r["median_ms"])
  return out


def our_rows(ours: dict, seq_len: int = 1024) -> Dict[int, dict]:
  """{N: row} of experiments/benchmark_attention.py's JSON at latent length `seq_len`."""
  rows = {}
  for key, r in (ours.get("rows") or {}).items():
    length, n = key.split("/")
    if length == f"L{seq_len}":
      rows[int(n[1:])] = r
  return rows


def merge_runs(ours: dict, extra: Sequence[dict]) -> dict:
  """`ours` with the fused-kernel results of other benchmark_attention runs of the same call
  merged into its rows (a copy): the keys naming 'fused' (`moc_total_fused_ms`,
  `moc_fwd_bwd_fused_ms`, `fused_rel_err`, `fused_error`), and the MoC forward of a run with
  `--gather fused` as `forward_moc_fused`. peer_comparison.sh times the fused kernel in
  processes of its own, so that a fault of the new GPU kernel cannot take the gather path's
  rows with it."""
  merged = json.loads(json.dumps(ours))
  rows = merged.setdefault("rows", {})
  for doc in extra:
    fused_forward = doc.get("gather") == "fused"
    for key, r in (doc.get("rows") or {}).items():
      row = rows.setdefault(key, {})
      row.update({k: v for k, v in r.items() if "fused" in k})
      if fused_forward and r.get("forward_moc"):
        row["forward_moc_fused"] = r["forward_moc"]
  return merged


def best_forward(r: dict) -> tuple:
  """(ms, path) of the faster MoC forward of a row: the gather path (`forward_moc`) or the DiT
  with gather='fused' (`forward_moc_fused`); (None, '') when neither was timed."""
  cands = [
      ((r.get(k) or {}).get("ms"), name)
      for k, name in (("forward_moc", "gather path"), ("forward_moc_fused", "fused kernel"))
  ]
  cands = [(ms, name) for ms, name in cands if ms is not None]
  return min(cands) if cands else (None, "")


def forward_table(ours: dict, peer: dict) -> List[dict]:
  """Per N: MoC forward ms (the faster of the gather path and the fused kernel, both kept)
  and dense forward ms (ours), PartCrafter compiled and eager ms, and peer_compiled / moc
  (> 1: we are faster)."""
  mine, comp, eager = our_rows(ours), peer_times(peer, "compile"), peer_times(peer, "eager")
  table = []
  for n in sorted(set(mine) | set(comp) | set(eager)):
    r = mine.get(n, {})
    moc, path = best_forward(r)
    dense = (r.get("forward_dense") or {}).get("ms")
    table.append(
        {
            "N": n,
            "moc_ms": moc,
            "moc_path": path,
            "moc_gather_ms": (r.get("forward_moc") or {}).get("ms"),
            "moc_fused_ms": (r.get("forward_moc_fused") or {}).get("ms"),
            "dense_ms": dense,
            "peer_compiled_ms": comp.get(n),
            "peer_eager_ms": eager.get(n),
            "peer_over_moc": (comp[n] / moc) if moc and n in comp else None,
        }
    )
  return table


def _target(
    name: str,
    value: Optional[float],
    threshold: float,
    higher_is_better: bool,
    unit: str = "",
    missing: str = "",
) -> dict:
  """One target row: met / missed by how much, or not measured (with `missing` as reason)."""
  if value is None:
    return {
        "target": name,
        "value": None,
        "threshold": threshold,
        "met": None,
        "note": f"not measured ({missing})" if missing else "not measured",
    }
  met = value >= threshold if higher_is_better else value <= threshold
  gap = abs(value - threshold)
  note = "met" if met else f"missed by {gap:.3g}{unit}"
  return {"target": name, "value": value, "threshold": threshold, "met": bool(met), "note": note}


def targets(
    ours: dict, peer: dict, e2e: Optional[dict] = None, train: Optional[dict] = None
) -> List[dict]:
  """Issue 13's targets, each measured or marked 'not measured'."""
  table = {r["N"]: r for r in forward_table(ours, peer)}
  out = []
  def forward_target(name: str, n: int, want: float) -> dict:
    r = table.get(n, {})
    t = _target(name, r.get("peer_over_moc"), want, True, "x",
                "no MoC or compiled-peer time at this N")
    if t["value"] is not None and r.get("moc_path"):
      t["note"] += f" ({r['moc_path']})"
    return t

  for n in NS:
    out.append(forward_target(f"N = {n}: PartCrafter compiled / MoC forward >= 1 (never slower)",
                              n, 1.0))
  for n, want in ((32, 2.0), (64, 3.0)):
    out.append(
        forward_target(
            f"N = {n}: MoC forward at most 1/{want:g} of PartCrafter compiled "
            f"(ratio >= {want:g})", n, want))
  rows = our_rows(ours)
  for n, want in ((32, 5.0), (64, 9.0)):
    r = rows.get(n, {})
    core, path, share = best_core(r)
    dense = r.get("dense_attention_ms")
    for t in (
        _target(
            f"N = {n}: MoC core (routing + context + attention) >= {want:g}x dense "
            "global attention",
            (dense / core) if core and dense else None,
            want,
            True,
            "x",
            "benchmark_attention --jobs core not run at this N",
        ),
        _target(
            f"N = {n}: routing + gather <= 10% of the MoC core",
            share,
            0.10,
            False,
            "",
            "benchmark_attention --jobs core not run at this N",
        ),
    ):
      if t["value"] is not None:
        t["note"] += f" ({path})"
      out.append(t)
  out += train_targets(train)
  e2e_s = None if not e2e else e2e.get("image_to_glb_median_s")
  out.append(
      _target(
          "image to GLB, 16 parts, 50 Euler steps + CFG, 256^3 with the 512^3 band " "<= 10 s",
          e2e_s,
          10.0,
          False,
          " s",
          "benchmark_e2e not run",
      )
  )
  return out


def best_core(r: dict) -> tuple:
  """(ms, path, routing + gather share) of the faster MoC core of a benchmark_attention row:
  the gather path ('hybrid': routing + routed context + attention) or the fused kernel
  (`moc_total_fused_ms`: routing + one Pallas kernel, no gather; its share is routing
  alone). (None, '', None) when neither was timed."""
  hybrid, fused = r.get("moc_total_hybrid_ms"), r.get("moc_total_fused_ms")
  routing = r.get("routing_ms")
  if fused is not None and (hybrid is None or fused < hybrid):
    return fused, "fused kernel", (routing / fused if routing is not None else None)
  if hybrid is None:
    return None, "", None
  share = None
  if routing is not None and r.get("context_hybrid_ms") is not None:
    share = (routing + r["context_hybrid_ms"]) / hybrid
  return hybrid, "gather path", share


def train_targets(train: Optional[dict]) -> List[dict]:
  """MFU >= 55% of the measured bf16 matmul peak and MoC step >= 2.2x the dense step, at
  paper size, N = 32 (experiments/benchmark_train.py's JSON)."""
  missing = "benchmark_train not run"
  mfu = speedup = None
  if train:
    runs = [
        r
        for r in train.get("runs", [])
        if r.get("size") == "paper" and int(r.get("components", 0)) == 32 and r.get("step_ms")
    ]
    moc = next((r for r in runs if r.get("attention") == "moc"), None)
    dense = next(
        (
            r
            for r in runs
            if r.get("attention") == "dense" and moc and r.get("batch") == moc.get("batch")
        ),
        None,
    )
    peak = train.get("matmul_peak_tflops")
    if moc and peak and moc.get("model_flops"):
      mfu = moc["model_flops"] / (moc["step_ms"] / 1e3) / (peak * 1e12)
    if moc and dense:
      speedup = dense["step_ms"] / moc["step_ms"]
  return [
      _target(
          "training step, paper size, N = 32: MFU >= 55% of the measured bf16 matmul " "peak",
          mfu,
          0.55,
          True,
          "",
          missing,
      ),
      _target(
          "training step, paper size, N = 32: MoC >= 2.2x the dense step",
          speedup,
          2.2,
          True,
          "x",
          missing,
      ),
  ]


def _fmt(v: Any, digits: int = 1) -> str:
  if v is None:
    return "-"
  return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def machines(ours: dict, peer: dict, e2e: Optional[dict], train: Optional[dict]) -> List[str]:
  """One line per input: what ran it and when."""
  info = peer.get("info", {})
  lines = [
      f"this project (benchmark_attention): {ours.get('device', '?')}, jax "
      f"{ours.get('jax', '?')}, {ours.get('date', '?')}",
      f"PartCrafter (bench_partcrafter): {info.get('gpu', '?')}, torch "
      f"{info.get('torch', '?')}, {peer.get('date', info.get('date', 'date not recorded'))}",
  ]
  if e2e:
    lines.append(f"end to end (benchmark_e2e): {e2e.get('device', '?')}, "
                 f"{e2e.get('date', 'date not recorded (an earlier call)')}")
  if train:
    lines.append(
        f"training step (benchmark_train): {train.get('device', '?')}, " f"{train.get('date', '?')}"
    )
  return lines


def markdown(ours: dict, peer: dict, e2e: Optional[dict], train: Optional[dict]) -> str:
  table = forward_table(ours, peer)
  lines = [
      "# This project against PartCrafter (issue 13)",
      "",
      "Machines (a ratio is only meaningful when both sides ran on the same GPU, in one "
      "device call):",
      "",
  ]
  lines += [f"- {m}" for m in machines(ours, peer, e2e, train)]
  lines += [
      "",
      "Paper-size DiT, L = 1024, one object, no CFG batch, bf16, forward ms " "(medians):",
      "",
      "| N | MoC, gather path (ours) | MoC, fused kernel (ours) | dense (ours) | "
      "PartCrafter compiled | PartCrafter eager | PartCrafter compiled / MoC (faster path) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in table:
    lines.append(
        f"| {r['N']} | {_fmt(r['moc_gather_ms'])} | {_fmt(r['moc_fused_ms'])} | "
        f"{_fmt(r['dense_ms'])} | {_fmt(r['peer_compiled_ms'])} | {_fmt(r['peer_eager_ms'])} | "
        f"{_fmt(r['peer_over_moc'], 2)} |"
    )
  lines += core_markdown(ours)
  lines += ["", "## Targets", "", "| target | measured | threshold | result |", "|---|---|---|---|"]
  for t in targets(ours, peer, e2e, train):
    lines.append(
        f"| {t['target']} | {_fmt(t['value'], 3)} | {t['threshold']:g} | " f"{t['note']} |"
    )
  return "\n".join(lines) + "\n"


def core_markdown(ours: dict) -> List[str]:
  """The global-attention core table (ms, L = 1024): dense attention, the MoC core by the
  gather path and by the fused kernel, forward and forward+backward, and the fused kernel's
  relative difference to the gather path (or its error)."""
  rows = our_rows(ours)
  if not any("routing_ms" in r for r in rows.values()):
    return []
  lines = [
      "",
      "Global-attention core on projected q/k/v (ms; MoC = routing + context + attention, "
      "the fused kernel = routing + one Pallas kernel):",
      "",
      "| N | dense | MoC gather path | MoC fused | dense / best MoC | routing + gather share "
      "| fwd+bwd dense | fwd+bwd gather path | fwd+bwd fused | fused vs gather (rel. diff.) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for n, r in sorted(rows.items()):
    if "routing_ms" not in r:
      continue
    best, path, share = best_core(r)
    dense = r.get("dense_attention_ms")
    err = r.get("fused_rel_err")
    fused_note = r.get("fused_error", "")[:60] or (f"{err:.1e}" if err is not None else "-")
    lines.append(
        f"| {n} | {_fmt(dense, 3)} | {_fmt(r.get('moc_total_hybrid_ms'), 3)} | "
        f"{_fmt(r.get('moc_total_fused_ms'), 3)} | "
        f"{_fmt(dense / best if dense and best else None, 2)} ({path or '-'}) | "
        f"{_fmt(100 * share if share is not None else None, 0)}% | "
        f"{_fmt(r.get('dense_fwd_bwd_ms'), 3)} | {_fmt(r.get('moc_fwd_bwd_hybrid_ms'), 3)} | "
        f"{_fmt(r.get('moc_fwd_bwd_fused_ms'), 3)} | {fused_note} |"
    )
  return lines


def write(
    out: str,
    ours: dict,
    peer: dict,
    e2e: Optional[dict] = None,
    train: Optional[dict] = None,
    notes: str = "",
) -> dict:
  """Writes <out>.md (with `notes` appended under '## Notes') and <out>.json; returns the
  JSON document."""
  doc = {
      "machines": machines(ours, peer, e2e, train),
      "forward": forward_table(ours, peer),
      "targets": targets(ours, peer, e2e, train),
  }
  text = markdown(ours, peer, e2e, train)
  if notes.strip():
    text += "\n## Notes\n\n" + notes.strip() + "\n"
  mio.atomic_write_text(out + ".md", text)
  mio.write_json(out + ".json", doc, indent=1)
  return doc


def define_flags() -> None:
  flags.DEFINE_string("ours", None, "experiments/benchmark_attention.py JSON.")
  flags.DEFINE_string("peer", None, "bench_partcrafter.py JSON (with --compile rows).")
  flags.DEFINE_string("e2e", None, "experiments/benchmark_e2e.py JSON (optional).")
  flags.DEFINE_string("train", None, "experiments/benchmark_train.py JSON (optional).")
  flags.DEFINE_string("out", "experiments/results/peer_comparison", "Output path stem.")
  flags.DEFINE_string(
      "notes", None, "A markdown file appended to <out>.md under '## Notes' (what the "
      "numbers mean, what would close the missed targets).")
  flags.DEFINE_list(
      "extra", [], "More benchmark_attention JSONs of the same call whose fused-kernel "
      "results are merged into --ours (`merge_runs`).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  if not f.ours or not f.peer:
    print("peer_comparison: error: --ours and --peer are required", file=sys.stderr)
    sys.exit(2)
  try:
    inputs = [_load(p) for p in (f.ours, f.peer, f.e2e, f.train)]
  except ValueError as e:
    print(f"peer_comparison: error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    extra = [_load(p) for p in f.extra]
  except ValueError as e:
    print(f"peer_comparison: error: {e}", file=sys.stderr)
    sys.exit(2)
  inputs[0] = merge_runs(inputs[0], extra)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  notes = ""
  if f.notes:
    try:
      with open(f.notes) as fh:
        notes = fh.read()
    except OSError as e:
      print(f"peer_comparison: error: {f.notes}: unreadable notes ({e})", file=sys.stderr)
      sys.exit(2)
  doc = write(f.out, *inputs, notes=notes)
  met = sum(t["met"] is True for t in doc["targets"])
  print(f"wrote {f.out}.md/.json: {met} of {len(doc['targets'])} targets met")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
