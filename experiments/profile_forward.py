r"""Where the DiT forward's time goes: a device-kernel profile of the whole forward (issue 13).

  python -m experiments.profile_forward --ns=4,32 --modes=moc,dense \
      --out=experiments/results/forward_profile

Builds the same whole-model forward as experiments/benchmark_attention.py (paper size unless
--size, bf16 weights, L = --seq_len, one object, no CFG batch), compiles it, times it
untraced (median wall ms), then records --iters calls under `jax.profiler.trace` and reads
the trace back with `jax.profiler.ProfileData` (no TensorBoard needed). On a GPU the events
are the device's kernels (the '/device:GPU:N' plane); elsewhere the host's XLA op events
(those with an 'hlo_op' statistic). Per configuration it reports, per forward call:
  - wall ms (untraced median) and the device's busy ms (the union of its kernel intervals),
    so wall - busy is time the device waited (launch gaps, host work);
  - kernel ms by category (`kernel_category`): matmul, attention, elementwise fusion,
    reduction / norm fusion, copy / transpose / concat, memcpy / memset, other;
  - the number of kernels and the --top kernels by total time.
Writes <out>.md and <out>.json. Times are in milliseconds. Exit 2 on a bad flag value.
"""

from __future__ import annotations

import glob
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from absl import app, flags

from moca_jax import cli
from moca_jax import io as mio

CATEGORIES = (
    "matmul",
    "attention",
    "elementwise fusion",
    "reduction / norm fusion",
    "copy / transpose / concat",
    "memcpy / memset",
    "other",
)

# (category, substrings of a lower-cased kernel or HLO op name), tried in order.
_RULES = (
    ("attention", ("fmha", "flash", "sdpa", "cudnn", "attention", "mha")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "dot", "ynn_fusion")),
    ("memcpy / memset", ("memcpy", "memset")),
    ("copy / transpose / concat", ("transpose", "copy", "concatenate", "dynamic_update_slice",
                                   "dynamic-update-slice", "slice", "gather", "scatter")),
    ("reduction / norm fusion", ("reduce", "input_", "softmax", "norm")),
    ("elementwise fusion", ("loop_", "fusion", "convert", "multiply", "add", "broadcast")),
)


def kernel_category(name: str, hlo_op: str = "") -> str:
  """The category (one of CATEGORIES) of a device kernel or host XLA op, from its name and,
  where the profiler recorded one, the HLO op it belongs to. Matmul and attention are
  recognised by the library kernel names (cuBLAS/cuBLASLt 'gemm'/'nvjet', CUTLASS, cuDNN's
  fused attention 'sdpa'/'fmha'); XLA's own kernels by its fusion naming ('loop_*',
  'input_*' reductions, transposes and copies)."""
  for text in (name.lower(), hlo_op.lower()):
    for cat, keys in _RULES:
      if any(k in text for k in keys):
        return cat
  return "other"


_HLO_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%([\w.\-]+) = [^\n]*?metadata=\{[^}]*?op_name="([^"]*)"', re.M)


def kernel_key(name: str) -> str:
  """A kernel's or HLO instruction's name as the GPU profiler spells kernels: XLA names a
  fusion's kernel after the instruction, with '.' and '-' as '_'."""
  return name.replace(".", "_").replace("-", "_")


def op_names(hlo_text: str) -> Dict[str, str]:
  """{kernel_key(instruction): op_name} from a compiled module's text (`compiled.as_text()`):
  the JAX-level operation (its named scopes: the Flax module path, then the primitive) each
  fusion or library call came from, so a kernel in the profile points at the code."""
  return {kernel_key(m.group(1)): m.group(2) for m in _HLO_INSTRUCTION.finditer(hlo_text)}


def union_ms(intervals: Iterable[Tuple[float, float]]) -> float:
  """Total length in ms of the union of (start_ns, end_ns) intervals."""
  total, end = 0.0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total / 1e6


