"""experiments.import_weights: a snapshot folder built from the golden fixtures is imported into
a checkpoint that generation loads; bad snapshots get one exact error and leave nothing."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from experiments import import_weights
from moca_jax import checkpointing, pipeline
from moca_jax.convert import common, dinov2, triposg_dit, triposg_vae
from moca_jax.convert.common import ConversionError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULER = {"_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000,
             "shift": 1.0, "use_dynamic_shifting": False}


def make_snapshot(root, transformer="partcrafter_dit", copy=()):
  """A snapshot folder laid out as published, from the fixtures (symlinks; `copy` lists the
  component folders to copy instead, so a test may edit them)."""
  root.mkdir(parents=True)
  parts = {"transformer": transformer, "vae": "triposg_vae",
           "image_encoder_dinov2": "dinov2"}
  for name, fixture in parts.items():
    if name in copy:
      shutil.copytree(os.path.join(GOLDEN, fixture), root / name)
      for f in (root / name).iterdir():
        f.chmod(0o644)
    else:
      os.symlink(os.path.join(GOLDEN, fixture), root / name)
  (root / "feature_extractor_dinov2").mkdir()
  shutil.copy(os.path.join(GOLDEN, "image_preproc", "preprocessor_config.json"),
              root / "feature_extractor_dinov2")
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
  return root


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def partcrafter_import(tmp_path_factory):
  base = tmp_path_factory.mktemp("import")
  snap = make_snapshot(base / "snapshot")
  out = base / "out"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.import_weights", "--source=partcrafter",
       f"--path={snap}", f"--out={out}", "--noprogress", "--latent_tokens=64"],
      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      timeout=600)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == f"imported partcrafter from {snap} into {out}"
  return snap, out


def test_imported_checkpoint_loads_for_generation_unchanged(partcrafter_import):
  snap, out = partcrafter_import
  gen = pipeline.load_pipeline(str(out), cache=False)
  cfg = gen.config
  assert cfg.vae.workdir == str(out / "vae") and cfg.sample.time_shift == 1.0
  assert list(cfg.model.dit.global_blocks) == [0, 2, 4] and cfg.model.dit.id_codebook == 16
  assert cfg.preprocess.path == "raw" and cfg.preprocess.crop_height == 224
  # Every imported tensor arrives unchanged.
  _leaves_equal(gen.params["dit"], triposg_dit.load(str(snap / "transformer"))[1]["params"])
  _leaves_equal(gen.params["encoder"], dinov2.load(str(snap / "image_encoder_dinov2"))[1]["params"])
  _leaves_equal(gen.vae_params["params"],
                triposg_vae.load(str(snap / "vae"), num_latents=64)[1]["params"])
  assert (out / "preprocessor_config.json").read_text() == (
      snap / "feature_extractor_dinov2" / "preprocessor_config.json").read_text()
  image = np.full((1, 32, 32, 3), 255, np.uint8)
  image[0, 8:24, 8:24] = 30
  latents, _ = gen.sample_latents(image, 2, steps=2, cfg_scale=7.0)
  assert latents.shape == (1, 2, 64, 16) and np.isfinite(latents).all()
  # PartCrafter numbers its part ids over the CFG batch's rows: 16 ids hold 2 x 8 parts.
  with pytest.raises(ValueError, match="can represent at most 8 components"):
    gen.sample_latents(image, 9, steps=2, cfg_scale=7.0)


def make_triposg_snapshot(root):
  """A snapshot whose transformer is the TripoSG fixture with its cross-attention widened to
  the DINOv2 fixture's width 64 (random key/value weights), so the components fit together."""
  snap = make_snapshot(root, transformer="triposg_dit", copy=("transformer",))
  config, tensors = common.read_component(str(snap / "transformer"))
  rng = np.random.default_rng(0)
  for name in list(tensors):
    if ".attn2.to_k." in name or ".attn2.to_v." in name:
      tensors[name] = rng.normal(0, 0.125, (64, 64)).astype(np.float32)
  save_file(tensors, str(snap / "transformer" / "diffusion_pytorch_model.safetensors"))
  (snap / "transformer" / "config.json").write_text(
      json.dumps(dict(config, cross_attention_dim=64)))
  return snap


