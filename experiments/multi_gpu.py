r"""Multi-device checks and scaling of the DiT train step (one process, all local devices).

  python -m experiments.multi_gpu equal --size=small --components=8 --batch=8 --steps=4
  python -m experiments.multi_gpu scale --size=paper --components=16 --batch_per_device=2 \
      --layouts=1x1,2x1,1x2 --steps=8 --out=/tmp/scale.json

equal: trains `--steps` steps of the real train step (AdamW, EMA, the config's dtype) from
  the same initial state on the same global batches with the mesh 1 device, data=2 and
  fsdp=2, and prints the per-step losses and the largest parameter difference against the
  1-device run (JSON on the last line).
scale: for each layout DATAxFSDP (devices used = DATA * FSDP), a fresh subprocess builds
  the sharded state and the compiled step for the global batch batch_per_device * DATA *
  FSDP, times --steps steps (median after 2 warm-ups, block_until_ready) and reads every
  device's peak bytes in use from the runtime (`device.memory_stats()`), beside XLA's
  memory analysis. An out-of-memory run is recorded as such.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _config(size: str, n: int):
  import jax
  from experiments.configs import dit as dit_configs
  cfg = dit_configs.get_config(size)
  cfg.data.max_components = n
  if jax.default_backend() == "gpu":
    cfg.model.dit.dtype = cfg.model.encoder.dtype = "bfloat16"
    cfg.model.dit.attention_implementation = "cudnn"
  return cfg


def _host_batch(cfg, b: int, n: int, seed: int = 0) -> dict:
  import numpy as np
  dit, enc = cfg.model.dit, cfg.model.encoder
  rng = np.random.default_rng(seed)
  mask = np.ones((b, n), bool)
  mask[:, n // 2 + 1:] = rng.random((b, n - n // 2 - 1)) < 0.7   # some padding slots
  return {"latents": rng.normal(size=(b, n, dit.latent_tokens, dit.latent_channels)
                                ).astype(np.float32),
          "component_mask": mask,
          "images": rng.integers(0, 255, size=(b, enc.image_size, enc.image_size, 3),
                                 dtype=np.uint8)}


def _build(cfg, spec, mesh, times: dict | None = None):
  """(sharded state, compiled step, XLA memory analysis); `times` gets init_s / step_compile_s
  (the init's compile and run; the step's lowering and compile)."""
  import jax
  from moca_jax import dit_task, train_lib
  _, init_fn, loss_fn = dit_task.make_task(cfg)
  tx = train_lib.make_optimizer(cfg.optim)
  t0 = time.perf_counter()
  state, setup = train_lib.create_train_state(init_fn, tx, spec, jax.random.PRNGKey(0), mesh)
  jax.block_until_ready(state)
  t1 = time.perf_counter()
  step, mem = train_lib.compile_train_step(loss_fn, tx, train_lib.make_schedule(cfg.optim),
                                           cfg.optim.ema_decay, setup, spec, mesh)
  if times is not None:
    times.update(init_s=t1 - t0, step_compile_s=time.perf_counter() - t1)
  return state, step, mem


def equal(size: str, n: int, batch: int, steps: int) -> dict:
  """Losses and final params of the same run on 1 device, data=2 and fsdp=2."""
  import jax
  import numpy as np
  from moca_jax import sharding
  cfg = _config(size, n)
  batches = [_host_batch(cfg, batch, n, seed=s) for s in range(steps)]
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches[0])
  runs = {}
  for name, (d, f, k) in {"1": (1, 1, 1), "data2": (2, 1, 2), "fsdp2": (1, 2, 2)}.items():
    mesh = sharding.make_mesh(d, f, devices=jax.devices()[:k])
    state, step, _ = _build(cfg, spec, mesh)
    losses = []
    for b in batches:
      state, metrics = step(state, sharding.shard_batch(b, mesh), jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
    runs[name] = (losses, jax.tree.leaves(sharding.to_host(state.params)))
  ref_loss, ref_params = runs["1"]
  out = {"size": size, "components": n, "batch": batch, "steps": steps,
         "dtype": cfg.model.dit.dtype, "device": jax.devices()[0].device_kind,
         "losses": {k: v[0] for k, v in runs.items()}}
  for k in ("data2", "fsdp2"):
    losses, params = runs[k]
    out[f"{k}_max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_loss))
    out[f"{k}_max_param_abs_diff"] = max(float(np.max(np.abs(a - b)))
                                         for a, b in zip(params, ref_params))
    out[f"{k}_param_rel_l2"] = float(
        np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(params, ref_params))
                / sum(np.sum(b.astype(np.float64) ** 2) for b in ref_params)))
  return out


def scale_one(size: str, n: int, batch_per_device: int, data: int, fsdp: int,
              steps: int, compile_only: bool = False) -> dict:
  """Times one layout in this process (see the module docstring). compile_only: build the
  state and compile the step (filling JAX's persistent compilation cache), no steps."""
  import jax
  from moca_jax import sharding, train_lib
  k = data * fsdp
  b = batch_per_device * k
  cfg = _config(size, n)
  host = _host_batch(cfg, b, n)
  host["component_mask"][:] = True
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
  mesh = sharding.make_mesh(data, fsdp, devices=jax.devices()[:k])
  t0 = time.perf_counter()
  times: dict = {}
  state, step, mem = _build(cfg, spec, mesh, times)
  compile_s = time.perf_counter() - t0
  if compile_only:
    return dict(size=size, components=n, data=data, fsdp=fsdp, batch=b, compile_s=compile_s,
                **times)
  dev_batch = sharding.shard_batch(host, mesh)
  from experiments.benchmark_train import time_steps  # pylint: disable=g-import-not-at-top

  state, metrics, step_times = time_steps(step, state, dev_batch, jax.random.PRNGKey(1), steps)
  step_s = statistics.median(step_times)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
           for d in mesh.devices.flat]
  return dict(size=size, components=n, data=data, fsdp=fsdp, devices=k, batch=b,
              batch_per_device=batch_per_device, latent_tokens=cfg.model.dit.latent_tokens,
              params=train_lib.count_params(state.params), compile_s=compile_s, **times,
              step_ms=1e3 * step_s, step_ms_min=1e3 * min(step_times),
              tokens_per_s=b * n * cfg.model.dit.latent_tokens / step_s,
              loss=float(metrics["loss"]), memory_analysis_mib=mem,
              peak_gib_per_device=peaks, device=jax.devices()[0].device_kind)


