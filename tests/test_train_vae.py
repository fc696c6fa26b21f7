"""The VAE task (moca_jax.vae_task) on train_lib: records resume == straight, load_vae round
trip (EMA and raw), the analytic source learns one fixed shape and writes every output,
non-finite guard."""

import json

import jax
import numpy as np
import pytest
import trimesh

from data_pipeline import primitives, vae_batches
from experiments.configs.vae import get_config
from moca_jax import checkpointing, sharding, train_lib, vae_task


def _mesh1():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def _few_step_config(source="analytic", data_dir=""):
  c = get_config("tiny")
  c.batch_size = 2
  c.num_steps = 3
  c.log_every = 1
  c.checkpoint.every = 2
  c.checkpoint.keep = 2
  c.warmup_steps = 1
  c.model.num_latents = 16
  c.model.enc_width = c.model.dec_width = 32
  c.model.dec_layers = 1
  c.data.num_points = 64
  c.data.num_near = 32
  c.data.num_volume = 16
  c.model.loss.num_normal_points = 32
  c.eval.num_shapes = 0
  c.eval.write_mesh = False
  c.data.source = source
  c.data.dir = data_dir
  c.data.max_components = 4
  return c


@pytest.fixture(scope="module")
def data_dir(tiny_shards):
  return tiny_shards(num_shards=1)


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_records_resume_equals_straight_and_load_vae(data_dir, tmp_path):
  c = _few_step_config("records", data_dir)
  c.data.parts_per_element = 2
  c.num_steps = 4
  c.checkpoint.every = 4  # saves: a at 4; b at 2 (end of the first run) and 4
  c.optim.ema_decay = 0.5
  straight = vae_task.train_and_evaluate(c, str(tmp_path / "a"), mesh=_mesh1(), show_progress=False)
  assert straight["step"] == 4 and np.isfinite(straight["metrics"]["loss"])
  vae_task.train_and_evaluate(
      c, str(tmp_path / "b"), num_steps=2, mesh=_mesh1(), show_progress=False
  )
  resumed = vae_task.train_and_evaluate(c, str(tmp_path / "b"), mesh=_mesh1(), show_progress=False)
  assert resumed["step"] == 4
  # the iterator state went into the checkpoint: the resumed run saw the same batches
  assert resumed["metrics"] == straight["metrics"]
  lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  for use_ema in (True, False):
    _, pa, _ = vae_task.load_vae(tmp_path / "a", use_ema=use_ema)
    _, pb, cfg = vae_task.load_vae(tmp_path / "b", use_ema=use_ema)
    _assert_trees_equal(pa, pb)
  assert cfg.data.source == "records" and cfg.model.num_latents == 16
  ema = vae_task.load_vae(tmp_path / "a")[1]
  raw = vae_task.load_vae(tmp_path / "a", use_ema=False)[1]
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))
  # the interrupted run's step-2 checkpoint holds other params than the final ones
  early = vae_task.load_vae(tmp_path / "b", step=2, use_ema=False)[1]
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(early), jax.tree.leaves(raw)))


def test_mixed_resume_equals_straight_and_batches_hold_both_sources(data_dir, tmp_path):
  c = _few_step_config("mixed", data_dir)
  c.batch_size = 4
  c.data.analytic_fraction = 0.5
  c.num_steps = 4
  c.checkpoint.every = 4
  batch = next(vae_task.make_iterator_fn(c)())
  assert batch["surface_points"].shape == (4, 64, 3)
  assert batch["index"].tolist()[2:] == [0, 0]  # the last two rows: analytic batch 0
  straight = vae_task.train_and_evaluate(c, str(tmp_path / "a"), mesh=_mesh1(), show_progress=False)
  vae_task.train_and_evaluate(
      c, str(tmp_path / "b"), num_steps=2, mesh=_mesh1(), show_progress=False
  )
  resumed = vae_task.train_and_evaluate(c, str(tmp_path / "b"), mesh=_mesh1(), show_progress=False)
  assert resumed["step"] == straight["step"] == 4
  assert resumed["metrics"] == straight["metrics"]  # both sources' positions were restored
  _assert_trees_equal(
      vae_task.load_vae(tmp_path / "a", use_ema=False)[1],
      vae_task.load_vae(tmp_path / "b", use_ema=False)[1],
  )
  c.data.analytic_fraction = 1.0
  with pytest.raises(ValueError, match="analytic_fraction must be in"):
    vae_task.make_iterator_fn(c)
  c.data.source = "meshes"
  with pytest.raises(ValueError, match="'analytic', 'records' or 'mixed', got 'meshes'"):
    vae_task.make_iterator_fn(c)


