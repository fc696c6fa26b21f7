"""MoC vs dense global attention: the paper's Table 4 on one GPU (scaling with N).

Run on a GPU (bf16, cuDNN attention), random weights, one object (B = 1), no CFG batch:
  python experiments/benchmark_attention.py --ns 4,8,16,32,64 --seq_lens 1024,512 \
      --workers 6 --budget_s 520 --out experiments/results

Measures, for every L in --seq_lens and N in --ns, MoC against dense:
  * the whole DiT forward (paper size: 21 blocks, width 2048, 16 heads) and, for L in
    --train_seq_lens, a forward+backward training step (fp32 weights, bf16 compute, remat);
  * one local block, one global block (MoC / dense);
  * the global attention core on projected q/k/v: routing (router scores + top-k), routed
    context (gather + gates + concat), attention on the routed context, MoC total and dense,
    forward and forward+backward (--gather_variants: every gather method); on a GPU (or with
    --fused on) also the fused Pallas kernel (moca_jax.kernels.moc_flash, gather='fused');
  * XLA's memory analysis of every whole-model job, and the largest N that fits (a grid of
    compile-only jobs, --largest_grid).
Whole-model jobs are compiled first in --workers parallel processes into a persistent
compilation cache; timing then runs alone on the GPU. Times are medians after warm-up,
compile excluded, with block_until_ready. --resume keeps the finished jobs of an earlier
JSON (a run cut short by --budget_s goes on where it stopped). Writes
<out>/attention_scaling.{md,json} (atomically) naming the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax.core import meta  # noqa: E402
from moca_jax import io as mio  # noqa: E402
from moca_jax import moc  # noqa: E402
from moca_jax.dit import CompositionalDiT, DiTBlock, DiTSpec, _defaults  # noqa: E402

# PartCrafter's own DiT, measured by others on one H100 (shared/paper/NOTES.md), ms.
PARTCRAFTER_H100 = {
    "eager": {4: 48.8, 8: 84.3, 16: 184.9, 32: 453.1},
    "compile": {4: 27.2, 8: 57.0, 16: 132.7, 32: 357.3},
}


def spec_for(size="paper", **overrides) -> DiTSpec:
  cfg = _defaults(size)
  cfg.update(overrides)
  return DiTSpec.from_config(cfg)


# Set in compile-only workers: `timeit` compiles (filling the persistent cache) and runs once
# for the outputs later steps need, without timing.
COMPILE_ONLY = False


def timeit(fn, *args, iters=10, warmup=2):
  """Median wall time (ms) of a jitted fn after warm-up; returns (ms, compile_s, out)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  if COMPILE_ONLY:
    return 0.0, compile_s, jax.block_until_ready(compiled(*args))
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
  """Random weights for a param tree of ShapeDtypeStructs: kernels N(0, 1/fan_in).

  Leaf by leaf, eagerly: one jit over all leaves of a 1.5 B-parameter model compiles
  hundreds of large RNG expansions (minutes on a GPU); eager calls compile once per shape.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    name = str(path[-1])
    k = jax.random.fold_in(key, i)
    if "scale" in name:
      out.append(jnp.ones(leaf.shape, dtype))
    elif "bias" in name:
      out.append(jnp.zeros(leaf.shape, dtype))
    elif len(leaf.shape) >= 2 and "embedding" not in name and "queries" not in name:
      out.append(jax.random.normal(k, leaf.shape, dtype) * (1 / math.sqrt(leaf.shape[0])))
    else:
      out.append(0.02 * jax.random.normal(k, leaf.shape, dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


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
  q, kh, vh = (
      mk(0, (b, n, seq_len, nh, hd)),
      mk(1, (b, n, seq_len, nh, hd)),
      mk(2, (b, n, seq_len, nh, hd)),
  )
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
    results[f"moc_grad_{impl}"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(
        q, kh, vh, kc, vc, imp
    )
    dense = lambda q, k, v: jnp.where(
        mask[:, :, None, None, None], moc.dense_global_attention(q, k, v, mask, impl), 0
    )
    results[f"dense_{impl}"] = jax.jit(dense)(q, kh, vh)
  checks = {
      "moc_attention_fwd": rel_err(results["moc_fwd_cudnn"], results["moc_fwd_xla"]),
      "moc_attention_grads": max(
          rel_err(a, b) for a, b in zip(results["moc_grad_cudnn"], results["moc_grad_xla"])
      ),
      "dense_attention_fwd": rel_err(results["dense_cudnn"], results["dense_xla"]),
  }
  # A small DiT in bf16 with padding, scene mode, training routing with a fixed key.
  for mode in ("moc", "dense"):
    outs = {}
    for impl in ("xla", "cudnn"):
      spec = spec_for(
          "small",
          latent_tokens=128,
          num_blocks=4,
          global_attention=mode,
          attention_implementation=impl,
          dtype="bfloat16",
      )
      model = CompositionalDiT(spec)
      x = jax.random.normal(ks[6], (2, 6, 128, 64))
      t = jnp.array([0.2, 0.8])
      cond = jax.random.normal(ks[7], (2, 6, 9, 384))
      params = model.init({"params": jax.random.key(3)}, x, t, cond, mask, train=False)
      f = lambda p: model.apply(
          p,
          x,
          t,
          cond,
          mask,
          train=True,
          rngs={"routing": jax.random.key(5), "ids": jax.random.key(6)},
      )
      outs[impl] = jax.jit(f)(params)
      outs[impl + "_grad"] = jax.jit(
          jax.grad(lambda p: jnp.sum(jnp.where(mask[:, :, None, None], f(p), 0) ** 2))
      )(params)
    real = np.asarray(mask)
    checks[f"dit_{mode}_fwd"] = rel_err(
        np.asarray(outs["cudnn"])[real], np.asarray(outs["xla"])[real]
    )
    ga = jax.tree_util.tree_leaves(outs["cudnn_grad"])
    gb = jax.tree_util.tree_leaves(outs["xla_grad"])
    checks[f"dit_{mode}_grads_max"] = max(
        rel_err(a, b) for a, b in zip(ga, gb) if float(jnp.linalg.norm(b.astype(jnp.float32))) > 0
    )
  for name, value in checks.items():
    log(f"  cudnn vs xla {name}: rel err {value:.2e}")
  return checks


# ----------------------------------------------------------------------------------------
# Timings
# ----------------------------------------------------------------------------------------


def bench_core(n, seq_len, spec, iters, log, all_gathers=False, fused=False):
  """Global attention core on projected q/k/v: routing, context, attention, totals.

  With `fused`, also the fused kernel (`bench_fused`)."""
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
  gathers = moc.GATHER_METHODS if all_gathers else (spec.gather,)
  for g in gathers:
    ctx = lambda kh, vh, kc, vc, imp: moc.routed_context(
        kh, vh, kc, vc, imp, sel, unsel, None, gather=g
    )[:2]
    res[f"context_{g}_ms"], _, (keys, values) = timeit(ctx, kh, vh, kc, vc, imp, iters=iters)
  attn = lambda q, keys, values: moc.attend_prefix(
      q.reshape(n, seq_len, nh, hd), keys, values, None, impl
  )
  res["routed_attention_ms"], _, _ = timeit(attn, q, keys, values, iters=iters)
  res["context_tokens"] = int(keys.shape[1])
  for g in gathers:
    full = lambda q, kh, vh, kc, vc, anchor, wq, wk: moc.moc_attention(
        q, kh, vh, kc, vc, *routing(anchor, wq, wk), None, implementation=impl, gather=g
    )
    res[f"moc_total_{g}_ms"], _, _ = timeit(full, q, kh, vh, kc, vc, anchor, wq, wk, iters=iters)
    ct = mk(0, (1, n, seq_len, nh, hd))

    def loss(q, kh, vh, kc, vc, anchor, wq, wk):
      return jnp.sum(full(q, kh, vh, kc, vc, anchor, wq, wk).astype(jnp.float32) * ct)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 6, 7))
    res[f"moc_fwd_bwd_{g}_ms"], _, _ = timeit(grad, q, kh, vh, kc, vc, anchor, wq, wk, iters=iters)
  dense = lambda q, kh, vh: moc.dense_global_attention(q, kh, vh, None, impl)
  res["dense_attention_ms"], _, _ = timeit(dense, q, kh, vh, iters=iters)
  if True:
    dgrad = jax.grad(
        lambda q, kh, vh: jnp.sum(dense(q, kh, vh).astype(jnp.float32) * ct), argnums=(0, 1, 2)
    )
    res["dense_fwd_bwd_ms"], _, _ = timeit(dgrad, q, kh, vh, iters=iters)
  if fused:
    res.update(bench_fused((q, kh, vh, kc, vc, anchor, wq, wk), routing, ct, spec, iters, log))
  log(
      f"  N={n} core: "
      + ", ".join(
          f"{k_}={v:.3f}" if isinstance(v, (int, float)) else f"{k_}={v}" for k_, v in res.items()
      )
  )
  return res


def bench_fused(args, routing, ct, spec, iters, log):
  """The fused MoC kernel (gather='fused': Pallas forward and backward, moc_flash's default
  bwd='pallas').

  Times the core forward and forward+backward like the gather path (`moc_total_fused_ms`,
  `moc_fwd_bwd_fused_ms`)
  and records its relative difference to the gather path's output (`fused_rel_err`). The
  kernel's GPU lowering is young (first run on an H200 on 2026-12-01): a failure is recorded
  (`fused_error`) and the rest of the row goes on.
  """
  impl, g = spec.attention_implementation, spec.gather

  def core(gather):
    return lambda q, kh, vh, kc, vc, anchor, wq, wk: moc.moc_attention(
        q, kh, vh, kc, vc, *routing(anchor, wq, wk), None, implementation=impl, gather=gather
    )

  res = {}
  try:
    res["moc_total_fused_ms"], _, out = timeit(core("fused"), *args, iters=iters)
    res["fused_rel_err"] = rel_err(out, jax.jit(core(g))(*args))
    loss = lambda *a: jnp.sum(core("fused")(*a).astype(jnp.float32) * ct)
    # value_and_grad: a training step uses the loss too (with jax.grad alone XLA could drop
    # an unused forward output).
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 6, 7))
    res["moc_fwd_bwd_fused_ms"], _, _ = timeit(grad, *args, iters=iters)
  except Exception as e:  # noqa: BLE001 - record and go on
    res["fused_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(f"  fused MoC kernel failed: {res['fused_error']}")
  return res


def bench_blocks(n, seq_len, spec, iters, log, size="paper"):
  """One local block and one global block (MoC / dense) of the paper DiT."""
  t_c = seq_len + spec.num_compressed + 1
  x = jax.random.normal(jax.random.key(1), (1, n, t_c, spec.width), jnp.float32).astype(
      jnp.bfloat16
  )
  cond = jax.random.normal(jax.random.key(2), (1, 257, spec.cond_dim), jnp.float32).astype(
      jnp.bfloat16
  )
  res = {}
  for name, is_global, mode in (
      ("local", False, "moc"),
      ("global_moc", True, "moc"),
      ("global_dense", True, "dense"),
  ):
    s = spec_for(
        size,
        global_attention=mode,
        gather=spec.gather,
        attention_implementation=spec.attention_implementation,
        dtype="bfloat16",
    )
    block = DiTBlock(s, is_global=is_global, has_skip=False, train=False)
    params = random_params(abstract_params(block, x, cond, None), jax.random.key(3), jnp.bfloat16)
    f = lambda p, x, cond: block.apply({"params": p}, x, cond, None)[0]
    res[f"block_{name}_ms"], _, out = timeit(f, params, x, cond, iters=iters)
    ct = jax.random.normal(jax.random.key(4), out.shape, jnp.float32).astype(out.dtype)
    grad = jax.grad(
        lambda p, x, cond: jnp.sum(f(p, x, cond).astype(jnp.float32) * ct), argnums=(0, 1)
    )
    res[f"block_{name}_fwd_bwd_ms"], _, _ = timeit(grad, params, x, cond, iters=iters)
    del params, out
  log(f"  N={n} blocks: " + ", ".join(f"{k_}={v:.2f}" for k_, v in res.items()))
  return res


def whole_model(
    kind, n, seq_len, mode, *, size="paper", impl="cudnn", gather="hybrid", remat="dots"
):
  """The whole DiT as a function and its abstract arguments.

  kind 'forward': inference forward, bf16 params (deterministic routing).
  kind 'train': loss and gradients of a flow-matching MSE w.r.t. fp32 params, bf16 compute,
    training routing (Gumbel top-k) and random IDs, remat policy `remat` per block.
  Returns (fn, abstract_args, make_args) where make_args() builds concrete arguments.
  The ID codebook is widened to N where N > 50 (the paper's 50; speed is unaffected).
  """
  spec = spec_for(
      size,
      global_attention=mode,
      gather=gather,
      attention_implementation=impl,
      dtype="bfloat16",
      remat=remat if kind == "train" else "none",
      id_codebook=max(50, n),
  )
  model = CompositionalDiT(spec)
  x_shape = (1, n, seq_len, spec.latent_channels)
  cond_shape = (1, 257, spec.cond_dim)
  param_dtype = jnp.float32 if kind == "train" else jnp.bfloat16
  params_abs = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, param_dtype),
      abstract_params(
          model,
          jnp.zeros(x_shape[:1] + (2,) + x_shape[2:]),
          jnp.zeros((1,)),
          jnp.zeros(cond_shape),
          None,
          train=False,
      ),
  )
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  bf16 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  if kind == "forward":

    def fn(p, x, t, cond):
      return model.apply({"params": p}, x, t, cond, None, train=False)

    abstract = (params_abs, f32(x_shape), f32((1,)), bf16(cond_shape))
  elif kind == "train":

    def fn(p, x, t, cond, target, key):
      def loss(p):
        rngs = {"routing": jax.random.fold_in(key, 0), "ids": jax.random.fold_in(key, 1)}
        v = model.apply({"params": p}, x, t, cond, None, train=True, rngs=rngs)
        return jnp.mean(jnp.square(v - target))

      return jax.value_and_grad(loss)(p)

    abstract = (
        params_abs,
        f32(x_shape),
        f32((1,)),
        bf16(cond_shape),
        f32(x_shape),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
  else:
    raise ValueError(f"kind must be 'forward' or 'train', got {kind!r}")

  def make_args():
    params = random_params(params_abs, jax.random.key(3), param_dtype)
    rest = [
        jax.random.normal(jax.random.key(10 + i), a.shape, jnp.float32).astype(a.dtype)
        for i, a in enumerate(abstract[1:4])
    ]
    rest[1] = jnp.array([0.5], jnp.float32)
    if kind == "train":
      rest += [jax.random.normal(jax.random.key(20), x_shape, jnp.float32), jax.random.PRNGKey(21)]
    return (params, *rest)

  return fn, abstract, make_args


def memory_gib(compiled) -> Optional[dict]:
  """XLA's compile-time memory analysis in GiB: arguments, outputs, temporaries, total."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pragma: no cover - backend without the analysis
    return None
  if m is None:
    return None
  gib = lambda v: float(v) / 2**30
  arg, out, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = getattr(m, "alias_size_in_bytes", 0)
  return {
      "arguments": gib(arg),
      "outputs": gib(out),
      "temp": gib(tmp),
      "total": gib(arg + out + tmp - alias),
  }


def compile_whole(kind, n, seq_len, mode, size, impl, gather, remat):
  """Compiles a whole-model function from abstract arguments: (compiled, seconds, memory)."""
  fn, abstract, make_args = whole_model(
      kind, n, seq_len, mode, size=size, impl=impl, gather=gather, remat=remat
  )
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*abstract).compile()
  return compiled, time.perf_counter() - t0, memory_gib(compiled), make_args


