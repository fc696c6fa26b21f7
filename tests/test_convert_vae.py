"""TripoSG VAE import: parity with the upstream golden fixture, full-size coverage, errors."""
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moca_jax import vae
from moca_jax.convert import common, triposg_vae

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
FIXTURE = os.path.join(GOLDEN, "triposg_vae")


def _model_shapes(config) -> dict[str, tuple[int, ...]]:
  model = vae.VecSetVAE(config)
  abstract = jax.eval_shape(lambda k: vae.init_vae(model, k, num_queries=4),
                            jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract["params"]))[0]
  return {"/".join(p.key for p in path): tuple(x.shape) for path, x in flat}


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(p.key for p in path): tuple(np.shape(x)) for path, x in flat}


def test_parity_with_upstream_fixture():
  results = triposg_vae.parity(FIXTURE)
  stored = set(np.load(os.path.join(FIXTURE, "io.npz")).files)
  assert stored - {"surface", "sample_indices", "queries", "z_rand"} == set(results)
  for name, (ours, ref) in results.items():
    assert ours.shape == ref.shape, name
    err = np.max(np.abs(ours - ref))
    assert err <= 1e-4 * np.max(np.abs(ref)), (name, err)


def test_fixture_config_and_layout():
  config, variables = triposg_vae.load(FIXTURE)
  assert (config.enc_width, config.dec_width, config.latent_channels) == (64, 96, 16)
  assert (config.enc_self_layers, config.dec_layers, config.enc_heads) == (2, 2, 4)
  assert not config.qk_norm and config.negate_output and config.gelu_exact
  assert config.norm_eps == 1e-5 and (config.logvar_min, config.logvar_max) == (-30.0, 20.0)
  assert _flat_shapes(variables["params"]) == _model_shapes(config)


def test_head_interleave_is_undone():
  """Upstream head h of a self-attention reads rows [h*3d, h*3d+d) of cat(q, k, v) as its
  query: with 2 heads of size 1 and q, k, v = rows 0..5, head 1's query is row 3 (k[1])."""
  rows = [np.full((2, 1), v, np.float32) + np.array([[0.0], [1.0]], np.float32)
          for v in (0.0, 2.0, 4.0)]  # q = [0, 1], k = [2, 3], v = [4, 5]
  q, k, v = triposg_vae._split_heads(rows, heads=2)
  np.testing.assert_array_equal(q[:, 0], [0, 3])
  np.testing.assert_array_equal(k[:, 0], [1, 4])
  np.testing.assert_array_equal(v[:, 0], [2, 5])


def test_fullsize_manifest_is_covered():
  manifest = os.path.join(GOLDEN, "fullsize", "triposg_vae.json")
  shapes = common.fullsize_shapes(manifest)
  config = vae.vae_config_from_triposg(common.fullsize_config(manifest))
  assert (config.enc_width, config.dec_width, config.dec_layers) == (512, 1024, 16)
  params = triposg_vae.convert(common.zero_tensors(shapes), config, source=manifest)
  assert _flat_shapes(params) == _model_shapes(config)
  # the published size is the 'triposg' named config
  published = vae.vae_config("triposg")
  for key in ("enc_width", "dec_width", "enc_self_layers", "dec_layers", "latent_channels",
              "norm_eps", "gelu_exact", "qk_norm", "query_mlp", "negate_output"):
    assert published[key] == config[key], key
  assert sum(int(np.prod(s)) for s in shapes.values()) == 242662017


def _copy_fixture(tmp_path, edit):
  folder = tmp_path / "vae"
  shutil.copytree(FIXTURE, folder)
  path = folder / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path))
  return str(folder)


def test_missing_and_unmapped_tensors_are_listed(tmp_path):
  def edit(t):
    del t["decoder.proj_out.bias"]
    t["decoder.extra.weight"] = np.zeros((2,), np.float32)
  folder = _copy_fixture(tmp_path, edit)
  with pytest.raises(common.ConversionError,
                     match=r"missing tensors: decoder\.proj_out\.bias; "
                     r"unmapped tensors: decoder\.extra\.weight"):
    triposg_vae.load(folder)


def test_shape_mismatch_names_the_tensor(tmp_path):
  def edit(t):
    t["quant.weight"] = np.zeros((32, 63), np.float32)
  folder = _copy_fixture(tmp_path, edit)
  with pytest.raises(common.ConversionError,
                     match=r"tensor quant\.weight has shape \(32, 63\), expected \(32, 64\)"):
    triposg_vae.load(folder)


def test_bad_folders(tmp_path):
  with pytest.raises(common.ConversionError, match="no such folder"):
    triposg_vae.load(str(tmp_path / "nope"))
  folder = tmp_path / "cfg_only"
  folder.mkdir()
  shutil.copy(os.path.join(FIXTURE, "config.json"), folder / "config.json")
  with pytest.raises(common.ConversionError, match=r"no \*\.safetensors weights file"):
    triposg_vae.load(str(folder))
  with pytest.raises(common.ConversionError, match="class 'TripoSGVAEModel' is not one of X"):
    common.read_component(FIXTURE, ("X",))
  ints = _copy_fixture(tmp_path, lambda t: t.update(step=np.zeros((1,), np.int64)))
  with pytest.raises(common.ConversionError, match="tensor step has non-float dtype int64"):
    triposg_vae.load(ints)
  os.remove(os.path.join(ints, "config.json"))
  with pytest.raises(common.ConversionError, match="no config.json"):
    triposg_vae.load(ints)


def test_common_helpers():
  assert common.nest({"a/b/kernel": 1, "a/c": 2}) == {"a": {"b": {"kernel": 1}, "c": 2}}
  with pytest.raises(ValueError, match="a/b/kernel: b is already a leaf"):
    common.nest({"a/b": 1, "a/b/kernel": 2})
  tm = common.TensorMap({"x": np.zeros((2, 3), np.float32)}, "src")
  assert tm.take("x", (2, 3)).shape == (2, 3)
  tm.finish()
  zeros = common.zero_tensors({"w": (1024, 1024)})
  assert zeros["w"].strides == (0, 0) and zeros["w"].shape == (1024, 1024)
  with pytest.raises(common.ConversionError, match="not a readable shape manifest"):
    common.fullsize_shapes(FIXTURE + "/config.json")
