r"""Input-pipeline benchmark: the real training step fed by the pipeline vs from memory.

  python -m experiments.input_pipeline --tasks=vae,dit --workers=-1 --devices=1   # GPU
  python -m experiments.input_pipeline --tasks=vae --vae_size=tiny --vae_batch=4 \
      --seconds=2 --min_steps=3 --inline_seconds=1 --warmup=3 --workers=1 --out=/tmp/ip  # smoke

For each task (the VAE on its analytic source, the DiT on its synthetic source or, with
--dit_data, on real latent shards) it builds the training step of `moca_jax.train_lib`
(AdamW, EMA; the task's loss, config and shardings), compiles it ahead of time, and times it
in three feeds (four for the DiT on latent shards):
  memory     one batch already on the device, reused every step (the step's own rate)
  pipeline   the task's iterator (`make_iterator_fn`) with --workers (VAE) / --dit_workers
             input worker processes, `model_batch`, `sharding.shard_batch`: what
             `train_lib.run_training` does each step (the DiT's synthetic iterator with 0
             workers still makes its examples in grain's prefetch threads)
  inline     the same with no worker processes (sampling in the training process: the rate
             before the workers; --inline_seconds)
  in-memory  (DiT on --dit_data only) the records decoded once into host memory and batched
             by --dit_read_threads threads of the training process (config.data.in_memory)
The loop is `run_training`'s: dispatch step i, then fetch step i - 1's metrics, so host work
for the next batch overlaps the device's step. After --warmup steps (compilation, worker
start), each feed runs for --seconds; the rate is steps per second over the second half of
that time, once the workers' prefetch buffers have drained (`timed_steps`). Also reported:
the host's time to make one batch in the training process (median of 3).

The VAE runs in bf16 with the config's attention ('auto': cuDNN where it applies, XLA for
the query cross-attention, see moca_jax.vae) when --dtype=auto on a GPU; so does the DiT
with its image encoder (--dit_dtype=auto), as experiments/results/bundle_train.sh trains it.
With --dit_data the DiT reads those latent shards (data.source='records'; the latent
statistics of --dit_bundle when given, else of the shards), else its synthetic source.
Writes <out>.json and <out>.md naming the machine; prints the table. --from_json=a.json,b.json
writes <out> from earlier reports instead (e.g. runs on one and on all devices).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from moca_jax import cli
from moca_jax import io as mio
from moca_jax import sharding, train_lib
from moca_jax.machine import describe_host

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("tasks", ["vae", "dit"], "Tasks to measure: vae, dit.")
  flags.DEFINE_string("vae_size", "small", "VAE config (experiments/configs/vae.py).")
  flags.DEFINE_integer("vae_batch", 64, "VAE global batch.")
  flags.DEFINE_string("dit_size", "small", "DiT config (experiments/configs/dit.py).")
  flags.DEFINE_integer("dit_batch", 16, "DiT global batch.")
  flags.DEFINE_string(
      "dit_data", "", "Latent shards (data_pipeline.encode_latents) for the DiT; empty: synthetic."
  )
  flags.DEFINE_string(
      "dit_bundle", "", "A bundle of --dit_size whose latent statistics the --dit_data row uses."
  )
  flags.DEFINE_string(
      "dit_dtype", "auto", "DiT compute dtype: auto (bf16 on GPU), float32, bfloat16."
  )
  flags.DEFINE_integer(
      "dit_read_threads", 8, "Threads of the in-memory feed (--dit_data; 0: loader.DEFAULT_READ_THREADS)."
  )
  flags.DEFINE_integer(
      "workers", -1, "VAE input worker processes (-1: auto, moca_jax.vae_task.input_workers)."
  )
  flags.DEFINE_integer(
      "dit_workers",
      0,
      "DiT input worker processes (0: grain's prefetch "
      "threads in the training process; -1: auto as for the VAE).",
  )
  flags.DEFINE_integer("devices", 0, "Devices of the data mesh (0: all).")
  flags.DEFINE_string("dtype", "auto", "VAE compute dtype: auto (bf16 on GPU), float32, bfloat16.")
  flags.DEFINE_float("seconds", 12.0, "Timed seconds per feed (the rate is over the second half).")
  flags.DEFINE_integer("min_steps", 10, "Timed steps per feed, at least.")
  flags.DEFINE_integer("warmup", 5, "Untimed steps before each timed run.")
  flags.DEFINE_float("inline_seconds", 6.0, "Timed seconds of the inline (no worker) feed.")
  flags.DEFINE_string("out", "experiments/results/input_pipeline", "Output path stem.")
  flags.DEFINE_string("note", "", "A paragraph for the .md and .json (what the numbers show).")
  flags.DEFINE_list(
      "from_json",
      [],
      "Instead of measuring: write <out>.md / .json from these "
      "reports of this benchmark (rows concatenated; the first one's machine).",
  )


# ----------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------


def vae_setup(size: str, batch: int, workers: int, dtype: str) -> dict:
  """The VAE task on its analytic source: config, Task, iterator factory, prepare_fn."""
  from experiments.configs import vae as vae_configs
  from moca_jax import vae_task

  config = vae_configs.get_config(size)
  config.batch_size = batch
  config.data.num_workers = workers
  if dtype == "auto":
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  config.model.dtype = dtype
  return {
      "config": config,
      "task": vae_task.make_task(config),
      "iterator_fn": vae_task.make_iterator_fn,
      "prepare": vae_task.model_batch,
      "trainable_fn": None,
      "workers": vae_task.input_workers(workers),
      "label": f"VAE '{size}' ({dtype}, attention {config.model.attention_implementation}), "
      "analytic primitives",
  }


def dit_config(size: str, batch: int, workers: int, data_dir: str = "", bundle_dir: str = "",
               dtype: str = "auto", read_threads: int = 8):
  """The DiT training config of the benchmark and, for records, its in-memory twin.

  size: experiments/configs/dit.py size; bundle_dir: a bundle of that size whose latent
  statistics the records run takes (else they come from the shards). data_dir: latent shards
  (data.source='records'), else the synthetic source. dtype 'auto': bfloat16
  for the DiT and its image encoder on a GPU, else float32. Returns (config, in-memory
  config or None).
  """
  from experiments.configs import dit as dit_configs
  from moca_jax import dit_task, vae_task

  config = dit_configs.get_config(size)
  if bundle_dir:  # its latent statistics (dit_task.resolve_latent_norm); weights not read
    config.init.from_bundle = bundle_dir
  if dtype == "auto":
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  config.model.dit.dtype = config.model.encoder.dtype = dtype
  config.batch_size = batch
  config.data.num_workers = vae_task.input_workers(workers)  # the same auto rule as the VAE's
  if not data_dir:
    config.data.source = "synthetic"
    return config, None
  config.data.source, config.data.dir, config.data.val_dir = "records", data_dir, ""
  config = dit_task.resolve_latent_norm(config)
  cached = config.copy_and_resolve_references()
  cached.data.num_workers, cached.data.in_memory, cached.data.read_threads = 0, True, read_threads
  return config, cached


def dit_setup(size: str, batch: int, workers: int, data_dir: str = "", bundle_dir: str = "",
              dtype: str = "auto", read_threads: int = 8) -> dict:
  """The DiT task on its synthetic source or on latent shards (`dit_config`)."""
  from moca_jax import dit_task

  config, cached = dit_config(size, batch, workers, data_dir, bundle_dir, dtype, read_threads)
  source = f"latent shards ({data_dir})" if data_dir else "synthetic latents"
  return {
      "config": config,
      "cached_config": cached,
      "task": dit_task.make_task(config),
      "iterator_fn": dit_task.make_iterator_fn,
      "prepare": dit_task.model_batch,
      "trainable_fn": dit_task.trainable_fn(config),
      "workers": config.data.num_workers,
      "label": f"DiT '{size}' ({config.model.dit.dtype}, attention "
      f"{config.model.dit.attention_implementation}), {source}",
  }


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def timed_steps(
    compiled,
    state,
    rng,
    feed: Callable[[], Any],
    warmup: int,
    seconds: float,
    min_steps: int = 10,
    clock: Callable[[], float] = time.perf_counter,
):
  """run_training's loop over `feed()` batches, timed in steady state.

  Each step is dispatched before the previous step's metrics are fetched. After `warmup`
  steps (finished on the device before the clock starts), steps run until `seconds` have
  passed and at least `min_steps` steps were timed. The rate is taken over the second half
  of that time only: the workers' prefetch buffers (up to workers x buffer batches made
  before the clock starts) drain in the first half, so the rate is what the slower of
  pipeline and device sustains.

  Returns:
    (state, steps per second, steps timed).
  """
  pending = None
  for _ in range(warmup):
    state, metrics = compiled(state, feed(), rng)
    if pending is not None:
      jax.device_get(pending)
    pending = metrics
  if pending is not None:
    jax.device_get(pending)  # the warm-up has finished on the device
  pending, done_at = None, []
  start = clock()
  while len(done_at) < min_steps or done_at[-1] - start < seconds:
    state, metrics = compiled(state, feed(), rng)
    if pending is not None:
      jax.device_get(pending)
      done_at.append(clock())
    pending = metrics
  jax.device_get(pending)
  done_at.append(clock())
  mid = start + (done_at[-1] - start) / 2
  late = [t for t in done_at if t >= mid]
  rate = (len(late) - 1) / (late[-1] - late[0])
  return state, rate, len(done_at)


def optimizer(config, init_fn, trainable_fn, batch_spec):
  """run_training's optimizer: config.optim, with the task's trainable mask if it has one."""
  trainable = None
  if trainable_fn is not None:
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_spec)
    abstract = jax.eval_shape(
        lambda r: nn.meta.unbox(init_fn(r, zeros())["params"]), jax.random.PRNGKey(0)
    )
    trainable = trainable_fn(abstract)
  return train_lib.make_optimizer(config.optim, trainable)


def measure(
    setup: dict, mesh, warmup: int, seconds: float, min_steps: int, inline_seconds: float
) -> dict:
  """The three feeds of one task (module docstring); rates in steps per second."""
  config, (_, init_fn, loss_fn) = setup["config"], setup["task"]
  prepare = setup["prepare"]
  inline_config = config.copy_and_resolve_references()
  inline_config.data.num_workers = 0
  inline_iter = setup["iterator_fn"](inline_config)()
  host_times, batches = [], []
  for _ in range(3):
    t = time.perf_counter()
    batches.append(next(inline_iter))
    host_times.append(time.perf_counter() - t)
  first = batches[0]
  if hasattr(inline_iter, "close"):  # nothing of it may run while the other feeds are timed
    inline_iter.close()
  batch_spec = sharding.global_batch_spec(prepare(first))
  tx = optimizer(config, init_fn, setup["trainable_fn"], batch_spec)
  schedule = train_lib.make_schedule(config.optim)
  t = time.perf_counter()
  state, st_setup = train_lib.create_train_state(
      init_fn, tx, batch_spec, jax.random.PRNGKey(0), mesh
  )
  compiled, mem = train_lib.compile_train_step(
      loss_fn, tx, schedule, config.optim.ema_decay, st_setup, batch_spec, mesh
  )
  compile_s = time.perf_counter() - t
  rng = jax.random.PRNGKey(1)

  def timed(state, feed, warm, secs):
    return timed_steps(compiled, state, rng, feed, warm, secs, min_steps)

  on_device = sharding.shard_batch(prepare(first), mesh)
  state, memory_rate, memory_steps = timed(state, lambda: on_device, warmup, seconds)

  it = setup["iterator_fn"](config)()
  state, pipeline_rate, pipeline_steps = timed(
      state, lambda: sharding.shard_batch(prepare(next(it)), mesh), warmup, seconds
  )
  if hasattr(it, "close"):
    it.close()  # stop the workers before the inline run

  inline_iter = setup["iterator_fn"](inline_config)()
  state, inline_rate, inline_steps = timed(
      state, lambda: sharding.shard_batch(prepare(next(inline_iter)), mesh), 1, inline_seconds
  )
  if hasattr(inline_iter, "close"):
    inline_iter.close()
  extra = {}
  if setup.get("cached_config") is not None:  # the records decoded once, batched in threads
    t = time.perf_counter()
    cached_iter = setup["iterator_fn"](setup["cached_config"])()
    extra["in_memory_load_s"] = round(time.perf_counter() - t, 1)
    state, cached_rate, cached_steps = timed(
        state, lambda: sharding.shard_batch(prepare(next(cached_iter)), mesh), warmup, seconds
    )
    extra.update(
        in_memory_steps=cached_steps,
        in_memory_steps_per_s=round(cached_rate, 3),
        in_memory_over_memory=round(cached_rate / memory_rate, 3),
        read_threads=setup["cached_config"].data.read_threads,
    )
  return {
      "task": setup["label"],
      "devices": int(mesh.devices.size),
      "batch_size": config.batch_size,
      "workers": setup["workers"],
      "compile_s": round(compile_s, 1),
      "warmup": warmup,
      "memory_steps": memory_steps,
      "memory_steps_per_s": round(memory_rate, 3),
      "pipeline_steps": pipeline_steps,
      "pipeline_steps_per_s": round(pipeline_rate, 3),
      "pipeline_over_memory": round(pipeline_rate / memory_rate, 3),
      "inline_steps": inline_steps,
      "inline_steps_per_s": round(inline_rate, 3),
      "host_batch_s": round(statistics.median(host_times), 4),
      "memory_mib": {k: round(v, 1) for k, v in mem.items()},
      **extra,
  }


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def machine() -> dict:
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": dev.device_kind,
      "devices_present": jax.device_count(),
      "host": describe_host(),
      "node": platform.node(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
  }


def markdown(report: dict) -> str:
  m = report["machine"]
  lines = [
      "# Input pipeline: training steps/s fed by the pipeline vs from memory",
      "",
      f"`python -m experiments.input_pipeline` on {m['devices_present']} x {m['device']} "
      f"({m['backend']}, jax {m['jax']}); host: {m['host']}.",
      "",
      "memory: one batch already on the device, reused. pipeline: the task's iterator with "
      "the input worker processes, `model_batch`, `shard_batch`, as `train_lib.run_training` "
      "feeds it. inline: the same iterator with no worker processes (sampling in the "
      "training process). Rates are timed steps / wall time after warm-up steps (compilation "
      "and worker start excluded), over the second half of each timed run (prefetch buffers "
      "drained); host batch: the training process's time to make one batch "
      "(median of 3). in-memory (DiT on latent shards): the records decoded once into host "
      "memory and batched by threads of the training process (config.data.in_memory; "
      "threads in brackets). Target: pipeline >= 90% of memory.",
      "",
      "| task | devices | batch | workers | memory steps/s | pipeline steps/s | "
      "pipeline / memory | inline steps/s | in-memory steps/s | in-memory / memory | "
      "host batch (s) | compile (s) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in report["rows"]:
    cached = ("| - | - |" if "in_memory_steps_per_s" not in r else
              f"| {r['in_memory_steps_per_s']:.2f} ({r['read_threads']}) | "
              f"{100 * r['in_memory_over_memory']:.0f}% |")
    lines.append(
        f"| {r['task']} | {r['devices']} | {r['batch_size']} | {r['workers']} | "
        f"{r['memory_steps_per_s']:.2f} | "
        f"{r['pipeline_steps_per_s']:.2f} | {100 * r['pipeline_over_memory']:.0f}% | "
        f"{r['inline_steps_per_s']:.2f} {cached} {r['host_batch_s']:.3f} | "
        f"{r['compile_s']:.0f} |"
    )
  if report.get("note"):
    lines += ["", report["note"]]
  return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> None:
  mio.write_json(out + ".json", report)
  mio.atomic_write_text(out + ".md", markdown(report))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = FLAGS
  if f.from_json:
    reports = [mio.read_json(p) for p in f.from_json]
    report = {"machine": reports[0]["machine"], "rows": [r for x in reports for r in x["rows"]]}
    if f.note:
      report["note"] = f.note
    write_report(report, f.out)
    print(markdown(report))
    return
  unknown = set(f.tasks) - {"vae", "dit"}
  if unknown:
    raise app.UsageError(f"--tasks: unknown task(s) {sorted(unknown)}; expected vae, dit")
  devices = jax.devices()[: f.devices] if f.devices > 0 else jax.devices()
  mesh = sharding.make_mesh(-1, 1, devices)
  rows = []
  for name in f.tasks:
    setup = (
        vae_setup(f.vae_size, f.vae_batch, f.workers, f.dtype)
        if name == "vae"
        else dit_setup(f.dit_size, f.dit_batch, f.dit_workers, f.dit_data, f.dit_bundle,
                       f.dit_dtype, f.dit_read_threads)
    )
    row = measure(setup, mesh, f.warmup, f.seconds, f.min_steps, f.inline_seconds)
    print(row, flush=True)
    rows.append(row)
  report = {"machine": machine(), "rows": rows}
  if f.note:
    report["note"] = f.note
  write_report(report, f.out)
  print(markdown(report))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
