r"""A sampler-setting sweep, summarised: held-out quality against the CFG scale (issue 17).

Each setting is one `experiments.evaluate` run on the SAME items (a held-out split chosen for
settings, `val`, so that `test` stays untouched by the choice), for example:

  for c in 2 3 5 7 10 14; do
    python -m experiments.evaluate --checkpoint_dir=assets/moca-small --split=val \
        --kind=object --limit=20 --image_size=112 --cfg=$c --out_dir=outputs/sweep/cfg$c
  done
  python -m experiments.cfg_sweep --runs=outputs/sweep/cfg2,...,outputs/sweep/cfg14 \
      --reference_cfg=7 --out=experiments/results/cfg_sweep_val

Reads each run's metrics.json (moca_jax.evaluation.write_report) and writes <out>.md,
<out>.json and <out>.png: per setting the mean CD, F-score@0.1/0.05 and self-IoU (for
scenes Table 2's: scene CD / F-score, per-instance CD / F-score, self-IoU), the empty parts
per item (requested minus non-empty generated parts or instances), and each metric's mean
paired difference to the reference setting over the same items with its standard error, so
a reader sees whether a difference is larger than the item-to-item noise. Nothing is
measured here. Exit 2 on a missing or unreadable run, runs over different items or kinds,
runs of different model weights (the bundle fingerprint `experiments.evaluate` records), or
a reference CFG scale that no run has.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, List, Sequence

from absl import app, flags

from moca_jax import cli
from moca_jax import io as mio

# The metrics summarised per kind of item (moca_jax.evaluation.score: Table 1 keys for
# objects, Table 2 keys for scenes), and the ones plotted.
METRICS = {
    "object": ("cd", "fscore@0.1", "fscore@0.05", "self_iou"),
    "scene": ("cd_scene", "fscore_scene@0.1", "fscore_scene@0.05", "cd_obj", "fscore_obj@0.1",
              "self_iou"),
}
PLOTTED = {"object": ("cd", "fscore@0.1", "empty_parts"),
           "scene": ("cd_scene", "cd_obj", "empty_parts")}
LOWER_IS_BETTER = {"cd": True, "fscore@0.1": False, "fscore@0.05": False, "self_iou": True,
                   "empty_parts": True, "cd_scene": True, "fscore_scene@0.1": False,
                   "fscore_scene@0.05": False, "cd_obj": True, "fscore_obj@0.1": False}


def metric_keys(kind: str) -> tuple:
  """The summarised metrics of `kind` ('object' or 'scene'; anything else: objects')."""
  return METRICS.get(kind, METRICS["object"])


def load_run(path: str, need_cfg: bool = True) -> dict:
  """One evaluate run: {'cfg', 'steps', 'source', 'machine', 'rows', 'meta'} from <path>/metrics.json
  (or a metrics.json path). Raises ValueError naming the path when it is missing, unreadable,
  has no rows or, with need_cfg, records no CFG scale (a run without a model, such as
  `evaluate --reconstruct`, has none: its 'cfg' is None)."""
  file = path if path.endswith(".json") else os.path.join(path, "metrics.json")
  try:
    with open(file) as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{file}: not a readable evaluate metrics.json ({e})") from e
  rows = doc.get("rows") or []
  meta = doc.get("meta") or {}
  if not rows or (need_cfg and meta.get("cfg") is None):
    raise ValueError(f"{file}: no scored items or no CFG scale recorded")
  return {"cfg": None if meta.get("cfg") is None else float(meta["cfg"]), "steps": meta.get("steps"), "source": meta.get("source"),
          "machine": meta.get("machine"), "date": meta.get("date_utc"), "path": file,
          "kind": doc.get("kind"), "rows": rows, "meta": meta}


def item_values(row: dict, kind: str = "object") -> Dict[str, float]:
  """The metrics of one item plus its empty parts (requested minus generated non-empty
  parts or instances; NaN for a run scored before scenes recorded their counts)."""
  out = {k: float(row[k]) for k in metric_keys(kind) if k in row}
  if "num_parts_gt" in row and "num_parts_pred" in row:
    out["empty_parts"] = float(row["num_parts_gt"]) - float(row["num_parts_pred"])
  else:
    out["empty_parts"] = float("nan")
  return out


def paired(a: Sequence[float], b: Sequence[float]) -> tuple:
  """(mean of a - b, standard error of that mean) over paired items."""
  d = [x - y for x, y in zip(a, b)]
  mean = sum(d) / len(d)
  if len(d) < 2:
    return mean, float("nan")
  var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
  return mean, math.sqrt(var / len(d))


def summarize(runs: List[dict], reference_cfg: float) -> dict:
  """Per setting (sorted by CFG scale): means and paired differences to the reference run.
  Raises ValueError when the runs scored different items, come from different bundles (their
  meta.weights_sha256, `moca_jax.bundle.weights_sha256`, where every run records one), differ
  in their guidance interval or sampler time shift, or no run has `reference_cfg`."""
  paths = [run["path"] for run in runs]
  twice = sorted({p for p in paths if paths.count(p) > 1})
  if twice:
    raise ValueError(f"a run is given more than once: {', '.join(twice)}")
  kinds = {run["kind"] for run in runs}
  if len(kinds) != 1:
    raise ValueError("the runs scored different kinds of items: " + ", ".join(
        f"{run['path']} ({run['kind']})" for run in runs))
  kind = kinds.pop()
  names = [tuple(r["name"] for r in run["rows"]) for run in runs]
  if len(set(names)) != 1:
    raise ValueError("the runs scored different items; evaluate every setting on the same "
                     "split, kind and --limit")
  prints = {run["meta"].get("weights_sha256") for run in runs}
  if None not in prints and len(prints) > 1:  # runs older than the fingerprint are not checked
    raise ValueError("the runs come from different model weights (bundle fingerprints: " + ", ".join(
        f"{run['path']} {run['meta']['weights_sha256'][:12]}" for run in runs)
        + "); a CFG sweep compares settings of one model (experiments.compare_runs compares models)")
  for key in ("cfg_interval", "time_shift"):  # a CFG sweep varies the scale alone
    values = {repr(run["meta"].get(key)) for run in runs}
    if key == "time_shift" and "None" in values:  # runs older than its record: not checked
      continue
    if len(values) > 1:
      raise ValueError(f"the runs differ in {key} (" + ", ".join(
          f"{run['path']} {run['meta'].get(key)}" for run in runs)
          + "); a CFG sweep varies the scale alone (experiments.compare_runs compares settings)")
  ref = [r for r in runs if r["cfg"] == reference_cfg]
  if not ref:
    raise ValueError(f"no run has the reference CFG scale {reference_cfg:g} (have "
                     f"{sorted(r['cfg'] for r in runs)})")
  ref_vals = [item_values(row, kind) for row in ref[0]["rows"]]
  keys = list(metric_keys(kind)) + ["empty_parts"]
  settings = []
  for run in sorted(runs, key=lambda r: r["cfg"]):
    vals = [item_values(row, kind) for row in run["rows"]]
    entry = {"cfg": run["cfg"], "steps": run["steps"], "items": len(vals),
             "run": os.path.basename(os.path.dirname(run["path"])), "date_utc": run["date"]}
    for k in keys:
      entry[k] = sum(v[k] for v in vals) / len(vals)
      diff, se = paired([v[k] for v in vals], [v[k] for v in ref_vals])
      entry[f"{k}_diff"], entry[f"{k}_diff_se"] = diff, se
    settings.append(entry)
  return {"reference_cfg": reference_cfg, "items": len(names[0]), "source": runs[0]["source"],
          "kind": runs[0]["kind"], "machine": runs[0]["machine"], "settings": settings}


def _cell(entry: dict, k: str, ref: float) -> str:
  if math.isnan(entry[k]):
    return "-"
  value = f"{entry[k]:.4f}" if k != "empty_parts" else f"{entry[k]:.2f}"
  if entry["cfg"] == ref:
    return value
  return f"{value} ({entry[f'{k}_diff']:+.4f} ± {entry[f'{k}_diff_se']:.4f})"


def markdown(doc: dict) -> str:
  ref = doc["reference_cfg"]
  keys = list(metric_keys(doc["kind"])) + ["empty_parts"]
  lines = [
      f"# CFG scale sweep ({doc['kind']}s, {doc['source']}, {doc['items']} items)",
      "",
      f"`experiments/cfg_sweep.py` over `experiments.evaluate` runs on the same items "
      f"({doc['machine']}). In brackets: the mean paired difference to CFG {ref:g} over "
      "the same items ± its standard error; a difference within about two standard errors "
      "is item-to-item noise. Empty parts: requested minus non-empty generated parts "
      "(instances for scenes), per item.",
      "",
      "| CFG | steps | " + " | ".join(
          f"{k} {'↓' if LOWER_IS_BETTER[k] else '↑'}" for k in keys) + " |",
      "|---|---|" + "---|" * len(keys),
  ]
  for e in doc["settings"]:
    lines.append(f"| {e['cfg']:g} | {e['steps']} | "
                 + " | ".join(_cell(e, k, ref) for k in keys) + " |")
  lines += ["", "![quality against CFG scale](" + doc.get("png", "") + ")"]
  return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> str:
  """CD, F-score@0.1 and empty parts against the CFG scale, with the paired standard
  errors as bars around each mean."""
  from moca_jax import viz  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  keys = PLOTTED.get(doc["kind"], PLOTTED["object"])
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
  cfgs = [e["cfg"] for e in doc["settings"]]
  for ax, k in zip(axes, keys):
    ax.errorbar(cfgs, [e[k] for e in doc["settings"]],
                yerr=[0 if math.isnan(e[f"{k}_diff_se"]) else e[f"{k}_diff_se"]
                      for e in doc["settings"]], marker="o", capsize=3)
    ax.axvline(doc["reference_cfg"], color="0.7", lw=1, ls="--")
    ax.set_xlabel("CFG scale")
    ax.set_title(f"{k} ({'lower' if LOWER_IS_BETTER[k] else 'higher'} is better)")
  fig.tight_layout()
  return viz._save_figure(fig, path)  # pylint: disable=protected-access


def define_flags() -> None:
  flags.DEFINE_list("runs", None, "experiments.evaluate output folders (or metrics.json).")
  flags.DEFINE_float("reference_cfg", 7.0, "The setting the others are compared with.")
  flags.DEFINE_string("out", "outputs/cfg_sweep", "Output path stem (.md, .json, .png).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  try:
    if not f.runs:
      raise ValueError("--runs is required (evaluate output folders)")
    doc = summarize([load_run(p) for p in f.runs], f.reference_cfg)
  except ValueError as e:
    print(f"cfg_sweep: error: {e}", file=sys.stderr)
    sys.exit(2)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  doc["png"] = os.path.basename(plot(doc, f.out + ".png"))
  mio.write_json(f.out + ".json", doc, indent=1)
  mio.atomic_write_text(f.out + ".md", markdown(doc))
  print(f"wrote {f.out}.md/.json/.png")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
