"""moca_jax.viz writes valid PNGs of the documented size whose pixels follow the input."""

import numpy as np
import pytest
import trimesh
from PIL import Image

from moca_jax import viz


def _png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  im = Image.open(path)
  im.load()
  return np.asarray(im.convert("RGB"))


def _router(seed, h=4, n=6, k=2):
  imp = np.random.default_rng(seed).random((h, n, n))
  off = imp + np.where(np.eye(n, dtype=bool), -np.inf, 0)
  return imp, np.argsort(-off, axis=-1)[..., :k]


def test_router_heatmap_size_and_content(tmp_path):
  imp, sel = _router(0)
  a = _png(viz.router_heatmap_png(imp, sel, tmp_path / "a.png", panel_px=200))
  assert a.shape == (200 + 40, 4 * 200, 3)
  imp2, sel2 = _router(1)
  b = _png(viz.router_heatmap_png(imp2, sel2, tmp_path / "b.png", panel_px=200))
  assert a.shape == b.shape and np.any(a != b)
  # Selections alone change the picture (red outlines).
  c = _png(viz.router_heatmap_png(imp, sel2, tmp_path / "c.png", panel_px=200))
  assert np.any(a != c)
  # Six heads -> two rows of four panels; padding components hidden.
  imp6, sel6 = _router(2, h=6)
  d = _png(
      viz.router_heatmap_png(
          imp6,
          sel6,
          tmp_path / "d.png",
          panel_px=100,
          component_mask=np.array([1, 1, 1, 1, 0, 0], bool),
      )
  )
  assert d.shape == (2 * 100 + 40, 4 * 100, 3)
  assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


def test_router_heatmap_rejects_bad_shapes(tmp_path):
  with pytest.raises(ValueError, match="importances"):
    viz.router_heatmap_png(np.zeros((2, 3, 4)), None, tmp_path / "x.png")
  with pytest.raises(ValueError, match="selections"):
    viz.router_heatmap_png(np.zeros((2, 3, 3)), np.zeros((1, 3, 1), int), tmp_path / "x.png")


def test_loss_curves_from_lists_and_tensorboard(tmp_path):
  curve = [(i, 1.0 / (i + 1)) for i in range(50)]
  a = _png(viz.loss_curves_png(curve, tmp_path / "a.png", width_px=500, height_px=300))
  assert a.shape == (300, 500, 3)
  b = _png(
      viz.loss_curves_png(
          {"x": [(i, float(i)) for i in range(50)]}, tmp_path / "b.png", width_px=500, height_px=300
      )
  )
  assert np.any(a != b)
  from tensorboardX import SummaryWriter

  w = SummaryWriter(str(tmp_path / "tb"))
  for step, v in curve:
    w.add_scalar("train/loss", v, step)
  w.add_scalar("eval/cd", 0.3, 10)
  w.close()
  scalars = viz.read_tensorboard_scalars(str(tmp_path / "tb"))
  assert set(scalars) == {"train/loss", "eval/cd"}
  np.testing.assert_allclose(np.asarray(scalars["train/loss"]), np.asarray(curve), rtol=1e-6)
  c = _png(
      viz.loss_curves_png(
          str(tmp_path / "tb"), tmp_path / "c.png", tags=["train/loss"], width_px=500, height_px=300
      )
  )
  assert c.shape == (300, 500, 3)
  with pytest.raises(FileNotFoundError):
    viz.read_tensorboard_scalars(str(tmp_path / "nope"))


def test_trailing_mean_against_a_loop_and_the_smoothed_plot(tmp_path):
  rng = np.random.default_rng(0)
  v = rng.normal(size=37)
  want = [v[max(0, i + 1 - 5) : i + 1].mean() for i in range(len(v))]
  np.testing.assert_allclose(viz.trailing_mean(v, 5), want, rtol=1e-12)
  np.testing.assert_allclose(viz.trailing_mean(v, 1), v)
  curve = [(i, 1.0 + float(x)) for i, x in enumerate(np.abs(v) + 0.1)]
  raw = _png(viz.loss_curves_png(curve, tmp_path / "raw.png", width_px=300, height_px=200))
  smooth = _png(viz.loss_curves_png(curve, tmp_path / "s.png", width_px=300, height_px=200,
                                    smooth=5))
  assert smooth.shape == raw.shape and np.any(smooth != raw)


def test_render_parts_colours_and_empty():
  box = trimesh.creation.box()
  sphere = trimesh.creation.icosphere(radius=0.5).apply_translation((1, 0, 0))
  img = viz.render_parts([box, sphere], size=64)
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  assert np.any(img != 255)  # something was drawn
  blank = viz.render_parts([trimesh.Trimesh()], size=64)
  assert np.all(blank == 255)
  # Different colours per part -> different pixels from a single-colour render.
  grey = viz.render_parts([box, sphere], size=64, colours=[(0.5, 0.5, 0.5)] * 2)
  assert np.any(img != grey)
  # The camera sees the box's silhouette where expected: the centre pixel is a hit.
  assert np.any(viz.render_parts([box], size=64)[32, 32] != 255)


def test_mesh_grid_size_and_content(tmp_path):
  box = trimesh.creation.box()
  sphere = trimesh.creation.icosphere(radius=0.6)
  image = np.zeros((32, 32, 7), np.uint8)
  image[8:24, 8:24, :3] = 200
  rows = [
      dict(image=image, pred=[box, sphere], gt=[box], label="a"),
      dict(image=None, pred=[trimesh.Trimesh()], gt=None),
  ]
  a = _png(viz.mesh_grid_png(rows, tmp_path / "a.png", panel_px=96))
  assert a.shape == (2 * 96 + 30, 3 * 96, 3)
  rows[0]["pred"] = [sphere]
  b = _png(viz.mesh_grid_png(rows, tmp_path / "b.png", panel_px=96))
  assert np.any(a != b)
  with pytest.raises(ValueError, match="rows"):
    viz.mesh_grid_png([], tmp_path / "c.png")