def bench_whole(
    kind,
    n,
    seq_len,
    mode,
    iters,
    log,
    *,
    size="paper",
    impl="cudnn",
    gather="hybrid",
    remat="dots",
    limit_gib=None,
    max_run_s=60.0,
):
  """Compiles, checks the memory analysis against the device, runs and times one job."""
  compiled, compile_s, mem, make_args = compile_whole(
      kind, n, seq_len, mode, size, impl, gather, remat
  )
  if kind == "train" and remat != "full" and limit_gib and mem and mem["total"] > limit_gib:
    log(
        f"  L={seq_len} N={n} {mode} train: remat={remat} needs {mem['total']:.1f} GiB; "
        "trying remat=full"
    )
    remat = "full"
    compiled, compile_s, mem, make_args = compile_whole(
        kind, n, seq_len, mode, size, impl, gather, remat
    )
  res = {"compile_s": compile_s, "memory_gib": mem, "remat": remat if kind == "train" else "none"}
  if limit_gib and mem and mem["total"] > limit_gib:
    res["fits"] = False
    log(f"  L={seq_len} N={n} {mode} {kind}: needs {mem['total']:.1f} GiB > {limit_gib:.1f} GiB")
    return res
  args = make_args()
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - t0
  reps = max(3, min(iters, int(max_run_s / max(first, 1e-3))))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  leaves = jax.tree_util.tree_leaves(out)
  finite = all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
  res.update(
      fits=True,
      ms=1e3 * statistics.median(times),
      runs=reps,
      finite=finite,
      params=sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(args[0])),
  )
  del args, out
  peak = f", {mem['total']:.1f} GiB" if mem else ""
  log(
      f"  L={seq_len} N={n} {mode} {kind}: {res['ms']:.1f} ms (median of {reps}, compile "
      f"{compile_s:.0f} s{peak}, finite={finite})"
  )
  return res


