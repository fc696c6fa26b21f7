"""Training over several devices and processes (CPU; simulated devices, gloo collectives).

- the global batch does not depend on the process count (grain `process_blocks`);
- the DiT trained on data=2 or fsdp=2 equals the 1-device run on the same global batches;
- a checkpoint written on one mesh resumes on another (resharding on restore), exactly;
- two processes joined by jax.distributed on localhost (one device each) train like one
  process, write one checkpoint, resume from it, and do not hang (subprocess timeouts);
- a data-parallel step is per-example work plus the gradient all-reduce: no op of the DiT
  (the MoC top-k routing and component gather) makes XLA gather the batch onto every device;
- start-up: the config.distributed fields.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import loader
from moca_jax import dit_task, distributed, moc, sharding

import multi_device_worker  # tests/ is on sys.path (rootdir conftest)

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 4                         # checkpoints at 2 and 4 (micro_config: every 2)
PARAM_ATOL = 1e-4                 # fp32; Adam turns reduction-order noise into ~lr-sized steps


def _mesh(data: int, fsdp: int):
  return sharding.make_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])


def _train(workdir, mesh, steps=STEPS):
  cfg = multi_device_worker.micro_config(steps)
  return dit_task.train_and_evaluate(cfg, str(workdir), mesh=mesh, show_progress=False,
                                      eval_batches=0)


def _assert_same_run(got, want, steps=None):
  steps = steps or len(want.history)
  g = {h["step"]: h for h in got.history}
  for h in want.history[-steps:]:
    np.testing.assert_allclose(g[h["step"]]["loss"], h["loss"], rtol=1e-5,
                               err_msg=f"loss at step {h['step']}")
  flat_g = jax.tree_util.tree_flatten_with_path(sharding.to_host(got.state.params))[0]
  flat_w = jax.tree.leaves(sharding.to_host(want.state.params))
  for (path, a), b in zip(flat_g, flat_w):
    np.testing.assert_allclose(a, b, atol=PARAM_ATOL, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  """4 steps on 1 device; its checkpoints (steps 2 and 4) are reused below."""
  workdir = tmp_path_factory.mktemp("one_device")
  return workdir, _train(workdir, _mesh(1, 1))


@pytest.fixture(scope="module")
def two_device_runs(tmp_path_factory):
  """(data, fsdp) -> (workdir, 4-step run on that 2-device mesh), made once each."""
  runs = {}

  def get(data, fsdp):
    if (data, fsdp) not in runs:
      workdir = tmp_path_factory.mktemp(f"mesh_{data}x{fsdp}")
      runs[data, fsdp] = workdir, _train(workdir, _mesh(data, fsdp))
    return runs[data, fsdp]
  return get


# ----------------------------------------------------------------------------------------
# Data: the global batch is the same whatever the process count
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [2, 4])
def test_process_blocks_concatenate_to_the_one_process_batches(count):
  ds = grain.MapDataset.range(50).shuffle(seed=3).repeat()
  ds = ds.random_map(lambda x, rng: (x, int(rng.integers(1 << 30))), seed=5)
  global_batch = 8
  one = iter(loader.process_blocks(ds, global_batch, 0, 1).batch(global_batch))
  parts = [iter(loader.process_blocks(ds, global_batch // count, p, count)
                .batch(global_batch // count)) for p in range(count)]
  for _ in range(10):  # past the first epoch (reshuffled)
    want = next(one)
    got = [np.concatenate(z) for z in zip(*[next(it) for it in parts])]
    np.testing.assert_array_equal(got[0], want[0])   # same elements, same order
    np.testing.assert_array_equal(got[1], want[1])   # same per-element randomness


def test_process_blocks_finite_cover_and_errors():
  ds = grain.MapDataset.range(11)
  seen = [list(loader.process_blocks(ds, 2, p, 2)) for p in range(2)]
  assert seen == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10]]
  assert [len(loader.process_blocks(ds, 2, p, 2)) for p in range(2)] == [6, 5]
  assert list(loader.process_blocks(ds, 1, 1, 3)) == list(ds[1::3])
  with pytest.raises(ValueError, match="process_index < process_count"):
    loader.process_blocks(ds, 2, 2, 2)


# ----------------------------------------------------------------------------------------
# One process, several devices
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,fsdp", [(2, 1), (1, 2)])
def test_two_device_training_equals_one_device(one_device_run, two_device_runs, data, fsdp):
  _, want = one_device_run
  _, got = two_device_runs(data, fsdp)
  assert got.batch_log == want.batch_log
  leaf = got.state.params["dit"]
  assert {d.id for d in jax.tree.leaves(leaf)[0].sharding.device_set} == {0, 1}
  _assert_same_run(got, want)


@pytest.mark.parametrize("data,fsdp", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_mesh(tmp_path, one_device_run, two_device_runs, data,
                                            fsdp):
  """1-device checkpoint at step 2 -> resumed on 2 devices; and a 2-device checkpoint ->
  resumed on 1 device. Both equal the straight 1-device run at step 4."""
  src, want = one_device_run
  resumed_on_2 = tmp_path / "on2"
  shutil.copytree(src / "checkpoints" / "2", resumed_on_2 / "checkpoints" / "2")
  got = _train(resumed_on_2, _mesh(data, fsdp))
  assert got.batch_log == want.batch_log[2:]
  _assert_same_run(got, want, steps=2)

  # the reverse: the step-2 checkpoint of the 4-step 2-device run, resumed on 1 device
  src2, _ = two_device_runs(data, fsdp)
  written_on_2 = tmp_path / "from2"
  shutil.copytree(src2 / "checkpoints" / "2", written_on_2 / "checkpoints" / "2")
  got = _train(written_on_2, _mesh(1, 1))
  assert got.batch_log == want.batch_log[2:]
  _assert_same_run(got, want, steps=2)


def _collectives(compiled) -> dict[str, int]:
  """Counts of each collective op in a compiled executable's optimised HLO."""
  ops = re.findall(r" (all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)"
                   r"(?:-start)?\(", compiled.as_text())
  return {op: ops.count(op) for op in set(ops)}


