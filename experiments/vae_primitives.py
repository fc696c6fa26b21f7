"""How well bundles' VAEs reconstruct random analytic primitives (shapes no split holds).

`train_vae` ends with this evaluation (`moca_jax.vae_task.evaluate_reconstruction`: held-out
random primitives encoded from area-uniform surface samples, decoded on a grid, IoU against
the exact solid and Chamfer distance, by part size); this entry point runs it on the VAE of
one or more model bundles, on the same held-out shapes (drawn from the first bundle's
training config: its primitive kinds, size range and seed), so that a fine-tuned decoder
can be checked for what it forgot. It writes
  <out>.md / <out>.json   IoU and Chamfer by part size and IoU by primitive kind, per bundle
  <out>.png               the largest primitive of each kind: the exact shape, then each
                          bundle's reconstruction

  python -m experiments.vae_primitives --bundles=assets/moca-small,/tmp/other \
      --labels=shipped,other [--num_shapes=96] [--resolution=128]

Bundle weights are stored in bf16 (`moca_jax.bundle`), so the figures can differ from the
training run's own evaluation (float32 EMA weights) in the third decimal.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
from absl import app, flags

from data_pipeline import vae_batches
from moca_jax import bundle, cli, extract, viz
from moca_jax import io as mio
from moca_jax import vae_task
from moca_jax.machine import describe_host
from moca_jax.vae import VecSetVAE

SIZES = ("large", "medium", "small")


def define_flags() -> None:
  flags.DEFINE_list("bundles", None, "Model bundle folders whose VAEs are evaluated.")
  flags.DEFINE_list("labels", None, "A name per bundle (default: the folder names).")
  flags.DEFINE_integer("num_shapes", None, "Held-out primitives (default: the first "
                       "bundle's config.eval.num_shapes, as train_vae evaluates).")
  flags.DEFINE_integer("resolution", None, "Decoding grid (default: config.eval.resolution).")
  flags.DEFINE_string("out", "outputs/vae_primitives", "Output path stem (.md, .json, .png).")


def held_out_shapes(config, num_shapes: int):
  """(shapes, rng): the primitives train_vae evaluates on (same draw from the same seed),
  and the generator in the state train_vae passes on to the evaluation."""
  source = vae_batches.AnalyticShapeSource(config.data, 1, config.seed)
  rng = np.random.default_rng([config.seed, 7, 7])
  return [source.random_shape(rng) for _ in range(num_shapes)], rng


def iou_by_kind(shapes: Sequence[dict]) -> dict:
  """{kind: mean IoU} over evaluate_reconstruction's per-shape records."""
  by_kind = collections.defaultdict(list)
  for s in shapes:
    by_kind[s["kind"]].append(s["iou"])
  return {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}


def reconstruction_mesh(model, params, shape, config, rng, resolution: int):
  """The extracted mesh of one shape through the VAE (deterministic encoding)."""
  ex = vae_batches.stack_examples(
      [vae_batches.example_from_shape(shape, rng, config.data.num_points, 1, 1)]
  )
  z, _ = model.apply(
      params, ex["surface_points"], ex["surface_normals"], deterministic=True,
      method=VecSetVAE.encode,
  )
  return extract.extract_vae_meshes(model, params, z, resolution=resolution, fine_resolution=None)[0]


