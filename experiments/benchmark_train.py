r"""Training-step benchmark of the image-conditioned DiT on one device (the single-GPU
baseline for the multi-GPU issue).

  python -m experiments.benchmark_train --sizes=small,paper --components=16,32 \
      --attention=moc,dense --steps=10 --budget_s=480

For each (size, N, global attention) it builds the real train step (AdamW, EMA, bf16 compute
with fp32 params, remat from the config), compiles it ahead of time and reports: compile
time, step time (median of --steps timed steps after 2 warm-up steps), throughput in
component tokens per second (B * N * L / step time), model FLOPs per step (XLA's count of
the unoptimised forward+backward with XLA attention and no remat), MFU against a measured
bf16 matmul peak, XLA's memory analysis and the device's peak memory. Each configuration
runs in its own process (clean peak-memory reading; an out-of-memory failure is recorded
instead of ending the run). --workers K first compiles every job in K parallel processes
into a persistent compilation cache, so the timed runs (one at a time) mostly load.
--sample_components N times one 50-step CFG sampling run of the largest size.

Writes experiments/results/benchmark_train.{md,json} (or --out) naming the device; prints the
table. On CPU use --sizes=tiny for a smoke test (numbers meaningless).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

from moca_jax import io as mio  # numpy only: jax is imported later, per job

# Batch per size so that B * N is constant across N (same number of component tokens).
COMPONENT_BUDGET = {"tiny": 8, "small": 128, "paper": 32}


def _measure_matmul_peak(jax, jnp, n: int = 8192, reps: int = 20) -> float:
  """bf16 matmul TFLOP/s on the default device: median of reps, random operands (zeros and
  ones run faster than real data), rotating over three input pairs."""
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  mats = [jax.random.normal(k, (n, n), jnp.float32).astype(jnp.bfloat16) for k in keys]
  f = jax.jit(lambda x, y: x @ y)
  f(mats[0], mats[1]).block_until_ready()
  times = []
  for i in range(reps):
    a, b = mats[(2 * i) % 6], mats[(2 * i + 1) % 6]
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times) / 1e12


def _config(size: str, attention: str, remat: str = ""):
  """The size's training config, set up for the benchmark device (bf16 + cuDNN on GPU);
  `remat` overrides the DiT's remat policy."""
  import jax
  from experiments.configs import dit as dit_configs

  cfg = dit_configs.get_config(size)
  cfg.model.dit.global_attention = attention
  if remat:
    cfg.model.dit.remat = remat
  if jax.default_backend() == "gpu":  # the encoder keeps its config's attention backend
    cfg.model.dit.dtype = cfg.model.encoder.dtype = "bfloat16"
    cfg.model.dit.attention_implementation = "cudnn"
  return cfg


def _batch_spec(cfg, b: int, n: int) -> dict:
  import jax
  import numpy as np

  dit, enc = cfg.model.dit, cfg.model.encoder
  return {
      "latents": jax.ShapeDtypeStruct((b, n, dit.latent_tokens, dit.latent_channels), np.float32),
      "component_mask": jax.ShapeDtypeStruct((b, n), np.bool_),
      "images": jax.ShapeDtypeStruct((b, enc.image_size, enc.image_size, 3), np.uint8),
  }


def model_flops(size: str, n: int, attention: str, b: int) -> float:
  """FLOPs of one training step's forward+backward as the model defines them: XLA's count
  of the unoptimised step with XLA attention and no remat (so attention is counted and
  recomputation is not). The numerator of MFU."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from moca_jax import dit_task

  cfg = _config(size, attention)
  cfg.model.dit.attention_implementation = "xla"
  cfg.model.dit.remat = "none"
  cfg.model.encoder.remat = False
  spec = _batch_spec(cfg, b, n)
  _, init_fn, loss_fn = dit_task.make_task(cfg)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), spec)
  params = jax.eval_shape(lambda r: nn.meta.unbox(init_fn(r, zeros)["params"]), rng)
  grad = jax.grad(lambda p, batch, r: loss_fn(p, batch, r)[0])
  cost = jax.jit(grad).lower(params, spec, rng).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _total_mib(mem: dict) -> float:
  return (
      mem.get("argument_size_mib", 0)
      + mem.get("output_size_mib", 0)
      + mem.get("temp_size_mib", 0)
      - mem.get("alias_size_mib", 0)
  )


def compile_one(size: str, n: int, attention: str, batch: Optional[int] = None) -> dict:
  """Compiles the init and train step from abstract values only (nothing allocated): fills
  the persistent compilation cache for `run_one`, and counts the model FLOPs. When XLA's
  memory analysis of the step exceeds the device's allocator limit under the config's remat
  policy, compiles with remat='full' instead and says so ('remat' in the result)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  limit_mib = stats.get("bytes_limit", 0) / 2**20
  out = _compile_step(size, n, attention, batch, "")
  if limit_mib and _total_mib(out["memory_analysis_mib"]) > limit_mib:
    first = out
    out = _compile_step(size, n, attention, batch, "full")
    out["remat_note"] = (
        f"config remat needs {_total_mib(first['memory_analysis_mib']) / 1024:.1f}"
        f" GiB > {limit_mib / 1024:.1f} GiB: remat=full"
    )
  return out


