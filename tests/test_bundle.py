"""Model bundles: compact round trips, checks that name the folder, the pipeline loads one."""
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moca_jax import bundle, pipeline, vae_task
from test_demo import _tiny_models


@pytest.fixture(scope="module")
def models():
  """Untrained tiny DiT and VAE params: test_demo's (jitted inits, made once per process;
  the eager inits took 30-60 s of this module's setup on 2 cores)."""
  return _tiny_models()


def _leaves(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def test_round_trip_bfloat16_and_float32(models, tmp_path):
  dit_config, dit_params, vae_config, vae_params = models
  for dtype in ("bfloat16", "float32"):
    out = str(tmp_path / dtype)
    bundle.write_bundle(out, dit_config, dit_params, vae_config, vae_params,
                        card={"note": "test"}, storage_dtype=dtype)
    b = bundle.read_bundle(out)
    assert b.dit_config.model.dit.to_dict() == dit_config.model.dit.to_dict()
    assert b.vae_config.model.num_latents == vae_config.model.num_latents
    assert b.info["card"] == {"note": "test"}
    for want, got in ((dit_params, b.dit_params), (vae_params, b.vae_params)):
      w, g = _leaves(want), _leaves(got)
      assert set(w) == set(g)
      for k in w:
        assert g[k].dtype == jnp.float32, k  # loading restores the params' dtype
        expect = np.asarray(jnp.asarray(w[k]).astype(dtype).astype(jnp.float32))
        np.testing.assert_array_equal(np.asarray(g[k]), expect, err_msg=k)
  # bf16 storage is half the bytes of float32
  sizes = {d: os.path.getsize(tmp_path / d / "dit.npz") for d in ("bfloat16", "float32")}
  assert sizes["bfloat16"] < 0.55 * sizes["float32"]


def test_errors_name_the_folder_and_reason(models, tmp_path):
  dit_config, dit_params, vae_config, vae_params = models
  out = str(tmp_path / "b")
  bundle.write_bundle(out, dit_config, dit_params, vae_config, vae_params)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bundle.read_bundle(str(tmp_path / "nothing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(bundle.BundleError, match="not a model bundle"):
    bundle.read_bundle(str(tmp_path / "empty"))
  info_path = os.path.join(out, "bundle.json")
  info = json.load(open(info_path))

  def edited(**changes):
    with open(info_path, "w") as f:
      json.dump({**info, **changes}, f)

  edited(version=bundle.VERSION + 1)
  with pytest.raises(bundle.BundleError, match="newer than this code"):
    bundle.read_bundle(out)
  edited(format="something-else")
  with pytest.raises(bundle.BundleError, match="not a moca-jax-bundle"):
    bundle.read_bundle(out)
  wider = json.loads(json.dumps(info["dit_config"]))
  wider["model"]["dit"]["width"] *= 2
  edited(dit_config=wider)
  with pytest.raises(bundle.BundleError, match=r"dit.npz: parameters do not match .* shape"):
    bundle.read_bundle(out)
  edited()
  with open(os.path.join(out, "vae.npz"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(bundle.BundleError, match=r"vae.npz: checksum does not match"):
    bundle.read_bundle(out)
  os.remove(os.path.join(out, "vae.npz"))
  with pytest.raises(bundle.BundleError, match=r"vae.npz: weights file missing"):
    bundle.read_bundle(out)


def test_pipeline_from_bundle_equals_pipeline_from_params(models, tmp_path):
  """A float32 bundle generates exactly what the same params generate; load_pipeline and
  from_checkpoint accept the folder."""
  from moca_jax.vae import VecSetVAE
  import ml_collections

  dit_config, dit_params, vae_config, vae_params = models
  out = str(tmp_path / "f32")
  bundle.write_bundle(out, dit_config, dit_params, vae_config, vae_params, storage_dtype="float32")
  direct = pipeline.Pipeline(dit_config, dit_params,
                             VecSetVAE(ml_collections.FrozenConfigDict(vae_config.model)),
                             {"params": vae_params}, dict(resolution=16))
  loaded = pipeline.load_pipeline(out, extract_kwargs=dict(resolution=16), cache=False)
  assert isinstance(pipeline.Pipeline.from_checkpoint(out), pipeline.Pipeline)
  image = np.full((40, 40, 3), 255, np.uint8)
  image[10:30, 12:28] = (200, 60, 40)
  a = direct(image, num_components=2, steps=2, cfg_scale=2.0, seed=3)
  b = loaded(image, num_components=2, steps=2, cfg_scale=2.0, seed=3)
  np.testing.assert_array_equal(a.latents, b.latents)
  assert len(b.meshes[0]) == 2


def test_load_vae_reads_a_bundle(models, tmp_path):
  dit_config, dit_params, vae_config, vae_params = models
  out = str(tmp_path / "b")
  bundle.write_bundle(out, dit_config, dit_params, vae_config, vae_params)
  model, params, config = vae_task.load_vae(out)
  b = bundle.read_bundle(out)
  assert config.model.num_latents == vae_config.model.num_latents
  assert model.config.latent_channels == vae_config.model.latent_channels
  got, want = _leaves(params["params"]), _leaves(b.vae_params)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_card_history_continues_from_the_warm_start_bundle():
  from experiments import export_bundle

  run = lambda a, b, sec: {"start_step": a, "end_step": b, "examples": 64 * (b - a),
                           "train_seconds": sec, "compile_seconds": 6.0, "devices": 1,
                           "device_kind": "H200", "stopped_early": False}
  before = {"runs": [run(0, 100, 60.0)], "steps": 100, "examples": 6400, "train_minutes": 1.0,
            "compile_minutes": 0.1, "devices": ["1 x H200"]}
  now = {"runs": [run(0, 40, 30.0), run(40, 50, 6.0)], "steps": 50, "examples": 3200,
         "train_minutes": 0.6, "compile_minutes": 0.2, "devices": ["1 x H200"]}
  merged = export_bundle.with_earlier_runs(now, before, "assets/old")
  assert [(r["start_step"], r["end_step"]) for r in merged["runs"]] == [(0, 100), (100, 140),
                                                                        (140, 150)]
  assert merged["steps"] == 150 and merged["examples"] == 9600
  assert merged["train_minutes"] == 1.6 and merged["compile_minutes"] == 0.3
  assert "warm_restart_from" not in merged["runs"][0]
  assert merged["runs"][1]["warm_restart_from"] == "assets/old"
  assert "warm_restart_from" not in merged["runs"][2]  # it resumed the warm-started run
  table = export_bundle._runs_table(merged)
  assert table.count("warm restart from assets/old") == 1 and "| fresh |" in table
  assert "| resume |" in table
  # a bundle without a history: the runs as they were, the warm restart still marked
  alone = export_bundle.with_earlier_runs(now, {}, "x")
  assert [(r["start_step"], r["end_step"]) for r in alone["runs"]] == [(0, 40), (40, 50)]
  assert alone["runs"][0]["warm_restart_from"] == "x" and alone["steps"] == 50
  assert "warm_restart_from" not in alone["runs"][1] and alone["examples"] == 3200


def test_update_card_attaches_evaluations_and_keeps_weights(models, tmp_path):
  from experiments import export_bundle

  dit_config, dit_params, vae_config, vae_params = models
  out = str(tmp_path / "b")
  bundle.write_bundle(out, dit_config, dit_params, vae_config, vae_params, card={"name": "t"})
  before = {n: open(os.path.join(out, n), "rb").read() for n in ("dit.npz", "vae.npz")}
  ev = tmp_path / "eval_objects"
  ev.mkdir()
  (ev / "metrics.json").write_text(json.dumps(
      {"mean": {"cd": 0.25}, "rows": [{}, {}], "skipped": [], "meta": {"steps": 5}}))
  (ev / "grid.png").write_bytes(b"png")
  export_bundle.update_card(out, [str(ev)], notes="evaluated on a CPU")
  interval_ev = tmp_path / "eval_interval"
  interval_ev.mkdir()
  (interval_ev / "metrics.json").write_text(json.dumps(
      {"mean": {"cd": 0.2}, "rows": [{}], "skipped": [],
       "meta": {"steps": 5, "cfg": 7.0, "cfg_interval": [0.8, 1.0], "image_size": 112}}))
  export_bundle.update_card(out, [str(interval_ev)])
  assert "CFG 7.0 at flow times 0.8 <= t <= 1, inputs rendered at 112 px" in open(
      os.path.join(out, "MODEL_CARD.md")).read()
  # a VAE-alone run (evaluate --reconstruct) is described as one, without sampler settings
  rec_ev = tmp_path / "eval_reconstructed"
  rec_ev.mkdir()
  (rec_ev / "metrics.json").write_text(json.dumps(
      {"mean": {"cd": 0.03}, "rows": [{}], "skipped": [],
       "meta": {"reconstruct": True, "source": "split test"}}))
  export_bundle.update_card(out, [str(rec_ev)], data="trained on real parts")
  text = open(os.path.join(out, "MODEL_CARD.md")).read()
  section = text.split("## Evaluation: eval_reconstructed")[1]
  assert "(split test, no DiT: the ground truth's parts encoded" in section
  assert "Euler" not in section.split("## ")[0]
  # evaluations stay attached after the weights change (a VAE swap): the card says whose
  # they were; those of this bundle's weights are not flagged
  assert "Not this bundle's weights" not in text
  stale_ev = tmp_path / "eval_earlier"
  stale_ev.mkdir()
  (stale_ev / "metrics.json").write_text(json.dumps(
      {"mean": {"cd": 0.3}, "rows": [{}], "skipped": [],
       "meta": {"weights_sha256": "be8ef66a8430" + "0" * 52}}))
  current_ev = tmp_path / "eval_current"
  current_ev.mkdir()
  (current_ev / "metrics.json").write_text(json.dumps(
      {"mean": {"cd": 0.3}, "rows": [{}], "skipped": [],
       "meta": {"weights_sha256": bundle.weights_sha256(out)}}))
  export_bundle.update_card(out, [str(stale_ev), str(current_ev)])
  text = open(os.path.join(out, "MODEL_CARD.md")).read()
  assert text.count("Not this bundle's weights") == 1
  stale = text.split("## Evaluation: eval_earlier")[1].split("## ")[0]
  assert f"evaluated with weights be8ef66a8430, this bundle's are {bundle.weights_sha256(out)[:12]}" in stale
  assert bundle.read_info(out)["card"]["data"] == "trained on real parts"
  assert "trained on real parts" in text
  info = bundle.read_info(out)
  assert info["card"]["evaluation"]["eval_objects"]["items"] == 2
  assert info["card"]["notes"] == "evaluated on a CPU" and info["card"]["name"] == "t"
  card = open(os.path.join(out, "MODEL_CARD.md")).read()
  assert "Evaluation: eval_objects" in card and "| cd | 0.2500 |" in card
  assert open(os.path.join(out, "eval_objects.png"), "rb").read() == b"png"
  for n, data in before.items():
    assert open(os.path.join(out, n), "rb").read() == data
  bundle.read_bundle(out)  # checksums still hold
  with pytest.raises(FileNotFoundError, match="no metrics.json"):
    export_bundle.update_card(out, [str(tmp_path)])
  # A scene sampling default: in the stored config and on the card, the weights unchanged.
  export_bundle.update_card(out, scene_cfg_scale=3.0)
  assert bundle.read_bundle(out).dit_config.sample.scene_cfg_scale == 3.0
  assert "(scene inputs: CFG 3.0)" in open(os.path.join(out, "MODEL_CARD.md")).read()
  with pytest.raises(ValueError, match="scene_cfg_scale=-1"):
    export_bundle.update_card(out, scene_cfg_scale=-1.0)
  # A guidance interval: stored, read back by the pipeline's defaults, on the card; 'none'
  # clears it; a bad one is refused before anything is written.
  export_bundle.update_card(out, cfg_interval=export_bundle.parse_cfg_interval(["0.8", "1"]))
  loaded = bundle.read_bundle(out)
  assert list(loaded.dit_config.sample.cfg_interval) == [0.8, 1.0]
  settings = pipeline.check_sample_settings(
      pipeline.Pipeline.sample_settings(types.SimpleNamespace(config=loaded.dit_config), "object"))
  assert settings["cfg_interval"] == (0.8, 1.0)
  card = open(os.path.join(out, "MODEL_CARD.md")).read()
  assert "applied only at flow times 0.8 <= t <= 1" in card
  assert export_bundle.parse_cfg_interval(["none"]) is None
  export_bundle.update_card(out, time_shift=3.0)
  assert bundle.read_bundle(out).dit_config.sample.time_shift == 3.0
  assert "shifted toward noise by 3" in open(os.path.join(out, "MODEL_CARD.md")).read()
  with pytest.raises(ValueError, match="time_shift"):
    export_bundle.update_card(out, time_shift=0.0)
  export_bundle.update_card(out, cfg_interval=None)
  assert bundle.read_bundle(out).dit_config.sample.cfg_interval is None
  with pytest.raises(ValueError, match=r"cfg_interval=0\.9,0\.1: needs 0 <= lo <= hi"):
    export_bundle.parse_cfg_interval(["0.9", "0.1"])
  for n, data in before.items():
    assert open(os.path.join(out, n), "rb").read() == data


def test_a_warm_restart_keeps_the_bundles_sampling_defaults(models, tmp_path):
  """Round 11 (2026-12-02) was exported with the training config's guidance at every step
  instead of its warm-start bundle's t >= 0.8: the export now keeps the bundle's."""
  from experiments import export_bundle

  dit_config, dit_params, vae_config, vae_params = models
  shipped = dit_config.copy_and_resolve_references()
  shipped.sample.cfg_interval = [0.8, 1.0]
  shipped.sample.scene_cfg_scale = 1.0
  shipped.sample.time_shift = 3.0
  src = str(tmp_path / "shipped")
  bundle.write_bundle(src, shipped, dit_params, vae_config, vae_params)
  trained = dit_config.copy_and_resolve_references()  # the generic training defaults
  assert "cfg_interval" not in trained.sample
  got, source = export_bundle.warm_start_sampling(trained, src)
  assert source == src and dict(got.sample) == dict(
      bundle.read_info(src)["dit_config"]["sample"])
  assert got.sample.cfg_interval == [0.8, 1.0] and got.sample.time_shift == 3.0
  assert "cfg_interval" not in trained.sample  # the argument is not changed
  for missing in ("", str(tmp_path / "gone")):  # no warm start, or the bundle is not here
    same, source = export_bundle.warm_start_sampling(trained, missing)
    assert source is None and dict(same.sample) == dict(trained.sample)
