"""train_vae: checkpoint round trip, a short run writing all outputs, non-finite guard."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import trimesh

from experiments import train_vae
from experiments.configs.vae import get_config
from moca_jax.vae import VecSetVAE


def _few_step_config():
  c = get_config("tiny")
  c.batch_size = 2
  c.num_steps = 3
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.model.num_latents = 16
  c.data.num_points = 64
  c.data.num_near = 64
  c.data.num_volume = 32
  c.model.loss.num_normal_points = 32
  c.eval.num_shapes = 2
  c.eval.resolution = 16
  c.eval.fine_resolution = 32
  return c


def test_orbax_checkpoint_round_trip(tmp_path):
  c = _few_step_config()
  model = VecSetVAE(ml_collections.FrozenConfigDict(c.model))
  tx = train_vae.make_optimizer(c)
  state = train_vae.create_state(model, tx, jax.random.PRNGKey(0))
  state["step"] = jnp.int32(7)
  mngr = train_vae.checkpoint_manager(tmp_path, c)
  assert train_vae.save_checkpoint(mngr, 7, state, c, force=True)
  mngr.wait_until_finished()
  other = train_vae.create_state(model, tx, jax.random.PRNGKey(1))
  restored = train_vae.restore_checkpoint(mngr, jax.eval_shape(lambda: other))
  mngr.close()
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
  model2, params, cfg = train_vae.load_vae(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, state["params"])
  assert cfg.model.num_latents == 16 and model2.config.num_latents == 16


def test_train_vae_run_writes_outputs_resumes_and_stops_on_nan(tmp_path, monkeypatch):
  c = _few_step_config()
  result = train_vae.train_and_evaluate(c, str(tmp_path))
  assert result["step"] == 3
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 3]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]
  assert all(np.isfinite(json.loads(l)["loss"]) for l in lines)
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
  for name in ("reconstruction.glb", "reconstruction.png", "loss_curve.png", "eval.json"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"
  mesh = trimesh.load(tmp_path / "reconstruction.glb", force="mesh")  # may be empty if untrained
  assert isinstance(mesh, trimesh.Trimesh)
  assert set(json.loads((tmp_path / "eval.json").read_text())["by_size"]) <= {
      "small", "medium", "large"}
  # resuming: more steps continue from the latest checkpoint (step 3), not from scratch; a
  # non-finite loss at step index 4 stops the run, naming the step, with checkpoint 4 kept
  c.num_steps = 6
  c.eval.num_shapes = 0
  real = train_vae.AnalyticShapeSource.batch

  def poisoned(self, step):
    b = real(self, step)
    if step == 4:
      b["near_sdf"] = np.full_like(b["near_sdf"], np.nan)
    return b

  monkeypatch.setattr(train_vae.AnalyticShapeSource, "batch", poisoned)
  with pytest.raises(FloatingPointError, match="at step 4"):
    train_vae.train_and_evaluate(c, str(tmp_path))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]
  assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == 4
