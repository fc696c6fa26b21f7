"""Latent normalisation (moca_jax.latent_norm): exact inverse, unit variance on the data it
was fitted to, a naive numpy reference, statistics from records, and its use in the DiT
loss and the sampler."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moca_jax import latent_norm


def _parts(rng, p=40, l=16, c=6):
  """Parts whose tokens share a large per-part offset and deviate from it a little (the
  structure measured on the bundled VAE's latents)."""
  offset = rng.normal(size=(p, 1, c)) * np.linspace(0.5, 3.0, c) + 0.7
  return (offset + 0.1 * rng.normal(size=(p, l, c))).astype(np.float32)


def _naive_normalize(z, stats):
  out = np.empty_like(z, dtype=np.float64)
  for idx in np.ndindex(z.shape[:-2]):
    part = z[idx].astype(np.float64)
    for ch in range(z.shape[-1]):
      m = part[:, ch].mean()
      out[idx][:, ch] = (m - stats.mean[ch]) / stats.between_std[ch] + (
          part[:, ch] - m
      ) / stats.within_std[ch]
  return out


def test_stats_match_numpy_and_give_unit_variance():
  z = _parts(np.random.default_rng(0))
  stats = latent_norm.stats_from_latents(z)
  m = z.astype(np.float64).mean(1)
  np.testing.assert_allclose(stats.mean, m.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats.between_std, m.std(0), rtol=1e-5)
  np.testing.assert_allclose(stats.within_std, (z - m[:, None]).std(axis=(0, 1)), rtol=1e-5)
  assert stats.parts == 40
  # chunks accumulate to the same statistics as one stack
  chunked = latent_norm.stats_from_latents([z[:7], z[7]] + list(z[8:]))
  np.testing.assert_allclose(chunked.within_std, stats.within_std, rtol=1e-6)
  np.testing.assert_allclose(chunked.between_std, stats.between_std, rtol=1e-6)
  u = np.asarray(latent_norm.normalize(z, stats), np.float64)
  mu = u.mean(1)
  np.testing.assert_allclose(mu.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(mu.std(0), 1.0, rtol=1e-4)
  np.testing.assert_allclose((u - mu[:, None]).std(axis=(0, 1)), 1.0, rtol=1e-4)


def test_normalize_matches_naive_reference_and_inverts_exactly():
  rng = np.random.default_rng(1)
  z = _parts(rng, p=12).reshape(3, 4, 16, 6)  # [B, N, L, C]
  stats = latent_norm.stats_from_latents(_parts(rng))
  u = np.asarray(jax.jit(lambda x: latent_norm.normalize(x, stats))(z))  # traces under jit
  np.testing.assert_allclose(u, _naive_normalize(z, stats), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(latent_norm.denormalize(u, stats)), z, atol=1e-5)
  w = rng.normal(size=z.shape).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(latent_norm.normalize(latent_norm.denormalize(w, stats), stats)), w, atol=1e-4
  )
  # 'none' is the identity
  assert latent_norm.normalize(z, None) is z and latent_norm.denormalize(z, None) is z


def test_token_order_and_part_independence():
  """Permuting a part's tokens permutes its normalised tokens (the mean is over L), and a
  part's result does not depend on the other parts."""
  rng = np.random.default_rng(2)
  z = _parts(rng, p=5)
  stats = latent_norm.stats_from_latents(_parts(rng))
  perm = rng.permutation(z.shape[1])
  u = np.asarray(latent_norm.normalize(z, stats))
  np.testing.assert_allclose(
      np.asarray(latent_norm.normalize(z[:, perm], stats)), u[:, perm], atol=3e-5
  )
  np.testing.assert_allclose(np.asarray(latent_norm.normalize(z[2:3], stats)), u[2:3], atol=1e-6)


def test_stats_from_records_reads_in_order_and_stops_at_max_parts(tmp_path):
  from data_pipeline import records

  rng = np.random.default_rng(3)
  lat = [_parts(rng, p=n) for n in (3, 4, 5)]
  recs = [
      records.encode_record(
          {"latents": a}, {"kind": "latents", "key": f"r{i}", "num_parts": len(a)}
      )
      for i, a in enumerate(lat)
  ]
  for s, chunk in enumerate((recs[:2], recs[2:])):
    base = tmp_path / records.shard_name(s, 2)
    records.write_shard(str(base) + ".array_record", chunk)
    records.atomic_write_json(str(base) + ".json", {"count": len(chunk)})
  full = latent_norm.stats_from_records(str(tmp_path))
  ref = latent_norm.stats_from_latents(np.concatenate(lat))
  np.testing.assert_allclose(full.within_std, ref.within_std, rtol=1e-6)
  assert full.parts == 12
  first = latent_norm.stats_from_records(str(tmp_path), max_parts=5)
  np.testing.assert_allclose(
      first.between_std,
      latent_norm.stats_from_latents(np.concatenate(lat)[:5]).between_std,
      rtol=1e-6,
  )
  assert first.parts == 5
  with pytest.raises(FileNotFoundError, match="nothing"):
    latent_norm.stats_from_records(str(tmp_path / "nothing"))


def test_config_round_trip_and_errors():
  assert latent_norm.stats_from_config(ml_collections.ConfigDict({"dit": {}})) is None
  model = ml_collections.ConfigDict({"latent_norm": latent_norm.latent_norm_config("none")})
  assert latent_norm.stats_from_config(model) is None
  model.latent_norm.kind = "part_mean_residual"
  with pytest.raises(ValueError, match="needs mean, between_std and within_std"):
    latent_norm.stats_from_config(model)
  with pytest.raises(ValueError, match="expected one of"):
    latent_norm.latent_norm_config("zscore")
  from experiments.configs import dit as dit_configs

  c = dit_configs.get_config("tiny")
  c.data.source = "synthetic"
  c.model.latent_norm.kind = "part_mean_residual"
  parts = _parts(np.random.default_rng(4), c=c.model.dit.latent_channels)
  filled = latent_norm.with_stats(c, [parts])
  stats = latent_norm.stats_from_config(filled.model)
  ref = latent_norm.stats_from_latents(parts)
  np.testing.assert_allclose(stats.within_std, ref.within_std, rtol=1e-5)  # 6 digits kept
  assert c.model.latent_norm.mean == ()  # the input config is not changed
  assert latent_norm.with_stats(filled) is filled  # already filled: unchanged
  for size, kind in (("bundle", "part_mean_residual"), ("paper", "none")):
    assert dit_configs.get_config(size).model.latent_norm.kind == kind


def test_dit_loss_diffuses_normalised_latents():
  """With latent_norm the DiT loss on raw latents equals the loss of the same model
  without it on the normalised latents (same params, rng, batch otherwise)."""
  from moca_jax import dit_task
  from tests.test_train_dit import micro_config

  raw = micro_config()
  normed = micro_config()
  normed.model.latent_norm.kind = "part_mean_residual"
  normed = dit_task.resolve_latent_norm(normed)
  stats = latent_norm.stats_from_config(normed.model)
  assert stats is not None and stats.parts > 0
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(raw)()))
  _, init_fn, loss_raw = dit_task.make_task(raw)
  _, _, loss_normed = dit_task.make_task(normed)
  # jitted (eager Flax is slow on CPU); loss_raw: one program for both batches
  params = jax.jit(init_fn)(jax.random.PRNGKey(0), batch)["params"]
  loss_raw, loss_normed = jax.jit(loss_raw), jax.jit(loss_normed)
  rng = jax.random.PRNGKey(5)
  moved = dict(batch, latents=np.asarray(latent_norm.normalize(batch["latents"], stats)))
  a = float(loss_normed(params, batch, rng)[0])
  b = float(loss_raw(params, moved, rng)[0])
  assert a == pytest.approx(b, rel=1e-5)
  assert a != pytest.approx(float(loss_raw(params, batch, rng)[0]), rel=1e-3)


