"""The pipeline (moca_jax.pipeline) and the generation CLI on a tiny checkpoint: GLB with N
named parts, pictures, router maps, seeding, config.sample defaults, errors."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from PIL import Image

from experiments import generate
from experiments.configs import vae as vae_configs
from moca_jax import checkpointing, dit_task, sharding, train_lib
from moca_jax import io as mio
from moca_jax import pipeline

N, STEPS, RES = 3, 2, 24  # one sampler / extractor shape for all tests (compiled once)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, save_untrained_vae):
  """A tiny VAE workdir and a DiT workdir, both untrained, saved the way run_training saves."""
  root = tmp_path_factory.mktemp("gen")
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  vae_dir = str(root / "vae")
  save_untrained_vae(vae_dir, num_latents=16)  # the DiT's latent_tokens below

  from experiments.configs import dit as dit_configs

  cfg = dit_configs.get_config("tiny")
  cfg.data.source = "synthetic"
  cfg.data.max_components = N
  cfg.model.dit.num_blocks = 2
  cfg.model.dit.latent_tokens = 16
  cfg.model.encoder.depth = 1
  cfg.batch_size = 2
  cfg.vae.workdir = vae_dir
  dit_dir = str(root / "dit")
  # an initial (untrained) state saved the way train_dit saves: no train step to compile
  cfg.sample.steps, cfg.sample.cfg_scale = STEPS, 2.0  # the defaults of generate
  _, init_fn, _ = dit_task.make_task(cfg)
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(cfg)()))
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  state, _ = train_lib.create_train_state(
      init_fn, train_lib.make_optimizer(cfg.optim), spec, jax.random.PRNGKey(0), mesh
  )
  ckpt = checkpointing.Checkpointer(os.path.join(dit_dir, "checkpoints"))
  ckpt.save(1, state, None, cfg, force=True)
  ckpt.close()
  img = np.full((40, 40, 3), 255, np.uint8)
  img[10:30, 5:35] = (200, 60, 30)
  img_path = str(root / "chair.png")
  Image.fromarray(img).save(img_path)
  return {"root": root, "vae": vae_dir, "dit": dit_dir, "image": img_path}


def test_generation_end_to_end(checkpoints, tmp_path):
  """All checks that need the checkpoint in one test: xdist builds the fixture once."""
  _check_cli_writes_glb_with_n_parts(checkpoints)
  _check_pipeline_is_seeded_and_takes_any_image_form(checkpoints)
  _check_errors_needing_a_checkpoint(checkpoints, tmp_path)


def _check_cli_writes_glb_with_n_parts(checkpoints):
  out = str(checkpoints["root"] / "out")
  summary = generate.run(
      checkpoints["dit"],
      checkpoints["image"],
      N,
      out,
      cfg=3.0,
      seed=0,
      resolution=RES,
      batch_size=1,
  )
  assert (summary["steps"], summary["cfg"]) == (STEPS, 3.0)  # config.sample, then the flag
  d = os.path.join(out, "chair")
  for f in ("parts.glb", "preview.png", "router.png", "router.json", "latents.npy"):
    assert os.path.getsize(os.path.join(d, f)) > 0, f
  scene = trimesh.load(os.path.join(d, "parts.glb"), force="scene")
  empty = summary["outputs"][checkpoints["image"]]["empty_parts"]
  names = sorted(scene.geometry)
  assert names == [f"part_{i:02d}" for i in range(N) if i not in empty]
  assert len(names) == N, f"random VAE gave empty parts {empty}"
  colours = {tuple(g.visual.face_colors[0][:3]) for g in scene.geometry.values()}
  assert len(colours) == N  # one colour per part
  router = json.load(open(os.path.join(d, "router.json")))
  imp = np.asarray(router["importances"])
  assert imp.shape[0] == len(router["global_blocks"]) and imp.shape[-2:] == (N, N)
  assert np.load(os.path.join(d, "latents.npy")).shape == (N, 16, 8)
  assert Image.open(os.path.join(d, "preview.png")).size == (512, 256)


def _check_pipeline_is_seeded_and_takes_any_image_form(checkpoints):
  pipe = pipeline.load_pipeline(checkpoints["dit"], extract_kwargs={"resolution": RES})
  images = mio.load_image(checkpoints["image"])[None]
  a = pipe.sample_latents(images, N, steps=STEPS, cfg_scale=2.0, seed=1)[0]
  b = pipe.sample_latents(images, N, steps=STEPS, cfg_scale=2.0, seed=1)[0]
  c = pipe.sample_latents(images, N, steps=STEPS, cfg_scale=2.0, seed=2)[0]
  d = pipe.sample_latents(images, N, steps=STEPS, cfg_scale=5.0, seed=1)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)
  assert a.shape == (1, N, 16, 8)
  # config.sample (steps=STEPS, cfg_scale=2) is the default; a path, one [H, W, 3] image and
  # a list give the same latents
  np.testing.assert_array_equal(pipe.sample_latents(checkpoints["image"], N, seed=1)[0], a)
  np.testing.assert_array_equal(pipe.sample_latents(images[0], N, seed=1)[0], a)
  np.testing.assert_array_equal(pipe.sample_latents([images[0]], N, seed=1)[0], a)
  assert pipe.sample_settings() == {
      "steps": STEPS,
      "cfg_scale": 2.0,
      "method": "euler",
      "time_shift": 1.0,
      "cfg_interval": None,
  }
  # A scene default (config.sample.scene_cfg_scale) applies to kind='scene' only; an
  # explicit scale still wins, and a checkpoint without one keeps its scale for scenes.
  assert pipe.sample_settings("scene")["cfg_scale"] == 2.0
  scene_cfg = pipe.config.copy_and_resolve_references()
  with scene_cfg.unlocked():
    scene_cfg.sample.scene_cfg_scale = 5.0
  scenes = pipeline.Pipeline(scene_cfg, pipe.params, pipe.vae_model, pipe.vae_params)
  assert scenes.sample_settings("scene")["cfg_scale"] == 5.0
  assert scenes.sample_settings("object")["cfg_scale"] == 2.0
  assert scenes.sample_settings("scene", cfg_scale=3.0)["cfg_scale"] == 3.0
  np.testing.assert_array_equal(scenes.sample_latents(images, N, seed=1, kind="scene")[0], d)
  np.testing.assert_array_equal(scenes.sample_latents(images, N, seed=1)[0], a)
  with pytest.raises(ValueError, match="kind='room'"):
    scenes.sample_settings("room")
  # A checkpoint written before the layout switches existed (its stored DiT config lacks
  # them) samples the same latents: the defaults fill the missing fields.
  old_cfg = pipe.config.copy_and_resolve_references()
  with old_cfg.unlocked():
    for field in ("id_assignment", "time_embedding", "norm_eps"):
      if field in old_cfg.model.dit:
        del old_cfg.model.dit[field]
  old = pipeline.Pipeline(old_cfg, pipe.params, pipe.vae_model, pipe.vae_params)
  np.testing.assert_array_equal(old.sample_latents(images, N, seed=1)[0], a)
  result = pipe(images, N, steps=STEPS, cfg_scale=1.0, seed=0)
  assert len(result.meshes) == 1 and len(result.meshes[0]) == N
  assert all(isinstance(m, trimesh.Trimesh) for m in result.meshes[0])
  assert result.routing["importances"].shape[-2:] == (N, N)
  assert result.latents.shape == (1, N, 16, 8)


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.load_pipeline(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    pipeline.load_pipeline(str(empty))
  # corrupt: a checkpoint step whose files are garbage
  bad = tmp_path / "bad" / "checkpoints" / "5"
  (bad / "config").mkdir(parents=True)
  (bad / "config" / "metadata").write_text("{not json")
  with pytest.raises(
      ValueError, match=r"corrupt or unreadable checkpoint config in \S+/bad/" r"checkpoints step 5"
  ):
    pipeline.load_pipeline(str(tmp_path / "bad"))
  text = tmp_path / "notes.png"
  text.write_text("hello")
  with pytest.raises(ValueError, match="notes.png: not an image"):
    mio.load_image(str(text))
  with pytest.raises(FileNotFoundError, match="missing.png: no such image"):
    mio.load_image(str(tmp_path / "missing.png"))
  mask = np.zeros((8, 8), np.uint8)
  mask[:4] = 1
  mask[4:] = 2
  pipeline.check_mask(mask, 2, (8, 8, 3))
  with pytest.raises(ValueError, match="do not match num_components=3"):
    pipeline.check_mask(mask, 3, (8, 8, 3))
  with pytest.raises(ValueError, match="does not match the image"):
    pipeline.check_mask(mask, 2, (9, 8, 3))


def _check_errors_needing_a_checkpoint(checkpoints, tmp_path):
  pipe = pipeline.load_pipeline(checkpoints["dit"], extract_kwargs={"resolution": RES})
  mask = np.ones((8, 8), np.uint8)
  with pytest.raises(ValueError, match="only for scene models"):
    pipe.sample_latents(np.zeros((1, 8, 8, 3), np.uint8), 1, masks=mask[None])
  with pytest.raises(ValueError, match="expected uint8"):
    pipe.sample_latents(np.zeros((1, 8, 8), np.uint8), 2)
  _check_arguments_refused_before_work(checkpoints, pipe, tmp_path)
  _check_images_reach_the_model_as_meant(pipe)
  # batch mode: the non-image file is skipped and reported, the good one generated
  folder = tmp_path / "imgs"
  folder.mkdir()
  (folder / "broken.png").write_text("not an image")
  Image.open(checkpoints["image"]).save(folder / "good.png")
  summary = generate.run(
      checkpoints["dit"],
      str(folder),
      N,
      str(tmp_path / "o"),
      steps=STEPS,
      resolution=RES,
      batch_size=1,
  )
  assert list(summary["skipped"]) == [str(folder / "broken.png")]
  assert os.path.exists(tmp_path / "o" / "good" / "preview.png")
  _check_folder_mode_skips_and_names_outputs_apart(checkpoints, tmp_path)


def _check_arguments_refused_before_work(checkpoints, pipe, tmp_path):
  """Issue 12 §2: non-finite CFG, zero steps (Euler and Heun), too many components."""
  run = lambda **kw: generate.run(  # noqa: E731
      checkpoints["dit"], checkpoints["image"], N, str(tmp_path / "never"), resolution=RES, **kw
  )
  for cfg in (float("nan"), float("inf"), -1.0):
    with pytest.raises(ValueError, match=rf"cfg_scale={cfg!r}: must be a finite number >= 0"):
      run(cfg=cfg)
  for method in ("euler", "heun"):
    with pytest.raises(ValueError, match=r"steps=0: must be an integer >= 1"):
      run(steps=0, method=method)
  with pytest.raises(
      ValueError, match=rf"num_components=5: the model was trained with at most {N}"
  ):
    generate.run(checkpoints["dit"], checkpoints["image"], 5, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")  # refused before anything was written
  codebook = pipe.config.model.dit.id_codebook
  with pytest.raises(ValueError, match=rf"trained with at most {N} components"):
    pipe.sample_latents(np.zeros((1, 8, 8, 3), np.uint8), N + 1)
  with pytest.raises(ValueError, match=rf"can represent at most {codebook} components"):
    pipe.sample_latents(np.zeros((1, 8, 8, 3), np.uint8), codebook + 1)
  pipe.check_num_components(N + 1, 2.0, force=True)  # forced: up to what the model represents
  with pytest.raises(ValueError, match=rf"can represent at most {codebook} components"):
    pipe.check_num_components(codebook + 1, 2.0, force=True)


def _check_images_reach_the_model_as_meant(pipe):
  """Issue 12 §1: thin strips and 4:3 photos keep their shape; blank images are refused."""
  strip = np.full((500, 3, 3), 255, np.uint8)  # 3 x 500 image, object 3 x 100 px
  strip[200:300] = (20, 40, 200)
  photo = np.full((300, 400, 3), 255, np.uint8)  # 4:3, a 100 x 100 square object
  photo[100:200, 150:250] = (20, 40, 200)
  size = pipe.image_size
  for image, (h, w) in ((strip, (100, 3)), (photo, (100, 100))):
    cond = pipe.preprocess([image], N)[0]
    assert cond.shape == (size, size, 3)
    rows, cols = np.nonzero((cond.astype(int) < 245).any(axis=-1))  # differs from white
    scale = size / max(image.shape[:2])
    got = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    np.testing.assert_allclose(got, (h * scale, w * scale), atol=2.0)  # resampling blur
  for blank in (np.full((32, 32, 3), 255, np.uint8), np.zeros((32, 32, 4), np.uint8)):
    with pytest.raises(ValueError, match=r"images\[0\]: no foreground in the image"):
      pipe.preprocess([blank], N)
    assert pipe.preprocess([blank], N, allow_empty=True).shape == (1, size, size, 3)


def _check_folder_mode_skips_and_names_outputs_apart(checkpoints, tmp_path):
  """Issue 12 §1-2: a too-large and a blank image are skipped and listed, two inputs with
  one stem get two folders, a folder where every input fails generates nothing."""
  from test_io_images import _huge_bilevel_png  # pylint: disable=g-import-not-at-top

  folder = tmp_path / "mixed"
  folder.mkdir()
  _huge_bilevel_png(folder / "bomb.png")
  Image.new("RGB", (30, 30), (255, 255, 255)).save(folder / "white.png")
  Image.open(checkpoints["image"]).save(folder / "chair.png")
  Image.open(checkpoints["image"]).convert("RGB").save(folder / "chair.jpg")
  out = tmp_path / "mixed_out"
  summary = generate.run(
      checkpoints["dit"], str(folder), N, str(out), steps=STEPS, resolution=RES, batch_size=2
  )
  assert sorted(summary["outputs"]) == [str(folder / "chair.jpg"), str(folder / "chair.png")]
  assert {os.path.basename(o["dir"]) for o in summary["outputs"].values()} == {
      "chair_jpg",
      "chair_png",
  }
  assert os.path.exists(out / "chair_jpg" / "parts.glb") and os.path.exists(
      out / "chair_png" / "parts.glb"
  )
  assert "image too large (225 Mpx > 100 Mpx limit" in summary["skipped"][str(folder / "bomb.png")]
  assert "no foreground" in summary["skipped"][str(folder / "white.png")]
  assert generate.exit_code(len(summary["outputs"]), len(summary["skipped"])) == 1
  bad = tmp_path / "all_bad"
  bad.mkdir()
  (bad / "a.png").write_text("not an image")
  summary = generate.run(checkpoints["dit"], str(bad), N, str(tmp_path / "o2"), resolution=RES)
  assert summary["outputs"] == {} and generate.exit_code(0, 1) == 2


def test_output_names_and_exit_codes():
  names = generate.output_names(["d/chair.png", "d/chair.jpg", "d/table.png"])
  assert names == {"d/chair.png": "chair_png", "d/chair.jpg": "chair_jpg", "d/table.png": "table"}
  assert [generate.exit_code(*a) for a in ((2, 0), (1, 1), (0, 3), (0, 0))] == [0, 1, 2, 2]


def test_console_names_the_sampling_settings():
  run = {"steps": 50, "method": "euler", "cfg": 7.0, "cfg_interval": [0.8, 1.0], "seed": 3}
  assert generate.sampling_line(run) == (
      "sampling: 50 euler steps, CFG 7 at flow times 0.8 <= t <= 1, seed 3")
  assert generate.sampling_line(dict(run, cfg_interval=None)) == (
      "sampling: 50 euler steps, CFG 7, seed 3")
  assert generate.sampling_line(dict(run, cfg=1.0)) == "sampling: 50 euler steps, CFG 1, seed 3"
  assert generate.sampling_line(dict(run, cfg=1.0, time_shift=3.0)) == (
      "sampling: 50 euler steps (time shift 3), CFG 1, seed 3")


def test_scene_conditions_layout():
  img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
  mask = np.array([[[1, 1, 2, 2]] * 4], np.uint8)
  cond = pipeline.scene_conditions(img, mask, 2)
  assert cond.shape == (1, 2, 4, 4, 7) and cond.dtype == np.uint8
  np.testing.assert_array_equal(cond[0, 0, :, :2, :3], img[0, :, :2])  # instance pixels
  np.testing.assert_array_equal(cond[0, 0, :, 2:, :3], 255)  # on white
  np.testing.assert_array_equal(cond[0, 1, ..., 3:6], img[0])  # the whole scene
  np.testing.assert_array_equal(cond[0, 1, ..., 6], np.where(mask[0] == 2, 255, 0))


def test_vae_pairing_names_every_differing_field():
  from experiments.configs import dit as dit_configs

  dit = dit_configs.get_config("tiny")
  vae = vae_configs.get_config("tiny")
  vae.model.num_latents = dit.model.dit.latent_tokens
  pipeline.check_vae_pairing(vae, dit, "v")  # matching: no error
  vae.model.num_latents = dit.model.dit.latent_tokens * 2
  vae.model.latent_channels = dit.model.dit.latent_channels + 1
  with pytest.raises(
      ValueError,
      match=r"VAE v does not match the DiT: latent tokens "
      r"\d+ vs \d+, latent channels \d+ vs \d+ \(VAE vs DiT\)",
  ):
    pipeline.check_vae_pairing(vae, dit, "v")


def test_no_checkpoint_means_the_bundled_model(tmp_path, monkeypatch):
  """Issue 17 §3: `generate --image=my.png` with no --checkpoint loads pipeline.DEFAULT_BUNDLE
  (here a tiny bundle); a missing bundled model is refused with a message naming it."""
  from test_demo import write_tiny_bundle  # pylint: disable=g-import-not-at-top

  folder = write_tiny_bundle(str(tmp_path / "assets" / "moca-small"))
  monkeypatch.setattr(pipeline, "DEFAULT_BUNDLE", folder)
  img = np.full((40, 40, 4), 0, np.uint8)  # RGBA: a user's cut-out picture
  img[10:30, 5:35] = (200, 60, 30, 255)
  Image.fromarray(img).save(tmp_path / "my.png")
  out = str(tmp_path / "out")
  summary = generate.run(None, str(tmp_path / "my.png"), 2, out, resolution=16)
  assert summary["checkpoint"] == folder
  assert (summary["steps"], summary["cfg"]) == (2, 2.0)  # the bundle's config.sample
  assert os.path.getsize(os.path.join(out, "my", "parts.glb")) > 0
  missing = str(tmp_path / "gone")
  monkeypatch.setattr(pipeline, "DEFAULT_BUNDLE", missing)
  with pytest.raises(
      FileNotFoundError,
      match=rf"^no --checkpoint given and the bundled model is missing: {re.escape(missing)} \(folder "
      r"missing\); pass --checkpoint=<model bundle or train_dit workdir>$",
  ):
    generate.run(None, str(tmp_path / "my.png"), 2, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")


def test_cli_without_bundled_model_exits_2_with_one_line(tmp_path):
  """The command line itself: no --checkpoint and no bundled model -> one line, exit 2; the
  --help text names the default."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "my.png")
  missing = str(tmp_path / "assets" / "moca-small")
  code = (
      "import sys; from moca_jax import pipeline; pipeline.DEFAULT_BUNDLE = sys.argv.pop(1); "
      "from absl import app; from experiments import generate; generate.define_flags(); "
      "app.run(generate.main)"
  )
  res = subprocess.run(
      [
          sys.executable,
          "-c",
          code,
          missing,
          f"--image={tmp_path / 'my.png'}",
          f"--out={tmp_path / 'out'}",
      ],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      f"generate: error: no --checkpoint given and the bundled model is missing: {missing} "
      "(folder missing); pass --checkpoint=<model bundle or train_dit workdir>"
  ]
  res = subprocess.run(  # no --image: one line, exit 2 (the exit-code table)
      [sys.executable, "-m", "experiments.generate"], cwd=repo, env=env, capture_output=True,
      text=True, timeout=120,
  )
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      "generate: error: --image is required (an image file or a folder of images)"
  ]
  res = subprocess.run(
      [sys.executable, "-m", "experiments.generate", "--help"],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  text = " ".join(res.stdout.split())  # (absl's --help exits with 1)
  assert "python -m experiments.generate --image=my.png # the bundled model" in text
  assert (
      "--checkpoint: Model bundle folder, or train_dit workdir (or its checkpoints/ folder). "
      "Default: the bundled model, assets/moca-small" in text
  )


def test_component_padding_changes_nothing(checkpoints):
  """Sampling N real components padded to a bucket (masked out of the DiT, the real noise
  unchanged) gives the unpadded latents and routing; two counts of one bucket share one
  compiled sampler; padding the decoder's batch gives the same meshes."""
  loaded = pipeline.load_pipeline(checkpoints["dit"], extract_kwargs={"resolution": RES})
  make = lambda buckets: pipeline.Pipeline(
      loaded.config, loaded.params, loaded.vae_model, loaded.vae_params,
      {"resolution": RES}, component_buckets=buckets)
  plain, padded = make(()), make((4,))
  images = mio.load_image(checkpoints["image"])[None]
  for n in (1, N):
    assert plain.sampled_components(n, True) == n and padded.sampled_components(n, True) == 4
    z0, r0 = plain.sample_latents(images, n, seed=1, force=True)
    z1, r1 = padded.sample_latents(images, n, seed=1, force=True)
    assert z1.shape == z0.shape == (1, n, 16, 8)
    # not bit for bit: XLA rounds the longer (masked) reductions differently, ~1e-7
    np.testing.assert_allclose(z1, z0, rtol=0, atol=1e-5)
    assert r1["importances"].shape == r0["importances"].shape
    assert r1["selections"].shape == r0["selections"].shape
    np.testing.assert_allclose(r1["importances"], r0["importances"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(r1["selections"], r0["selections"])
  assert padded._sample._cache_size() == 1  # n = 1 and n = 3: one compiled shape
  # The starting noise is the draw the sampler made before padding existed.
  key = jax.random.PRNGKey(1)
  np.testing.assert_array_equal(
      plain.initial_noise(key, 1, N), jax.random.normal(key, (1, N, 16, 8), jnp.float32))
  # The test can fail: the same padding left unmasked changes the real components.
  prepared = dit_task.prepare_images(jnp.asarray(plain.preprocess(images, N)),
                                     plain.config.model.encoder)
  noise = pipeline.pad_components(plain.initial_noise(key, 1, N), 4).copy()
  noise[:, N:] = 1.0
  unmasked, _ = padded._sample(  # the compiled sampler above, the mask all True
      padded.params, prepared, key, num_components=4, component_mask=jnp.ones((1, 4), bool),
      steps=STEPS, cfg_scale=jnp.float32(2.0), method="euler", time_shift=1.0,
      cfg_interval=None, return_routing=True, noise=jnp.asarray(noise))
  assert padded._sample._cache_size() == 1
  assert not np.allclose(np.asarray(unmasked)[:, :N], z1, atol=1e-3)
  # Decoding: a padded batch (zero latents, not meshed) gives the same meshes.
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (1, N, 16, 8)))
  for a, b in zip(plain.decode(z)[0], padded.decode(z)[0], strict=True):
    np.testing.assert_array_equal(a.faces, b.faces)
    np.testing.assert_allclose(a.vertices, b.vertices, rtol=0, atol=1e-5)


def test_padding_helpers():
  assert pipeline.padded_count(3, (4, 8)) == 4 and pipeline.padded_count(8, (4, 8)) == 8
  assert pipeline.padded_count(9, (4, 8)) == 9 and pipeline.padded_count(3, ()) == 3
  assert pipeline.padded_count(3, (4, 8), limit=3) == 3
  x = np.ones((2, 3, 5))
  np.testing.assert_array_equal(pipeline.pad_components(x, 4)[:, 3], 0.0)
  assert pipeline.pad_components(x, 4).shape == (2, 4, 5) and pipeline.pad_components(x, 3) is x
  routing = {"importances": np.zeros((1, 2, 4, 5, 5)), "selections": np.zeros((1, 2, 4, 5, 4))}
  out = pipeline.unpad_routing(routing, 3)
  assert out["importances"].shape[-2:] == (3, 3) and out["selections"].shape[-2:] == (3, 2)
  assert pipeline.coarse_levels_for(64) == (16, 32) and pipeline.coarse_levels_for(24) == ()
  assert pipeline.coarse_levels_for(128) == (16, 32, 64)
  assert pipeline.default_extract_kwargs({"coarse_levels": ()})["coarse_levels"] == ()


def test_a_result_folder_is_written_whole(tmp_path):
  """A second result in the same folder replaces the first: no earlier parts.glb stays
  beside a new preview when every new part came out empty."""
  out = str(tmp_path / "chair")
  routing = {"importances": np.zeros((0, 1, 2, 2), np.float32),
             "selections": np.zeros((0, 1, 2, 1), np.int32)}
  first = pipeline.write_outputs(out, [trimesh.creation.box(), trimesh.creation.icosphere()],
                                 np.zeros((2, 4, 3), np.float32), routing)
  assert not first["replaced"] and os.path.exists(os.path.join(out, "parts.glb"))
  open(os.path.join(out, "notes.txt"), "w").write("an earlier file")
  second = pipeline.write_outputs(out, [trimesh.Trimesh(), trimesh.Trimesh()],
                                  np.ones((2, 4, 3), np.float32), routing)
  assert second["replaced"] and second["empty_parts"] == [0, 1]
  assert sorted(os.listdir(out)) == sorted(second["files"]) == [
      "latents.npy", "preview.png", "router.json"]
  np.testing.assert_array_equal(np.load(os.path.join(out, "latents.npy")), 1.0)
  assert sorted(os.listdir(tmp_path)) == ["chair"]  # no staging or .old folder left