def compile_only_main(spec_json: str) -> None:
  """Worker: compile one whole-model job (filling the persistent cache); print its memory.

  Kind 'parts' compiles the core and block functions of one (L, N) instead."""
  job = json.loads(spec_json)
  if job["kind"] == "parts":
    global COMPILE_ONLY
    COMPILE_ONLY = True
    t0 = time.perf_counter()
    sp = spec_for(
        job["size"],
        attention_implementation=job["impl"],
        gather=job["gather"],
        dtype="bfloat16",
        id_codebook=max(50, job["n"]),
    )
    try:
      if job.get("core", True):
        bench_core(
            job["n"],
            job["seq_len"],
            sp,
            1,
            lambda msg: None,
            job.get("all_gathers", False),
            job.get("fused", False),
        )
      bench_blocks(job["n"], job["seq_len"], sp, 1, lambda msg: None, job["size"])
      print("RESULT " + json.dumps({"compile_s": time.perf_counter() - t0}), flush=True)
    except Exception as e:  # noqa: BLE001
      print("RESULT " + json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
    return
  try:
    _, compile_s, mem, _ = compile_whole(
        job["kind"],
        job["n"],
        job["seq_len"],
        job["mode"],
        job["size"],
        job["impl"],
        job["gather"],
        job["remat"],
    )
    print("RESULT " + json.dumps({"compile_s": compile_s, "memory_gib": mem}), flush=True)
  except Exception as e:  # recorded by the parent (e.g. out of memory at compile time)
    print("RESULT " + json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)


def precompile(jobs, workers, cache_dir, timeout_s, log):
  """Compiles whole-model jobs in parallel worker processes into the persistent cache.

  Returns {job key: worker result}. Timing runs afterwards in the parent, alone on the GPU;
  the cache turns its compiles into loads.
  """
  env = dict(
      os.environ,
      XLA_PYTHON_CLIENT_PREALLOCATE="false",
      PYTHONUNBUFFERED="1",
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  procs, results, pending = {}, {}, list(jobs)
  deadline = time.time() + timeout_s
  while pending or procs:
    while pending and len(procs) < workers:
      key, job = pending.pop(0)
      cmd = [sys.executable, os.path.abspath(__file__), "--compile_only", json.dumps(job)]
      job_env = dict(env)
      if job.get("xla_flags"):
        job_env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + job["xla_flags"]).strip()
      procs[key] = subprocess.Popen(
          cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env
      )
    for key, proc in list(procs.items()):
      if proc.poll() is None and time.time() < deadline:
        continue
      killed = proc.poll() is None
      if killed:
        proc.kill()
      out, err = proc.communicate()
      line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
      if line:
        results[key] = json.loads(line[7:])
      elif killed:
        results[key] = {"error": "deadline", "deadline": True}
      else:
        results[key] = {"error": (err.strip().splitlines() or ["no output"])[-1][:300]}
      log(f"  precompiled {key}: {results[key]}")
      del procs[key]
    time.sleep(0.5)
  return results


def parse_grid(text: str, kinds: list) -> dict:
  """'64,128' (every kind) or 'train:64,128;forward:128,512' -> {kind: [N, ...]}."""
  if ":" not in text:
    return {k: [int(v) for v in text.split(",") if v] for k in kinds if k}
  out = {}
  for part in text.split(";"):
    kind, ns = part.split(":")
    if kind in kinds:
      out[kind] = [int(v) for v in ns.split(",") if v]
  return out


def job_key(kind, seq_len, n, mode):
  return f"{kind}/L{seq_len}/N{n}/{mode}"


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def write_atomic(path, text):
  """Writes `text` to `path` atomically (moca_jax.io)."""
  mio.atomic_write_text(path, text)


TARGETS = (  # (name, N, field, comparison, value): the issue's targets on one H100
    ("MoC global core >= 4x faster than dense global attention", 32, "core_speedup", ">=", 4.0),
    ("MoC global core >= 7x faster than dense global attention", 64, "core_speedup", ">=", 7.0),
    ("routing + gather <= 15% of the MoC global core", 32, "routing_gather_share", "<=", 0.15),
    ("whole DiT forward >= 1.8x faster than the dense DiT", 32, "forward_speedup", ">=", 1.8),
)


def derived(row: dict, gather: str) -> dict:
  """Ratios of one (L, N) row: core speed-up, routing+gather share, forward/train speed-ups."""
  out = {}
  total = row.get(f"moc_total_{gather}_ms")
  if total and row.get("dense_attention_ms"):
    out["core_speedup"] = row["dense_attention_ms"] / total
    out["routing_gather_share"] = (row["routing_ms"] + row[f"context_{gather}_ms"]) / total
  for kind in ("forward", "train"):
    moc_r, dense_r = row.get(f"{kind}_moc", {}), row.get(f"{kind}_dense", {})
    if moc_r.get("ms") and dense_r.get("ms"):
      out[f"{kind}_speedup"] = dense_r["ms"] / moc_r["ms"]
  return out


def _fmt(v, spec=".1f"):
  return "-" if v is None else format(v, spec)


def markdown(report) -> str:
  dev, g = report["device"], report["gather"]
  lines = [
      f"# MoC vs dense global attention: scaling with N ({report.get('size', 'paper')}-size DiT, {dev})",
      "",
      f"Machine: {dev}, {report['platform']}; jax {report['jax']}; {report.get('date', '')}. "
      f"bf16 compute, {report.get('implementation', 'cudnn')} attention, random weights, "
      f"B = 1 object, no CFG batch, k = {report.get('top_k')}, m = {report.get('num_compressed')}. "
      "Times are medians after warm-up, compile excluded, with block_until_ready. "
      "Memory is XLA's compile-time analysis (arguments + outputs + temporaries) against the "
      f"device's {_fmt(report.get('limit_gib'))} GiB allocator limit. Forward: bf16 weights, "
      "evaluation routing. Train step: loss and gradients of a flow-matching MSE w.r.t. fp32 "
      "weights, Gumbel routing, per-block remat (policy in the table).",
      "",
  ]
  rows = report["rows"]
  keys = sorted(rows, key=lambda k: (-int(k.split("/")[0][1:]), int(k.split("/")[1][1:])))
  for seq_len in sorted({int(k.split("/")[0][1:]) for k in keys}, reverse=True):
    sub = [(int(k.split("/")[1][1:]), rows[k]) for k in keys if k.startswith(f"L{seq_len}/")]
    pc = seq_len == 1024
    has_train = any(f"train_{m}" in r for _, r in sub for m in ("moc", "dense"))
    train_head = (
        " train step MoC | train step dense | dense / MoC | memory train MoC / dense (GiB) | remat |"
        if has_train
        else ""
    )
    lines += [
        f"## L = {seq_len}: whole DiT (ms)",
        "",
        "| N | forward MoC | forward dense | dense / MoC | memory fwd MoC / dense (GiB) |"
        + train_head
        + (" PartCrafter compiled / eager fwd (H100, others) |" if pc else ""),
        "|---|---|---|---|---|" + ("---|" * 5 if has_train else "") + ("---|" if pc else ""),
    ]
    for n, r in sub:
      d = derived(r, g)
      cell = lambda kind, mode: (
          lambda x: "OOM"
          if x.get("fits") is False
          else ("err" if "error" in x else _fmt(x.get("ms")))
      )(r.get(f"{kind}_{mode}", {}))
      mem = lambda kind, mode: _fmt(
          (r.get(f"{kind}_{mode}", {}).get("memory_gib") or {}).get("total")
      )
      ratio = lambda kind: f"{d[kind + '_speedup']:.2f}x" if f"{kind}_speedup" in d else "-"
      remat = r.get("train_moc", {}).get("remat") or r.get("train_dense", {}).get("remat") or "-"
      line = (
          f"| {n} | {cell('forward', 'moc')} | {cell('forward', 'dense')} | {ratio('forward')} | "
          f"{mem('forward', 'moc')} / {mem('forward', 'dense')} |"
      )
      if has_train:
        line += (
            f" {cell('train', 'moc')} | {cell('train', 'dense')} | {ratio('train')} | "
            f"{mem('train', 'moc')} / {mem('train', 'dense')} | {remat} |"
        )
      if pc:
        line += (
            f" {_fmt(PARTCRAFTER_H100['compile'].get(n))} / "
            f"{_fmt(PARTCRAFTER_H100['eager'].get(n))} |"
        )
      lines.append(line)
    lines += [
        "",
        f"## L = {seq_len}: blocks and the global-attention core (ms)",
        "",
        "| N | local block | global block MoC | global block dense | routing | context (gather) | routed attention | MoC core | dense core | core speed-up | routing+gather share | MoC core fwd+bwd | dense core fwd+bwd | fwd+bwd speed-up | context tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in sub:
      if "routing_ms" not in r:
        continue
      d = derived(r, g)
      fb_m, fb_d = r.get(f"moc_fwd_bwd_{g}_ms"), r.get("dense_fwd_bwd_ms")
      lines.append(
          f"| {n} | {_fmt(r.get('block_local_ms'), '.2f')} | {_fmt(r.get('block_global_moc_ms'), '.2f')} | "
          f"{_fmt(r.get('block_global_dense_ms'), '.2f')} | {r['routing_ms']:.3f} | "
          f"{r[f'context_{g}_ms']:.3f} | {r['routed_attention_ms']:.3f} | {r[f'moc_total_{g}_ms']:.3f} | "
          f"{r['dense_attention_ms']:.3f} | {d['core_speedup']:.2f}x | {100 * d['routing_gather_share']:.0f}% | "
          f"{_fmt(fb_m, '.3f')} | {_fmt(fb_d, '.3f')} | "
          f"{(f'{fb_d / fb_m:.2f}x' if fb_m and fb_d else '-')} | {r['context_tokens']} |"
      )
    fz = [(n, r) for n, r in sub if "moc_total_fused_ms" in r or "fused_error" in r]
    if fz:
      lines += [
          "",
          f"## L = {seq_len}: fused MoC kernel (ms; Pallas forward and backward)",
          "",
          f"| N | MoC core ({g}) | MoC core fused | {g} / fused | fwd+bwd ({g}) | fwd+bwd fused | "
          "rel. diff. to the gather path |",
          "|---|---|---|---|---|---|---|",
      ]
      for n, r in fz:
        if "fused_error" in r:
          lines.append(
              f"| {n} | {_fmt(r.get(f'moc_total_{g}_ms'), '.3f')} | failed: "
              f"{r['fused_error'][:80]} | - | - | - | - |"
          )
          continue
        mg, mf = r.get(f"moc_total_{g}_ms"), r["moc_total_fused_ms"]
        ratio = f"{mg / mf:.2f}x" if mg and mf else "-"
        lines.append(
            f"| {n} | {_fmt(mg, '.3f')} | {mf:.3f} | {ratio} | "
            f"{_fmt(r.get(f'moc_fwd_bwd_{g}_ms'), '.3f')} | "
            f"{_fmt(r.get('moc_fwd_bwd_fused_ms'), '.3f')} | "
            f"{_fmt(r.get('fused_rel_err'), '.1e')} |"
        )
    fb = [(n, r) for n, r in sub if "block_local_fwd_bwd_ms" in r]
    if fb:
      lines += [
          "",
          f"## L = {seq_len}: one block, forward+backward (ms; gradients of weights and input)",
          "",
          "| N | local block | global block MoC | global block dense | dense / MoC (global) |",
          "|---|---|---|---|---|",
      ]
      for n, r in fb:
        gm, gd = r.get("block_global_moc_fwd_bwd_ms"), r.get("block_global_dense_fwd_bwd_ms")
        lines.append(
            f"| {n} | {r['block_local_fwd_bwd_ms']:.2f} | {_fmt(gm, '.2f')} | "
            f"{_fmt(gd, '.2f')} | {(f'{gd / gm:.2f}x' if gm and gd else '-')} |"
        )
    lines.append("")
  lines += [
      "Routing+gather share = (routing + context) / MoC core, each timed alone. The core "
      "works on projected q/k/v (no projections); the blocks include projections, "
      "cross-attention and MLP.",
      "",
  ]
  largest = report.get("largest_n", {})
  if largest:
    lines += [
        f"## Largest N that fits (one object, L = {report.get('largest_seq_len', 1024)})",
        "",
        "| job | attention | memory by N (GiB; XLA analysis) | largest N that fits |",
        "|---|---|---|---|",
    ]
    for key in sorted(largest):
      kind, mode = key.split("/")
      entry = largest[key]
      grid = ", ".join(
          f"{n}: {v}" for n, v in sorted(entry["grid"].items(), key=lambda kv: int(kv[0]))
      )
      lines.append(
          f"| {kind} | {mode} | {grid} | {entry.get('largest', '-')}"
          f"{'' if entry.get('bounded') else ' or more'} |"
      )
    lines += [
        "",
        "A grid point fits when XLA's memory analysis of the compiled job is under the "
        "allocator limit; 'or more' means every grid point fitted. Train jobs here: loss "
        f"and gradients with remat={report.get('largest_remat', 'full')}. Forward: bf16 "
        "weights.",
        "",
    ]
  lines += ["## Targets (one H100)", "", "| target | N | measured | verdict |", "|---|---|---|---|"]
  for name, n, field, op, value in TARGETS:
    r = rows.get(f"L1024/N{n}")
    got = derived(r, g).get(field) if r else None
    if got is None:
      lines.append(f"| {name} | {n} | not measured | - |")
      continue
    ok = got >= value if op == ">=" else got <= value
    shown = f"{100 * got:.0f}%" if field.endswith("share") else f"{got:.2f}x"
    want = f"{100 * value:.0f}%" if field.endswith("share") else f"{value:.1f}x"
    verdict = "met" if ok else f"missed (target {op} {want})"
    lines.append(f"| {name} | {n} | {shown} | {verdict} |")
  if report.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
  lines += [
      "",
      "Why a target is missed, and what would close the gap: "
      "`attention_analysis.md` beside this file.",
      "",
      "PartCrafter numbers: its own PyTorch DiT (1.44 B parameters, same layout), measured "
      "by others on one H100 (shared/paper/NOTES.md), not in this run.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ns", default="4,8,16,32,64")
  parser.add_argument("--seq_lens", default="1024,512")
  parser.add_argument("--train_seq_lens", default="1024", help="L values with a train-step job")
  parser.add_argument("--size", default="paper", help="'tiny' for a CPU dry run")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument(
      "--gather",
      default="hybrid",
      choices=moc.MOC_GATHERS,
      help="the MoC context path of the whole-model jobs ('fused': the Pallas kernel; the core "
      "job times it with --fused)",
  )
  parser.add_argument("--gather_variants", action="store_true", help="time every gather method")
  parser.add_argument(
      "--fused",
      default="auto",
      choices=("auto", "on", "off"),
      help="also time the fused MoC kernel in the core job (auto: on a GPU; on: also on a CPU, "
      "in Pallas interpret mode, slow)",
  )
  parser.add_argument("--remat", default="dots", help="train-step remat (paper config: dots)")
  parser.add_argument("--checks", action="store_true", help="cudnn vs xla checks first")
  parser.add_argument("--jobs", default="core,blocks,forward,train")
  parser.add_argument("--modes", default="moc,dense")
  parser.add_argument(
      "--largest_grid",
      default="64,128,256,512",
      help="N values (besides --ns) for the largest-N search, for every kind "
      "or per kind ('train:64,128;forward:128,512'); '' to skip",
  )
  parser.add_argument("--largest_kinds", default="train,forward")
  parser.add_argument("--largest_remat", default="full", help="train-step remat in the search")
  parser.add_argument(
      "--precompile_s",
      type=float,
      default=0,
      help="deadline of the parallel compile phase (0: budget_s / 2)",
  )
  parser.add_argument("--workers", type=int, default=0, help="parallel precompile processes")
  parser.add_argument("--budget_s", type=float, default=1e9, help="start no new job after this")
  parser.add_argument("--resume", default="", help="earlier JSON whose finished jobs are kept")
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--name", default="attention_scaling")
  parser.add_argument("--compile_only", default="", help=argparse.SUPPRESS)
  parser.add_argument("--render", default="", help="rewrite the markdown of this JSON and exit")
  args = parser.parse_args(argv)
  if args.gather == "fused" and {"core", "blocks"} & set(args.jobs.split(",")):
    parser.error("--gather=fused is for the whole-model jobs; the core job times the fused "
                 "kernel with --fused=on beside a gather path")
  if args.compile_only:
    return compile_only_main(args.compile_only)
  if args.render:
    with open(args.render) as f:
      report = json.load(f)
    write_atomic(args.render[: -len(".json")] + ".md", markdown(report))
    return None

  start = time.time()
  log = lambda msg: print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)
  dev = jax.devices()[0]
  device = f"{dev.device_kind} ({dev.platform})"
  log(f"device: {device}; jax {jax.__version__}")
  if dev.platform != "gpu":
    log("warning: not a GPU; cudnn is unavailable, using xla (numbers are not the benchmark)")
  impl = "cudnn" if dev.platform == "gpu" else "xla"
  fused = args.fused == "on" or (args.fused == "auto" and dev.platform == "gpu")
  spec = spec_for(args.size, attention_implementation=impl, gather=args.gather, dtype="bfloat16")
  stats = (dev.memory_stats() or {}) if hasattr(dev, "memory_stats") else {}
  report = {"rows": {}, "largest_n": {}}
  if args.resume and os.path.exists(args.resume):
    with open(args.resume) as f:
      report.update(json.load(f))
  report.update(
      {
          "device": device,
          "platform": platform.platform(),
          "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "iters": args.iters,
          "gather": args.gather,
          "fused": fused,
          "implementation": impl,
          "size": args.size,
          "top_k": spec.top_k,
          "num_compressed": spec.num_compressed,
          "limit_gib": stats.get("bytes_limit", 0) / 2**30 or None,
          "partcrafter_h100_ms_measured_by_others": PARTCRAFTER_H100,
      }
  )
  limit = report["limit_gib"]

  def save():
    path = os.path.join(args.out, args.name)
    write_atomic(path + ".json", json.dumps(report, indent=1, sort_keys=True))
    write_atomic(path + ".md", markdown(report))

  if args.checks and dev.platform == "gpu":
    log("checks:")
    report["checks"] = check_backends(log)
    save()
  ns = [int(v) for v in args.ns.split(",") if v]
  seq_lens = [int(v) for v in args.seq_lens.split(",") if v]
  train_lens = {int(v) for v in args.train_seq_lens.split(",") if v}
  jobs = set(args.jobs.split(","))
  modes = args.modes.split(",")
  whole = [
      (kind, seq_len, n, mode)
      for seq_len in seq_lens
      for n in ns
      for kind in ("forward", "train")
      if kind in jobs and (kind == "forward" or seq_len in train_lens)
      for mode in modes
      if f"{kind}_{mode}" not in report["rows"].get(f"L{seq_len}/N{n}", {})
  ]
  grids = parse_grid(args.largest_grid, args.largest_kinds.split(","))
  largest_jobs = [
      (kind, seq_lens[0], n, mode)
      for kind, grid in grids.items()
      for mode in modes
      for n in grid
      if str(n) not in report["largest_n"].get(f"{kind}/{mode}", {}).get("grid", {})
      and (kind, seq_lens[0], n, mode) not in whole
  ]
  report["largest_seq_len"] = seq_lens[0]
  report["largest_remat"] = args.largest_remat
  precompiled = {}
  if args.workers and (whole or largest_jobs):
    import tempfile as _tf

    cache = _tf.mkdtemp(prefix="jax_cache_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # The largest-N jobs only need the memory analysis: no autotuning (which would also
    # allocate its large test buffers in every worker at once). Their cache entries are
    # never used for timing.
    no_tune = "--xla_gpu_autotune_level=0" if dev.platform == "gpu" else ""
    todo = [
        (
            job_key(*j),
            dict(
                kind=j[0],
                seq_len=j[1],
                n=j[2],
                mode=j[3],
                size=args.size,
                impl=impl,
                gather=args.gather,
                remat=args.remat if j in whole else args.largest_remat,
                xla_flags="" if j in whole else no_tune,
            ),
        )
        for j in whole + largest_jobs
    ]
    # the core and block functions of every (L, N) row still to time, one worker each
    parts = [
        (seq_len, n)
        for seq_len in seq_lens
        for n in ns
        if ("core" in jobs and "routing_ms" not in report["rows"].get(f"L{seq_len}/N{n}", {}))
        or (
            "blocks" in jobs
            and "block_local_fwd_bwd_ms" not in report["rows"].get(f"L{seq_len}/N{n}", {})
        )
    ]
    todo[:0] = [
        (
            f"parts/L{seq_len}/N{n}",
            dict(
                kind="parts",
                seq_len=seq_len,
                n=n,
                size=args.size,
                impl=impl,
                gather=args.gather,
                all_gathers=args.gather_variants,
                fused=fused,
                core="core" in jobs
                and "routing_ms" not in report["rows"].get(f"L{seq_len}/N{n}", {}),
            ),
        )
        for seq_len, n in parts
    ]
    log(f"precompiling {len(todo)} whole-model jobs in {args.workers} processes")
    precompiled = precompile(
        todo, args.workers, cache, args.precompile_s or max(60.0, args.budget_s / 2), log
    )

  for kind, seq_len, n, mode in largest_jobs:
    r = precompiled.get(job_key(kind, seq_len, n, mode))
    if r is None or r.get("deadline"):  # not compiled in time: left for a later run
      continue
    entry = report["largest_n"].setdefault(f"{kind}/{mode}", {"grid": {}})
    mem = (r.get("memory_gib") or {}).get("total")
    entry["grid"][str(n)] = f"{mem:.1f}" if mem is not None else "compile failed"

  for seq_len in seq_lens:
    for n in ns:
      if time.time() - start > args.budget_s:
        log(f"budget reached: L={seq_len} N={n} and later not run")
        save()
        break
      row = report["rows"].setdefault(f"L{seq_len}/N{n}", {})
      sp = spec_for(
          args.size,
          attention_implementation=impl,
          gather=args.gather,
          dtype="bfloat16",
          id_codebook=max(50, n),
      )
      try:
        if "core" in jobs and "routing_ms" not in row:
          row.update(bench_core(n, seq_len, sp, args.iters, log, args.gather_variants, fused))
        if "blocks" in jobs and "block_local_fwd_bwd_ms" not in row:
          row.update(bench_blocks(n, seq_len, sp, args.iters, log, args.size))
      except Exception as e:  # noqa: BLE001 - record and go on
        row["core_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  L={seq_len} N={n} core/blocks failed: {row['core_error']}")
      save()
      for kind, l_, n_, mode in whole:
        if (l_, n_) != (seq_len, n) or time.time() - start > args.budget_s:
          continue
        try:
          row[f"{kind}_{mode}"] = bench_whole(
              kind,
              n,
              seq_len,
              mode,
              args.iters,
              log,
              size=args.size,
              impl=impl,
              gather=args.gather,
              remat=args.remat,
              limit_gib=limit,
          )
        except Exception as e:  # noqa: BLE001 - an OOM at run time is a result
          row[f"{kind}_{mode}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
          log(f"  L={seq_len} N={n} {mode} {kind} failed: {row[f'{kind}_{mode}']['error']}")
        save()
        jax.clear_caches()
  # Largest N: the main rows and the grid, by memory analysis against the allocator limit.
  for kind in args.largest_kinds.split(","):
    for mode in modes:
      entry = report["largest_n"].setdefault(f"{kind}/{mode}", {"grid": {}})
      for key, row in report["rows"].items():
        if key.startswith(f"L{seq_lens[0]}/") and (row.get(f"{kind}_{mode}") or {}).get(
            "memory_gib"
        ):
          entry["grid"][key.split("/N")[1]] = f"{row[f'{kind}_{mode}']['memory_gib']['total']:.1f}"
      fits = [
          int(n)
          for n, v in entry["grid"].items()
          if v not in ("compile failed",) and limit and float(v) <= limit
      ]
      entry["largest"] = max(fits) if fits else None
      entry["bounded"] = any(int(n) > (entry["largest"] or 0) for n in entry["grid"])
  save()
  log("")
  log(markdown(report))


if __name__ == "__main__":
  main()
