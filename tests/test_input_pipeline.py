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


def test_timed_steps_dispatches_before_fetching_and_times_after_warmup(monkeypatch):
  events = []

  def step(state, batch, rng):
    events.append(("step", batch))
    return state + 1, {"step": state}

  monkeypatch.setattr(jax, "device_get", lambda x: events.append(("fetch", x["step"])))
  batches = iter(range(100))
  state, seconds = input_pipeline.timed_steps(step, 0, None, lambda: next(batches), 2, 3)
  assert state == 5 and seconds >= 0
  # warm-up: step 0, step 1, fetch 0; then step 1 is fetched before the clock starts;
  # timed: step 2, step 3, fetch 2, step 4, fetch 3, then the last fetch
  assert events == [("step", 0), ("step", 1), ("fetch", 0), ("fetch", 1), ("step", 2),
                    ("step", 3), ("fetch", 2), ("step", 4), ("fetch", 3), ("fetch", 4)]


def test_markdown_names_the_machine_and_the_ratio():
  row = {"task": "VAE 'small'", "devices": 1, "batch_size": 64, "workers": 14, "memory_steps_per_s": 10.0,
         "pipeline_steps_per_s": 9.5, "pipeline_over_memory": 0.95, "inline_steps_per_s": 1.4,
         "host_batch_s": 0.5, "compile_s": 30.0}
  machine = {"device": "NVIDIA H200", "backend": "gpu", "jax": "0.11.2",
             "devices_present": 2, "host": "some cpu, 32 cores available"}
  md = input_pipeline.markdown({"machine": machine, "rows": [row]})
  assert "on 2 x NVIDIA H200 (gpu, jax 0.11.2); host: some cpu, 32 cores available" in md
  assert "| VAE 'small' | 1 | 64 | 14 | 10.00 | 9.50 | 95% | 1.40 | 0.500 | 30 |" in md