def summarize(events: Sequence[dict], calls: int, top: int = 15) -> dict:
  """Per-call statistics of kernel events [{name, hlo_op, start_ns, dur_ns, op}] recorded
  over `calls` forward calls: busy ms (interval union), kernel ms by category, kernel count,
  and the `top` kernels by total time (name, category, ms per call, launches per call, and
  up to 4 of the JAX ops (`op_names`) its launches came from)."""
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}")
  by_cat = {c: 0.0 for c in CATEGORIES}
  by_name: Dict[str, list] = {}
  for ev in events:
    cat = kernel_category(ev["name"], ev.get("hlo_op", ""))
    ms = ev["dur_ns"] / 1e6
    by_cat[cat] += ms
    entry = by_name.setdefault(ev["name"], [cat, 0.0, 0, set()])
    entry[1] += ms
    entry[2] += 1
    if ev.get("op"):
      entry[3].add(ev["op"])
  kernel_ms = sum(by_cat.values())
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  return {
      "busy_ms": union_ms((ev["start_ns"], ev["start_ns"] + ev["dur_ns"]) for ev in events)
      / calls,
      "kernel_ms": kernel_ms / calls,
      "kernels_per_call": len(events) / calls,
      "by_category_ms": {c: v / calls for c, v in by_cat.items()},
      "top": [
          {"name": name, "category": cat, "ms": ms / calls, "launches": count / calls,
           "ops": sorted(ops)[:4]}
          for name, (cat, ms, count, ops) in ranked
      ],
  }


def _stats(ev) -> dict:
  try:
    return dict(ev.stats)
  except Exception:  # noqa: BLE001 - a stat value the binding cannot convert
    return {}


def trace_events(profile) -> Tuple[List[dict], str]:
  """Kernel events of a `jax.profiler.ProfileData`: ([{name, hlo_op, start_ns, dur_ns}],
  source). GPU: every event on the device planes' stream lines; otherwise the host's events
  that carry an 'hlo_op' statistic (XLA's CPU thunks)."""
  events: List[dict] = []
  device_planes = [p for p in profile.planes if p.name.startswith("/device:GPU")]
  if device_planes:
    for plane in device_planes:
      for line in plane.lines:
        if not line.name.lower().startswith("stream"):
          continue  # derived lines ('XLA Ops', 'XLA Modules') would count kernels twice
        for ev in line.events:
          st = _stats(ev)
          events.append({"name": ev.name, "hlo_op": str(st.get("hlo_op", "")),
                         "start_ns": float(ev.start_ns), "dur_ns": float(ev.duration_ns)})
    return events, "device kernels (" + ", ".join(p.name for p in device_planes) + ")"
  for plane in profile.planes:
    for line in plane.lines:
      for ev in line.events:
        st = _stats(ev)
        if "hlo_op" in st and ev.duration_ns > 0:
          events.append({"name": ev.name, "hlo_op": str(st["hlo_op"]),
                         "start_ns": float(ev.start_ns), "dur_ns": float(ev.duration_ns)})
  return events, "host XLA ops (no device plane)"


def profile_forward(n: int, mode: str, *, size: str, seq_len: int, impl: str, gather: str,
                    iters: int, top: int) -> dict:
  """Compiles and profiles one whole-DiT forward (see the module docstring)."""
  import jax
  from jax.profiler import ProfileData

  from experiments import benchmark_attention as ba

  compiled, compile_s, mem, make_args = ba.compile_whole(
      "forward", n, seq_len, mode, size, impl, gather, "none")
  args = make_args()
  jax.block_until_ready(compiled(*args))
  walls = []
  for _ in range(max(3, iters)):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    walls.append(1e3 * (time.perf_counter() - t0))
  with tempfile.TemporaryDirectory(prefix="profile_forward_") as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(iters):
        jax.block_until_ready(compiled(*args))
    paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError(f"the profiler wrote no .xplane.pb under {tmp}")
    events, source = trace_events(ProfileData.from_file(paths[0]))
  ops = op_names(compiled.as_text() or "")
  for ev in events:
    ev["op"] = ops.get(kernel_key(ev["hlo_op"])) or ops.get(kernel_key(ev["name"]), "")
  res = summarize(events, iters, top)
  res.update(N=n, mode=mode, seq_len=seq_len, size=size, gather=gather, implementation=impl,
             compile_s=compile_s, wall_ms=statistics.median(walls), traced_calls=iters,
             source=source, memory_gib=mem)
  res["idle_ms"] = max(0.0, res["wall_ms"] - res["busy_ms"])
  return res


def _short(text: str, width: int) -> str:
  """`text` for a table cell: pipes escaped, cut to `width` characters, keeping the end (a JAX
  op's innermost scopes and primitive are at its end)."""
  text = text.replace("|", "/")
  return text if len(text) <= width else "..." + text[-(width - 3):]


