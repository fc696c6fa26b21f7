"""DiT training end to end on a micro config: resume exactness, overfitting, guards."""

import contextlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.configs import dit as dit_configs
from moca_jax import checkpointing, dit_task, sharding, train_lib

K = 3


def micro_config(**over):
  c = dit_configs.get_config("tiny")
  c.data.source = "synthetic"
  c.data.max_components = 3
  c.data.synthetic_examples = 10
  c.model.dit.num_blocks = 2
  c.model.encoder.depth = 1
  c.batch_size = 2
  c.log_every = 1
  c.optim.warmup_steps = 1
  c.checkpoint.every = K
  for k, v in over.items():
    c[k] = v
  return c


def _mesh1():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


@contextlib.contextmanager
def _compilation_cache(path):
  """A persistent XLA cache for the duration (the resumed run reuses the first run's
  executables, as a restarted job on a real cluster would); restored afterwards."""
  from jax._src import compilation_cache as cc

  old = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
      jax.config.jax_persistent_cache_min_entry_size_bytes,
  )
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
    cc.reset_cache()


def test_resume_is_exact(tmp_path):
  """2K steps straight == K steps + checkpoint + restore (fresh process state) + K steps."""
  with _compilation_cache(tmp_path / "xla_cache"):
    _check_resume_is_exact(tmp_path)


def _check_resume_is_exact(tmp_path):
  cfg = micro_config()
  a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
  straight = dit_task.train_and_evaluate(
      cfg, a_dir, num_steps=2 * K, mesh=_mesh1(), show_progress=False, eval_batches=0
  )
  assert sorted(os.listdir(os.path.join(a_dir, "checkpoints"))) == [str(K), str(2 * K)]
  # the job "died" after step K: only that checkpoint exists in b
  os.makedirs(os.path.join(b_dir, "checkpoints"))
  shutil.copytree(
      os.path.join(a_dir, "checkpoints", str(K)), os.path.join(b_dir, "checkpoints", str(K))
  )
  resumed = dit_task.train_and_evaluate(
      cfg, b_dir, num_steps=2 * K, mesh=_mesh1(), show_progress=False, eval_batches=1
  )
  assert int(resumed.state.step) == 2 * K
  assert resumed.batch_log == straight.batch_log[K:]  # same data order
  assert len({tuple(b) for b in straight.batch_log}) > 1  # and it is not trivial
  for tree in ("params", "ema_params"):
    for x, y in zip(
        jax.tree.leaves(getattr(straight.state, tree)),
        jax.tree.leaves(getattr(resumed.state, tree)),
    ):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(
      [h["loss"] for h in resumed.history], [h["loss"] for h in straight.history[K:]], rtol=1e-6
  )
  # metrics, eval and the stored config are written
  assert os.listdir(os.path.join(b_dir, "tb"))
  with open(os.path.join(b_dir, "eval.json")) as f:
    ev = json.load(f)
  # the wrong-image loss uses the same latents, times and noise: only the image differs
  assert ev["condition_gain"] == pytest.approx(ev["eval_loss_ema_wrong_image"]
                                               - ev["eval_loss_ema"])
  assert ev["eval_loss_ema_wrong_image"] != ev["eval_loss_ema"]
  assert 0.0 < ev["condition_spread"] < 1.0
  assert ev["eval_split"] == "train"  # no data.val_dir: the first training batches
  stored, step = checkpointing.read_checkpoint_config(os.path.join(b_dir, "checkpoints"))
  assert step == 2 * K and stored["model"]["dit"]["num_blocks"] == 2

  # Chunked training: a run whose wall-clock deadline has passed stops at its first log step
  # (1), saves there although checkpoint.every is 1000, and the next chunk (no deadline: a
  # chunk field, not a config mismatch) resumes exactly.
  c_dir = str(tmp_path / "c")
  rare_saves = micro_config()
  rare_saves.checkpoint.every = 1000
  limited = micro_config(stop_at_unix=1.0)
  limited.checkpoint.every = 1000
  chunk = dit_task.train_and_evaluate(
      limited, c_dir, num_steps=2 * K, mesh=_mesh1(), show_progress=False, eval_batches=0)
  assert chunk.stopped_early and int(chunk.state.step) == 1
  assert checkpointing.latest_checkpoint_step(os.path.join(c_dir, "checkpoints")) == 1
  rest = dit_task.train_and_evaluate(
      rare_saves, c_dir, num_steps=2 * K, mesh=_mesh1(), show_progress=False, eval_batches=0)
  assert not rest.stopped_early and chunk.batch_log + rest.batch_log == straight.batch_log
  for x, y in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(rest.state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-6)
  # metrics.jsonl holds every log step of both chunks; the loss curve is drawn
  with open(os.path.join(c_dir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 2 * K + 1))
  assert os.path.getsize(os.path.join(c_dir, "loss_curve.png")) > 0
  runs = train_lib.read_run_records(c_dir)
  assert [(r["start_step"], r["end_step"], r["stopped_early"]) for r in runs] == [
      (0, 1, True), (1, 2 * K, False)]
  assert sum(r["examples"] for r in runs) == 2 * K * cfg.batch_size
  assert "router/importance_entropy" in straight.history[0]


