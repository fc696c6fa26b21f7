"""experiments/diagnose_dit.py: its measurements against numpy, and a run end to end on an
untrained tiny checkpoint and a latents folder."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import diagnose_dit as D


def test_iou_and_variance_share_match_definitions():
  a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], bool)
  b = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]], bool)
  assert D.occupancy_iou(a, b) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  rng = np.random.default_rng(0)
  means = rng.normal(size=(30, 1, 4)) * 3.0
  parts = means + 0.1 * rng.normal(size=(30, 16, 4))
  share = D.mean_variance_share(parts)
  centred = parts - parts.mean(axis=(0, 1))
  dev = parts - parts.mean(axis=1, keepdims=True)
  assert share == pytest.approx(1 - np.square(dev).sum() / np.square(centred).sum())
  assert 0.99 < share < 1.0
  probes = D.deviation_probes(parts.astype(np.float32), 0.05)
  np.testing.assert_allclose(probes["mean only"].std(axis=1), 0.0, atol=1e-6)
  np.testing.assert_allclose(probes["deviations x0.5"].mean(axis=1), parts.mean(axis=1), atol=1e-5)


def test_loss_by_time_and_denoising_of_an_exact_velocity():
  """With the true velocity of a point mass (z known), the loss is 0 at every t for every
  condition and denoising from any t0 returns z."""
  z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 5)), jnp.float32)
  mask = jnp.ones((2, 3), bool)
  cond = jnp.ones((2, 7))

  def exact(x, t, c):  # x = (1 - t) z + t eps  ->  v = eps - z = (x - z) / t
    return (x - z) / t[:, None, None, None]

  losses = D.loss_by_time(exact, z, cond, mask, (0.2, 0.9), jax.random.PRNGKey(0))
  np.testing.assert_allclose(losses, 0.0, atol=1e-8)
  out = D.denoise_from(exact, z, cond, 0.7, 5, 1.0, jax.random.PRNGKey(1))
  np.testing.assert_allclose(np.asarray(out), np.asarray(z), atol=1e-5)


def test_run_end_to_end(tmp_path, save_untrained_vae):
  from data_pipeline import records
  from experiments.configs import dit as dit_configs
  from moca_jax import checkpointing, dit_task, sharding, train_lib

  vae_dir = str(tmp_path / "vae")
  save_untrained_vae(vae_dir, num_latents=16)
  cfg = dit_configs.get_config("tiny")
  cfg.data.source, cfg.data.max_components = "synthetic", 3
  cfg.model.dit.num_blocks, cfg.model.dit.latent_tokens, cfg.model.encoder.depth = 2, 16, 1
  cfg.model.latent_norm.kind = "part_mean_residual"
  cfg.batch_size, cfg.vae.workdir = 2, vae_dir
  cfg = dit_task.resolve_latent_norm(cfg)
  _, init_fn, _ = dit_task.make_task(cfg)
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(cfg)()))
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  state, _ = train_lib.create_train_state(
      init_fn, train_lib.make_optimizer(cfg.optim), spec, jax.random.PRNGKey(0), mesh
  )
  dit_dir = str(tmp_path / "dit")
  ckpt = checkpointing.Checkpointer(os.path.join(dit_dir, "checkpoints"))
  ckpt.save(1, state, None, cfg, force=True)
  ckpt.close()
  rng = np.random.default_rng(2)
  size = cfg.model.encoder.image_size
  recs = [
      records.encode_record(
          {
              "latents": rng.normal(size=(n, 16, cfg.model.dit.latent_channels)).astype(np.float32),
              "images": rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8),
              "masks": np.zeros((1, size, size), np.uint8),
              "part_bounds": np.zeros((n, 2, 3), np.float32),
          },
          {"kind": "latents", "key": f"r{i}", "num_parts": n, "type": "object"},
      )
      for i, n in enumerate((2, 3, 2, 3))
  ]
  data = tmp_path / "lat"
  data.mkdir()
  base = data / records.shard_name(0, 1)
  records.write_shard(str(base) + ".array_record", recs)
  records.atomic_write_json(str(base) + ".json", {"count": len(recs)})
  r = D.run(
      dit_dir,
      str(data),
      batches=2,
      batch_size=2,
      max_components=3,
      times=(0.5, 1.0),
      denoise_t0=(0.5,),
      denoise_steps=2,
      cfg=2.0,
      grid=8,
  )
  assert r["parts"] == 10 and r["latent_norm"] == "part_mean_residual"
  assert [x["t"] for x in r["loss_by_t"]] == [0.5, 1.0]
  assert set(r["denoise_iou"]["0.5"]) == {"cfg 1", "cfg 2"}
  json.dumps(r)  # JSON-ready
  text = D.markdown(r)
  assert "## 3. Partial denoising" in text and "| 0.5 |" in text
  assert os.path.getsize(D.plot_loss_by_t(r, str(tmp_path / "plot.png"))) > 1000
