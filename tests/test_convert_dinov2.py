"""DINOv2 import: parity with transformers' Dinov2Model fixture, full-size coverage, the
torch-compatible bicubic position resize, errors."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moca_jax import image_encoder as ie
from moca_jax.convert import common, dinov2

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
FIXTURE = os.path.join(GOLDEN, "dinov2")


def _model_shapes(config, image_size):
  model = ie.ImageEncoder(config)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda k, im: model.init(k, im), jax.random.PRNGKey(0), x)
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract["params"]))[0]
  return {"/".join(p.key for p in path): tuple(v.shape) for path, v in flat}


def _flat_shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(p.key for p in path): tuple(np.shape(v)) for path, v in flat}


def test_parity_with_transformers_fixture():
  results = dinov2.parity(FIXTURE)
  assert set(results) == set(np.load(os.path.join(FIXTURE, "io.npz")).files) - {"pixel_values"}
  for name, (ours, ref) in results.items():
    assert ours.shape == ref.shape, name
    err = np.max(np.abs(ours - ref))
    assert err <= 1e-4 * np.max(np.abs(ref)), (name, err)


def test_fixture_config():
  config, variables = dinov2.load(FIXTURE)
  assert (config.width, config.depth, config.num_heads) == (64, 2, 4)
  assert (config.image_size, config.pos_image_size, config.norm_eps) == (224, 518, 1e-6)
  assert _flat_shapes(variables["params"]) == _model_shapes(config, 224)


def test_fullsize_manifest_is_covered():
  manifest = os.path.join(GOLDEN, "fullsize", "dinov2_large.json")
  shapes = common.fullsize_shapes(manifest)
  config = ie.encoder_config_from_dinov2(common.fullsize_config(manifest))
  named = ie.encoder_config("dinov2-large")
  for key in ("width", "depth", "num_heads", "image_size", "pos_image_size", "norm_eps",
              "mlp_ratio"):
    assert config[key] == named[key], key
  params = dinov2.convert(common.zero_tensors(shapes), config, source=manifest)
  assert _flat_shapes(params) == _model_shapes(config, 224)
  assert ie.num_tokens(config) == 257
  assert sum(int(np.prod(s)) for s in shapes.values()) == 304368640


def test_bicubic_weights_match_torch_by_hand():
  """4 -> 2 samples: source positions 0.5 and 2.5, t = 0.5; Keys a = -0.75 gives
  k(0.5) = 0.59375, k(1.5) = -0.09375; indices are clamped at the borders."""
  w = ie.bicubic_weights_torch(4, 2)
  np.testing.assert_allclose(w, [[0.5, 0.59375, -0.09375, 0.0],
                                 [0.0, -0.09375, 0.59375, 0.5]], atol=1e-7)
  # rows sum to one (a constant grid stays constant)
  big = ie.bicubic_weights_torch(37, 16)
  np.testing.assert_allclose(big.sum(1), 1.0, atol=1e-6)
  # jax.image.resize's bicubic (a = -0.5) is not the same thing
  grid = jax.random.normal(jax.random.PRNGKey(0), (1, 37, 37, 2))
  ours = ie.bicubic_resize_torch(grid, (16, 16))
  theirs = jax.image.resize(grid, (1, 16, 16, 2), "bicubic")
  assert float(jnp.max(jnp.abs(ours - theirs))) > 1e-2
  np.testing.assert_allclose(ours, jnp.einsum("oh,bhwd,pw->bopd", big, grid, big), atol=1e-5)


def test_unsupported_variants_are_named():
  with pytest.raises(ValueError, match="use_swiglu_ffn=True"):
    ie.encoder_config_from_dinov2({"use_swiglu_ffn": True})
  with pytest.raises(ValueError, match="hidden_act 'gelu_new' is not supported"):
    ie.encoder_config_from_dinov2({"hidden_act": "gelu_new"})
  with pytest.raises(ValueError, match="image_size must be a multiple of 14, got 100"):
    ie.encoder_config_from_dinov2({}, image_size=100)
  config, _ = dinov2.load(FIXTURE)
  _, tensors = common.read_component(FIXTURE)
  del tensors["embeddings.mask_token"]
  tensors["encoder.layer.2.norm1.weight"] = np.zeros((64,), np.float32)
  with pytest.raises(common.ConversionError,
                     match=r"missing tensors: embeddings\.mask_token; "
                     r"unmapped tensors: encoder\.layer\.2\.norm1\.weight"):
    dinov2.convert(tensors, config, source="x")