def test_sampler_returns_vae_space_latents():
  """The sampler draws in the normalised space and returns `denormalize` of what the same
  params draw without latent_norm."""
  from moca_jax import dit_task, pipeline
  from tests.test_train_dit import micro_config

  raw = micro_config()
  normed = micro_config()
  normed.model.latent_norm.kind = "part_mean_residual"
  normed = dit_task.resolve_latent_norm(normed)
  stats = latent_norm.stats_from_config(normed.model)
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(raw)()))
  params = jax.jit(dit_task.make_task(raw).init_fn)(jax.random.PRNGKey(0), batch)["params"]
  images = dit_task.prepare_images(jnp.asarray(batch["images"][:1]), raw.model.encoder)

  def sample(cfg):
    model = dit_task.ImageConditionedDiT(ml_collections.FrozenConfigDict(cfg.model))
    z, _ = pipeline.sample_latents(
        model,
        params,
        images,
        jax.random.PRNGKey(1),
        num_components=2,
        steps=2,
        cfg_scale=2.0,
        return_routing=False,
    )
    return np.asarray(z)

  z_raw, z_normed = sample(raw), sample(normed)
  np.testing.assert_allclose(
      z_normed, np.asarray(latent_norm.denormalize(z_raw, stats)), rtol=1e-4, atol=1e-4
  )


