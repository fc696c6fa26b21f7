"""Image preprocessing: exact on the upstream fixture (both recorded paths); nothing is
stretched (crop to the foreground, pad to a square, then resize); blank images are refused."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from moca_jax import io
from moca_jax import preprocess as pp
from moca_jax.convert import image_preproc

FIXTURE = os.path.join(os.path.dirname(__file__), "golden", "image_preproc")
DINO = pp.ProcessorConfig.from_file(os.path.join(FIXTURE, "preprocessor_config.json"))


def test_parity_with_upstream_fixture():
  results = image_preproc.parity(FIXTURE)
  stored = set(np.load(os.path.join(FIXTURE, "io.npz")).files)
  assert set(results) == stored - {"input_rgba"}
  for name, (ours, ref) in results.items():
    assert ours.shape == ref.shape, name
    assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref)), name
  # the uint8 image before the processor is bit-exact, and equals the stored PNG
  prepared = np.asarray(Image.open(os.path.join(FIXTURE, "prepared_rgb.png")).convert("RGB"))
  np.testing.assert_array_equal(results["a_prepared_uint8"][0], prepared)


def test_load_image_feeds_both_paths(tmp_path):
  """The PNG through io.load_image(keep_alpha=True) gives the fixture's arrays."""
  rgba = io.load_image(os.path.join(FIXTURE, "input_rgba.png"), keep_alpha=True)
  ref = np.load(os.path.join(FIXTURE, "io.npz"))
  np.testing.assert_array_equal(rgba, ref["input_rgba"])
  np.testing.assert_array_equal(pp.preprocess(rgba, DINO, "triposg"),
                                ref["a_pixel_values"][0].transpose(1, 2, 0))
  np.testing.assert_array_equal(pp.preprocess(rgba, DINO, "raw"),
                                ref["b_pixel_values"][0].transpose(1, 2, 0))
  with pytest.raises(ValueError, match="unknown preprocessing path 'midi'"):
    pp.preprocess(rgba, DINO, "midi")


def _dark_box(out: np.ndarray) -> tuple[int, int]:
  """(height, width) of the dark pixels' bounding box in a normalised processor output."""
  grey = out * np.asarray(DINO.image_std) + np.asarray(DINO.image_mean)
  rows, cols = np.nonzero(grey.mean(-1) < 0.5)
  return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_thin_strip_is_not_stretched():
  """3 x 500 image, black object 3 x 100: it reached the model as 112 x 22 when the image was
  resized to a square; cropped and padded it keeps its 1 : 33 shape."""
  img = np.full((3, 500, 3), 255, np.uint8)
  img[:, 200:300] = 0
  prepared = pp.prepare_image(img)
  assert prepared.shape[:2] == (119, 120)  # 100 + 2 * 10 wide; 3 + 2 * int(10 + 97 / 2) high
  out = pp.preprocess(img, DINO)
  assert out.shape == (224, 224, 3)
  h, w = _dark_box(out)
  assert 200 <= w <= 224 and 5 <= h <= 8, (h, w)


def test_four_by_three_photo_is_not_squashed():
  """A round object in a 4:3 photo stays round; a 4:3 photo with no plain background is
  padded to a square, so its content keeps its 4:3 aspect."""
  yy, xx = np.mgrid[:120, :160]
  img = np.full((120, 160, 3), 128, np.uint8)
  img[(yy - 60) ** 2 + (xx - 70) ** 2 <= 30 ** 2] = (20, 20, 20)
  h, w = _dark_box(pp.preprocess(img, DINO))
  assert abs(h - w) <= 2, (h, w)
  photo = np.stack([xx * 1.5, yy * 2.0, (xx + yy) % 97], -1).astype(np.uint8)
  photo = np.minimum(photo, 200).astype(np.uint8)  # no white in the content
  prepared = pp.prepare_image(photo)
  assert prepared.shape[:2] == (2 * int(16 + 20) + 120, 160 + 2 * 16)
  out = pp.preprocess(photo, DINO)
  grey = out * np.asarray(DINO.image_std) + np.asarray(DINO.image_mean)
  rows, cols = np.nonzero(grey.min(-1) < 0.9)
  ratio = (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)
  assert ratio == pytest.approx(4 / 3, rel=0.03)


