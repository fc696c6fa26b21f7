"""`make demo` (experiments/demo.py, bundle mode) on a tiny model bundle: the files it
promises, its deterministic choice of held-out items, one-line errors for a missing bundle."""

import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import trimesh

from experiments import demo
from experiments.configs import dit as dit_configs
from experiments.configs import vae as vae_configs
from moca_jax import bundle, dit_task, pipeline, vae_task

STEPS, RES = 2, 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def _tiny_models():
  """Untrained tiny DiT and VAE params (as tests/test_bundle.py, inits jitted: 9 s instead
  of 30 s on 2 cores), made once per test process."""
  dit_config = dit_configs.get_config("tiny")
  vae_config = vae_configs.get_config("tiny")
  s, d = dit_config.model.encoder.image_size, dit_config.model.dit
  batch = {
      "images": np.zeros((1, s, s, 3), np.uint8),
      "latents": np.zeros((1, 2, d.latent_tokens, d.latent_channels), np.float32),
      "component_mask": np.ones((1, 2), bool),
  }
  init = jax.jit(dit_task.make_task(dit_config).init_fn)
  dit_params = init(jax.random.PRNGKey(0), batch)["params"]
  model, _ = vae_task.abstract_params(vae_config)
  vae_params = jax.jit(model.init)(*vae_task.init_args(model, jax.random.PRNGKey(1)))["params"]
  unbox = lambda t: jax.tree.map(np.asarray, nn.meta.unbox(t))  # noqa: E731
  return dit_config, unbox(dit_params), vae_config, unbox(vae_params)


def write_tiny_bundle(folder: str) -> str:
  """An untrained tiny object-mode bundle (N <= 4, config.sample: 2 steps, CFG 2, scenes
  CFG 1.5) in `folder`; returns the folder. Also used by test_generate."""
  dit_config, dit_params, vae_config, vae_params = _tiny_models()
  dit_config = dit_config.copy_and_resolve_references()
  dit_config.sample.steps, dit_config.sample.cfg_scale = STEPS, 2.0
  with dit_config.unlocked():
    dit_config.sample.scene_cfg_scale = 1.5
  bundle.write_bundle(
      folder, dit_config, dit_params, vae_config, vae_params, card={"name": "tiny-test"}
  )
  return folder


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
  return write_tiny_bundle(str(tmp_path_factory.mktemp("demo") / "moca-small"))


def test_bundle_demo_writes_what_it_promises(tiny_bundle, tmp_path, capsys):
  work = str(tmp_path / "demo")
  summary = demo.run_bundle_demo(
      work, tiny_bundle, objects=1, scenes=1, resolution=RES, eval_samples=2000
  )
  # The first object and scene of `test`, in split order, with at most the tiny model's
  # 4 components (objects 0-6 have 6 to 20 parts, scenes 0-3 have 14 to 29 instances).
  assert summary["settings"]["max_components"] == 4
  assert summary["objects"]["items"] == ["procedural/test/object/000007"]
  assert summary["objects"]["passed_over"] == [f"procedural/test/object/{i:06d}" for i in range(7)]
  assert summary["scenes"]["items"] == ["procedural/test/scene/000004"]
  assert (summary["settings"]["steps"], summary["settings"]["cfg_scale"]) == (STEPS, 2.0)
  assert summary["settings"]["scene_cfg_scale"] == 1.5  # the bundle's scene default
  assert summary["settings"]["resolution"] == RES
  # per item: GLB with one named node per part, preview, router maps, latents
  for name, n in (("procedural/test/object/000007", 3), ("procedural/test/scene/000004", 4)):
    d = os.path.join(work, "samples", name.replace("/", "_"))
    assert summary["samples"][name] == d
    for f in ("parts.glb", "preview.png", "router.png", "router.json", "latents.npy"):
      assert os.path.getsize(os.path.join(d, f)) > 0, (name, f)
    scene = trimesh.load(os.path.join(d, "parts.glb"), force="scene")
    assert scene.geometry and set(scene.geometry) <= {f"part_{i:02d}" for i in range(n)}
    assert np.load(os.path.join(d, "latents.npy")).shape[0] == n
  # per kind: grid, table, metrics, each scored on its own table (Table 1 / Table 2 columns)
  for kind, column in (("objects", "Fscore-0.1"), ("scenes", "CD-Scene")):
    d = os.path.join(work, "eval", kind)
    for f in ("grid.png", "table.md", "metrics.json"):
      assert os.path.getsize(os.path.join(d, f)) > 0, (kind, f)
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    assert metrics["kind"] == kind[:-1]
    assert metrics["meta"]["cfg"] == (2.0 if kind == "objects" else 1.5)
    assert metrics["meta"]["cfg_interval"] is None and metrics["meta"]["time_shift"] == 1.0
    assert [r["name"] for r in metrics["rows"]] == summary[kind]["items"]
    assert metrics["mean"]["count"] == 1.0
    assert column in open(os.path.join(d, "table.md")).read()
  assert "cd" in summary["objects"]["metrics"] and "cd_scene" in summary["scenes"]["metrics"]
  on_disk = json.load(open(os.path.join(work, "summary.json")))
  assert on_disk["mode"] == "bundle" and on_disk["bundle"] == tiny_bundle
  assert set(on_disk["seconds"]) == {"load", "objects", "scenes", "total"}
  out = capsys.readouterr().out
  assert "# Evaluation: tiny-test (objects)" in out and "# Evaluation: tiny-test (scenes)" in out
  assert "tiny-test: object-mode MoC DiT" in out  # the banner names the model
  assert "procedural/test/scene/000004: 4 components -> " in out  # per item: files, score
  assert "procedural/test/object/000007: CD " in out


def test_missing_or_bad_bundle_is_one_clear_error(tmp_path, monkeypatch):
  missing = str(tmp_path / "assets" / "moca-small")
  monkeypatch.setattr(pipeline, "DEFAULT_BUNDLE", missing)
  with pytest.raises(
      demo.DemoError,
      match=rf"^no model bundle at {re.escape(missing)} \(folder missing\); "
      r"`make demo-train` trains a tiny model from scratch instead$",
  ):
    demo.run_bundle_demo(str(tmp_path / "w"))  # no --bundle: the bundled model
  os.makedirs(missing)
  with pytest.raises(demo.DemoError, match=r"moca-small: not a model bundle \(no bundle.json\)"):
    demo.run_bundle_demo(str(tmp_path / "w"))
  with pytest.raises(demo.DemoError, match=r"objects=0, scenes=0: need at least one item"):
    demo.run_bundle_demo(str(tmp_path / "w"), missing, objects=0, scenes=0)
  assert not os.path.exists(tmp_path / "w")  # refused before anything was written


def test_cli_missing_bundle_exits_2_with_one_line(tmp_path):
  missing = str(tmp_path / "nothing")
  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.demo",
          f"--bundle={missing}",
          f"--workdir={tmp_path / 'w'}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      f"demo: error: no model bundle at {missing} (folder missing); `make demo-train` trains "
      "a tiny model from scratch instead"
  ]
  assert not os.path.exists(tmp_path / "w")