def init_compile(size: str, n: int, batch: int) -> list[dict]:
  """Compile and run time of the jitted parameter init (one device) under XLA options.

  The flax init is one program with an inlined threefry hash per parameter and scope; this
  measures what XLA's fusion passes cost on it, and the same program on the host CPU.
  """
  import jax
  from moca_jax import dit_task, train_lib
  cfg = _config(size, n)
  _, init_fn, _ = dit_task.make_task(cfg)
  host = _host_batch(cfg, batch, n)
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
  key = jax.random.PRNGKey(0)
  zeros = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), spec)
  fn = lambda r: init_fn(r, zeros)["params"]
  variants = [("default", None, {}),
              ("no_fusion_passes", None,
               {"xla_disable_hlo_passes": "priority-fusion,multi_output_fusion"}),
              ("host_cpu", jax.devices("cpu")[0], {})]
  out = []
  for name, device, options in variants:
    try:
      t0 = time.perf_counter()
      lowered = jax.jit(fn).lower(key if device is None else jax.device_put(key, device))
      t1 = time.perf_counter()
      compiled = lowered.compile(options) if options else lowered.compile()
      t2 = time.perf_counter()
      jax.block_until_ready(compiled(key))
      out.append(dict(variant=name, lower_s=t1 - t0, compile_s=t2 - t1,
                      run_s=time.perf_counter() - t2))
    except Exception as e:  # an option this XLA does not take: recorded, not fatal
      out.append(dict(variant=name, error=str(e).splitlines()[0][:200]))
    print("RESULT " + json.dumps(out[-1]), flush=True)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("mode", choices=("equal", "scale", "one", "init"))
  p.add_argument("--size", default="small")
  p.add_argument("--components", default="16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--batch_per_device", default="2", help="comma list, tried in order")
  p.add_argument("--layouts", default="1x1,2x1,1x2", help="DATAxFSDP, comma separated")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--per_run_timeout_s", type=float, default=300)
  p.add_argument("--out", default="")
  p.add_argument("--compile_only", action="store_true", help="mode one: build, no steps")
  a = p.parse_args(argv)
  if a.mode == "equal":
    res = equal(a.size, int(a.components), a.batch, a.steps)
    print(json.dumps(res))
    return
  if a.mode == "init":
    init_compile(a.size, int(a.components), a.batch)
    return
  if a.mode == "one":
    d, f = (int(x) for x in a.layouts.split("x"))
    res = scale_one(a.size, int(a.components), int(a.batch_per_device), d, f, a.steps,
                    a.compile_only)
    print("RESULT " + json.dumps(res), flush=True)
    return
  results = []
  for n in (int(x) for x in a.components.split(",")):
    for layout in a.layouts.split(","):
      for bpd in a.batch_per_device.split(","):
        cmd = [sys.executable, "-m", "experiments.multi_gpu", "one", f"--size={a.size}",
               f"--components={n}", f"--batch_per_device={bpd}", f"--layouts={layout}",
               f"--steps={a.steps}"]
        t0 = time.perf_counter()
        try:
          proc = subprocess.run(cmd, capture_output=True, text=True,
                                timeout=a.per_run_timeout_s)
          lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
          if lines:
            res = json.loads(lines[-1][len("RESULT "):])
          else:
            tail = proc.stderr.strip().splitlines()[-3:]
            oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower()
                      for l in proc.stderr.splitlines())
            res = dict(size=a.size, components=n, layout=layout, batch_per_device=int(bpd),
                       error="out of memory" if oom else " | ".join(tail))
        except subprocess.TimeoutExpired:
          res = dict(size=a.size, components=n, layout=layout, batch_per_device=int(bpd),
                     error=f"timeout {a.per_run_timeout_s} s")
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(json.dumps(res), flush=True)
        if a.out:
          from moca_jax import io
          io.write_json(a.out, {"runs": results})


if __name__ == "__main__":
  main()
