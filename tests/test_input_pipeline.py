"""Input workers (moca_jax.vae_task.input_workers) and the input-pipeline benchmark's loop."""

import jax
import pytest

from experiments import input_pipeline
from moca_jax import vae_task


def test_input_workers_auto_and_explicit(monkeypatch):
  assert vae_task.input_workers(0) == 0
  assert vae_task.input_workers(3) == 3
  assert vae_task.input_workers(-1) == 0  # CPU backend: no workers beside XLA's threads
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
  assert vae_task.input_workers(-1) == 14  # all cores but two
  monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(128)))
  assert vae_task.input_workers(-1) == 32  # capped
  monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
  assert vae_task.input_workers(-1) == 1
  with pytest.raises(ValueError, match="num_workers must be -1 \\(auto\\) or >= 0, got -2"):
    vae_task.input_workers(-2)


def test_timed_steps_dispatches_before_fetching_and_rates_the_second_half(monkeypatch):
  events, now = [], [0.0]

  def step(state, batch, rng):  # dispatch: returns at once
    events.append(("step", batch))
    return state + 1, {"step": state}

  def fetch(metrics):  # waits for the step: batches 0..5 take 0.1 s (full buffers), then 1 s
    events.append(("fetch", metrics["step"]))
    now[0] += 0.1 if metrics["step"] < 6 else 1.0

  monkeypatch.setattr(jax, "device_get", fetch)
  batches = iter(range(100))
  state, rate, timed = input_pipeline.timed_steps(
      step, 0, None, lambda: next(batches), warmup=2, seconds=6.0, min_steps=3, clock=lambda: now[0]
  )
  # warm-up: step 0, step 1, fetch 0, then step 1 is fetched before the clock starts;
  # timed: step 2, step 3, fetch 2, step 4, fetch 3, ...
  assert events[:8] == [
      ("step", 0),
      ("step", 1),
      ("fetch", 0),
      ("fetch", 1),
      ("step", 2),
      ("step", 3),
      ("fetch", 2),
      ("step", 4),
  ]
  steps = [b for kind, b in events if kind == "step"]
  fetches = [b for kind, b in events if kind == "fetch"]
  assert fetches == steps  # every step's metrics fetched once, in order
  assert state == len(steps) and timed == len(steps) - 2
  # 6 s from the clock start at 0.2 s: the buffered steps 2..5 (0.4 s) then 1 s steps; the
  # second half runs at the steady 1 step/s, not at the whole run's 11 steps in 7.4 s
  assert rate == pytest.approx(1.0)


def test_markdown_names_the_machine_and_the_ratio():
  row = {
      "task": "VAE 'small'",
      "devices": 1,
      "batch_size": 64,
      "workers": 14,
      "memory_steps_per_s": 10.0,
      "pipeline_steps_per_s": 9.5,
      "pipeline_over_memory": 0.95,
      "inline_steps_per_s": 1.4,
      "host_batch_s": 0.5,
      "compile_s": 30.0,
  }
  machine = {
      "device": "NVIDIA H200",
      "backend": "gpu",
      "jax": "0.11.2",
      "devices_present": 2,
      "host": "some cpu, 32 cores available",
  }
  md = input_pipeline.markdown({"machine": machine, "rows": [row]})
  assert "on 2 x NVIDIA H200 (gpu, jax 0.11.2); host: some cpu, 32 cores available" in md
  assert "| VAE 'small' | 1 | 64 | 14 | 10.00 | 9.50 | 95% | 1.40 | - | - | 0.500 | 30 |" in md
  # a DiT row on latent shards adds its in-memory feed (threads in brackets)
  dit = dict(row, task="DiT", in_memory_steps_per_s=9.9, in_memory_over_memory=0.99,
             read_threads=8)
  md = input_pipeline.markdown({"machine": machine, "rows": [dit]})
  assert "| DiT | 1 | 64 | 14 | 10.00 | 9.50 | 95% | 1.40 | 9.90 (8) | 99% | 0.500 | 30 |" in md
