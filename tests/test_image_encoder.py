"""ViT image encoder (DINOv2 layout): shapes, 7-channel init, LoRA identity, freezing."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moca_jax import image_encoder as ie


def _init(cfg, images, seed=0):
  model = ie.ImageEncoder(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), images)["params"])
  return model, params


@pytest.mark.parametrize("channels,registers", [(3, 0), (7, 4)])
def test_shapes(channels, registers):
  cfg = ie.encoder_config("tiny", in_channels=channels)
  cfg.num_registers = registers
  x = jnp.zeros((2, 56, 56, channels))
  model, params = _init(cfg, x)
  out = model.apply({"params": params}, x)
  chex.assert_shape(out, (2, ie.num_tokens(cfg), cfg.width))
  assert ie.num_tokens(cfg) == 1 + registers + 16
  assert params["patch_embed"]["kernel"].shape == (14, 14, channels, cfg.width)
  # another resolution: the position table is resized, token count follows the grid
  out = model.apply({"params": params}, jnp.zeros((1, 84, 84, channels)))
  chex.assert_shape(out, (1, 1 + registers + 36, cfg.width))


def test_named_sizes_match_dinov2():
  large = ie.encoder_config("large")
  assert (large.width, large.depth, large.num_heads, large.patch_size) == (1024, 24, 16, 14)
  assert ie.num_tokens(large) == 257
  small = ie.encoder_config("small")
  assert (small.width, small.depth, small.num_heads) == (384, 12, 6)
  published = ie.encoder_config("dinov2-large")
  assert (published.width, published.depth, published.num_heads) == (1024, 24, 16)
  assert (published.image_size, published.pos_image_size, published.layer_scale_init) == (
      224, 518, 1.0)
  assert ie.num_tokens(published) == 257
  with pytest.raises(ValueError, match="unknown size"):
    ie.encoder_config("huge")


def test_seven_channel_init_copies_rgb_weights():
  cfg = ie.encoder_config("tiny", in_channels=7)
  _, params = _init(cfg, jnp.zeros((1, 56, 56, 7)))
  k = params["patch_embed"]["kernel"]
  np.testing.assert_array_equal(k[:, :, 3:6], k[:, :, 0:3])
  np.testing.assert_array_equal(k[:, :, 6], 0.0)
  assert float(jnp.abs(k[:, :, :3]).max()) > 0
  # the same seed gives the RGB model's kernel in the first three channels
  _, rgb = _init(ie.encoder_config("tiny", 3), jnp.zeros((1, 56, 56, 3)))
  np.testing.assert_array_equal(k[:, :, :3], rgb["patch_embed"]["kernel"])
  # hence: a 7-channel input [img, img, 0] sees twice the RGB patch response
  img = jax.random.normal(jax.random.PRNGKey(3), (1, 14, 14, 3))
  seven = jnp.concatenate([img, img, jnp.ones((1, 14, 14, 1))], -1)
  np.testing.assert_allclose(jnp.einsum("bhwc,hwcd->bd", seven, k),
                             2 * jnp.einsum("bhwc,hwcd->bd", img, k[:, :, :3]), rtol=1e-5,
                             atol=1e-5)


def _small(cfg):
  cfg.image_size = 28          # 2 x 2 patches: the same code paths, less compute
  return cfg


def test_lora_starts_as_identity_and_is_the_only_trainable_part_when_frozen():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
  base_cfg = _small(ie.encoder_config("tiny"))
  lora_cfg = _small(ie.encoder_config("tiny"))
  lora_cfg.lora_rank, lora_cfg.freeze = 4, True
  lora_cfg.lora_targets = ("qkv", "proj", "fc1", "fc2")
  base_model, base_params = _init(base_cfg, x)
  lora_model, lora_params = _init(lora_cfg, x)
  # copy the base weights into the LoRA model: its output must equal the base output
  merged = jax.tree_util.tree_map_with_path(
      lambda path, v: v if path[-1].key in ("lora_a", "lora_b") else
      _get(base_params, path), lora_params)
  np.testing.assert_allclose(lora_model.apply({"params": merged}, x),
                             base_model.apply({"params": base_params}, x), atol=1e-6)
  assert float(jnp.abs(merged["blocks_0"]["qkv"]["lora_a"]).max()) > 0
  mask = ie.trainable_mask(merged, lora_cfg)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert all(m == (p[-1].key in ("lora_a", "lora_b")) for p, m in flat)
  assert sum(m for _, m in flat) == 2 * 4 * base_cfg.depth
  # the adapter does change the output once B is non-zero (it is wired in)
  bumped = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if p[-1].key == "lora_b" else v, merged)
  assert not np.allclose(lora_model.apply({"params": bumped}, x),
                         lora_model.apply({"params": merged}, x), atol=1e-4)


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_freeze_without_lora_stops_gradient():
  cfg = _small(ie.encoder_config("tiny"))
  cfg.freeze = True
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 28, 28, 3))
  model, params = _init(cfg, x)
  g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
  assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree.leaves(g))
  assert not any(jax.tree.leaves(ie.trainable_mask(params, cfg)))
  cfg.freeze = False
  g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
  assert float(jnp.abs(g["patch_embed"]["kernel"]).max()) > 0
  assert all(jax.tree.leaves(ie.trainable_mask(params, cfg)))


def test_preprocess():
  img = np.full((2, 30, 40, 3), 255, np.uint8)
  out = ie.preprocess(img, 56)
  chex.assert_shape(out, (2, 56, 56, 3))
  np.testing.assert_allclose(out[0, 0, 0], (1 - ie.IMAGENET_MEAN) / ie.IMAGENET_STD, rtol=1e-5)
  seven = np.concatenate([img, img, np.full((2, 30, 40, 1), 200, np.uint8)], -1)
  out7 = ie.preprocess(seven, 28, in_channels=7)
  # 30 x 40 is padded to 40 x 40 (5 rows each side, mask 0 there), then resized to 28
  np.testing.assert_array_equal(out7[:, 6:22, :, 6], 1.0)
  np.testing.assert_array_equal(out7[:, :2, :, 6], 0.0)
  np.testing.assert_allclose(out7[..., 3:6], out7[..., 0:3])
  with pytest.raises(ValueError, match="expected images"):
    ie.preprocess(img, 56, in_channels=7)


def test_preprocess_pads_instead_of_stretching():
  """A 3 x 500 strip with a 3 x 100 black object (issue 12): padded to a square first, the
  object keeps its 1 : 33 shape (stretching made it 112 x 22 at 224)."""
  img = np.full((1, 3, 500, 3), 255, np.uint8)
  img[:, :, 200:300] = 0
  out = np.asarray(ie.preprocess(img, 224))
  dark = out[0].mean(-1) < 0
  rows, cols = np.nonzero(dark)
  assert cols.max() - cols.min() + 1 >= 44 and rows.max() - rows.min() + 1 <= 3
  # padding is white for RGB and 0 for the mask channel of 7-channel inputs
  seven = np.concatenate([np.zeros((1, 20, 40, 6), np.uint8),
                          np.full((1, 20, 40, 1), 255, np.uint8)], -1)
  out7 = np.asarray(ie.preprocess(seven, 28, in_channels=7))  # rows 10..29 of 40 are image
  assert out7[0, 0, 0, 6] == 0.0 and out7[0, 14, 14, 6] == 1.0
  np.testing.assert_allclose(out7[0, 0, 0, :3], (1 - ie.IMAGENET_MEAN) / ie.IMAGENET_STD,
                             rtol=1e-5)


def test_odd_length_padding_path_matches_plain_attention():
  """The cuDNN path pads 257-style odd token counts by one masked token; with the XLA backend
  standing in for cuDNN, the padded computation equals plain attention."""
  from moca_jax import layers
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 17, 2, 8)) for i in range(3))
  ref = layers.naive_attention(q, k, v)
  orig = ie.attention
  try:
    ie.attention = lambda *a, implementation=None, **kw: orig(*a, implementation="xla", **kw)
    out = ie.encoder_attention(q, k, v, "cudnn")
  finally:
    ie.attention = orig
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(ie.encoder_attention(q, k, v, "xla"), ref, atol=1e-5)


def test_token_spread_measures_dependence_on_the_image():
  rng = np.random.default_rng(0)
  same = np.broadcast_to(rng.normal(size=(1, 5, 8)), (4, 5, 8))
  assert float(ie.token_spread(jnp.asarray(same))) == pytest.approx(0.0, abs=1e-6)
  varied = rng.normal(size=(4, 5, 8))
  s = float(ie.token_spread(jnp.asarray(varied)))
  assert 0.3 < s < 1.5
  assert float(ie.token_spread(jnp.asarray(3.0 * varied))) == pytest.approx(s, rel=1e-5)
  # a constant offset shared by every image (a collapsed encoder's bias) lowers the spread
  assert float(ie.token_spread(jnp.asarray(varied + 10.0))) < 0.2 * s
  with pytest.raises(ValueError, match="at least 2"):
    ie.token_spread(jnp.asarray(varied[:1]))
