"""TripoSG / PartCrafter DiT, scheduler and pipeline import: parity with the golden upstream
fixtures (tests/golden, made with the upstream PyTorch code), full-size coverage, bad input."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from safetensors.numpy import save_file

from moca_jax import dit as dit_lib
from moca_jax.convert import common, pipeline_e2e, scheduler, triposg_dit

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _rel_errors(result):
  return {name: float(np.abs(np.asarray(ours, np.float64) - ref).max()
                      / max(float(np.abs(ref).max()), 1e-30))
          for name, (ours, ref) in result.items()}


def _manifest(path):
  with open(path) as f:
    return json.load(f)


def _stored_arrays(fixture):
  return set(np.load(os.path.join(GOLDEN, fixture, "io.npz")).files)


@pytest.mark.parametrize("fixture,parity,inputs", [
    ("triposg_dit", triposg_dit.parity_triposg,
     {"hidden_states", "timestep", "encoder_hidden_states", "cfg_hidden_states",
      "cfg_timestep", "cfg_encoder_hidden_states"}),
    ("partcrafter_dit", triposg_dit.parity_partcrafter,
     {"a_hidden_states", "a_timestep", "a_encoder_hidden_states", "b_hidden_states",
      "b_timestep", "b_encoder_hidden_states", "c_encoder_hidden_states", "d_num_parts",
      "d_hidden_states", "d_timestep", "d_encoder_hidden_states"}),
])
def test_dit_parity_with_upstream(fixture, parity, inputs):
  """Every stored output (and per-block debug array) within 1e-4 x max |reference|."""
  result = parity(os.path.join(GOLDEN, fixture))
  assert set(result) == _stored_arrays(fixture) - inputs
  for name, (ours, ref) in result.items():
    assert np.shape(ours) == ref.shape, name
  errors = _rel_errors(result)
  assert max(errors.values()) <= 1e-4, errors


def test_partcrafter_part_ids_and_cfg_batch_quirk():
  """Inference ids number the rows of the whole batch (the conditional half of the CFG batch
  gets N..2N-1); training ids restart per object."""
  result = triposg_dit.parity_partcrafter(os.path.join(GOLDEN, "partcrafter_dit"))
  np.testing.assert_array_equal(result["b_part_ids"][0], np.arange(8))
  np.testing.assert_array_equal(result["d_part_ids"][0], [0, 1, 2, 0, 1])
  for name in ("a_part_ids", "b_part_ids", "d_part_ids"):
    np.testing.assert_array_equal(*result[name])


def test_scheduler_parity_is_exact():
  result = scheduler.parity(os.path.join(GOLDEN, "scheduler"))
  assert set(result) == _stored_arrays("scheduler") - {"loop_sample0", "loop_model_outputs"}
  for name, (ours, ref) in result.items():
    if name != "loop_prev_samples":  # the replayed Euler loop may fuse a multiply-add
      np.testing.assert_array_equal(ours, ref, err_msg=name)
  assert _rel_errors(result)["loop_prev_samples"] <= 1e-6


def test_pipeline_e2e_parity():
  """PartCrafter from the prepared image: processor, DINOv2, then 10 CFG steps; every model
  array within 1e-4 x max |reference|, the latents within 1e-3."""
  result = pipeline_e2e.parity(os.path.join(GOLDEN, "partcrafter_pipeline_e2e"))
  assert set(result) == _stored_arrays("partcrafter_pipeline_e2e") - {"initial_noise"}
  errors = _rel_errors(result)
  assert errors["final_latents"] <= 1e-3 and errors["step_latents_after"] <= 1e-3, errors
  assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("name", ["triposg_dit", "partcrafter_dit"])
def test_fullsize_coverage_without_weights(name):
  """The published sizes: every upstream tensor is mapped and every produced param has the
  shape of our model at the converted config (zero-stride arrays, jax.eval_shape)."""
  manifest = os.path.join(GOLDEN, "fullsize", f"{name}.json")
  upstream = common.fullsize_config(manifest)
  upstream["_class_name"] = _manifest(manifest)["class"]
  config = triposg_dit.dit_config_from_upstream(upstream)
  params = triposg_dit.convert(common.zero_tensors(common.fullsize_shapes(manifest)), config,
                               source=name)
  spec = dit_lib.DiTSpec.from_config(config)
  model = dit_lib.CompositionalDiT(config)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 2, 8, spec.latent_channels)), jnp.zeros((1,)),
      jnp.zeros((1, 4, spec.cond_dim)), None, train=False))
  want = jax.tree.map(lambda a: a.shape, meta.unbox(abstract)["params"])
  got = jax.tree.map(np.shape, params)
  assert got == want
  shapes = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, tuple))
  assert sum(int(np.prod(s)) for s in shapes) == _manifest(manifest)["num_params"]


def test_config_from_upstream():
  with open(os.path.join(GOLDEN, "partcrafter_dit", "config.json")) as f:
    upstream = json.load(f)
  cfg = triposg_dit.dit_config_from_upstream(upstream)
  spec = dit_lib.DiTSpec.from_config(cfg)
  assert spec.global_block_ids() == (0, 2, 4) and spec.id_codebook == 16
  assert (spec.packing, spec.time_embedding, spec.norm_eps, spec.gelu) == (
      False, "token", 1e-5, "erf")
  ranged = dict(upstream, global_attn_block_ids=None, global_attn_block_id_range=[1, 3])
  assert dit_lib.DiTSpec.from_config(
      triposg_dit.dit_config_from_upstream(ranged)).global_block_ids() == (1, 2, 3)
  cases = [
      (dict(upstream, num_layers=4),
       "num_layers=4: the U-ViT skip layout needs an odd block count"),
      (dict(upstream, enable_local_cross_attn=False),
       "enable_local_cross_attn=false (blocks without the image condition) is not supported"),
      (dict(upstream, _class_name="UNet2DModel"),
       "class 'UNet2DModel' is not one of TripoSGDiTModel, PartCrafterDiTModel"),
  ]
  for bad, message in cases:
    with pytest.raises(ValueError) as e:
      triposg_dit.dit_config_from_upstream(bad)
    assert str(e.value) == message


def _copy_fixture(tmp_path, name="triposg_dit"):
  folder = tmp_path / name
  shutil.copytree(os.path.join(GOLDEN, name), folder)
  for path in folder.iterdir():
    path.chmod(0o644)
  return folder


def _rewrite_weights(folder, edit):
  path = folder / "diffusion_pytorch_model.safetensors"
  tensors = common.read_component(str(folder))[1]
  edit(tensors)
  save_file(tensors, str(path))


def test_load_errors_name_the_problem(tmp_path):
  folder = _copy_fixture(tmp_path)
  src = str(folder)

  def drop_and_add(t):
    del t["blocks.2.attn1.to_k.weight"]
    t["blocks.2.extra.weight"] = np.zeros((2,), np.float32)

  _rewrite_weights(folder, drop_and_add)
  with pytest.raises(common.ConversionError) as e:
    triposg_dit.load(src)
  assert str(e.value) == (f"{src}: missing tensors: blocks.2.attn1.to_k.weight; "
                          "unmapped tensors: blocks.2.extra.weight")

  folder = _copy_fixture(tmp_path / "b")
  _rewrite_weights(folder, lambda t: t.update({"proj_in.weight": np.zeros((64, 15), np.float32)}))
  with pytest.raises(common.ConversionError) as e:
    triposg_dit.load(str(folder))
  assert str(e.value) == (f"{folder}: tensor proj_in.weight has shape (64, 15), "
                          "expected (64, 16)")

  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(dict(config, num_layers=6)))
  with pytest.raises(common.ConversionError) as e:
    triposg_dit.load(str(folder))
  assert str(e.value) == (f"{folder / 'config.json'}: num_layers=6: the U-ViT skip layout "
                          "needs an odd block count")


def test_scheduler_settings_and_errors(tmp_path):
  (tmp_path / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
  assert scheduler.load(str(tmp_path)) == {"time_shift": 3.0, "num_train_timesteps": 1000}
  with pytest.raises(common.ConversionError) as e:
    scheduler.load(str(tmp_path / "missing"))
  assert str(e.value) == f"{tmp_path / 'missing'}: no such folder"
  bad = [({"_class_name": "DDIMScheduler"},
          "class 'DDIMScheduler' is not one of RectifiedFlowScheduler"),
         ({"use_dynamic_shifting": True}, "use_dynamic_shifting=true is not supported"),
         ({"num_train_timesteps": 500}, "num_train_timesteps=500, only 1000 is supported"),
         ({"shift": -1}, "shift must be a positive number, got -1")]
  for config, message in bad:
    with pytest.raises(common.ConversionError) as e:
      scheduler.settings_from_config(config, "cfg")
    assert str(e.value) == f"cfg: {message}"