def test_triposg_snapshot_imports(tmp_path):
  """A TripoSG transformer (the fixture's, its cross-attention widened to the encoder's 64
  with random weights) imports, loads and samples one component."""
  snap = make_triposg_snapshot(tmp_path / "snap")
  out = import_weights.run("triposg", str(snap), str(tmp_path / "out"), progress=False,
                           latent_tokens=32)
  cfg_dict, step = checkpointing.read_checkpoint_config(os.path.join(out, "checkpoints"))
  assert step == 0 and cfg_dict["model"]["dit"]["id_codebook"] == 0
  assert cfg_dict["preprocess"]["path"] == "triposg"
  gen = pipeline.load_pipeline(out, cache=False)
  _leaves_equal(gen.params["dit"], triposg_dit.load(str(snap / "transformer"))[1]["params"])
  image = np.full((48, 40, 4), 0, np.uint8)  # RGBA: the alpha channel gives the foreground
  image[10:30, 12:30] = (200, 60, 30, 255)
  z, _ = gen.sample_latents(image, 1, steps=2, cfg_scale=7.0)
  assert z.shape == (1, 1, 32, 16) and np.isfinite(z).all()
  with pytest.raises(ValueError, match="trained with at most 1 component "):
    gen.sample_latents(image, 2, steps=2)


def _edit_weights(folder, edit):
  path = folder / "diffusion_pytorch_model.safetensors"
  tensors = common.read_component(str(folder))[1]
  edit(tensors)
  save_file(tensors, str(path))


def _expect_error(tmp_path, snap, message, source="partcrafter"):
  out = tmp_path / "out"
  with pytest.raises((ConversionError, FileExistsError)) as e:
    import_weights.run(source, str(snap), str(out), progress=False)
  assert str(e.value) == message
  assert not out.exists() or out.is_dir() and os.listdir(out)  # nothing written
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_missing_folder_and_files(tmp_path):
  snap = make_snapshot(tmp_path / "a")
  shutil.rmtree(snap / "scheduler")
  _expect_error(tmp_path, snap, f"{snap}: missing component folders: scheduler")
  snap = make_snapshot(tmp_path / "b")
  (snap / "feature_extractor_dinov2" / "preprocessor_config.json").unlink()
  _expect_error(tmp_path, snap, f"{snap / 'feature_extractor_dinov2' / 'preprocessor_config.json'}"
                ": no such preprocessor config")
  snap = make_snapshot(tmp_path / "c", copy=("transformer",))
  (snap / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
  _expect_error(tmp_path, snap, f"{snap / 'transformer'}: no *.safetensors weights file")
  _expect_error(tmp_path, tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such snapshot folder")


def test_unmapped_missing_and_misshaped_tensors(tmp_path):
  snap = make_snapshot(tmp_path / "a", copy=("transformer",))

  def edit(t):
    del t["blocks.1.attn1.norm_q.weight"], t["part_embedding.weight"]
    t["blocks.1.lora_A.weight"] = np.zeros((4, 96), np.float32)

  _edit_weights(snap / "transformer", edit)
  _expect_error(tmp_path, snap, f"{snap / 'transformer'}: missing tensors: part_embedding.weight, "
                "blocks.1.attn1.norm_q.weight; unmapped tensors: blocks.1.lora_A.weight")
  snap = make_snapshot(tmp_path / "b", copy=("transformer",))
  config = json.loads((snap / "transformer" / "config.json").read_text())
  (snap / "transformer" / "config.json").write_text(json.dumps(dict(config, max_num_parts=8)))
  _expect_error(tmp_path, snap, f"{snap / 'transformer'}: tensor part_embedding.weight has shape "
                "(16, 96), expected (8, 96)")


def test_unknown_class_and_non_float_dtype(tmp_path):
  snap = make_snapshot(tmp_path / "a")
  _expect_error(tmp_path, snap, f"{snap / 'transformer' / 'config.json'}: class "
                "'PartCrafterDiTModel' is not one of TripoSGDiTModel", source="triposg")
  snap = make_snapshot(tmp_path / "b", copy=("transformer",))
  _edit_weights(snap / "transformer",
                lambda t: t.update({"proj_in.bias": np.zeros((96,), np.int64)}))
  _expect_error(tmp_path, snap, f"{snap / 'transformer' / 'diffusion_pytorch_model.safetensors'}: "
                "tensor proj_in.bias has non-float dtype int64")


def test_components_that_do_not_fit_and_existing_output(tmp_path):
  snap = make_snapshot(tmp_path / "a", transformer="triposg_dit")
  _expect_error(tmp_path, snap, f"{snap}: transformer cross_attention_dim 48 does not match the "
                "image encoder's hidden_size 64", source="triposg")
  snap = make_snapshot(tmp_path / "b")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  _expect_error(tmp_path, snap, f"{tmp_path / 'out'}: exists and is not empty")
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.import_weights", "--source=hunyuan",
       f"--path={tmp_path}", f"--out={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip() == ("import_weights: error: --source='hunyuan' is not one of "
                                   "triposg, partcrafter")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.import_weights", "--source=triposg",
       f"--path={tmp_path / 'none'}", f"--out={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      timeout=300)
  assert result.returncode == 2 and not (tmp_path / "out").exists()
  assert result.stderr.strip().splitlines()[-1] == (
      f"import_weights: error: {tmp_path / 'none'}: no such snapshot folder")