def picture(shapes, models, labels, config, resolution: int, path: str) -> str:
  """A row per primitive kind (its largest held-out shape, the clearest to see): exact, then
  each model's mesh."""
  firsts = {}
  for s in shapes:
    if s.kind not in firsts or s.bounding_radius() > firsts[s.kind].bounding_radius():
      firsts[s.kind] = s
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for kind, shape in sorted(firsts.items()):
      meshes, titles = [shape.to_mesh(48)], [f"exact {kind} (r {shape.bounding_radius():.2f})"]
      for (model, params), label in zip(models, labels):
        rng = np.random.default_rng(0)  # the same surface samples for every model
        meshes.append(reconstruction_mesh(model, params, shape, config, rng, resolution))
        titles.append(label)
      row = os.path.join(tmp, f"{kind}.png")
      viz.meshes_png(meshes, titles, row)
      rows.append(mio.load_image(row))
  width = max(r.shape[1] for r in rows)
  sheet = np.concatenate(
      [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  )
  mio.write_png(path, sheet, palette=True)  # a figure shipped with the results: compact
  return path


def markdown(report: dict) -> str:
  lines = [
      "# Bundles' VAEs on random analytic primitives",
      "",
      f"`experiments/vae_primitives.py` on {report['machine']}: {report['num_shapes']} "
      f"held-out primitives (kinds {', '.join(report['kinds'])}; bounding radius r in "
      f"{report['size_range']}), encoded from area-uniform surface samples, decoded on a "
      f"{report['resolution'] + 1}^3 grid. IoU: the decoded solid against the exact one; "
      "Chamfer: 4096 points on the extracted mesh against the exact surface. Small r < "
      f"{report['small_part_radius']}, large r > {report['large_part_radius']}.",
      "",
      "| bundle | weights | IoU large / medium / small | Chamfer large / medium / small | "
      + " | ".join(report["kinds"]) + " |",
      "|---|---|---|---|" + "---|" * len(report["kinds"]),
  ]
  for r in report["bundles"]:
    by = r["by_size"]
    iou = " / ".join(f"{by[s]['iou_mean']:.3f}" if s in by else "-" for s in SIZES)
    cd = " / ".join(f"{by[s]['chamfer_mean']:.4f}" if s in by else "-" for s in SIZES)
    kinds = " | ".join(f"{r['iou_by_kind'].get(k, float('nan')):.3f}" for k in report["kinds"])
    lines.append(f"| {r['label']} | {r['weights'][:12]} | {iou} | {cd} | {kinds} |")
  lines += ["", "Bundles: " + "; ".join(f"{r['label']} `{r['folder']}`" for r in report["bundles"])]
  return "\n".join(lines) + "\n"


def run(folders: Sequence[str], labels: Optional[Sequence[str]], out: str,
        num_shapes: Optional[int] = None, resolution: Optional[int] = None) -> dict:
  """Evaluates each bundle's VAE; writes out.md / .json / .png; returns the report."""
  labels = list(labels or [os.path.basename(os.path.normpath(f)) for f in folders])
  if len(labels) != len(folders):
    raise ValueError(f"{len(labels)} labels for {len(folders)} bundles")
  loaded = [bundle.read_bundle(f) for f in folders]
  config = loaded[0].vae_config.copy_and_resolve_references()
  config.eval.num_shapes = num_shapes or config.eval.num_shapes
  config.eval.resolution = resolution or config.eval.resolution
  shapes, _ = held_out_shapes(config, config.eval.num_shapes)
  models, results = [], []
  for folder, label, b in zip(folders, labels, loaded):
    model, _ = vae_task.abstract_params(b.vae_config)
    params = {"params": b.vae_params}
    _, rng = held_out_shapes(config, config.eval.num_shapes)  # the same samples per bundle
    ev = vae_task.evaluate_reconstruction(model, params, shapes, config, rng)
    models.append((model, params))
    results.append(dict(label=label, folder=os.path.abspath(folder),
                        weights=bundle.weights_sha256(folder), by_size=ev["by_size"],
                        iou_by_kind=iou_by_kind(ev["shapes"]), shapes=ev["shapes"]))
  report = dict(
      machine=describe_host(), num_shapes=len(shapes), resolution=config.eval.resolution,
      kinds=sorted({s.kind for s in shapes}), size_range=tuple(config.data.size_range),
      small_part_radius=config.eval.small_part_radius,
      large_part_radius=config.eval.large_part_radius, bundles=results,
  )
  mio.write_json(out + ".json", report)
  mio.atomic_write_text(out + ".md", markdown(report))
  picture(shapes, models, labels, config, config.eval.resolution, out + ".png")
  return report


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f.bundles:
    raise app.UsageError("--bundles is required (one or more bundle folders)")
  try:
    run(f.bundles, f.labels, f.out, f.num_shapes, f.resolution)
  except (FileNotFoundError, ValueError) as e:  # a missing or foreign bundle (BundleError)
    raise app.UsageError(str(e)) from e
  print(f"wrote {f.out}.md, {f.out}.json, {f.out}.png")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
