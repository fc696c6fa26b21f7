"""Params-only warm restarts from a bundle (config.init.from_bundle) and the VAE's
decoder-only fine-tune on posterior means (train_encoder=False, decode_mean_fraction)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from experiments.configs import dit as dit_configs
from experiments.configs import vae as vae_configs
from moca_jax import bundle, dit_task, sharding, vae, vae_task


def _mesh1():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def _vae_config():
  c = vae_configs.get_config("tiny")
  c.batch_size, c.num_steps, c.log_every, c.warmup_steps = 2, 2, 1, 1
  c.checkpoint.every = 2
  c.model.num_latents = 16
  c.model.enc_width = c.model.dec_width = 32
  c.model.dec_layers = 1
  c.data.num_points, c.data.num_near, c.data.num_volume = 64, 32, 16
  c.model.loss.num_normal_points = 32
  c.eval.num_shapes = 0
  c.eval.write_mesh = False
  return c


def _dit_config():
  c = dit_configs.get_config("tiny")
  c.data.source = "synthetic"
  c.data.max_components = 3
  c.data.synthetic_examples = 8
  c.model.dit.num_blocks = 2
  c.model.encoder.depth = 1
  c.batch_size, c.log_every = 2, 1
  c.optim.warmup_steps = 1
  return c


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
  """A bundle whose weights are NOT what the training seed initialises (another PRNG key)."""
  dit_config, vae_config = _dit_config(), _vae_config()
  s = dit_config.model.encoder.image_size
  d = dit_config.model.dit
  batch = {
      "images": np.zeros((1, s, s, 3), np.uint8),
      "latents": np.zeros((1, 2, d.latent_tokens, d.latent_channels), np.float32),
      "component_mask": np.ones((1, 2), bool),
  }
  unbox = lambda t: jax.tree.map(np.asarray, __import__("flax").linen.meta.unbox(t))
  # inits jitted (eager Flax is slow on CPU: this fixture took ~30 s on 2 cores)
  dit_params = jax.jit(dit_task.make_task(dit_config).init_fn)(jax.random.PRNGKey(123), batch)[
      "params"
  ]
  model, _ = vae_task.abstract_params(vae_config)
  vae_params = jax.jit(model.init)(*vae_task.init_args(model, jax.random.PRNGKey(321)))["params"]
  folder = str(tmp_path_factory.mktemp("bundle"))
  bundle.write_bundle(folder, dit_config, unbox(dit_params), vae_config, unbox(vae_params))
  return folder


def test_mix_in_means_per_example():
  samples = jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 3, 2)
  means = -samples
  rng = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(vae.mix_in_means(samples, means, 0.0, rng), samples)
  np.testing.assert_array_equal(vae.mix_in_means(samples, means, 1.0, rng), means)
  mixed = np.asarray(vae.mix_in_means(samples, means, 0.5, rng))
  is_mean = np.all(mixed == np.asarray(means), axis=(1, 2))
  is_sample = np.all(mixed == np.asarray(samples), axis=(1, 2))
  assert np.all(is_mean | is_sample)  # whole examples, never a blend
  assert 16 <= is_mean.sum() <= 48  # about half of 64
  with pytest.raises(ValueError, match="decode_mean_fraction"):
    vae.mix_in_means(samples, means, 1.5, rng)


def test_encoder_param_names():
  c = _vae_config()
  _, abstract = vae_task.abstract_params(c)
  enc = sorted(k for k in abstract if vae.is_encoder_param(k))
  dec = sorted(k for k in abstract if not vae.is_encoder_param(k))
  assert "enc_moments" in enc and "point_embed" in enc
  assert "query_embed" in dec and "out_proj" in dec and "dec_in" in dec


def test_vae_decoder_finetune_from_bundle(tiny_bundle, tmp_path):
  c = _vae_config()
  c.init.from_bundle = tiny_bundle
  c.train_encoder = False
  c.model.decode_mean_fraction = 0.5
  res = vae_task.train_and_evaluate(c, str(tmp_path / "w"), mesh=_mesh1(), show_progress=False)
  assert res["step"] == 2 and np.isfinite(res["metrics"]["loss"])
  _, abstract = vae_task.abstract_params(c)
  start = _flat(bundle.params_for_training(tiny_bundle, "vae", abstract))
  for use_ema in (False, True):
    trained = _flat(vae_task.load_vae(tmp_path / "w", use_ema=use_ema)[1]["params"])
    # the encoder is the bundle's, bit for bit (the EMA of a constant is that constant);
    # the decoder trained away from the bundle's
    changed = {k for k in trained if not np.array_equal(trained[k], start[k])}
    assert not {k for k in changed if vae.is_encoder_param(k.split("/")[0])}, use_ema
    assert {k for k in changed if k.startswith("dec_")}, use_ema
  # The fine-tune swapped into (a copy of) the bundle: its DiT and encoder as they were, the
  # new decoder, the runs after the bundle's; a VAE whose encoder trained too is refused.
  import shutil

  from experiments import export_bundle

  target = str(tmp_path / "swapped")
  shutil.copytree(tiny_bundle, target)
  dit_bytes = open(f"{target}/dit.npz", "rb").read()
  info = export_bundle.replace_vae(target, str(tmp_path / "w"))
  assert open(f"{target}/dit.npz", "rb").read() == dit_bytes
  swapped = _flat(bundle.read_bundle(target).vae_params)
  ema = _flat(vae_task.load_vae(tmp_path / "w")[1]["params"])
  for k in swapped:
    np.testing.assert_array_equal(swapped[k], np.asarray(ema[k], jnp.bfloat16).astype(np.float32))
  assert info["card"]["vae"]["steps"] == 2 and len(info["card"]["vae"]["runs"]) == 1
  # labelled with the bundle the fine-tune started from, not the copy it was swapped into
  assert info["card"]["vae"]["runs"][0]["warm_restart_from"] == os.path.normpath(tiny_bundle)
  assert "decoder was fine-tuned with its encoder frozen" in info["card"]["data"]
  assert not any(p.name.endswith((".old", ".updating")) for p in tmp_path.iterdir())
  # swapping the same fine-tune in again replaces its runs rather than listing them twice
  again = export_bundle.replace_vae(target, str(tmp_path / "w"))
  assert again["card"]["vae"]["runs"] == info["card"]["vae"]["runs"]
  assert again["card"]["data"] == info["card"]["data"]
  c.train_encoder = True
  vae_task.train_and_evaluate(c, str(tmp_path / "all"), mesh=_mesh1(), show_progress=False)
  before = open(f"{target}/vae.npz", "rb").read()
  with pytest.raises(bundle.BundleError, match="encoder parameters differ from the bundle's"):
    export_bundle.replace_vae(target, str(tmp_path / "all"))
  assert open(f"{target}/vae.npz", "rb").read() == before


def test_decoder_finetune_swaps_into_a_float32_stored_bundle(tiny_bundle, tmp_path):
  """float32 storage keeps every bit of the weights, so the frozen encoder's EMA must equal
  the stored encoder exactly for export_bundle.replace_vae to accept the fine-tune."""
  from experiments import export_bundle  # pylint: disable=g-import-not-at-top

  src = bundle.read_bundle(tiny_bundle)
  folder = str(tmp_path / "f32")
  bundle.write_bundle(folder, src.dit_config, src.dit_params, src.vae_config, src.vae_params,
                      storage_dtype="float32")
  c = _vae_config()
  c.init.from_bundle = folder
  c.train_encoder = False
  vae_task.train_and_evaluate(c, str(tmp_path / "w"), mesh=_mesh1(), show_progress=False)
  info = export_bundle.replace_vae(folder, str(tmp_path / "w"))
  assert info["storage_dtype"] == "float32"
  swapped = _flat(bundle.read_bundle(folder).vae_params)
  ema = _flat(vae_task.load_vae(tmp_path / "w")[1]["params"])
  for k in swapped:
    np.testing.assert_array_equal(swapped[k], np.asarray(ema[k], np.float32), err_msg=k)


def test_dit_warm_start_from_bundle_and_mismatch(tiny_bundle, tmp_path):
  c = _dit_config()
  c.init.from_bundle = tiny_bundle
  c.optim.lr = 0.0  # the params stay where the run started
  res = dit_task.train_and_evaluate(
      c, str(tmp_path / "w"), num_steps=1, mesh=_mesh1(), show_progress=False, eval_batches=0
  )
  start = _flat(bundle.params_for_training(tiny_bundle, "dit", dit_task.abstract_params(c)))
  for tree in (res.state.params, res.state.ema_params):
    got = _flat(tree)  # the EMA of a constant is that constant, exactly
    assert set(got) == set(start)
    for k in start:
      np.testing.assert_array_equal(got[k], start[k], err_msg=k)
  bad = _dit_config()
  bad.init.from_bundle = tiny_bundle
  bad.model.dit.num_blocks = 3
  with pytest.raises(bundle.BundleError, match="init.from_bundle=.*missing"):
    dit_task.train_and_evaluate(
        bad, str(tmp_path / "bad"), num_steps=1, mesh=_mesh1(), show_progress=False, eval_batches=0
    )
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_dit_warm_start_of_the_dit_alone_keeps_a_fresh_encoder(tiny_bundle, tmp_path):
  c = _dit_config()
  c.optim.lr = 0.0
  fresh = dit_task.train_and_evaluate(
      c, str(tmp_path / "fresh"), num_steps=1, mesh=_mesh1(), show_progress=False, eval_batches=0
  )
  c.init.from_bundle = tiny_bundle
  c.init.bundle_parts = ("dit",)
  res = dit_task.train_and_evaluate(
      c, str(tmp_path / "w"), num_steps=1, mesh=_mesh1(), show_progress=False, eval_batches=0
  )
  start = _flat(
      bundle.params_for_training(tiny_bundle, "dit", dit_task.abstract_params(c), ("dit",))
  )
  got, init = _flat(res.state.params), _flat(fresh.state.params)
  assert set(start) == {k for k in got if k.startswith("dit/")}
  for k in got:
    want = start[k] if k.startswith("dit/") else init[k]  # the encoder as freshly initialised
    np.testing.assert_array_equal(got[k], want, err_msg=k)
  assert any(not np.array_equal(init[k], start[k]) for k in start)  # the test can tell
  with pytest.raises(ValueError, match="not top-level params"):
    bundle.params_for_training(tiny_bundle, "dit", dit_task.abstract_params(c), ("nothing",))


def test_dit_warm_start_keeps_the_bundles_latent_norm(tmp_path):
  """A warm restart of the DiT continues in the latent space it learned: the bundle's
  latent_norm statistics are taken (not recomputed from the new data) when the kind and
  posterior_noise agree; another kind recomputes them."""
  from moca_jax import latent_norm

  c = _dit_config()
  c.model.latent_norm.kind = "part_mean_residual"
  c.model.latent_norm.mean = (0.5,) * c.model.dit.latent_channels
  c.model.latent_norm.between_std = (2.0,) * c.model.dit.latent_channels
  c.model.latent_norm.within_std = (0.25,) * c.model.dit.latent_channels
  folder = str(tmp_path / "b")
  vae_config = _vae_config()
  model, _ = vae_task.abstract_params(vae_config)
  vae_params = jax.jit(model.init)(*vae_task.init_args(model, jax.random.PRNGKey(0)))["params"]
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dit_task.abstract_params(c))
  unbox = lambda t: jax.tree.map(np.asarray, __import__("flax").linen.meta.unbox(t))
  bundle.write_bundle(folder, c, params, vae_config, unbox(vae_params))
  new = _dit_config()
  new.model.latent_norm.kind = "part_mean_residual"
  new.init.from_bundle = folder
  got = latent_norm.stats_from_config(dit_task.resolve_latent_norm(new).model)
  np.testing.assert_array_equal(got.within_std, 0.25)
  new.init.bundle_parts = ("encoder",)  # the DiT is not taken: its own statistics
  got = latent_norm.stats_from_config(dit_task.resolve_latent_norm(new).model)
  assert not np.allclose(got.within_std, 0.25)


def test_swapped_vae_runs_follow_the_bundles_and_replace_an_earlier_swap():
  """A decoder fine-tune's runs count on from the bundle's, its first marked with the bundle
  it warm-started from; a later swap of the same (or resumed) workdir cuts the card's
  history before the runs it already holds."""
  from experiments import export_bundle as eb

  def run(start, end, finished):
    return dict(start_step=start, end_step=end, examples=10 * (end - start), train_seconds=60.0,
                compile_seconds=6.0, devices=1, device_kind="gpu", finished_utc=finished)

  bundle_runs = eb.summary_of_runs([run(0, 100, "t1"), run(100, 300, "t2")])
  first = eb.summary_of_runs([run(0, 50, "f1")])
  card = eb.with_earlier_runs(first, eb.runs_before(bundle_runs, first), "assets/b")
  assert [(r["start_step"], r["end_step"]) for r in card["runs"]] == [(0, 100), (100, 300),
                                                                      (300, 350)]
  assert card["runs"][2]["warm_restart_from"] == "assets/b" and card["examples"] == 3500
  resumed = eb.summary_of_runs([run(0, 50, "f1"), run(50, 80, "f2")])
  again = eb.with_earlier_runs(resumed, eb.runs_before(card, resumed), "assets/b")
  assert [(r["start_step"], r["end_step"]) for r in again["runs"]] == [
      (0, 100), (100, 300), (300, 350), (350, 380)]
  assert again["steps"] == 380 and again["examples"] == 3800
  assert "warm_restart_from" not in again["runs"][3] and again["train_minutes"] == 4.0