def test_posterior_noise_adds_the_vae_noise_in_quadrature():
  """posterior_noise: both scales become sqrt(s_data^2 + s_post^2); the posterior std comes
  from posterior_std_fn once and is stored with the statistics."""
  from experiments.configs import dit as dit_configs

  c = dit_configs.get_config("tiny")
  c.data.source = "synthetic"
  c.model.latent_norm.kind = "part_mean_residual"
  c.model.latent_norm.posterior_noise = True
  channels = c.model.dit.latent_channels
  parts = _parts(np.random.default_rng(6), c=channels)
  post = np.linspace(0.05, 2.0, channels)
  assert latent_norm.needs_stats(c)
  with pytest.raises(ValueError, match="posterior_std_fn"):
    latent_norm.with_stats(c, [parts])
  calls = []
  filled = latent_norm.with_stats(c, [parts], lambda: calls.append(1) or post)
  assert calls == [1] and not latent_norm.needs_stats(filled)
  stats = latent_norm.stats_from_config(filled.model)
  ref = latent_norm.stats_from_latents(parts)
  np.testing.assert_allclose(stats.within_std, np.hypot(ref.within_std, post), rtol=1e-5)
  np.testing.assert_allclose(stats.between_std, np.hypot(ref.between_std, post), rtol=1e-5)
  z = parts[:3]
  np.testing.assert_allclose(
      np.asarray(latent_norm.denormalize(latent_norm.normalize(z, stats), stats)), z, atol=1e-5
  )
  filled.model.latent_norm.posterior_std = (0.1,)
  with pytest.raises(ValueError, match=f"posterior_std of {channels} channels"):
    latent_norm.stats_from_config(filled.model)


def test_vae_posterior_std_of_a_checkpoint(tmp_path, save_untrained_vae):
  """dit_task.vae_posterior_std: one positive std per channel of the named VAE, the same on
  a second call (fixed analytic shapes), and a clear error without vae.workdir."""
  from moca_jax import dit_task
  from tests.test_train_dit import micro_config

  c = micro_config()
  with pytest.raises(ValueError, match="vae.workdir"):
    dit_task.vae_posterior_std(c)
  vae_dir = str(tmp_path / "vae")
  save_untrained_vae(vae_dir, num_latents=16)
  c.vae.workdir = vae_dir
  a = dit_task.vae_posterior_std(c, num_shapes=64)
  b = dit_task.vae_posterior_std(c, num_shapes=64)
  assert a.shape == (c.model.dit.latent_channels,) and np.all(a > 0)
  np.testing.assert_array_equal(a, b)