@pytest.fixture(scope="module")
def dit_step():
  """The DiT task (micro config, batch 8) compiled once on 1 device. Its loss uses a fixed
  key, so repeated steps see the same (t, eps, ids, routing, dropout) draws."""
  cfg = micro_config(batch_size=8)
  cfg.data.synthetic_examples = 8
  cfg.optim.lr, cfg.optim.grad_clip, cfg.flow.cfg_dropout = 3e-3, 1.0, 0.3
  # Adam divides by sqrt(v) + eps: with eps = 1e-8 a parameter whose gradient is ~1e-9
  # (rounding level, so its sign depends on the reduction order of each sharding) still
  # moves by ~lr. A larger eps keeps such updates proportional to the gradient, so the
  # sharded-vs-single comparison tests the sharding, not the sign of rounding noise.
  cfg.optim.eps = 1e-4
  _, init_fn, noisy_loss_fn = dit_task.make_task(cfg)
  loss_fn = lambda p, b, r: noisy_loss_fn(p, b, jax.random.PRNGKey(5))
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(cfg, shuffle=False)()))
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  tx = train_lib.make_optimizer(cfg.optim)
  sched = train_lib.make_schedule(cfg.optim)
  mesh = _mesh1()
  state, setup = train_lib.create_train_state(init_fn, tx, spec, jax.random.PRNGKey(0), mesh)
  step, mem = train_lib.compile_train_step(loss_fn, tx, sched, 0.9, setup, spec, mesh)
  return dict(
      cfg=cfg,
      init_fn=init_fn,
      loss_fn=loss_fn,
      batch=batch,
      spec=spec,
      tx=tx,
      sched=sched,
      host_state=jax.device_get(state),
      setup=setup,
      step=step,
      mem=mem,
  )


def _fresh(d):
  return jax.device_put(d["host_state"], d["setup"].shardings)


def test_dit_step_overfits_and_shards_exactly(dit_step):
  """Both checks share one compiled step (one worker builds it under xdist)."""
  _check_loss_falls_overfitting_one_sample(dit_step)
  _check_sharded_dit_step_equals_single_device_step(dit_step)


def _check_loss_falls_overfitting_one_sample(dit_step):
  """One sample (8 copies; each component's latent tokens all equal, so a vecset model can
  memorise it), the same noise draw every step: the loss falls far below 2.0, the loss of
  predicting zero velocity (E|eps - z|^2 for unit-variance z)."""
  one = jax.tree.map(lambda x: np.repeat(x[:1], 8, axis=0), dit_step["batch"])
  lat = one["latents"]
  one["latents"] = np.repeat(lat[:, :, :1], lat.shape[2], axis=2)
  state, losses = _fresh(dit_step), []
  for _ in range(50):
    state, m = dit_step["step"](state, one, jax.random.PRNGKey(1))
    losses.append(float(m["loss"]))
  msg = [round(l, 3) for l in losses]
  assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:5]), msg
  assert np.mean(losses[-5:]) < 1.0, msg