@pytest.mark.parametrize(
    "workers, fraction, want",
    [(0, 0.5, (0, 0)), (1, 0.5, (1, 0)), (2, 0.5, (1, 1)), (14, 0.5, (9, 5)), (30, 0.9, (5, 25))],
)
def test_mixed_workers_give_each_source_its_share(workers, fraction, want):
  assert vae_task.mixed_workers(workers, fraction) == want


def test_hand_driven_step_checkpoint_and_load_vae_round_trip(tmp_path):
  c = _few_step_config()
  c.optim.ema_decay = 0.5
  _, init_fn, loss_fn = vae_task.make_task(c)
  tx = train_lib.make_optimizer(c.optim)
  source = vae_batches.AnalyticShapeSource(c.data, 2, 0)
  spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), vae_task.model_batch(source.batch(0))
  )
  state, setup = train_lib.create_train_state(init_fn, tx, spec, jax.random.PRNGKey(0), _mesh1())
  step, _ = train_lib.compile_train_step(
      loss_fn, tx, train_lib.make_schedule(c.optim), c.optim.ema_decay, setup, spec, _mesh1()
  )
  for _ in range(2):
    state, metrics = step(state, vae_task.model_batch(next(source)), jax.random.PRNGKey(1))
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  ck = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  assert ck.save(2, state, None, c, force=True)
  ck.close()
  model2, ema, cfg = vae_task.load_vae(tmp_path)
  _, raw, _ = vae_task.load_vae(tmp_path, use_ema=False)
  _assert_trees_equal(ema, {"params": state.ema_params})
  _assert_trees_equal(raw, {"params": state.params})
  assert any(
      not np.array_equal(x, y)  # EMA != raw
      for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(raw))
  )
  assert cfg.model.num_latents == 16 and model2.config.num_latents == 16
  # the saved state restores as run_training's TrainState (same layout)
  ck = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  restored, data_state, _ = ck.restore(None, setup.abstract_state)
  ck.close()
  assert data_state is None and int(restored.step) == 2
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.opt_state, state.opt_state)
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    vae_task.load_vae(tmp_path / "nowhere")


def test_analytic_learns_a_fixed_shape_writes_outputs_and_stops_on_nan(tmp_path, monkeypatch):
  sphere = primitives.Sphere(radius=0.5, translation=(0.1, 0.0, -0.1))
  monkeypatch.setattr(vae_batches.AnalyticShapeSource, "random_shape", lambda self, rng: sphere)
  c = _few_step_config()
  c.num_steps = 40
  c.log_every = 5
  c.checkpoint.every = 20
  c.learning_rate = 3e-3
  c.warmup_steps = 5
  c.model.sample_posterior = False
  c.eval.num_shapes = 2
  c.eval.resolution = 16
  c.eval.fine_resolution = 32
  c.eval.write_mesh = True
  result = vae_task.train_and_evaluate(c, str(tmp_path), mesh=_mesh1(), show_progress=False)
  assert result["step"] == 40
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == list(range(5, 41, 5))
  assert lines[-1]["loss"] < 0.5 * lines[0]["loss"], [l["loss"] for l in lines]
  assert lines[-1]["near_l1"] < 0.5 * lines[0]["near_l1"]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
      20,
      40,
  ]
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
  for name in ("reconstruction.glb", "reconstruction.png", "loss_curve.png", "eval.json"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"
  assert isinstance(trimesh.load(tmp_path / "reconstruction.glb", force="mesh"), trimesh.Trimesh)
  ev = json.loads((tmp_path / "eval.json").read_text())
  assert ev["params"] == "ema" and set(ev["by_size"]) == {"medium"}
  assert ev["by_size"]["medium"]["count"] == 2

  # resuming with more steps continues from step 40; a NaN batch at step index 42 stops
  # the run with an error naming the step
  c.num_steps = 45
  c.eval.num_shapes = 0
  real = vae_batches.AnalyticShapeSource.batch

  def poisoned(self, step):
    b = real(self, step)
    if step == 42:
      b["near_sdf"] = np.full_like(b["near_sdf"], np.nan)
    return b

  monkeypatch.setattr(vae_batches.AnalyticShapeSource, "batch", poisoned)
  with pytest.raises(FloatingPointError, match="at step 42"):
    vae_task.train_and_evaluate(c, str(tmp_path), mesh=_mesh1(), show_progress=False)


def test_bad_data_source_is_named():
  c = _few_step_config("nowhere")
  with pytest.raises(ValueError, match="'analytic', 'records' or 'mixed', got 'nowhere'"):
    vae_task.make_iterator_fn(c)
  with pytest.raises(ValueError, match="data.dir is empty"):
    vae_task.make_iterator_fn(_few_step_config("records"))
