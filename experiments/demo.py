r"""`make demo`: the bundled model generates part-composed objects and scenes from held-out
renders, on CPU. `make demo-train` trains tiny models from scratch instead.

  python -m experiments.demo [--workdir=outputs/demo] [--bundle=assets/moca-small] \
      [--objects=6] [--scenes=2] [--sample_steps=...] [--resolution=64]
  python -m experiments.demo --mode=train [--workdir=outputs/demo_train] [--vae_steps=...]

--mode=bundle (the default, `make demo`): loads the model bundle (moca_jax.bundle; default
the one that ships in the repository, pipeline.DEFAULT_BUNDLE = assets/moca-small) and
generates from renders of the held-out procedural `test` split: the first --objects objects
and the first --scenes scenes (in split order) whose part / instance count is at most the
model's trained maximum (config.data.max_components), so the selection is deterministic.
Objects generate their ground-truth part count; scenes are generated from the image alone by
the object-mode model, one component per instance (evaluation.pipeline_predict_fn). Writes
under --workdir:
  samples/<item>/   parts.glb (one node per part), preview.png (input | parts), router.png
                    and router.json (router importances), latents.npy: pipeline.write_outputs
  eval/objects/, eval/scenes/   grid.png (input | generated parts | ground truth), table.md
                    and metrics.json (paper Table 1 / Table 2 columns): evaluation.write_report
  summary.json      settings, selected items, mean metrics per kind, files, seconds per stage
and prints both metric tables. The defaults (--objects, --scenes, --sample_steps, --resolution
of marching cubes, --eval_samples) keep the run within 15 minutes on 2 CPU cores; VAE
decoding and marching cubes dominate, growing with resolution^3 and the part count.
A missing or unreadable bundle is one line on stderr and exit code 2.

--mode=train (`make demo-train`): the whole pipeline on the built-in procedural `tiny` split
(stages resume: finished shards and checkpoints are reused on a rerun):
  1. data      procedural:tiny -> ArrayRecord shards of per-part samples and renders
               (and procedural:test_tiny, held out, for evaluation)
  2. vae       train the tiny vecset VAE on analytic shapes sampled on the fly
  3. latents   encode every part of the tiny split with the frozen VAE
  4. dit       train the tiny MoC DiT on the latent shards (rectified flow, CFG dropout)
  5. evaluate  generate from held-out renders, extract meshes, score Chamfer / F-score /
               self-IoU against the ground truth; GLBs, PNG grid, router heatmap
Writes under --workdir: data/, vae/, dit/, eval/ (metrics.json, table.md, grid.png,
router.png), samples/ (one GLB + PNG per evaluated item) and summary.json; prints a table.
The tiny models train for minutes on two CPU cores: the numbers show the pipeline works
end to end, not the quality of a trained MoCA.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Iterator, Optional

from absl import app, flags, logging

from moca_jax import cli
from moca_jax import io as mio

# `make demo`'s defaults (bundle mode): held-out items per kind and the marching-cubes grid
# (64^3 coarse grid, no refinement: the extraction experiments.evaluate and the model card's
# evaluation use). With the bundle's 50 Euler steps at CFG 7 they took 7.7 minutes on 2 CPU
# cores (a random-weight bundle of the bundled sizes, 2026-12-01; about a minute per item,
# most of it VAE decoding of 65^3 points per part), half the 15-minute budget.
DEFAULT_OBJECTS = 6
DEFAULT_SCENES = 2
DEFAULT_RESOLUTION = 64
# train mode's sampling defaults (the tiny DiT); bundle mode uses the bundle's config.sample
TRAIN_SAMPLE_STEPS, TRAIN_CFG = 20, 3.0


class DemoError(Exception):
  """A user-facing problem (a missing or unreadable bundle, bad flags): one line, exit 2."""


def _banner(title: str) -> float:
  print(f"\n==== {title} " + "=" * max(0, 70 - len(title)), flush=True)
  return time.time()


# ----------------------------------------------------------------------------------------
# Bundle mode (`make demo`)
# ----------------------------------------------------------------------------------------


def check_bundle_folder(folder: str) -> None:
  """Raises DemoError (one line naming the folder) unless `folder` holds a bundle.json."""
  from moca_jax import bundle  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(folder):
    raise DemoError(
        f"no model bundle at {os.path.abspath(folder)} (folder missing); `make demo-train` "
        "trains a tiny model from scratch instead"
    )
  if not bundle.is_bundle(folder):
    raise DemoError(f"{os.path.abspath(folder)}: not a model bundle (no {bundle.INFO_FILE})")


def load_bundle(folder: str, resolution: int):
  """The pipeline of a model bundle, meshes extracted at `resolution` cells per axis.

  Raises DemoError (one line naming the folder) when it is missing or cannot be loaded.
  """
  from moca_jax import pipeline  # pylint: disable=g-import-not-at-top

  check_bundle_folder(folder)
  try:
    return pipeline.load_pipeline(
        folder, extract_kwargs={"resolution": resolution, "fine_resolution": None}
    )
  except (FileNotFoundError, ValueError) as e:  # BundleError is a ValueError
    raise DemoError(f"cannot load the model bundle: {e}") from e


def select_items(
    split: str,
    kind: str,
    count: int,
    max_components: int,
    image_size: int,
    passed_over: Optional[list] = None,
) -> Iterator:
  """The first `count` items of `kind` in the procedural `split` (in split order) with at
  most `max_components` parts / instances, rendered at `image_size` (evaluation.EvalItem).
  The names of items passed over for their count are appended to `passed_over`."""
  from moca_jax import evaluation  # pylint: disable=g-import-not-at-top

  if count <= 0:
    return
  taken = 0
  for item in evaluation.items_from_split(split, kind=kind, image_size=image_size):
    if len(item.gt_parts) > max_components:
      if passed_over is not None:
        passed_over.append(item.name)
      continue
    yield item
    taken += 1
    if taken == count:
      return


def _card_line(pipe, folder: str) -> str:
  """One line describing the bundled model (from its config and card)."""
  from moca_jax import bundle  # pylint: disable=g-import-not-at-top

  card = bundle.read_info(folder).get("card", {})
  dit, enc = pipe.config.model.dit, pipe.config.model.encoder
  # every run's steps (warm restarts included), else the exported checkpoint's step
  steps = card.get("dit", {}).get("steps") or card.get("dit_step")
  return (
      f"{card.get('name', os.path.basename(folder))}: {pipe.config.get('mode', 'object')}-mode "
      f"MoC DiT {dit.width} x {dit.num_blocks}, encoder {enc.width} x {enc.depth} at "
      f"{pipe.image_size} px, N <= {pipe.max_components}"
      + (f", {steps} DiT training steps" if steps else "")
  )


def run_bundle_demo(
    workdir: str,
    bundle_dir: str = "",
    objects: int = DEFAULT_OBJECTS,
    scenes: int = DEFAULT_SCENES,
    sample_steps: Optional[int] = None,
    cfg: Optional[float] = None,
    resolution: int = DEFAULT_RESOLUTION,
    eval_samples: int = 20_000,
    split: str = "test",
    image_size: int = 0,
    seed: int = 0,
) -> dict:
  """`make demo`: the bundled model on held-out renders (module docstring). Returns the
  summary (also written to workdir/summary.json).

  bundle_dir: a bundle folder ('' = pipeline.DEFAULT_BUNDLE). sample_steps / cfg: None =
  the bundle's config.sample. image_size: render size of the inputs (0 = the encoder's).
  Raises DemoError (missing or unreadable bundle, bad settings) before anything is written.
  """
  from moca_jax import bundle, evaluation, pipeline  # pylint: disable=g-import-not-at-top

  if objects < 0 or scenes < 0 or objects + scenes == 0:
    raise DemoError(f"objects={objects}, scenes={scenes}: need at least one item, none < 0")
  if resolution < 8:
    raise DemoError(f"resolution={resolution}: must be >= 8")
  folder = os.path.abspath(bundle_dir or pipeline.DEFAULT_BUNDLE)
  check_bundle_folder(folder)
  start = time.time()
  timings = {}
  t = _banner(f"make demo: the bundled model on held-out `{split}` renders")
  pipe = load_bundle(folder, resolution)
  try:
    settings = pipeline.check_sample_settings(
        pipe.sample_settings(steps=sample_steps, cfg_scale=cfg)
    )
    scene_cfg = pipeline.check_sample_settings(
        pipe.sample_settings("scene", steps=sample_steps, cfg_scale=cfg)
    )["cfg_scale"]
  except ValueError as e:
    raise DemoError(str(e)) from e
  settings["scene_cfg_scale"] = scene_cfg
  size = image_size or pipe.image_size
  method = bundle.read_info(folder).get("card", {}).get("name") or os.path.basename(folder)
  print(f"model    {folder}\n         {_card_line(pipe, folder)}")
  print(
      f"settings {objects} object(s) + {scenes} scene(s) with <= {pipe.max_components} parts, "
      f"{settings['steps']} {settings['method']} steps"
      + (f" (time shift {settings['time_shift']:g})" if settings["time_shift"] != 1.0 else "")
      + f", CFG {settings['cfg_scale']:g}"
      + (" at flow times {:g} <= t <= {:g}".format(*settings["cfg_interval"])
         if settings["cfg_interval"] is not None else "")
      + (f" (scenes {scene_cfg:g})" if scenes and scene_cfg != settings["cfg_scale"] else "")
      + ", "
      f"marching cubes {resolution}^3, renders {size} px, {eval_samples} surface samples "
      "per shape for the metrics"
  )
  timings["load"] = time.time() - t
  samples = {}

  def write_sample(item, res):
    out = os.path.join(workdir, "samples", item.name.replace("/", "_"))
    first = {k: v[0] for k, v in res.routing.items()}
    pipeline.write_outputs(
        out, res.meshes[0], res.latents[0], first, item.image, pipe.global_blocks
    )
    samples[item.name] = out
    empty = sum(1 for m in res.meshes[0] if len(m.vertices) == 0)
    note = f" ({empty} came out empty)" if empty else ""
    print(f"  {item.name}: {len(res.meshes[0])} components{note} -> {out}", flush=True)

  predict = evaluation.pipeline_predict_fn(  # each item at its kind's CFG scale
      None,
      steps=settings["steps"],
      cfg=cfg,
      seed=seed,
      pipe=pipe,
      on_result=write_sample,
  )
  metric_settings = evaluation.MetricSettings(num_samples=eval_samples, seed=seed)
  reports, passed_over = {}, {}
  for kind, count in (("object", objects), ("scene", scenes)):
    if count == 0:
      continue
    t = _banner(f"{kind}s: generate {count} held-out {kind}(s), score against the ground truth")
    if kind == "scene" and not pipe.scene:
      print("  (an object-mode model: each scene from its image alone, one component per instance)")
    passed_over[kind] = []
    items = select_items(split, kind, count, pipe.max_components, size, passed_over[kind])
    result = evaluation.evaluate_items(
        items, predict, metric_settings, grid_rows=count, progress=False
    )
    meta = {
        "stage": "make demo (bundled model, CPU)",
        "bundle": folder,
        "split": split,
        "steps": settings["steps"],
        "cfg": scene_cfg if kind == "scene" else settings["cfg_scale"],
        "cfg_interval": (None if settings["cfg_interval"] is None
                         else list(settings["cfg_interval"])),
        "time_shift": settings["time_shift"],
        "resolution": resolution,
        "num_samples": eval_samples,
        "seed": seed,
    }
    written = evaluation.write_report(
        os.path.join(workdir, "eval", f"{kind}s"),
        result,
        kind=kind,
        method=method,
        meta=meta,
        tensorboard=False,
    )
    for r in result["rows"]:
      cd = r.get("cd", r.get("cd_scene"))
      print(f"  {r['name']}: CD {cd:.3f}, generated in {r['seconds_predict']:.1f} s", flush=True)
    reports[kind] = {
        "items": [r["name"] for r in result["rows"]],
        "passed_over": passed_over[kind],
        "metrics": result["mean"],
        "skipped": result["skipped"],
        "outputs": written,
    }
    if len(result["rows"]) + len(result["skipped"]) < count:
      print(
          f"only {len(result['rows'])} {kind}(s) in `{split}` have <= {pipe.max_components} "
          "parts",
          flush=True,
      )
    timings[f"{kind}s"] = time.time() - t
  timings["total"] = time.time() - start
  summary = {
      "mode": "bundle",
      "bundle": folder,
      "model": _card_line(pipe, folder),
      "settings": {
          **settings,
          "resolution": resolution,
          "image_size": size,
          "eval_samples": eval_samples,
          "split": split,
          "seed": seed,
          "max_components": pipe.max_components,
      },
      **{f"{k}s": v for k, v in reports.items()},
      "samples": samples,
      "seconds": {k: round(v, 1) for k, v in timings.items()},
  }
  mio.write_json(os.path.join(workdir, "summary.json"), summary, indent=1)
  _print_bundle_summary(summary)
  return summary


def _print_bundle_summary(summary: dict) -> None:
  print("\n==== make demo: done " + "=" * 50)
  for kind in ("objects", "scenes"):
    report = summary.get(kind)
    if report is None:
      continue
    md = report["outputs"].get("markdown")
    if md:
      with open(md, encoding="utf-8") as fh:
        print(fh.read())
    for s in report["skipped"]:
      print(f"skipped {s['name']}: {s['reason']}")
  print("| stage | seconds |\n|---|---|")
  for k, v in summary["seconds"].items():
    print(f"| {k} | {v} |")
  print("\nper item (GLB, preview, router maps):")
  for name, out in summary["samples"].items():
    print(f"  {name}: {out}")
  for kind in ("objects", "scenes"):
    if kind in summary:
      print(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in summary[kind]["outputs"].items()))


# ----------------------------------------------------------------------------------------
# Train mode (`make demo-train`)
# ----------------------------------------------------------------------------------------


def build_data(workdir: str) -> dict:
  """Stage 1: the procedural tiny split (train) and test_tiny (held out)."""
  from data_pipeline import make, sampling

  cfg = make.BuildConfig(
      sample=sampling.SampleConfig(n_surface=1024, n_near=1024, n_volume=512),
      image_size=112,
      num_views=1,
      num_previews=2,
  )
  out = os.path.join(workdir, "data", "tiny")
  manifest = make.build("procedural:tiny", out, num_shards=2, shard_index=-1, cfg=cfg, workers=0)
  return {
      "dir": out,
      "count": manifest["count"],
      "skipped": len(manifest["skipped"]),
      "image_size": cfg.image_size,
  }


def train_vae(workdir: str, steps: int) -> str:
  """Stage 2: the tiny VAE; returns its workdir."""
  from experiments.configs import vae as vae_configs
  from moca_jax import vae_task

  config = vae_configs.get_config("tiny")
  config.num_steps = steps
  vae_dir = os.path.join(workdir, "vae")
  vae_task.train_and_evaluate(config, vae_dir)
  return vae_dir


def encode_latents(workdir: str, data_dir: str, vae_dir: str) -> str:
  """Stage 3: every part of the tiny split through the frozen VAE encoder."""
  from data_pipeline import encode_latents as enc

  encode_fn, vae_info, num_points = enc.CheckpointEncoder(vae_dir).load()
  out = os.path.join(workdir, "data", "tiny_latents")
  enc.encode_dataset(
      data_dir, out, encode_fn, num_points=num_points, batch_size=32, vae_info=vae_info
  )
  return out


def train_dit(workdir: str, latents_dir: str, vae_dir: str, image_size: int, steps: int) -> str:
  """Stage 4: the tiny MoC DiT on the latent shards; returns its workdir."""
  from experiments.configs import dit as dit_configs
  from moca_jax import dit_task

  config = dit_configs.get_config("tiny")
  config.data.dir = latents_dir
  config.data.image_size = image_size
  config.vae.workdir = os.path.abspath(vae_dir)
  config.num_steps = steps
  config.optim.total_steps = steps
  config.checkpoint.every = steps
  dit_dir = os.path.join(workdir, "dit")
  dit_task.train_and_evaluate(config, dit_dir)
  return dit_dir


def evaluate(
    workdir: str,
    dit_dir: str,
    image_size: int,
    items: int,
    steps: int,
    cfg: float,
    num_samples: int,
) -> dict:
  """Stage 5: generate from held-out renders, write GLB/PNG/router maps, score vs ground truth."""
  from moca_jax import evaluation, pipeline

  pipe = pipeline.load_pipeline(dit_dir)
  samples = []

  def write_sample(item, res):
    out = os.path.join(workdir, "samples", item.name.replace("/", "_"))
    first = {k: v[0] for k, v in res.routing.items()}
    pipeline.write_outputs(
        out, res.meshes[0], res.latents[0], first, item.image, pipe.global_blocks
    )
    samples.append(out)

  predict = evaluation.pipeline_predict_fn(
      None, steps=steps, cfg=cfg, seed=0, pipe=pipe, on_result=write_sample
  )
  test_items = evaluation.items_from_split(
      "test_tiny", kind="object", limit=items, image_size=image_size
  )
  result = evaluation.evaluate_items(
      test_items, predict, evaluation.MetricSettings(num_samples=num_samples)
  )
  written = evaluation.write_report(
      os.path.join(workdir, "eval"), result, kind="object", meta={"stage": "make demo (tiny, CPU)"}
  )
  return {
      "mean": result["mean"],
      "skipped": result["skipped"],
      "written": written,
      "samples": samples,
  }


def run_train_demo(
    workdir: str,
    vae_steps: int,
    dit_steps: int,
    eval_items: int,
    sample_steps: int,
    cfg: float,
    eval_samples: int,
) -> dict:
  """`make demo-train`: runs the five stages; returns the summary (also written to workdir/summary.json)."""
  os.makedirs(workdir, exist_ok=True)
  timings = {}
  t = _banner("1/5 data: procedural tiny split -> ArrayRecord shards")
  data = build_data(workdir)
  timings["data"] = time.time() - t
  t = _banner("2/5 vae: train the tiny vecset VAE on analytic shapes")
  vae_dir = train_vae(workdir, vae_steps)
  timings["vae"] = time.time() - t
  t = _banner("3/5 latents: encode every part with the frozen VAE")
  latents_dir = encode_latents(workdir, data["dir"], vae_dir)
  timings["latents"] = time.time() - t
  t = _banner("4/5 dit: train the tiny MoC DiT (rectified flow)")
  dit_dir = train_dit(workdir, latents_dir, vae_dir, data["image_size"], dit_steps)
  timings["dit"] = time.time() - t
  t = _banner("5/5 evaluate: generate from held-out renders, score, write pictures")
  ev = evaluate(workdir, dit_dir, data["image_size"], eval_items, sample_steps, cfg, eval_samples)
  timings["evaluate"] = time.time() - t
  summary = {
      "mode": "train",
      "data": data,
      "vae_dir": vae_dir,
      "latents_dir": latents_dir,
      "dit_dir": dit_dir,
      "metrics": ev["mean"],
      "skipped": ev["skipped"],
      "outputs": ev["written"],
      "samples": ev["samples"],
      "seconds": {k: round(v, 1) for k, v in timings.items()},
  }
  mio.write_json(os.path.join(workdir, "summary.json"), summary, indent=1)
  _print_train_table(summary)
  return summary


def _print_train_table(summary: dict) -> None:
  print("\n==== make demo-train: done " + "=" * 50)
  print("| stage | seconds |\n|---|---|")
  for k, v in summary["seconds"].items():
    print(f"| {k} | {v} |")
  print("\n| metric (held-out test_tiny objects) | value |\n|---|---|")
  for k, v in summary["metrics"].items():
    print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
  for s in summary["skipped"]:
    print(f"skipped {s['name']}: {s['reason']}")
  print("\noutputs:", json.dumps(summary["outputs"], indent=1, default=str))


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def define_flags() -> None:
  flags.DEFINE_enum(
      "mode",
      "bundle",
      ["bundle", "train"],
      "bundle: generate with the bundled model (`make demo`); train: train tiny models from "
      "scratch on the procedural tiny split first (`make demo-train`).",
  )
  flags.DEFINE_string(
      "workdir", None, "Where everything is written (default outputs/demo, outputs/demo_train)."
  )
  flags.DEFINE_string(
      "bundle",
      "",
      "bundle mode: model bundle folder (default: the bundled model, " "assets/moca-small).",
  )
  flags.DEFINE_integer(
      "objects", DEFAULT_OBJECTS, "bundle mode: held-out objects to generate and score."
  )
  flags.DEFINE_integer(
      "scenes", DEFAULT_SCENES, "bundle mode: held-out scenes to generate and score."
  )
  flags.DEFINE_integer(
      "resolution",
      DEFAULT_RESOLUTION,
      "bundle mode: marching-cubes cells per axis (VAE decoding cost grows with its cube).",
  )
  flags.DEFINE_string("split", "test", "bundle mode: the held-out procedural split.")
  flags.DEFINE_integer(
      "image_size", 0, "bundle mode: render size of the inputs (0: the encoder's size)."
  )
  flags.DEFINE_integer("vae_steps", 1000, "train mode: VAE training steps.")
  flags.DEFINE_integer("dit_steps", 500, "train mode: DiT training steps.")
  flags.DEFINE_integer("eval_items", 3, "train mode: held-out objects to generate and score.")
  flags.DEFINE_integer(
      "sample_steps",
      None,
      "Euler steps of the flow sampler (default: the bundle's config.sample; train mode "
      f"{TRAIN_SAMPLE_STEPS}).",
  )
  flags.DEFINE_float(
      "cfg",
      None,
      f"Classifier-free guidance scale (default: the bundle's config.sample; train mode "
      f"{TRAIN_CFG:g}).",
  )
  flags.DEFINE_integer("eval_samples", 20_000, "Surface samples per shape for the metrics.")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if f.mode == "train":
    run_train_demo(
        f.workdir or "outputs/demo_train",
        f.vae_steps,
        f.dit_steps,
        f.eval_items,
        TRAIN_SAMPLE_STEPS if f.sample_steps is None else f.sample_steps,
        TRAIN_CFG if f.cfg is None else f.cfg,
        f.eval_samples,
    )
    return 0
  from moca_jax import extract  # pylint: disable=g-import-not-at-top

  # parts without a surface are counted per item in the progress lines instead
  warnings.simplefilter("ignore", extract.EmptyFieldWarning)
  try:
    run_bundle_demo(
        f.workdir or "outputs/demo",
        f.bundle,
        objects=f.objects,
        scenes=f.scenes,
        sample_steps=f.sample_steps,
        cfg=f.cfg,
        resolution=f.resolution,
        eval_samples=f.eval_samples,
        split=f.split,
        image_size=f.image_size,
    )
  except DemoError as e:  # one clear line, no traceback
    print(f"demo: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
