r"""Evaluates a checkpoint the way the paper does (Tables 1 and 2): a front-end of
moca_jax.evaluation and moca_jax.pipeline; also benchmarks the NN search of the metrics.

Usage:
  # Held-out procedural split (objects -> Table 1, scenes -> Table 2):
  python -m experiments.evaluate --checkpoint_dir=/tmp/dit --split=test_tiny --kind=object \
      --out_dir=experiments/results/eval_test_tiny_object
  # A folder of user meshes, laid out as data_pipeline.ingest reads them (NAME.glb/.gltf/
  # .obj/.ply = one object whose geometries are its parts; a sub-folder = one object of
  # per-part files), with an optional render NAME.png/.jpg (sub-folder: render.png) beside
  # it (rendered here when missing); scenes also take NAME.masks.npy ([N,H,W] bool,
  # instance i = component i).
  python -m experiments.evaluate --checkpoint_dir=/tmp/dit --glb_dir=my_meshes --kind=object
  # No model: score the ground truth with jittered vertices (checks the pipeline and shows
  # the scale of the numbers):
  python -m experiments.evaluate --split=test_tiny --perturb=0.01
  # No DiT: the checkpoint's VAE on the ground truth (every part encoded and decoded), the
  # ceiling of what generation with that VAE can score:
  python -m experiments.evaluate --split=test --kind=object --limit=50 --reconstruct
  # Nearest-neighbour backends (scipy cKDTree vs chunked JAX) on this machine's CPU:
  python -m experiments.evaluate --benchmark_nn

Outputs in --out_dir: metrics.json (per item rows + mean), table.md (paper-shaped table),
grid.png (input | generated parts | ground truth, first --grid_rows items), tb/ (TensorBoard
scalars of the means). Items that fail (unreadable file, generation error) are skipped and
listed under "skipped" in metrics.json and table.md. --checkpoint_dir defaults to the
bundled model (assets/moca-small). --steps, --cfg, --cfg_interval and --time_shift default
to the checkpoint's config.sample; they and --num_components are checked before any work.
Cost per item: the sampler and the decoder compile once per component bucket
(--component_buckets), not per part count; set JAX_COMPILATION_CACHE_DIR to keep the
compiled programs between runs. Rows of metrics.json carry seconds_predict (generation) and
seconds_score (metrics).
Exit codes: 0 every item scored; 1 some items skipped (listed with the reason); 2 bad
arguments (one line on stderr) or no item scored.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from absl import app, flags, logging

from moca_jax import bundle, cli
from moca_jax import evaluation as E
from moca_jax import metrics as M
from moca_jax import pipeline

# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def define_flags() -> None:
  flags.DEFINE_string("checkpoint_dir", None, "Generator checkpoint: a model bundle or a "
                      "train_dit workdir (default: the bundled model, assets/moca-small).")
  flags.DEFINE_string("split", None, "Procedural split (e.g. test, test_tiny).")
  flags.DEFINE_string("glb_dir", None, "Folder of user meshes (see module docstring).")
  flags.DEFINE_enum("kind", "object", ["object", "scene"], "Objects (Table 1) or scenes (Table 2).")
  flags.DEFINE_string("out_dir", None, "Output folder (default experiments/results/eval_*).")
  flags.DEFINE_integer("limit", None, "Evaluate at most this many items.")
  flags.DEFINE_list("items", None, "--split only: evaluate these item positions (0-based "
                    "among the split's items of --kind, e.g. 37,11,45), in this order.")
  flags.DEFINE_integer("num_components", None, "Parts to generate (default: GT count).")
  flags.DEFINE_integer("steps", None, "Flow ODE steps (default: the checkpoint config).")
  flags.DEFINE_float(
      "cfg",
      None,
      "Classifier-free guidance scale (default: the checkpoint config's, for scenes its "
      "scene_cfg_scale where set).",
  )
  flags.DEFINE_list(
      "cfg_interval",
      None,
      "lo,hi: guidance only at flow times lo <= t <= hi (t = 1 is noise), the conditional "
      "pass alone elsewhere (default: the checkpoint config's, else every step).",
  )
  flags.DEFINE_float(
      "time_shift",
      None,
      "Sampler time shift s > 0: the uniform Euler grid warped as t' = s t / (1 + (s - 1) t), "
      "s > 1 putting more steps at high noise (default: the checkpoint config's, else 1).",
  )
  flags.DEFINE_list(
      "component_buckets",
      None,
      "Component counts padded up to the next of these for sampling and decoding (padding "
      "masked out, one compilation per bucket); empty (--component_buckets=) pads nothing; "
      "default moca_jax.pipeline.DEFAULT_COMPONENT_BUCKETS.",
  )
  flags.DEFINE_integer("seed", 0, "Generation and sampling seed.")
  flags.DEFINE_integer("num_samples", M.DEFAULT_NUM_SAMPLES, "Surface samples per shape.")
  flags.DEFINE_integer("voxel_resolution", M.DEFAULT_VOXEL_RESOLUTION, "Self-IoU grid.")
  flags.DEFINE_enum("nn_backend", "kdtree", list(M.NN_BACKENDS), "Nearest-neighbour search.")
  flags.DEFINE_enum(
      "object_frame",
      "instance",
      ["instance", "scene"],
      "Scene object-level metrics: per-instance or scene normalisation.",
  )
  flags.DEFINE_integer(
      "image_size",
      0,
      "Conditioning render size when rendering here (0: the model's image-encoder input "
      "size, the size its training renders had; 224 with --perturb).",
  )
  flags.DEFINE_integer("grid_rows", 4, "Rows in grid.png.")
  flags.DEFINE_string("method", "moca-jax", "Method name in the table.")
  flags.DEFINE_float(
      "perturb",
      None,
      "No model: score the ground truth jittered by this "
      "vertex noise (a sanity check of the pipeline).",
  )
  flags.DEFINE_bool(
      "reconstruct",
      False,
      "No DiT: score the checkpoint's VAE on the ground truth (each part encoded to its "
      "posterior mean and decoded as generated latents are), the ceiling of any generation "
      "with this VAE.",
  )
  flags.DEFINE_bool("benchmark_nn", False, "Run the nearest-neighbour benchmark and exit.")
  flags.DEFINE_string("nn_sizes", "10000,30000,100000", "Benchmark sizes (comma list).")
  flags.DEFINE_integer("nn_repeats", 3, "Benchmark repeats.")
  flags.DEFINE_integer("nn_jax_max_size", 100_000, "Largest size timed with the JAX backend.")


def sampler_flags(f) -> dict:
  """The flags that only the DiT's sampler reads, by their command-line names."""
  return {"--steps": f.steps, "--cfg": f.cfg, "--cfg_interval": f.cfg_interval,
          "--time_shift": f.time_shift, "--num_components": f.num_components}


