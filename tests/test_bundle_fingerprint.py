"""moca_jax.bundle.weights_sha256: one fingerprint of a bundle's weights, the same for a copy
under another path, different when any weight file differs."""

import json
import os
import shutil

import pytest

from moca_jax import bundle

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "assets", "moca-small")


def test_fingerprint_follows_the_weights_not_the_path(tmp_path):
  copy = tmp_path / "copy"
  copy.mkdir()
  shutil.copy(os.path.join(SHIPPED, "bundle.json"), copy / "bundle.json")
  shipped = bundle.weights_sha256(SHIPPED)
  assert len(shipped) == 64 and bundle.weights_sha256(str(copy)) == shipped

  info = json.loads((copy / "bundle.json").read_text())
  name = sorted(info["files"])[0]
  info["files"][name]["sha256"] = "0" * 64  # another set of weights in that file
  changed = tmp_path / "changed"
  changed.mkdir()
  (changed / "bundle.json").write_text(json.dumps(info))
  assert bundle.weights_sha256(str(changed)) != shipped


def test_fingerprint_of_a_folder_that_is_no_bundle_raises(tmp_path):
  with pytest.raises(bundle.BundleError, match="not a model bundle"):
    bundle.weights_sha256(str(tmp_path))
