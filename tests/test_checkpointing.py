"""Checkpoints and the loop's guards: the resume config check runs before anything is
written and names every differing field; nothing non-finite is ever saved."""

import logging
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moca_jax import checkpointing, sharding, train_lib
from test_sharding import StandIn


def _config(**over):
  c = ml_collections.ConfigDict(
      dict(
          seed=0,
          batch_size=2,
          num_steps=2,
          log_every=1,
          mesh=dict(data=-1, fsdp=1),
          checkpoint=dict(every=2, keep=2, async_save=False),
          model=dict(width=32),
          data=dict(num_workers=0, dir="/data/a"),
      )
  )
  c.optim = train_lib.default_optim_config()
  c.optim.warmup_steps, c.optim.lr = 1, 1e-3
  for k, v in over.items():
    c[k] = v
  return c


def _run(config, workdir, nan_at=None, num_examples=100):
  """run_training of a small stand-in model on batches 0, 1, 2, ...; batch `nan_at` is NaN."""
  model = StandIn()

  def init_fn(rng, batch):
    return model.init(rng, batch["x"])

  def loss_fn(params, batch, rng):
    del rng
    return jnp.mean((model.apply({"params": params}, batch["x"]) - 1.0) ** 2), {}

  def example(i):
    value = np.nan if i == nan_at else float(i)
    return {"x": np.full((3, 5), value, np.float32), "index": np.int64(i)}

  ds = grain.MapDataset.range(num_examples).map(example)
  make = lambda: iter(ds.batch(1).to_iter_dataset())
  return train_lib.run_training(
      config=config,
      workdir=str(workdir),
      init_fn=init_fn,
      loss_fn=loss_fn,
      make_iterator=make,
      mesh=sharding.make_mesh(1, 1, devices=jax.devices()[:1]),
      batch_id_fn=lambda b: b["index"].tolist(),
      prepare_fn=lambda b: {"x": b["x"]},
      show_progress=False,
  )


def test_empty_training_data_is_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match="training data gave no batch: the dataset is empty"):
    _run(_config(batch_size=1), tmp_path, num_examples=0)


def test_nan_batch_at_step_1_is_never_saved(tmp_path):
  """checkpoint.every=2 and a NaN batch at step 1: step 1's loss is checked before the
  checkpoint of step 2 is written, so no checkpoint exists and a restart starts fresh."""
  c = _config(batch_size=1)
  with pytest.raises(train_lib.NonFiniteLossError, match=r"at step 1 \(batch \[1\]\)"):
    _run(c, tmp_path, nan_at=1)
  ckpt_dir = tmp_path / "checkpoints"
  assert not [p for p in os.listdir(ckpt_dir) if p.isdigit()]
  result = _run(c, tmp_path)  # the restart trains from scratch
  assert result.batch_log == [[0], [1]] and int(result.state.step) == 2
  assert bool(train_lib.all_finite(result.state.params))


def test_all_finite():
  assert bool(train_lib.all_finite({"a": jnp.ones(3)}, [jnp.zeros((2, 2))]))
  assert not bool(train_lib.all_finite({"a": jnp.array([1.0, jnp.inf])}))
  assert not bool(train_lib.all_finite({"a": jnp.ones(2), "b": jnp.array([jnp.nan])}))
  assert bool(train_lib.all_finite({"i": jnp.arange(3)}))  # integer leaves are skipped


def test_config_differences_flatten_and_sort():
  stored = {"a": 1, "m": {"w": 32, "d": [1, 2]}, "gone": 0}
  new = {"a": 1, "m": {"w": 64, "d": [1, 3]}, "added": {"x": 1}}
  assert checkpointing.config_differences(stored, new) == [
      ("added.x", None, 1),
      ("gone", 0, None),
      ("m.d", [1, 2], [1, 3]),
      ("m.w", 32, 64),
  ]
  assert checkpointing.config_differences(stored, stored) == []


def test_a_field_added_later_resumes_at_the_value_older_runs_had():
  """A VAE workdir checkpointed before data.analytic_fraction existed resumes with the new
  default (0.5: what those runs did, the field being read by 'mixed' runs only); another
  value is a difference like any other."""
  stored = {"data": {"source": "records", "dir": "/d"}}
  new = {"data": {"source": "records", "dir": "/d", "analytic_fraction": 0.5}}
  assert checkpointing.FIELDS_ADDED_LATER["data.analytic_fraction"] == 0.5
  assert checkpointing.config_differences(stored, new) == []
  new["data"]["analytic_fraction"] = 0.25
  assert checkpointing.config_differences(stored, new) == [("data.analytic_fraction", None, 0.25)]
  from experiments.configs.vae import get_config

  assert get_config("tiny").data.analytic_fraction == 0.5  # the default is that value


def test_resume_with_another_model_is_refused_before_anything_is_written(tmp_path, caplog):
  c = _config()
  _run(c, tmp_path)
  config_json = (tmp_path / "config.json").read_bytes()
  steps = sorted(os.listdir(tmp_path / "checkpoints"))

  other = _config(num_steps=4)
  other.model.width = 64
  other.data.dir = "/data/b"
  with pytest.raises(checkpointing.ConfigMismatchError) as e:
    _run(other, tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and "cannot resume from step 2" in msg
  assert "data.dir ('/data/a' -> '/data/b'), model.width (32 -> 64);" in msg
  assert "num_steps" not in msg.split(";")[0]  # allowed to change: not listed
  assert (tmp_path / "config.json").read_bytes() == config_json  # nothing written
  assert sorted(os.listdir(tmp_path / "checkpoints")) == steps

  # steps, logging and checkpoint cadence may change; batch size too, with a warning
  longer = _config(num_steps=4, log_every=5, batch_size=1)
  longer.checkpoint.every = 4
  with caplog.at_level(logging.WARNING, logger="moca_jax.checkpointing"):
    result = _run(longer, tmp_path)
  assert int(result.state.step) == 4
  assert any("batch_size 1 (was 2)" in r.getMessage() for r in caplog.records)
  stored = checkpointing.read_checkpoint_config(str(tmp_path / "checkpoints"))[0]
  assert stored["num_steps"] == 4 and stored["batch_size"] == 1
  assert checkpointing.read_checkpoint_config(str(tmp_path / "checkpoints"))[1] == 4
  assert b'"num_steps": 4' in (tmp_path / "config.json").read_bytes()
