r"""Two or more evaluate runs on the same held-out items, paired: which checkpoint or sampler
setting is better, and by more than the item-to-item noise? (issue 17: a new training round
ships only when it beats the bundled one on `val`; a sampler setting is chosen there too).

  python -m experiments.evaluate --checkpoint_dir=assets/moca-small --split=val \
      --kind=object --limit=20 --image_size=112 --out_dir=outputs/val_old
  python -m experiments.evaluate --checkpoint_dir=NEW_BUNDLE --split=val \
      --kind=object --limit=20 --image_size=112 --out_dir=outputs/val_new
  python -m experiments.compare_runs --runs=outputs/val_old,outputs/val_new \
      --labels="round 4,round 5" --out=experiments/results/round5_val

Reads each run's metrics.json (`moca_jax.evaluation.write_report`) and writes <out>.md and
<out>.json: per run its checkpoint, the mean and median of each metric (Table 1's for
objects, Table 2's for scenes; `experiments.cfg_sweep.METRICS`), the empty parts per item,
and the mean paired difference to the reference run (the first, or --reference) over the
same items with its standard error. The runs must agree on the items and their kind; the
sampling settings in which they differ (`SAMPLING_KEYS`: CFG scale and interval, steps,
surface samples, seed, self-IoU grid, render size, sampler time shift, a VAE reconstruction
without the DiT, `evaluate --reconstruct`) and their model weights (the bundle fingerprint
`experiments.evaluate` records) are listed per run, so a table never hides what changed.
(`experiments.cfg_sweep` is the special case of one model across CFG scales.) Nothing is
measured here.
Exit codes: 0 written; 2 a missing or unreadable run, fewer than two runs, labels that do not
match the runs, or runs that differ in items or kind (one line on stderr).
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import List, Sequence

from absl import app, flags

from experiments import cfg_sweep
from moca_jax import cli
from moca_jax import io as mio

# The evaluate settings that must agree for a comparison of checkpoints to be fair.
SAMPLING_KEYS = ("cfg", "cfg_interval", "steps", "num_samples", "seed", "voxel_resolution",
                 "object_frame", "image_size", "time_shift", "reconstruct")

# The settings of the DiT's sampler: they do not apply to a run without one (--reconstruct).
DIT_SAMPLING_KEYS = ("cfg", "cfg_interval", "steps", "time_shift")


def check_comparable(runs: Sequence[dict]) -> str:
  """The kind the runs share. Raises ValueError naming what differs: the kind or the items
  (names, in order)."""
  if len(runs) < 2:
    raise ValueError(f"compare needs at least two runs, got {len(runs)}")
  kinds = {run["kind"] for run in runs}
  if len(kinds) != 1:
    raise ValueError("the runs scored different kinds of items: " + ", ".join(
        f"{run['path']} ({run['kind']})" for run in runs))
  first = [r["name"] for r in runs[0]["rows"]]
  for run in runs[1:]:
    if [r["name"] for r in run["rows"]] != first:
      raise ValueError(f"{run['path']} scored other items than {runs[0]['path']}; evaluate "
                       "every checkpoint on the same split, kind and --limit")
  return kinds.pop()


def differing_settings(runs: Sequence[dict]) -> List[str]:
  """The `SAMPLING_KEYS` (and 'weights_sha256') whose values are not the same in all runs."""
  return [k for k in SAMPLING_KEYS + ("weights_sha256",)
          if len({repr(run["meta"].get(k)) for run in runs}) > 1]


def compare(runs: Sequence[dict], labels: Sequence[str], reference: str) -> dict:
  """Per run (in the given order): means, medians and paired differences to the run
  labelled `reference`. Raises ValueError (`check_comparable`, or labels that do not match
  the runs one to one)."""
  kind = check_comparable(runs)
  if len(labels) != len(runs) or len(set(labels)) != len(labels):
    raise ValueError(f"--labels must name each of the {len(runs)} runs once, got "
                     f"{list(labels)}")
  if reference not in labels:
    raise ValueError(f"--reference {reference!r} is not one of the labels {list(labels)}")
  keys = list(cfg_sweep.metric_keys(kind)) + ["empty_parts"]
  values = [[cfg_sweep.item_values(row, kind) for row in run["rows"]] for run in runs]
  ref_vals = values[labels.index(reference)]
  differ = differing_settings(runs)
  out = []
  for label, run, vals in zip(labels, runs, values):
    entry = {"label": label, "checkpoint": run["meta"].get("checkpoint"),
             "date_utc": run["date"], "run": run["path"],
             "differs": {k: run["meta"].get(k) for k in differ},
             "reconstruct": bool(run["meta"].get("reconstruct"))}
    for k in keys:
      column = [v[k] for v in vals]
      entry[k] = sum(column) / len(column)
      entry[f"{k}_median"] = statistics.median(column)
      entry[f"{k}_diff"], entry[f"{k}_diff_se"] = cfg_sweep.paired(
          column, [v[k] for v in ref_vals])
    out.append(entry)
  meta = runs[0]["meta"]
  return {"kind": kind, "items": len(runs[0]["rows"]), "source": runs[0]["source"],
          "machine": runs[0]["machine"], "reference": reference, "differs": differ,
          "sampling": {k: meta.get(k) for k in SAMPLING_KEYS if k not in differ
                       and not (k in DIT_SAMPLING_KEYS and any(e["reconstruct"] for e in out))},
          "runs": out,
          "by_category": by_category(runs, labels, keys[:2])}


def by_category(runs: Sequence[dict], labels: Sequence[str], keys: Sequence[str]) -> list:
  """Per item category (procedural items record one: `EvalItem.category`; taken from any run
  that has it, the runs scoring the same items): the item count and each run's mean of
  `keys`, sorted by category. [] when no run recorded categories."""
  category = {}
  for run in runs:
    for row in run["rows"]:
      if row.get("category"):
        category.setdefault(row["name"], row["category"])
  if not category:
    return []
  kind = runs[0]["kind"]
  groups: dict = {}
  for i, row in enumerate(runs[0]["rows"]):
    groups.setdefault(category.get(row["name"], "unknown"), []).append(i)
  table = []
  for name in sorted(groups):
    entry = {"category": name, "items": len(groups[name])}
    for label, run in zip(labels, runs):
      vals = [cfg_sweep.item_values(run["rows"][i], kind) for i in groups[name]]
      for k in keys:
        entry[f"{label}: {k}"] = sum(v[k] for v in vals) / len(vals)
    table.append(entry)
  return table


def _cell(entry: dict, k: str, is_reference: bool) -> str:
  digits = 2 if k == "empty_parts" else 4
  value = f"{entry[k]:.{digits}f}"
  if is_reference:
    return value
  return f"{value} ({entry[f'{k}_diff']:+.{digits}f} ± {entry[f'{k}_diff_se']:.{digits}f})"


SETTING_NAMES = {"steps": "Euler steps", "cfg": "CFG", "cfg_interval": "CFG interval",
                 "num_samples": "surface samples", "seed": "seed",
                 "voxel_resolution": "self-IoU grid", "object_frame": "object frame",
                 "weights_sha256": "weights", "image_size": "input render px",
                 "time_shift": "sampler time shift", "reconstruct": "VAE reconstruction"}


def _setting_value(key: str, value) -> str:
  if key == "reconstruct":  # evaluate --reconstruct: no DiT, the VAE on the ground truth
    return "yes" if value else "no"
  if key == "cfg_interval" and value is None:
    return "every step"
  if key == "weights_sha256" or value is None:
    return str(value)[:12] if value else "not recorded"
  return f"{value:g}" if isinstance(value, float) else str(value)


def _setting_line(settings: dict) -> str:
  return ", ".join(f"{SETTING_NAMES.get(k, k)} {_setting_value(k, v)}"
                   for k, v in settings.items())


def markdown(doc: dict) -> str:
  keys = list(cfg_sweep.metric_keys(doc["kind"])) + ["empty_parts"]
  differ = doc["differs"]
  lines = [
      f"# Evaluate runs compared ({doc['kind']}s, {doc['source']}, {doc['items']} items)",
      "",
      f"`experiments/compare_runs.py` over `experiments.evaluate` runs on the same items "
      f"({doc['machine']}). Shared settings: {_setting_line(doc['sampling'])}. In brackets: "
      f"the mean paired difference to {doc['reference']} over the same items ± its standard "
      "error; a difference within about two standard errors is item-to-item noise. Empty "
      "parts: requested minus non-empty generated parts (instances for scenes), per item.",
      "",
      "| run | " + "".join(f"{SETTING_NAMES.get(k, k)} | " for k in differ) + " | ".join(
          f"{k} {'↓' if cfg_sweep.LOWER_IS_BETTER[k] else '↑'}" for k in keys) + " |",
      "|---|" + "---|" * (len(differ) + len(keys)),
  ]
  for e in doc["runs"]:
    shown = [("-" if e.get("reconstruct") and k in DIT_SAMPLING_KEYS  # no sampler ran
              else _setting_value(k, e["differs"][k])) for k in differ]
    lines.append(f"| {e['label']} | " + "".join(f"{v} | " for v in shown) + " | ".join(
        _cell(e, k, e["label"] == doc["reference"]) for k in keys) + " |")
  if doc.get("by_category"):
    cols = [c for c in doc["by_category"][0] if c not in ("category", "items")]
    lines += ["", "By category (means over the items of each):", "",
              "| category | items | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    lines += [f"| {e['category']} | {e['items']} | " + " | ".join(
        f"{e[c]:.4f}" for c in cols) + " |" for e in doc["by_category"]]
  lines += ["", "Medians: " + "; ".join(
      f"{e['label']} " + ", ".join(f"{k} {e[k + '_median']:.3f}" for k in keys[:2])
      for e in doc["runs"]), "", "Checkpoints: " + "; ".join(
          f"{e['label']} `{e['checkpoint']}`" for e in doc["runs"])]
  return "\n".join(lines) + "\n"


def define_flags() -> None:
  flags.DEFINE_list("runs", None, "experiments.evaluate output folders (or metrics.json).")
  flags.DEFINE_list("labels", None, "A name per run (default: the folder names).")
  flags.DEFINE_string("reference", None, "The label the others are compared with "
                      "(default: the first run's).")
  flags.DEFINE_string("out", "outputs/compare_runs", "Output path stem (.md, .json).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  try:
    if not f.runs:
      raise ValueError("--runs is required (two or more evaluate output folders)")
    runs = [cfg_sweep.load_run(p, need_cfg=False) for p in f.runs]
    labels: List[str] = list(f.labels) if f.labels else [
        os.path.basename(os.path.dirname(run["path"])) for run in runs]
    doc = compare(runs, labels, f.reference or labels[0])
  except ValueError as e:
    print(f"compare_runs: error: {e}", file=sys.stderr)
    sys.exit(2)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  mio.write_json(f.out + ".json", doc, indent=1)
  mio.atomic_write_text(f.out + ".md", markdown(doc))
  print(f"wrote {f.out}.md/.json")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
