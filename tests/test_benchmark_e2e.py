"""experiments/benchmark_e2e.py: a tiny image -> GLB run through the pipeline, its report."""

import json
import re
import numpy as np
import pytest

from experiments import benchmark_e2e as be


def test_tiny_run_times_every_stage_and_writes_the_report(tmp_path):
  res = be.run_benchmark(
      size="tiny",
      components=3,
      steps=1,
      resolution=16,
      fine_resolution=32,
      chunk_size=512,
      image_pixels=48,
      repeats=1,
      coarse_levels=(4,),
  )
  assert set(res["stages_median_s"]) == set(be.STAGES)
  assert res["image_to_glb_median_s"] == pytest.approx(sum(res["stages_median_s"].values()))
  assert all(t > 0 for t in res["stages_first_call_s"].values())
  # every part has a closed surface (the sphere field), so none is empty
  assert len(res["faces_per_part"]) == 3 and min(res["faces_per_part"]) > 20
  assert res["empty_parts"] == [] and res["target"] is None
  # the two-level baseline ran on the same latents: the same meshes, from more points
  two = res["two_level"]
  assert two["parts_identical"] == 3 and two["faces_per_part"] == res["faces_per_part"]
  assert two["decode_median_s"] > 0 and two["decode_speedup"] > 0
  assert res["decoded_points"]["levels"] == [4, 16, 32]
  assert two["decoded_points"]["levels"] == [16, 32]
  assert res["decoded_points"]["decoded_points"][0] == 3 * 5**3
  assert two["decoded_points"]["decoded_points"][0] == 3 * 17**3
  # the same final band (at this size the coarse test refines every 4^3 cell: no saving)
  assert res["decoded_points"]["decoded_points"][2] == two["decoded_points"]["decoded_points"][1]
  text = be.write_results(res, str(tmp_path / "e2e"))
  stored = json.loads((tmp_path / "e2e.json").read_text())
  assert stored["machine"] and stored["settings"]["components"] == 3
  assert (tmp_path / "e2e.md").read_text() == text
  assert "| **image to GLB** |" in text and "no target verdict" in text
  assert "| decode+extraction, two-level baseline |" in text
  assert "Parts with the same meshes both ways: 3 of 3" in text
  assert f"| two-level baseline | 16^3: {3 * 17**3:,}; 32^3: " in text


def test_surface_field_spheres_differ_by_part_and_fit_the_grid():
  import jax.numpy as jnp

  latents = np.random.default_rng(0).normal(size=(5, 16, 8)).astype(np.float32)
  spheres = np.asarray(be._sphere_params(jnp.asarray(latents)))
  assert spheres.shape == (5, 4)
  assert np.all(np.abs(spheres[:, :3]) <= 0.5)
  assert np.all((spheres[:, 3] >= 0.15) & (spheres[:, 3] <= 0.3))
  assert len(np.unique(spheres[:, 0])) == 5  # different parts, different places


def test_issue_setting_gets_a_verdict():
  res = {
      "settings": dict(
          be.ISSUE_SETTING, cfg_scale=7.0, chunk_size=32768, image_pixels=1024, repeats=3
      ),
      "device": "gpu: H200",
      "jax": "0",
      "dtype": "bfloat16",
      "machine": "m",
      "build_s": 1.0,
      "stages_median_s": dict.fromkeys(be.STAGES, 3.0),
      "stages_first_call_s": dict.fromkeys(be.STAGES, 9.0),
      "image_to_glb_median_s": 12.0,
      "image_to_glb_first_call_s": 36.0,
      "compile_and_first_call_overhead_s": 24.0,
      "write_outputs_median_s": 1.0,
      "faces_per_part": [1],
      "empty_parts": [],
      "decoded_points": {"levels": [256, 512], "decoded_points": [5, 2], "decoder_queries": [6, 4]},
      "target": {"limit_s": be.TARGET_S, "met": False},
  }
  assert "image to GLB <= 10 s: **missed** (12.00 s)" in be.markdown(res)


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(resolution=1), "resolution=1: must be >= 2"),
        (dict(fine_resolution=300), "fine_resolution=300: must be 0 (no band) or a multiple"),
        (dict(repeats=0), "repeats=0: must be >= 1"),
        (dict(coarse_levels=(48,)), "coarse_levels=(48,) with resolution=256: each level must"),
        (dict(coarse_band=0.5), "coarse_band=0.5 must be >= band=1.0"),
    ],
)
def test_bad_settings_are_refused_before_any_work(override, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    be.run_benchmark(**{"size": "no-such-size", **override})


def test_coarse_levels_flag_must_be_integers():
  assert be.parse_levels(["32", "128"]) == (32, 128) and be.parse_levels([]) == ()
  with pytest.raises(ValueError, match=re.escape("coarse_levels=32,x: must be integers")):
    be.parse_levels(["32", "x"])