def _compile_step(size: str, n: int, attention: str, batch: Optional[int], remat: str) -> dict:
  import jax
  from moca_jax import dit_task, sharding, train_lib

  cfg = _config(size, attention, remat)
  b = batch or max(1, COMPONENT_BUDGET[size] // n)
  spec = _batch_spec(cfg, b, n)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  _, init_fn, loss_fn = dit_task.make_task(cfg)
  tx = train_lib.make_optimizer(cfg.optim)
  t0 = time.perf_counter()
  rng = jax.random.PRNGKey(0)
  shardings, names, init_state = train_lib.state_shardings(init_fn, tx, spec, rng, mesh)
  jax.jit(init_state, out_shardings=shardings).lower(rng).compile()
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init_state, rng),
      shardings,
  )
  setup = train_lib.StateSetup(
      shardings=shardings, abstract_state=abstract_state, param_names=names
  )
  _, mem = train_lib.compile_train_step(
      loss_fn, tx, train_lib.make_schedule(cfg.optim), cfg.optim.ema_decay, setup, spec, mesh
  )
  return dict(
      compile_s=time.perf_counter() - t0, memory_analysis_mib=mem, remat=cfg.model.dit.remat
  )


def time_steps(step, state, batch, key, steps: int, warmup: int = 2):
  """Times a compiled train step alone: `warmup` untimed calls, then `steps` calls each
  waited for (the loss). state is donated and threaded through. Returns (state, metrics,
  per-step seconds)."""
  import jax

  metrics = None
  for _ in range(warmup):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  return state, metrics, times


