"""MoC vs dense global attention at paper size: correctness (xla vs cudnn) and timings.

Run on a GPU (bf16, cuDNN attention), random weights, one object (B = 1), no CFG batch:
  python experiments/benchmark_attention.py --ns 4,8,16,32 --out experiments/results

Measures, per N:
  * the whole DiT forward (21 blocks, width 2048, 16 heads, L = 1024), MoC vs dense;
  * one local block, one global block (MoC / dense) of the same DiT;
  * the global attention core on projected q/k/v: routing (router scores + top-k), routed
    context (gather + gates + concat), attention on the routed context, MoC total, dense;
  * the gather variants ('onehot', 'take', 'hybrid') forward and forward+backward.
Times are medians of --iters runs after --warmup runs, compile excluded, with
block_until_ready. Writes <out>/attention_benchmark.{md,json} (atomically) naming the GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax.core import meta  # noqa: E402
from moca_jax import moc  # noqa: E402
from moca_jax.dit import CompositionalDiT, DiTBlock, DiTSpec, _defaults  # noqa: E402

# PartCrafter's own DiT, measured by others on one H100 (shared/paper/NOTES.md), ms.
PARTCRAFTER_H100 = {"eager": {4: 48.8, 8: 84.3, 16: 184.9, 32: 453.1},
                    "compile": {4: 27.2, 8: 57.0, 16: 132.7, 32: 357.3}}


def spec_for(size="paper", **overrides) -> DiTSpec:
  cfg = _defaults(size)
  cfg.update(overrides)
  return DiTSpec.from_config(cfg)


def timeit(fn, *args, iters=10, warmup=2):
  """Median wall time (ms) of a jitted fn after warm-up; returns (ms, compile_s, out)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), compile_s, out


