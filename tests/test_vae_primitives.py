"""experiments.vae_primitives: bundles' VAEs on the held-out primitives train_vae evaluates."""

import json

import jax
import numpy as np
import pytest

from data_pipeline import vae_batches
from experiments import vae_primitives
from moca_jax import bundle, vae_task
from moca_jax import io as mio
from test_demo import _tiny_models


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
  """Two tiny bundles (float32 storage, so their VAE params are exactly these) whose VAEs
  differ: untrained params, and the same scaled by 1.5."""
  dit_config, dit_params, vae_config, vae_params = _tiny_models()
  vae_config = vae_config.copy_and_resolve_references()
  vae_config.eval.num_shapes, vae_config.eval.resolution = 4, 16
  other = jax.tree.map(lambda a: np.asarray(a) * 1.5, vae_params)
  root = tmp_path_factory.mktemp("bundles")
  folders = []
  for name, params in (("a", vae_params), ("b", other)):
    folder = str(root / name)
    bundle.write_bundle(folder, dit_config, dit_params, vae_config, params, card={},
                        storage_dtype="float32")
    folders.append(folder)
  return folders, vae_config, (vae_params, other)


def test_reproduces_train_vae_evaluation_per_bundle_and_writes_outputs(bundles, tmp_path):
  folders, config, params = bundles
  out = str(tmp_path / "report")
  report = vae_primitives.run(folders, ["first", "second"], out)
  # the reference: train_vae's own evaluation (vae_task.train_and_evaluate draws the shapes
  # from AnalyticShapeSource with the generator [seed, 7, 7], then evaluates with it)
  model, _ = vae_task.abstract_params(config)
  source = vae_batches.AnalyticShapeSource(config.data, 1, config.seed)
  for got, p in zip(report["bundles"], params):
    rng = np.random.default_rng([config.seed, 7, 7])
    shapes = [source.random_shape(rng) for _ in range(4)]
    want = vae_task.evaluate_reconstruction(model, {"params": p}, shapes, config, rng)
    assert [s["kind"] for s in got["shapes"]] == [s["kind"] for s in want["shapes"]]
    for key in ("iou", "chamfer"):  # the Chamfer's mesh samples are seeded too
      np.testing.assert_array_equal(
          [s[key] for s in got["shapes"]], [s[key] for s in want["shapes"]]
      )
    for kind, iou in got["iou_by_kind"].items():
      assert iou == pytest.approx(np.mean([s["iou"] for s in want["shapes"] if s["kind"] == kind]))
  assert report["bundles"][0]["weights"] != report["bundles"][1]["weights"]
  saved = json.loads(open(out + ".json").read())
  assert [b["label"] for b in saved["bundles"]] == ["first", "second"]
  md = open(out + ".md").read()
  assert "| first |" in md and "| second |" in md and "4 held-out primitives" in md
  picture = mio.load_image(out + ".png")
  assert picture.shape == (400 * len(report["kinds"]), 3 * 400, 3)


def test_bad_arguments_name_the_problem(bundles, tmp_path):
  folders, _, _ = bundles
  with pytest.raises(ValueError, match="1 labels for 2 bundles"):
    vae_primitives.run(folders, ["one"], str(tmp_path / "x"))
  with pytest.raises(FileNotFoundError):
    vae_primitives.run([str(tmp_path / "missing")], None, str(tmp_path / "x"))