def _f(v: Optional[float], digits: int = 2) -> str:
  return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
  """The results file: one summary table (a row per configuration), the categories, and the
  top kernels of each configuration."""
  runs = report["runs"]
  lines = [
      "# Where the DiT forward's time goes (issue 13)",
      "",
      f"Written by `experiments/profile_forward.py` on {report['device']} (jax "
      f"{report['jax']}), {report['date']}. {report['size']} DiT, L = {report['seq_len']}, bf16 "
      f"weights, one object, no CFG batch, {report['implementation']} attention. Per forward "
      "call: wall = untraced median; busy = the union of the device's kernel intervals in a "
      "traced run; idle = wall - busy (the device waits on launches or the host). Kernel "
      "categories: `kernel_category`.",
      "",
      "| N | attention | wall ms | busy ms | idle ms | kernels | "
      + " | ".join(CATEGORIES) + " |",
      "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES),
  ]
  for r in runs:
    if "error" in r:
      lines.append(f"| {r['N']} | {r['mode']} | failed: {r['error'][:100]} |")
      continue
    cats = r["by_category_ms"]
    share = lambda c: f"{cats[c]:.2f} ({100 * cats[c] / max(r['kernel_ms'], 1e-9):.0f}%)"
    lines.append(
        f"| {r['N']} | {r['mode']} | {_f(r['wall_ms'])} | {_f(r['busy_ms'])} | "
        f"{_f(r['idle_ms'])} | {r['kernels_per_call']:.0f} | "
        + " | ".join(share(c) for c in CATEGORIES) + " |")
  for r in runs:
    if "error" in r:
      continue
    lines += ["", f"## N = {r['N']}, {r['mode']}: top kernels ({r['source']})", "",
              "| ms per call | launches per call | category | kernel | JAX op (`op_names`) |",
              "|---|---|---|---|---|"]
    for k in r["top"]:
      lines.append(f"| {k['ms']:.3f} | {k['launches']:.0f} | {k['category']} | "
                   f"`{_short(k['name'], 90)}` | {_short('; '.join(k.get('ops', [])), 120)} |")
  return "\n".join(lines) + "\n"


def define_flags() -> None:
  flags.DEFINE_list("ns", ["4", "32"], "Numbers of components N.")
  flags.DEFINE_list("modes", ["moc", "dense"], "Global attention: moc and/or dense.")
  flags.DEFINE_string("size", "paper", "DiT size (moca_jax.dit sizes).")
  flags.DEFINE_integer("seq_len", 1024, "Latent tokens per component L.")
  flags.DEFINE_string("implementation", "auto",
                      "Attention implementation ('auto': cudnn on a GPU, xla elsewhere).")
  flags.DEFINE_string("gather", "hybrid", "MoC context path (moca_jax.moc.MOC_GATHERS).")
  flags.DEFINE_integer("iters", 5, "Forward calls traced (and at least 3 timed untraced).")
  flags.DEFINE_integer("top", 15, "Kernels listed per configuration.")
  flags.DEFINE_string("out", "outputs/forward_profile", "Output path stem (.md, .json).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  try:
    ns = [int(v) for v in f.ns]
  except ValueError:
    print(f"profile_forward: error: --ns must be integers, got {f.ns}", file=sys.stderr)
    sys.exit(2)
  bad = [m for m in f.modes if m not in ("moc", "dense")]
  if bad or f.iters < 1 or any(n < 1 for n in ns):
    print(f"profile_forward: error: --modes must be moc/dense, --iters and --ns >= 1 "
          f"(got modes={f.modes}, iters={f.iters}, ns={ns})", file=sys.stderr)
    sys.exit(2)
  import jax

  from experiments import benchmark_attention as ba

  dev = jax.devices()[0]
  impl = f.implementation
  if impl == "auto":
    impl = "cudnn" if dev.platform == "gpu" else "xla"
  report = {"device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size": f.size,
            "seq_len": f.seq_len, "implementation": impl, "gather": f.gather, "runs": []}
  del ba  # imported early so a broken benchmark module fails before any compilation
  for n in ns:
    for mode in f.modes:
      try:
        r = profile_forward(n, mode, size=f.size, seq_len=f.seq_len, impl=impl,
                            gather=f.gather, iters=f.iters, top=f.top)
        print(f"N={n} {mode}: wall {r['wall_ms']:.2f} ms, busy {r['busy_ms']:.2f} ms, "
              f"{r['kernels_per_call']:.0f} kernels; " + ", ".join(
                  f"{c} {v:.2f}" for c, v in r["by_category_ms"].items() if v), flush=True)
      except Exception as e:  # noqa: BLE001 - record and go on with the next configuration
        r = {"N": n, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"N={n} {mode}: failed: {r['error']}", flush=True)
      report["runs"].append(r)
      mio.write_json(f.out + ".json", report, indent=1)
      mio.atomic_write_text(f.out + ".md", markdown(report))
  print(f"wrote {f.out}.md/.json")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