def random_params(abstract, key, dtype):
  """Random weights for a param tree of ShapeDtypeStructs: kernels N(0, 1/fan_in)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  def make(key):
    out = []
    for i, (path, leaf) in enumerate(leaves):
      name = str(path[-1])
      k = jax.random.fold_in(key, i)
      if "scale" in name:
        out.append(jnp.ones(leaf.shape, dtype))
      elif "bias" in name:
        out.append(jnp.zeros(leaf.shape, dtype))
      elif len(leaf.shape) >= 2 and "embedding" not in name and "queries" not in name:
        out.append((jax.random.normal(k, leaf.shape, jnp.float32) / math.sqrt(leaf.shape[0])).astype(dtype))
      else:
        out.append((0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  return jax.jit(make)(key)


def abstract_params(module, *args, **kwargs):
  rngs = {"params": jax.random.key(0), "routing": jax.random.key(1), "ids": jax.random.key(2)}
  shapes = jax.eval_shape(lambda: module.init(rngs, *args, **kwargs))
  return meta.unbox(shapes)["params"]


def rel_err(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------
# Correctness: xla vs cudnn
# ----------------------------------------------------------------------------------------

def check_backends(log):
  """Relative differences cudnn vs xla (bf16) with padding, forward and gradients."""
  results = {}
  key = jax.random.key(7)
  b, n, seq_len, m, nh, hd, k = 2, 6, 128, 16, 4, 64, 2
  ks = jax.random.split(key, 8)
  mk = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32).astype(jnp.bfloat16)
  q, kh, vh = mk(0, (b, n, seq_len, nh, hd)), mk(1, (b, n, seq_len, nh, hd)), mk(2, (b, n, seq_len, nh, hd))
  kc, vc = mk(3, (b, n, m, nh, hd)), mk(4, (b, n, m, nh, hd))
  mask = jnp.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  imp = moc.router_importance(jax.random.normal(ks[5], (b, nh, n, n)), mask)
  sel, unsel = moc.route(imp, mask, k)

  def moc_fn(impl, q, kh, vh, kc, vc, imp):
    out = moc.moc_attention(q, kh, vh, kc, vc, imp, sel, unsel, mask, implementation=impl)
    return jnp.where(mask[:, :, None, None, None], out, 0)

  for impl in ("xla", "cudnn"):
    results[f"moc_fwd_{impl}"] = jax.jit(lambda *a: moc_fn(impl, *a))(q, kh, vh, kc, vc, imp)
    loss = lambda *a: jnp.sum(moc_fn(impl, *a).astype(jnp.float32) ** 2)
    results[f"moc_grad_{impl}"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(q, kh, vh, kc, vc, imp)
    dense = lambda q, k, v: jnp.where(mask[:, :, None, None, None],
                                      moc.dense_global_attention(q, k, v, mask, impl), 0)
    results[f"dense_{impl}"] = jax.jit(dense)(q, kh, vh)
  checks = {
      "moc_attention_fwd": rel_err(results["moc_fwd_cudnn"], results["moc_fwd_xla"]),
      "moc_attention_grads": max(rel_err(a, b) for a, b in zip(results["moc_grad_cudnn"],
                                                               results["moc_grad_xla"])),
      "dense_attention_fwd": rel_err(results["dense_cudnn"], results["dense_xla"]),
  }
  # A small DiT in bf16 with padding, scene mode, training routing with a fixed key.
  for mode in ("moc", "dense"):
    outs = {}
    for impl in ("xla", "cudnn"):
      spec = spec_for("small", latent_tokens=128, num_blocks=4, global_attention=mode,
                      attention_implementation=impl, dtype="bfloat16")
      model = CompositionalDiT(spec)
      x = jax.random.normal(ks[6], (2, 6, 128, 64))
      t = jnp.array([0.2, 0.8])
      cond = jax.random.normal(ks[7], (2, 6, 9, 384))
      params = model.init({"params": jax.random.key(3)}, x, t, cond, mask, train=False)
      f = lambda p: model.apply(p, x, t, cond, mask, train=True,
                                rngs={"routing": jax.random.key(5), "ids": jax.random.key(6)})
      outs[impl] = jax.jit(f)(params)
      outs[impl + "_grad"] = jax.jit(jax.grad(lambda p: jnp.sum(
          jnp.where(mask[:, :, None, None], f(p), 0) ** 2)))(params)
    real = np.asarray(mask)
    checks[f"dit_{mode}_fwd"] = rel_err(np.asarray(outs["cudnn"])[real], np.asarray(outs["xla"])[real])
    ga = jax.tree_util.tree_leaves(outs["cudnn_grad"])
    gb = jax.tree_util.tree_leaves(outs["xla_grad"])
    checks[f"dit_{mode}_grads_max"] = max(rel_err(a, b) for a, b in zip(ga, gb)
                                          if float(jnp.linalg.norm(b.astype(jnp.float32))) > 0)
  for name, value in checks.items():
    log(f"  cudnn vs xla {name}: rel err {value:.2e}")
  return checks


# ----------------------------------------------------------------------------------------
# Timings
# ----------------------------------------------------------------------------------------

def bench_core(n, seq_len, spec, iters, log):
  """Global attention core on projected q/k/v: routing, context, attention, totals."""
  nh, hd, m, k = spec.num_heads, spec.width // spec.num_heads, spec.num_compressed, spec.top_k
  ks = jax.random.split(jax.random.key(n), 8)
  mk = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32).astype(jnp.bfloat16)
  q, kh, vh = (mk(i, (1, n, seq_len, nh, hd)) for i in range(3))
  kc, vc = mk(3, (1, n, m, nh, hd)), mk(4, (1, n, m, nh, hd))
  anchor = mk(5, (1, n, spec.width))
  wq = mk(6, (spec.width, nh * spec.router_head_dim)) * (1 / math.sqrt(spec.width))
  wk = mk(7, (spec.width, nh * spec.router_head_dim)) * (1 / math.sqrt(spec.width))
  impl = spec.attention_implementation
  res = {}

  def routing(anchor, wq, wk):
    qr = (anchor @ wq).reshape(1, n, nh, -1).astype(jnp.float32)
    kr = (anchor @ wk).reshape(1, n, nh, -1).astype(jnp.float32)
    logits = jnp.einsum("bihr,bjhr->bhij", qr, kr) / math.sqrt(spec.router_head_dim)
    imp = moc.router_importance(logits, None)
    sel, unsel = moc.route(imp, None, k)
    return imp, sel, unsel

  res["routing_ms"], _, (imp, sel, unsel) = timeit(routing, anchor, wq, wk, iters=iters)
  for g in moc.GATHER_METHODS:
    ctx = lambda kh, vh, kc, vc, imp: moc.routed_context(kh, vh, kc, vc, imp, sel, unsel, None,
                                                         gather=g)[:2]
    res[f"context_{g}_ms"], _, (keys, values) = timeit(ctx, kh, vh, kc, vc, imp, iters=iters)
  attn = lambda q, keys, values: moc.attend_prefix(q.reshape(n, seq_len, nh, hd), keys, values,
                                                   None, impl)
  res["routed_attention_ms"], _, _ = timeit(attn, q, keys, values, iters=iters)
  res["context_tokens"] = int(keys.shape[1])
  for g in moc.GATHER_METHODS:
    full = lambda q, kh, vh, kc, vc, anchor, wq, wk: moc.moc_attention(
        q, kh, vh, kc, vc, *routing(anchor, wq, wk), None, implementation=impl, gather=g)
    res[f"moc_total_{g}_ms"], _, _ = timeit(full, q, kh, vh, kc, vc, anchor, wq, wk, iters=iters)
    ct = mk(0, (1, n, seq_len, nh, hd))

    def loss(q, kh, vh, kc, vc, anchor, wq, wk):
      return jnp.sum(full(q, kh, vh, kc, vc, anchor, wq, wk).astype(jnp.float32) * ct)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 6, 7))
    res[f"moc_fwd_bwd_{g}_ms"], _, _ = timeit(grad, q, kh, vh, kc, vc, anchor, wq, wk, iters=iters)
  dense = lambda q, kh, vh: moc.dense_global_attention(q, kh, vh, None, impl)
  res["dense_attention_ms"], _, _ = timeit(dense, q, kh, vh, iters=iters)
  if True:
    dgrad = jax.grad(lambda q, kh, vh: jnp.sum(dense(q, kh, vh).astype(jnp.float32) * ct),
                     argnums=(0, 1, 2))
    res["dense_fwd_bwd_ms"], _, _ = timeit(dgrad, q, kh, vh, iters=iters)
  log(f"  N={n} core: " + ", ".join(f"{k_}={v:.3f}" for k_, v in res.items()))
  return res


def bench_blocks(n, seq_len, spec, iters, log, size="paper"):
  """One local block and one global block (MoC / dense) of the paper DiT."""
  t_c = seq_len + spec.num_compressed + 1
  x = jax.random.normal(jax.random.key(1), (1, n, t_c, spec.width), jnp.float32).astype(jnp.bfloat16)
  cond = jax.random.normal(jax.random.key(2), (1, 257, spec.cond_dim), jnp.float32).astype(jnp.bfloat16)
  res = {}
  for name, is_global, mode in (("local", False, "moc"), ("global_moc", True, "moc"),
                                ("global_dense", True, "dense")):
    s = spec_for(size, global_attention=mode, gather=spec.gather,
                 attention_implementation=spec.attention_implementation, dtype="bfloat16")
    block = DiTBlock(s, is_global=is_global, has_skip=False, train=False)
    params = random_params(abstract_params(block, x, cond, None), jax.random.key(3), jnp.bfloat16)
    f = lambda p, x, cond: block.apply({"params": p}, x, cond, None)[0]
    res[f"block_{name}_ms"], _, _ = timeit(f, params, x, cond, iters=iters)
    del params
  log(f"  N={n} blocks: " + ", ".join(f"{k_}={v:.2f}" for k_, v in res.items()))
  return res


def bench_forward(n, seq_len, mode, iters, log, gather="hybrid", size="paper", impl="cudnn"):
  spec = spec_for(size, global_attention=mode, gather=gather, attention_implementation=impl,
                  dtype="bfloat16")
  model = CompositionalDiT(spec)
  x = jax.random.normal(jax.random.key(1), (1, n, seq_len, spec.latent_channels), jnp.float32)
  t = jnp.array([0.5], jnp.float32)
  cond = jax.random.normal(jax.random.key(2), (1, 257, spec.cond_dim), jnp.float32).astype(jnp.bfloat16)
  params = random_params(abstract_params(model, x[:, :2], t, cond, None, train=False),
                         jax.random.key(3), jnp.bfloat16)
  f = lambda p, x, t, cond: model.apply({"params": p}, x, t, cond, None, train=False)
  ms, compile_s, out = timeit(f, params, x, t, cond, iters=iters)
  finite = bool(jnp.all(jnp.isfinite(out)))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  del params
  log(f"  N={n} {mode} forward: {ms:.1f} ms (compile {compile_s:.0f} s, finite={finite}, "
      f"{n_params / 1e9:.3f} B params)")
  return {"forward_ms": ms, "compile_s": compile_s, "finite": finite, "params": n_params}


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def write_atomic(path, text):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def markdown(report) -> str:
  dev = report["device"]
  lines = [f"# MoC vs dense global attention, {report.get('size', 'paper')}-size DiT ({dev})", "",
           f"Machine: {dev}, {report['platform']}; jax {report['jax']}; bf16, "
           f"{report.get('implementation', 'cudnn')} attention, "
           f"random weights, B = 1 object, L = {report['seq_len']}, no CFG batch. "
           f"Median of {report['iters']} runs after warm-up, compile excluded.", ""]
  if report.get("checks"):
    lines += ["## cuDNN vs XLA (bf16, with padding)", "", "| check | rel. error |", "|---|---|"]
    lines += [f"| {k} | {v:.2e} |" for k, v in report["checks"].items()] + [""]
  rows = report["rows"]
  ns = sorted(int(n) for n in rows)
  lines += ["## Whole DiT forward (ms)", "",
            "| N | MoC | dense | dense / MoC | PartCrafter torch.compile (H100, others) | PartCrafter eager (H100, others) | MoC vs compiled PartCrafter |",
            "|---|---|---|---|---|---|---|"]
  for n in ns:
    r = rows[str(n)]
    moc_ms, dense_ms = r.get("moc_forward_ms"), r.get("dense_forward_ms")
    pc, pe = PARTCRAFTER_H100["compile"].get(n), PARTCRAFTER_H100["eager"].get(n)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    ratio = "-" if not (moc_ms and dense_ms) else f"{dense_ms / moc_ms:.2f}x"
    vs = "-" if not (moc_ms and pc) else f"{pc / moc_ms:.2f}x faster" if moc_ms <= pc else f"{moc_ms / pc:.2f}x slower"
    lines.append(f"| {n} | {fmt(moc_ms)} | {fmt(dense_ms)} | {ratio} | {fmt(pc)} | {fmt(pe)} | {vs} |")
  lines += ["", "## Blocks and global-attention core (ms)", "",
            "| N | local block | global block MoC | global block dense | routing | context (gather) | routed attention | MoC core total | dense core | core speed-up | routing+gather share | context tokens |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  g = report["gather"]
  for n in ns:
    r = rows[str(n)]
    if "routing_ms" not in r:
      continue
    total = r[f"moc_total_{g}_ms"]
    share = (r["routing_ms"] + r[f"context_{g}_ms"]) / max(total, 1e-9)
    lines.append(
        f"| {n} | {r.get('block_local_ms', float('nan')):.2f} | {r.get('block_global_moc_ms', float('nan')):.2f} | "
        f"{r.get('block_global_dense_ms', float('nan')):.2f} | {r['routing_ms']:.3f} | "
        f"{r[f'context_{g}_ms']:.3f} | {r['routed_attention_ms']:.3f} | {total:.3f} | "
        f"{r['dense_attention_ms']:.3f} | {r['dense_attention_ms'] / total:.2f}x | {100 * share:.0f}% | "
        f"{r['context_tokens']} |")
  lines += ["", "Routing+gather share = (routing + context) / MoC core total, each timed alone "
            "(the fused total can be less than the sum).", "",
            "## Gather variants (global-attention core, ms)", "",
            "| N | onehot fwd | take fwd | hybrid fwd | onehot fwd+bwd | take fwd+bwd | hybrid fwd+bwd | dense fwd+bwd |",
            "|---|---|---|---|---|---|---|---|"]
  for n in ns:
    r = rows[str(n)]
    if "routing_ms" not in r:
      continue
    cells = [f"{r[f'moc_total_{v}_ms']:.3f}" for v in moc.GATHER_METHODS]
    cells += [f"{r[f'moc_fwd_bwd_{v}_ms']:.3f}" for v in moc.GATHER_METHODS]
    cells.append(f"{r['dense_fwd_bwd_ms']:.3f}" if "dense_fwd_bwd_ms" in r else "-")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  lines += ["", "PartCrafter numbers: its own PyTorch DiT (1.44 B parameters, same layout), "
            "measured by others on one H100 (shared/paper/NOTES.md), not on this run's GPU."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ns", default="4,8,16,32")
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--size", default="paper", help="'tiny' for a CPU dry run")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--gather", default="hybrid", choices=moc.GATHER_METHODS)
  parser.add_argument("--skip_checks", action="store_true")
  parser.add_argument("--skip_forward", action="store_true")
  parser.add_argument("--skip_core", action="store_true")
  parser.add_argument("--skip_blocks", action="store_true")
  parser.add_argument("--modes", default="moc,dense")
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--name", default="attention_benchmark")
  args = parser.parse_args(argv)

  log = lambda msg: print(msg, flush=True)
  dev = jax.devices()[0]
  device = f"{dev.device_kind} ({dev.platform})"
  log(f"device: {device}; jax {jax.__version__}")
  if dev.platform != "gpu":
    log("warning: not a GPU; cudnn is unavailable, using xla (numbers are not the benchmark)")
  report = {"device": device, "platform": platform.platform(), "jax": jax.__version__,
            "seq_len": args.seq_len, "iters": args.iters, "gather": args.gather, "rows": {},
            "partcrafter_h100_ms_measured_by_others": PARTCRAFTER_H100}
  impl = "cudnn" if dev.platform == "gpu" else "xla"
  report["implementation"] = impl
  spec = spec_for(args.size, attention_implementation=impl, gather=args.gather, dtype="bfloat16")
  report["size"] = args.size

  def save():
    path = os.path.join(args.out, args.name)
    write_atomic(path + ".json", json.dumps(report, indent=1, sort_keys=True))
    write_atomic(path + ".md", markdown(report))

  if not args.skip_checks and dev.platform == "gpu":
    log("checks:")
    report["checks"] = check_backends(log)
    save()
  for n in [int(v) for v in args.ns.split(",")]:
    row = report["rows"].setdefault(str(n), {})
    if not args.skip_core:
      row.update(bench_core(n, args.seq_len, spec, args.iters, log))
    if not args.skip_blocks:
      row.update(bench_blocks(n, args.seq_len, spec, args.iters, log, args.size))
    if not args.skip_forward:
      for mode in args.modes.split(","):
        r = bench_forward(n, args.seq_len, mode, args.iters, log, args.gather, args.size, impl)
        row.update({f"{mode}_{k}": v for k, v in r.items()})
    save()
    jax.clear_caches()
  log("")
  log(markdown(report))


if __name__ == "__main__":
  main()