def test_blank_images_are_refused_unless_allowed():
  white = np.full((32, 48, 3), 255, np.uint8)
  clear = np.zeros((32, 48, 4), np.uint8)
  clear[..., :3] = (40, 80, 120)
  for image in (white, clear, np.full((32, 48, 3), 77, np.uint8)):
    with pytest.raises(pp.NoForegroundError, match="no foreground in the image"):
      pp.preprocess(image, DINO)
  assert issubclass(pp.NoForegroundError, ValueError)
  out = pp.preprocess(white, DINO, allow_empty=True)
  np.testing.assert_allclose(out[0, 0], (1 - np.asarray(DINO.image_mean)) /
                             np.asarray(DINO.image_std), rtol=1e-6)
  # the raw path (PartCrafter's default) does no foreground check
  assert pp.preprocess(clear, DINO, "raw").shape == (224, 224, 3)


def test_alpha_decides_the_foreground_when_usable():
  """A transparent background hides colour (40, 80, 120): the TripoSG path crops to the
  alpha and composites on white; a nearly opaque alpha (< 1% clear) is not used."""
  rgba = np.zeros((50, 60, 4), np.uint8)
  rgba[..., :3] = (40, 80, 120)
  rgba[10:20, 30:50] = (200, 0, 0, 255)
  np.testing.assert_array_equal(pp.foreground_mask(rgba), rgba[..., 3] > 0)
  prepared = pp.prepare_image(rgba)
  assert prepared.shape[:2] == (2 * int(2 + 5) + 10, 20 + 2 * 2)
  assert not np.any(np.all(prepared == (40, 80, 120), axis=-1))
  opaque = rgba.copy()
  opaque[..., 3] = 255
  assert not pp.has_usable_alpha(opaque[..., 3])
  mask = pp.foreground_mask(opaque)  # background colour from the border instead
  assert mask.sum() == 200 and mask[15, 40]


def test_processor_config_rules(tmp_path):
  """Shortest edge 256 with int() of the long side, centre crop offsets (H - h) // 2."""
  img = np.zeros((100, 301, 3), np.uint8)
  img[:, 150] = 255
  resized = pp.resize_shortest_edge(img, 256)
  assert resized.shape == (256, int(256 * 301 / 100), 3)
  cropped = pp.center_crop(np.arange(7 * 5).reshape(7, 5, 1), 4, 2)
  np.testing.assert_array_equal(cropped[..., 0], np.arange(35).reshape(7, 5)[1:5, 1:3])
  bad = tmp_path / "preprocessor_config.json"
  bad.write_text(json.dumps({"size": {"height": 224, "width": 224}}))
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: only size=\{'shortest_edge'"):
    pp.ProcessorConfig.from_file(str(bad))
  with pytest.raises(FileNotFoundError, match="no such preprocessor config"):
    pp.ProcessorConfig.from_file(str(tmp_path / "none.json"))
  assert (DINO.shortest_edge, DINO.crop_height, DINO.resample) == (256, 224, 3)
  assert DINO.image_mean == (0.485, 0.456, 0.406)


def test_very_large_images_are_downsized_first():
  """TripoSG downsizes a long side above 2000 px before cropping; the crop box follows."""
  img = np.full((10, 2100, 3), 255, np.uint8)
  img[:, 1000:1100] = 0
  prepared = pp.prepare_image(img)
  # at 2000 / 2100 the 100 px object is 95-97 px wide (edges blend); the pad is 9 per side
  assert 95 + 2 * 9 <= prepared.shape[1] <= 97 + 2 * 9