def _check_sharded_dit_step_equals_single_device_step(dit_step):
  """The real task (image encoder + MoC DiT + flow loss, Gumbel routing, random ids and
  condition dropout) on data 4 x fsdp 2 (8 simulated devices) gives the 1-device loss and
  params (1e-5) after two steps (step 0 has lr 0 in warmup; step 1 moves the params)."""
  d = dit_step
  mesh8 = sharding.make_mesh(4, 2)
  s8, setup8 = train_lib.create_train_state(
      d["init_fn"], d["tx"], d["spec"], jax.random.PRNGKey(0), mesh8
  )
  step8, _ = train_lib.compile_train_step(
      d["loss_fn"], d["tx"], d["sched"], 0.9, setup8, d["spec"], mesh8
  )
  s1 = _fresh(d)
  for _ in range(2):
    s8, m8 = step8(s8, sharding.shard_batch(d["batch"], mesh8), jax.random.PRNGKey(3))
    s1, m1 = d["step"](s1, d["batch"], jax.random.PRNGKey(3))
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  flat8 = jax.tree_util.tree_flatten_with_path(jax.device_get(s8.params))[0]
  for (path, a), b in zip(flat8, jax.tree.leaves(jax.device_get(s1.params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=str(path))
  k = s8.params["dit"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert k.sharding.spec == P("fsdp") and len(k.addressable_shards) == 8
  moved = (
      jax.device_get(s1.params)["dit"]["block_0"]["mlp"]["fc1"]["kernel"]
      - d["host_state"].params["dit"]["block_0"]["mlp"]["fc1"]["kernel"]
  )
  assert float(np.abs(moved).max()) > 0


def test_nonfinite_loss_names_step_and_batch(tmp_path):
  """The loop stops at the first non-finite loss, naming the step and the batch's records."""
  import grain
  from test_sharding import StandIn

  model = StandIn()
  cfg = micro_config()
  cfg.optim.lr, cfg.optim.grad_clip, cfg.checkpoint.every = 1e30, 0.0, 100

  def init_fn(rng, batch):
    return model.init(rng, batch["x"])

  def loss_fn(params, batch, rng):
    return jnp.mean((model.apply({"params": params}, batch["x"]) - 1.0) ** 2), {}

  ds = (
      grain.MapDataset.range(6)
      .map(lambda i: {"x": np.full((3, 5), i, np.float32), "index": np.int64(i)})
      .repeat()
  )
  make = lambda: iter(ds.batch(2).to_iter_dataset())
  with pytest.raises(
      train_lib.NonFiniteLossError, match=r"non-finite loss \S+ at step 2 \(batch \[4, 5\]\)"
  ):
    train_lib.run_training(
        config=cfg,
        workdir=str(tmp_path),
        init_fn=init_fn,
        loss_fn=loss_fn,
        make_iterator=make,
        mesh=_mesh1(),
        batch_id_fn=lambda b: b["index"].tolist(),
        prepare_fn=lambda b: {"x": b["x"]},
        show_progress=False,
    )


def test_router_statistics_reference():
  rng = np.random.default_rng(0)
  b, g, h, n, k = 2, 1, 2, 4, 2
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  imp = rng.uniform(0.1, 1, size=(b, g, h, n, n)).astype(np.float32)
  for bi in range(b):
    imp[bi, ..., ~mask[bi]] = 0
    for i in range(n):
      imp[bi, ..., i, i] = 0
  sel = np.argsort(-imp, axis=-1)[..., :k]
  out = jax.device_get(dit_task.router_statistics(imp, sel, mask))
  counts = np.zeros(n)
  ents = []
  for bi in range(b):
    nr = mask[bi].sum()
    for gi in range(g):
      for hi in range(h):
        for i in range(n):
          if not mask[bi, i]:
            continue
          for j in sel[bi, gi, hi, i]:
            counts[j] += 1
          if nr > 2:
            p = imp[bi, gi, hi, i][imp[bi, gi, hi, i] > 0]
            p = p / p.sum()
            ents.append(-(p * np.log(p)).sum() / np.log(nr - 1))
  np.testing.assert_allclose(out["router/selection_freq"], counts / counts.sum(), rtol=1e-6)
  np.testing.assert_allclose(out["router/importance_entropy"], np.mean(ents), rtol=1e-5)
  # uniform importances have normalised entropy 1
  uni = np.where(np.eye(n, dtype=bool), 0.0, 1.0)[None, None, None].repeat(2, 0).astype(np.float32)
  out = dit_task.router_statistics(uni, sel[:, :1, :1], np.ones((2, n), bool))
  np.testing.assert_allclose(out["router/importance_entropy"], 1.0, rtol=1e-6)


def test_config_sizes_and_errors():
  for size in ("tiny", "small", "paper"):
    c = dit_configs.get_config(size)
    assert c.model.dit.cond_dim == c.model.encoder.width
  assert dit_configs.get_config("tiny,scene").model.encoder.in_channels == 7
  with pytest.raises(ValueError, match="unknown size"):
    dit_configs.get_config("huge")
  c = micro_config()
  c.data.source = "records"
  with pytest.raises(ValueError, match="data.dir"):
    dit_task.make_iterator_fn(c)


def test_records_source_reads_latent_shards(tmp_path):
  """The 'records' source reads latent ArrayRecord shards through the data pipeline's loader:
  padded components, mask and images in the model batch layout; scene mode gives the
  per-instance 7-channel conditions."""
  from data_pipeline import records

  rng = np.random.default_rng(0)
  recs = []
  for i, n in enumerate([2, 5, 3]):
    masks = np.zeros((2, 20, 20), np.uint8)
    for j in range(n):
      masks[:, j * 3 : (j + 1) * 3] = j + 1
    arrays = {
        "latents": rng.normal(size=(n, 16, 8)).astype(np.float32),
        "images": rng.integers(0, 255, (2, 20, 20, 3), dtype=np.uint8),
        "masks": masks,
        "part_colors": np.zeros((n, 3), np.uint8),
        "part_bounds": np.zeros((n, 2, 3), np.float32),
        "cameras": np.zeros((2, 18), np.float32),
    }
    recs.append(
        records.encode_record(
            arrays, {"kind": "latents", "key": f"r{i}", "num_parts": n, "type": "object"}
        )
    )
  base = tmp_path / records.shard_name(0, 1)
  records.write_shard(str(base) + ".array_record", recs)
  records.atomic_write_json(str(base) + ".json", {"count": len(recs)})
  for mode, shape in (("object", (2, 20, 20, 3)), ("scene", (2, 4, 20, 20, 7))):
    cfg = micro_config()
    cfg.mode = mode
    cfg.data.source, cfg.data.dir, cfg.data.max_components = "records", str(tmp_path), 4
    it = dit_task.make_iterator_fn(cfg)()
    raw = next(it)
    batch = dit_task.model_batch(raw)
    assert batch["latents"].shape == (2, 4, 16, 8)
    assert batch["images"].shape == shape and batch["images"].dtype == np.uint8
    n_real = batch["component_mask"].sum(1)
    assert set(n_real.tolist()) <= {2, 3, 4}  # 5 parts are cut to 4
    for b in range(2):
      assert np.all(batch["latents"][b, n_real[b] :] == 0)
    state = it.get_state()
    nxt = next(it)
    it2 = dit_task.make_iterator_fn(cfg)()
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["index"], nxt["index"])  # checkpointable order
    # data.in_memory: the records decoded once, batched in threads: the same batches
    cached_cfg = cfg.copy_and_resolve_references()
    cached_cfg.data.in_memory, cached_cfg.data.read_threads = True, 2
    it3 = dit_task.make_iterator_fn(cached_cfg)()
    for want in (raw, nxt):
      got = next(it3)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  bad = micro_config()
  bad.data.source, bad.data.dir, bad.data.in_memory, bad.data.num_workers = (
      "records", str(tmp_path), True, 2)
  with pytest.raises(ValueError, match="num_workers=0"):
    dit_task.make_iterator_fn(bad)
  bad.data.num_workers, bad.data.read_threads = 0, -1
  with pytest.raises(ValueError, match="read_threads"):
    dit_task.make_iterator_fn(bad)


def test_scene_mode_loss_traces_with_per_component_conditions():
  """Scene mode: 7-channel inputs [B, N, H, W, 7] -> per-component tokens [B, N, T, Dc]; the
  loss traces (eval_shape: no compilation) to a scalar with router statistics."""
  cfg = micro_config()
  cfg.mode = "scene"
  cfg.model.encoder.in_channels = 7
  _, init_fn, loss_fn = dit_task.make_task(cfg)
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(cfg)()))
  assert batch["images"].shape == (2, 3, 56, 56, 7)
  variables = jax.eval_shape(init_fn, jax.random.PRNGKey(0), batch)
  import flax.linen as nn

  params = nn.meta.unbox(variables["params"])
  assert params["encoder"]["patch_embed"]["kernel"].shape[2] == 7
  loss, metrics = jax.eval_shape(loss_fn, params, batch, jax.random.PRNGKey(1))
  assert loss.shape == () and metrics["router/selection_freq"].shape == (3,)


def test_out_of_time_by_training_seconds_or_wall_clock_deadline(monkeypatch):
  """`_out_of_time`: checked at log steps only; either limit stops the loop."""
  now = {"mono": 100.0, "wall": 5000.0}
  monkeypatch.setattr(train_lib.time, "monotonic", lambda: now["mono"])
  monkeypatch.setattr(train_lib.time, "time", lambda: now["wall"])
  stop = train_lib._out_of_time
  assert not stop(10, 10, t_loop=0.0, time_limit=0.0)  # no limit
  assert stop(10, 10, t_loop=0.0, time_limit=50.0)  # 100 s of training > 50
  assert not stop(11, 10, t_loop=0.0, time_limit=50.0)  # not a log step
  assert not stop(10, 10, t_loop=0.0, time_limit=500.0)
  assert stop(10, 10, t_loop=0.0, time_limit=0.0, stop_at=4999.0)  # deadline passed
  assert not stop(10, 10, t_loop=0.0, time_limit=0.0, stop_at=5001.0)
  assert stop(10, 10, t_loop=0.0, time_limit=500.0, stop_at=4000.0)  # either one