def test_moc_routing_and_gather_stay_batch_sharded():
  """Top-k routing and the component gather on a batch split over 2 devices: the same
  values as on one device, and no collective at all (XLA's SPMD partitioner all-gathers the
  operand of lax.top_k and of a gather indexed on the batch dimension)."""
  rng = np.random.default_rng(0)
  b, n, t, h, d, k = 4, 5, 3, 2, 4, 2
  x = rng.normal(size=(b, n, t, h, d)).astype(np.float32)
  importance = rng.random((b, h, n, n)).astype(np.float32)
  mask = np.ones((b, n), bool)
  mask[0, 3:] = False

  def fn(x, importance, mask):
    selected, unselected = moc.route(importance, mask, k, jax.random.PRNGKey(3))
    idx = jnp.transpose(selected, (0, 2, 3, 1))  # [B, N, k, H]
    gate = jnp.transpose(jnp.take_along_axis(importance, selected, axis=-1), (0, 2, 3, 1))
    return selected, unselected, moc.gather_components(x, idx, gate, "hybrid"), jax.grad(
        lambda x_: jnp.sum(jnp.sin(moc.gather_components(x_, idx, gate, "hybrid"))))(x)

  mesh = _mesh(2, 1)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = jax.jit(fn, in_shardings=split, out_shardings=split)
  assert _collectives(sharded.lower(x, importance, mask).compile()) == {}
  want = jax.jit(fn)(x, importance, mask)
  got = sharded(x, importance, mask)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # route keeps lax.top_k's order (descending, ties to the lower index, self last)
  tied = importance.copy()
  tied[..., 1] = tied[..., 2]
  score = np.where(np.eye(n, dtype=bool), -np.inf, np.log(tied))
  np.testing.assert_array_equal(
      np.concatenate(moc.route(tied, None, k), -1), jax.lax.top_k(score, n - 1)[1])


def test_data_parallel_step_gathers_nothing(two_device_runs):
  """The DiT train step on a data=2 mesh: per-example work plus all-reduces (gradients,
  batch means), nothing gathered onto every device; with fsdp=2 the parameters are."""
  assert set(_collectives(two_device_runs(2, 1)[1].compiled_step)) == {"all-reduce"}
  assert "all-gather" in _collectives(two_device_runs(1, 2)[1].compiled_step)