def item_positions(items, split) -> Optional[list]:
  """--items as a list of ints (None when not given). ValueError: no --split, or not integers."""
  if not items:
    return None
  if split is None:
    raise ValueError("--items selects items of a --split")
  try:
    positions = [int(i) for i in items]
  except ValueError as e:
    raise ValueError(f"--items={','.join(items)}: expected item positions (integers)") from e
  if min(positions) < 0:
    raise ValueError(f"--items={','.join(items)}: positions start at 0")
  return positions


def run(f) -> dict:
  """The CLI as a function of the parsed flags; returns what `write_report` wrote."""
  if f.benchmark_nn:
    rows = E.benchmark_nn(
        [int(s) for s in f.nn_sizes.split(",")], f.nn_repeats, jax_max_size=f.nn_jax_max_size
    )
    E.write_nn_benchmark(rows)
    return {}
  if (f.split is None) == (f.glb_dir is None):
    raise ValueError("give exactly one of --split or --glb_dir")
  if f.image_size < 0:
    raise ValueError(f"--image_size must be >= 0 (0: the model's), got {f.image_size}")
  if f.reconstruct and f.perturb is not None:
    raise ValueError("give at most one of --reconstruct or --perturb")
  no_dit = "--reconstruct" if f.reconstruct else "--perturb" if f.perturb is not None else None
  ignored = [name for name, value in sampler_flags(f).items() if value is not None]
  if no_dit and ignored:
    raise ValueError(f"{no_dit} runs no DiT: {', '.join(ignored)} would be ignored")
  indices = item_positions(f.items, f.split)  # checked before the model loads
  pipe, checkpoint = None, f.checkpoint_dir
  if f.perturb is None:
    checkpoint = pipeline.checkpoint_or_bundled(f.checkpoint_dir, "--checkpoint_dir")
    pipe = pipeline.load_pipeline(checkpoint)
  # a render at another size than the training renders' is resampled by the encoder's
  # preprocessing and is not what the model was trained on (round 4 on 20 val objects:
  # CD 0.259 from 112 px renders, 0.248 from 224 px ones, on the first item alone)
  image_size = f.image_size or (pipe.image_size if pipe is not None else 224)
  skipped: list = []
  if f.split is not None:
    if indices is None:
      items = E.items_from_split(f.split, f.kind, f.limit, image_size)
    else:
      items = E.items_from_split(f.split, f.kind, f.limit, image_size, indices=indices)
    source = f"split {f.split}"
  else:
    items = E.items_from_glb_dir(f.glb_dir, f.kind, f.limit, image_size, skipped)
    source = f"folder {f.glb_dir}"
  sample = {"steps": f.steps, "cfg": f.cfg}
  if f.perturb is not None:
    predict = E.perturbed_gt_predict_fn(f.perturb, seed=f.seed)
    method = f"ground truth + noise {f.perturb:g}"
  elif f.reconstruct:
    if f.component_buckets is not None:
      pipe.component_buckets = tuple(int(k) for k in f.component_buckets)
    predict = E.vae_reconstruction_predict_fn(pipe, seed=f.seed)
    sample = {"reconstruct": True}
    method = "VAE reconstruction (no DiT)"
  else:
    if f.component_buckets is not None:
      pipe.component_buckets = tuple(int(k) for k in f.component_buckets)
    resolved = pipeline.check_sample_settings(
        pipe.sample_settings(f.kind, steps=f.steps, cfg_scale=f.cfg,
                             cfg_interval=f.cfg_interval or None, time_shift=f.time_shift)
    )
    if f.num_components is not None:
      guidance = None if resolved["cfg_scale"] == 1.0 else resolved["cfg_scale"]
      pipe.check_num_components(f.num_components, guidance)
    sample = {"steps": resolved["steps"], "cfg": resolved["cfg_scale"]}
    if resolved["cfg_interval"] is not None:
      sample["cfg_interval"] = list(resolved["cfg_interval"])
    sample["time_shift"] = resolved["time_shift"]
    predict = E.pipeline_predict_fn(
        checkpoint, f.steps, f.cfg, f.seed, f.num_components, pipe=pipe,
        cfg_interval=resolved["cfg_interval"], time_shift=resolved["time_shift"],
    )
    method = f.method
  settings = E.MetricSettings(
      num_samples=f.num_samples,
      seed=f.seed,
      voxel_resolution=f.voxel_resolution,
      nn_backend=f.nn_backend,
      object_frame=f.object_frame,
  )
  result = E.evaluate_items(
      items, predict, settings, grid_rows=f.grid_rows, skipped=skipped, total=f.limit
  )
  out_dir = f.out_dir or os.path.join(
      "experiments/results",
      f"eval_{(f.split or os.path.basename(f.glb_dir.rstrip('/')))}_{f.kind}",
  )
  meta = {
      "source": source,
      "checkpoint": checkpoint,
      # the same model under another path: cfg_sweep refuses runs whose fingerprints differ
      "weights_sha256": (bundle.weights_sha256(checkpoint)
                         if checkpoint and bundle.is_bundle(checkpoint) else None),
      **sample,
      "seed": f.seed,
      "image_size": image_size,
      "num_samples": f.num_samples,
      "voxel_resolution": f.voxel_resolution,
      "object_frame": f.object_frame,
  }
  written = E.write_report(out_dir, result, f.kind, method, meta)
  written["scored"], written["skipped"] = len(result["rows"]), len(result["skipped"])
  return written


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)  # JAX's backend probing and orbax log at INFO
  try:
    written = run(flags.FLAGS)
  except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
    print(f"evaluate: error: {e}", file=sys.stderr)
    sys.exit(2)
  scored, skipped = written.pop("scored", None), written.pop("skipped", 0)
  if "markdown" in written:
    with open(written["markdown"], encoding="utf-8") as fh:
      print(fh.read())
  for k, v in written.items():
    print(f"{k}: {v}")
  if scored is not None:  # not the nearest-neighbour benchmark
    sys.exit(2 if scored == 0 else (1 if skipped else 0))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
