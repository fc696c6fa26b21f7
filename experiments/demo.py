r"""`make demo`: the whole pipeline on the built-in procedural `tiny` split, on CPU.

  python -m experiments.demo --workdir=outputs [--eval_items=2] [--vae_steps=...]

Stages (each resumes: finished shards and checkpoints are reused on a rerun):
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
import time

from absl import app, flags, logging

from moca_jax import io as mio


def _banner(title: str) -> float:
  print(f"\n==== {title} " + "=" * max(0, 70 - len(title)), flush=True)
  return time.time()


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


def run_demo(
    workdir: str,
    vae_steps: int,
    dit_steps: int,
    eval_items: int,
    sample_steps: int,
    cfg: float,
    eval_samples: int,
) -> dict:
  """Runs the five stages; returns the summary (also written to workdir/summary.json)."""
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
  _print_table(summary)
  return summary


def _print_table(summary: dict) -> None:
  print("\n==== make demo: done " + "=" * 50)
  print("| stage | seconds |\n|---|---|")
  for k, v in summary["seconds"].items():
    print(f"| {k} | {v} |")
  print("\n| metric (held-out test_tiny objects) | value |\n|---|---|")
  for k, v in summary["metrics"].items():
    print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
  for s in summary["skipped"]:
    print(f"skipped {s['name']}: {s['reason']}")
  print("\noutputs:", json.dumps(summary["outputs"], indent=1, default=str))


def define_flags() -> None:
  flags.DEFINE_string("workdir", "outputs", "Where everything is written.")
  flags.DEFINE_integer("vae_steps", 1000, "VAE training steps.")
  flags.DEFINE_integer("dit_steps", 500, "DiT training steps.")
  flags.DEFINE_integer("eval_items", 3, "Held-out objects to generate and score.")
  flags.DEFINE_integer("sample_steps", 20, "Euler steps of the flow sampler.")
  flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale.")
  flags.DEFINE_integer("eval_samples", 20_000, "Surface samples per shape for the metrics.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  run_demo(f.workdir, f.vae_steps, f.dit_steps, f.eval_items, f.sample_steps, f.cfg, f.eval_samples)


if __name__ == "__main__":
  define_flags()
  app.run(main)