# ----------------------------------------------------------------------------------------
# Two processes (jax.distributed on localhost, gloo collectives)
# ----------------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(tmp_path, workdir, steps, tag, *args, timeout=420):
  port = _free_port()
  # both launches compile the same programs: the second loads them from JAX's cache
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  procs, outs = [], []
  for i in range(2):
    out = tmp_path / f"{tag}_{i}.json"
    log = open(tmp_path / f"{tag}_{i}.log", "w")
    cmd = [sys.executable, os.path.join(HERE, "multi_device_worker.py"), f"--out={out}",
           f"--workdir={workdir}", f"--steps={steps}", "--num_processes=2", f"--process_id={i}",
           f"--port={port}", "--data=2", *args]
    procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    outs.append(out)
  try:
    for p, log in procs:
      rc = p.wait(timeout=timeout)
      log.close()
      assert rc == 0, (tmp_path / f"{tag}_{procs.index((p, log))}.log").read_text()[-3000:]
  except subprocess.TimeoutExpired:
    for p, _ in procs:
      p.kill()
    pytest.fail(f"two-process training did not finish in {timeout} s (hang)")
  return [json.loads(o.read_text()) for o in outs]


def test_two_processes_train_like_one_and_resume(tmp_path, one_device_run):
  _, want = one_device_run
  workdir = tmp_path / "two_proc"
  first = _two_processes(tmp_path, workdir, 3, "first")
  assert [r["process_count"] for r in first] == [2, 2]
  assert first[0]["mesh"] == {"data": 2, "fsdp": 1}
  # each process fed its half of every global batch of the 1-process run
  for step, ids in enumerate(want.batch_log[:3]):
    assert first[0]["batch_log"][step] + first[1]["batch_log"][step] == ids
  for h0, h1, w in zip(first[0]["history"], first[1]["history"], want.history):
    assert h0["loss"] == h1["loss"]
    np.testing.assert_allclose(h0["loss"], w["loss"], rtol=1e-5)
  assert first[0]["params"] == first[1]["params"]
  # one checkpoint directory per step, written once
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
  assert (workdir / "eval.json").exists()

  # a restarted 2-process job resumes from step 3 and ends where the 1-process run ends
  # (its evaluation, which the first launch has shown to run, is skipped: nothing reads it)
  second = _two_processes(tmp_path, workdir, STEPS, "second", "--eval_batches=0")
  assert [h["step"] for h in second[0]["history"]] == [3]
  assert second[0]["batch_log"][0] + second[1]["batch_log"][0] == want.batch_log[3]
  np.testing.assert_allclose(second[0]["history"][0]["loss"], want.history[3]["loss"],
                             rtol=1e-5)
  flat_w = jax.tree_util.tree_flatten_with_path(sharding.to_host(want.state.params))[0]
  for path, w in flat_w:
    np.testing.assert_allclose(np.asarray(second[0]["params"][jax.tree_util.keystr(path)]),
                               np.asarray(w, np.float64).ravel(), atol=PARAM_ATOL, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# Start-up
# ----------------------------------------------------------------------------------------

def test_initialize_kwargs_and_errors():
  cfg = distributed.distributed_config()
  assert distributed.initialize_kwargs(cfg) == {"initialization_timeout": 300}
  cfg.update(enabled=True, coordinator_address="localhost:1234", num_processes=2,
             process_id=1, local_device_ids="1")
  assert distributed.initialize_kwargs(cfg) == {
      "initialization_timeout": 300, "coordinator_address": "localhost:1234",
      "num_processes": 2, "process_id": 1, "local_device_ids": [1]}
  for field, value, message in [("coordinator_address", "localhost", "host:port"),
                                ("process_id", 2, "must be < num_processes=2"),
                                ("local_device_ids", "0;1", "comma-separated")]:
    bad = distributed.distributed_config()
    bad.update(coordinator_address="h:1", num_processes=2)
    bad[field] = value
    with pytest.raises(ValueError, match=message):
      distributed.initialize_kwargs(bad)
  assert distributed.initialize(None) is False   # single process: nothing to start


def test_global_batch_spec_and_to_host():
  spec = sharding.global_batch_spec({"x": np.zeros((3, 2), np.float32), "s": np.int32(1)})
  assert spec["x"].shape == (3 * jax.process_count(), 2) and spec["s"].shape == ()
  mesh = _mesh(1, 2)
  x = jax.device_put(np.arange(8.0).reshape(4, 2), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("fsdp")))
  np.testing.assert_array_equal(sharding.to_host({"x": x})["x"], np.arange(8.0).reshape(4, 2))


def test_launch_script_rejects_bad_arguments():
  script = os.path.join(os.path.dirname(HERE), "experiments", "launch_multi.sh")
  for args in ([], ["two", "experiments.train_dit"], ["2"]):
    res = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage:" in res.stderr, args