def run_one(
    size: str, n: int, attention: str, steps: int, batch: Optional[int] = None, remat: str = ""
) -> dict:
  """Builds, compiles and times one configuration in this process."""
  import jax
  import numpy as np
  from moca_jax import dit_task, sharding, train_lib

  cfg = _config(size, attention, remat)
  b = batch or max(1, COMPONENT_BUDGET[size] // n)
  dit = cfg.model.dit
  enc = cfg.model.encoder
  rng = np.random.default_rng(0)
  host = {
      "latents": rng.normal(size=(b, n, dit.latent_tokens, dit.latent_channels)).astype(np.float32),
      "component_mask": np.ones((b, n), bool),
      "images": rng.integers(0, 255, size=(b, enc.image_size, enc.image_size, 3), dtype=np.uint8),
  }
  spec = _batch_spec(cfg, b, n)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  _, init_fn, loss_fn = dit_task.make_task(cfg)
  tx = train_lib.make_optimizer(cfg.optim)
  t0 = time.perf_counter()
  state, setup = train_lib.create_train_state(init_fn, tx, spec, jax.random.PRNGKey(0), mesh)
  jax.block_until_ready(state)
  t_init = time.perf_counter() - t0
  t0 = time.perf_counter()
  step, mem = train_lib.compile_train_step(
      loss_fn, tx, train_lib.make_schedule(cfg.optim), cfg.optim.ema_decay, setup, spec, mesh
  )
  t_compile = time.perf_counter() - t0
  try:
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
  except Exception:
    flops = 0.0
  batch_dev = sharding.shard_batch(host, mesh)
  state, metrics, times = time_steps(step, state, batch_dev, jax.random.PRNGKey(1), steps)
  step_s = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  out = dict(
      size=size,
      components=n,
      attention=attention,
      batch=b,
      remat=dit.remat,
      latent_tokens=dit.latent_tokens,
      width=dit.width,
      blocks=dit.num_blocks,
      params=train_lib.count_params(state.params),
      init_s=t_init,
      compile_s=t_compile,
      step_ms=1e3 * step_s,
      step_ms_min=1e3 * min(times),
      tokens_per_s=b * n * dit.latent_tokens / step_s,
      flops_per_step=flops,
      loss=float(metrics["loss"]),
      memory_analysis_mib=mem,
      peak_mem_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
  )
  return out


def sample_one(size: str, n: int, steps: int = 50, compile_only: bool = False) -> dict:
  """Latency of one 50-step CFG sampling run (batch 1, image encoder included), random
  weights and a random image."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from moca_jax import dit_task, pipeline

  cfg = _config(size, "moc")
  model = dit_task.ImageConditionedDiT(cfg.model)
  enc, dit = cfg.model.encoder, cfg.model.dit
  images = jax.random.uniform(jax.random.PRNGKey(5), (1, enc.image_size, enc.image_size, 3))
  x = jnp.zeros((1, n, dit.latent_tokens, dit.latent_channels))  # shape template for init
  init = jax.jit(
      lambda r: nn.meta.unbox(
          model.init(r, images, x, jnp.zeros((1,)), jnp.ones((1, n), bool))["params"]
      )
  )
  fn = jax.jit(
      lambda p, im, key, s: pipeline.sample_latents(
          model, p, im, key, num_components=n, steps=steps, cfg_scale=s, return_routing=False
      )[0]
  )
  if compile_only:
    t0 = time.perf_counter()
    init.lower(jax.random.PRNGKey(0)).compile()
    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    fn.lower(params, images, jax.random.PRNGKey(1), 7.0).compile()
    return dict(compile_s=time.perf_counter() - t0)
  params = init(jax.random.PRNGKey(0))
  t0 = time.perf_counter()
  fn(params, images, jax.random.PRNGKey(1), 7.0).block_until_ready()
  first = time.perf_counter() - t0
  times = []
  for i in range(3):
    t = time.perf_counter()
    fn(params, images, jax.random.PRNGKey(2 + i), 7.0).block_until_ready()
    times.append(time.perf_counter() - t)
  return dict(
      size=size,
      components=n,
      steps=steps,
      cfg=True,
      latent_tokens=dit.latent_tokens,
      first_call_s=first,
      latency_s=statistics.median(times),
      per_step_ms=1e3 * statistics.median(times) / steps,
  )


def _device_name() -> str:
  import jax

  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()}"


def _write(out_dir: str, name: str, payload: dict) -> None:
  base = os.path.join(out_dir, name)
  mio.write_json(base + ".json", payload)
  lines = [
      f"# DiT training-step benchmark ({payload['device']})",
      "",
      f"Host: {payload['host']}; jax {payload['jax']}; measured bf16 matmul peak "
      f"{payload.get('matmul_peak_tflops', 0):.0f} TFLOP/s. Step = the full train step "
      "(image encoder + DiT forward/backward, AdamW, EMA), fp32 params, bf16 compute and cuDNN "
      "attention in the DiT on GPU (XLA attention in the image encoder; fp32/XLA on CPU); "
      "median of timed steps after 2 warm-up steps. Tokens = B x N x L component "
      "tokens. MFU = model FLOPs per step / step time / measured matmul peak.",
      "",
      "| size | N | attention | B | params (M) | compile s | step ms | tokens/s | "
      "model TFLOP/step | MFU | peak GiB | DiT remat |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  peak = payload.get("matmul_peak_tflops") or 0
  for r in payload["runs"]:
    if "error" in r:
      lines.append(
          f"| {r['size']} | {r['components']} | {r['attention']} | - | - | - | "
          f"failed: {r['error'][:60]} | | | | | |"
      )
      continue
    mf = r.get("model_flops", 0) / 1e12
    mfu = (mf / (r["step_ms"] / 1e3) / peak) if peak and mf else 0
    lines.append(
        f"| {r['size']} | {r['components']} | {r['attention']} | {r['batch']} | "
        f"{r['params'] / 1e6:.0f} | {r['compile_s']:.0f} | {r['step_ms']:.1f} | "
        f"{r['tokens_per_s']:.0f} | {mf:.1f} | {100 * mfu:.0f}% | "
        f"{r['peak_mem_gib']:.1f} | "
        f"{r.get('remat', '-')} |"
    )
  pairs = {
      (r["size"], r["components"], r["attention"]): r for r in payload["runs"] if "error" not in r
  }
  speedups = [
      f"{size} N={n}: {pairs[(size, n, 'dense')]['step_ms'] / r['step_ms']:.2f}x"
      for (size, n, attn), r in sorted(pairs.items())
      if attn == "moc" and (size, n, "dense") in pairs
  ]
  if speedups:
    lines.append(
        "\nMoC step speed-up over dense (dense step time / MoC step time): "
        + "; ".join(speedups)
        + "."
    )
  lines.append(
      "\nModel FLOPs: XLA's count of the unoptimised forward+backward with XLA "
      "attention and no remat (attention included, recomputation excluded; "
      "`--add_model_flops` counts it on any machine). XLA's count of the compiled GPU "
      "step (`flops_per_step` in the JSON) misses the cuBLAS and cuDNN calls and is "
      "not used. compile s: a cache load when the parallel compile phase "
      "(--workers) finished first."
  )
  for s in payload.get("sampling", []):
    if "error" in s:
      lines.append(
          f"\nSampling {s.get('size')} N={s.get('components')}: failed: {s['error'][:100]}"
      )
    else:
      lines.append(
          f"\nSampling ({s['size']}, N={s['components']}, L={s['latent_tokens']}, "
          f"{s['steps']} Euler steps with CFG, batch 1): {s['latency_s']:.2f} s "
          f"(first call with compile {s['first_call_s']:.0f} s)."
      )
  if payload.get("skipped"):
    lines.append("\nNot run (time budget): " + ", ".join(payload["skipped"]))
  if payload.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {note}" for note in payload["notes"]]
  mio.atomic_write_text(base + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main(argv=None) -> None:
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="small,paper")
  p.add_argument("--components", default="16,32")
  p.add_argument("--attention", default="moc,dense")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", type=int, default=0, help="0: B = budget // N (see COMPONENT_BUDGET)")
  p.add_argument("--budget_s", type=float, default=1e9, help="start no new run after this")
  p.add_argument("--per_run_timeout_s", type=float, default=400)
  p.add_argument("--sample_components", type=int, default=0, help="0: no sampling benchmark")
  p.add_argument("--out", default="experiments/results")
  p.add_argument("--name", default="benchmark_train")
  p.add_argument(
      "--workers",
      type=int,
      default=0,
      help="compile every job first in this many parallel processes",
  )
  p.add_argument("--remat", default="", help="DiT remat override ('' = the config's)")
  p.add_argument("--resume", default="", help="earlier JSON: its finished runs are kept")
  p.add_argument(
      "--add_model_flops",
      default="",
      help="JSON of an earlier run: count model FLOPs for its runs (CPU is fine: "
      "lowering only), rewrite it and its markdown, and exit",
  )
  p.add_argument("--one", default="", help=argparse.SUPPRESS)
  p.add_argument("--compile_one", default="", help=argparse.SUPPRESS)
  p.add_argument("--sample_one", default="", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.one or a.compile_one:
    size, n, attn = (a.one or a.compile_one).split(",")
    fn = (
        (lambda: run_one(size, int(n), attn, a.steps, a.batch or None, a.remat))
        if a.one
        else (lambda: compile_one(size, int(n), attn, a.batch or None))
    )
    print("RESULT " + json.dumps(fn()), flush=True)
    return
  if a.sample_one:
    size, n, *rest = a.sample_one.split(",")
    print(
        "RESULT " + json.dumps(sample_one(size, int(n), compile_only=rest == ["compile"])),
        flush=True,
    )
    return

  if a.add_model_flops:
    with open(a.add_model_flops) as f:
      payload = json.load(f)
    for r in payload["runs"]:
      if "error" not in r and not r.get("model_flops"):
        r["model_flops"] = model_flops(r["size"], r["components"], r["attention"], r["batch"])
        print(
            f"{r['size']} N={r['components']} {r['attention']} B={r['batch']}: "
            f"{r['model_flops'] / 1e12:.1f} TFLOP",
            flush=True,
        )
    _write(
        os.path.dirname(a.add_model_flops) or ".",
        os.path.basename(a.add_model_flops)[: -len(".json")],
        payload,
    )
    return

  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # children need the GPU
  import jax
  import jax.numpy as jnp

  start = time.time()
  payload = {
      "device": _device_name(),
      "host": platform.node() or "?",
      "jax": jax.__version__,
      "python": platform.python_version(),
      "runs": [],
      "sampling": [],
      "skipped": [],
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }
  if a.resume and os.path.exists(a.resume):
    with open(a.resume) as f:
      old = json.load(f)
    payload["runs"] = [r for r in old.get("runs", []) if "error" not in r]
    payload["sampling"] = [r for r in old.get("sampling", []) if "error" not in r]
    payload["earlier"] = {k: old.get(k) for k in ("date", "matmul_peak_tflops", "device")}
  done = {(r["size"], r["components"], r["attention"]) for r in payload["runs"]}
  sampled = {(r["size"], r["components"]) for r in payload["sampling"]}
  if jax.default_backend() == "gpu":
    payload["matmul_peak_tflops"] = _measure_matmul_peak(jax, jnp)
  jobs = [
      (s, int(n), at)
      for s in a.sizes.split(",")
      for at in a.attention.split(",")
      for n in a.components.split(",")
  ]
  # MoC first, largest size first: the numbers that matter most come back even if cut short
  # (dense: largest N first, the comparison that matters most)
  jobs.sort(key=lambda j: (j[2] != "moc", j[0] != "paper", j[1] if j[2] == "moc" else -j[1]))
  jobs = [j for j in jobs if j not in done]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  sample_size = a.sizes.split(",")[-1]
  compiled = {}
  if a.workers:
    import tempfile

    env.update(
        JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="jax_cache_"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    flags = [("--compile_one", f"{s},{n},{at}") for s, n, at in jobs]
    if a.sample_components and (sample_size, a.sample_components) not in sampled:
      flags.append(("--sample_one", f"{sample_size},{a.sample_components},compile"))
    print(f"compiling {len(flags)} jobs in {a.workers} processes", flush=True)
    compiled = dict(zip([v for _, v in flags], _children(flags, a, env, a.workers)))
    for key, r in compiled.items():
      print(f"  compiled {key}: {json.dumps(r)[:300]}", flush=True)

  for size, n, attn in jobs:
    if time.time() - start > a.budget_s:
      payload["skipped"].append(f"{size}/N={n}/{attn}")
      continue
    pre = compiled.get(f"{size},{n},{attn}", {})
    r = _children([("--one", f"{size},{n},{attn}")], a, env, 1, remat=pre.get("remat") or a.remat)[
        0
    ]
    r.update(
        size=size,
        components=n,
        attention=attn,
        model_flops=pre.get("model_flops", 0.0),
        parallel_compile_s=pre.get("compile_s"),
        remat_note=pre.get("remat_note"),
    )
    payload["runs"].append(r)
    print(json.dumps(r), flush=True)
    _write(a.out, a.name, payload)
  if a.sample_components and (sample_size, a.sample_components) not in sampled:
    if time.time() - start <= a.budget_s:
      s = _children([("--sample_one", f"{sample_size},{a.sample_components}")], a, env, 1)[0]
      s.update(size=sample_size, components=a.sample_components)
      payload["sampling"].append(s)
    else:
      payload["skipped"].append(f"sampling {sample_size}/N={a.sample_components}")
  _write(a.out, a.name, payload)


def _children(flags: list, a, env: dict, workers: int, remat: str = "") -> list:
  """Runs `python -m experiments.benchmark_train FLAG VALUE` children, `workers` at a time;
  returns each child's RESULT dict (or {'error': ...}) in order."""
  results: list = [None] * len(flags)
  running: dict = {}
  pending = list(enumerate(flags))
  while pending or running:
    while pending and len(running) < workers:
      i, (flag, value) = pending.pop(0)
      cmd = [
          sys.executable,
          "-m",
          "experiments.benchmark_train",
          flag,
          value,
          f"--steps={a.steps}",
          f"--batch={a.batch}",
          f"--remat={remat or a.remat}",
      ]
      running[i] = (
          subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
          time.time(),
      )
    for i, (proc, t0) in list(running.items()):
      timed_out = time.time() - t0 > a.per_run_timeout_s
      if proc.poll() is None and not timed_out:
        continue
      if proc.poll() is None:
        proc.kill()
      out, err = proc.communicate()
      line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
      if line:
        results[i] = json.loads(line[7:])
      elif timed_out:
        results[i] = {"error": f"timeout after {a.per_run_timeout_s:.0f} s"}
      else:
        tail = (err or out).strip().splitlines()[-3:]
        results[i] = {"error": " | ".join(tail)[-300:] or f"exit {proc.returncode}"}
      del running[i]
    time.sleep(0.2)
  return results


if __name__ == "__main__":
  main()
