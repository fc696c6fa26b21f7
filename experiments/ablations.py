r"""The paper's Table 3 ablation study, plus the dense global-attention baseline.

  python -m experiments.ablations --config=experiments/configs/dit.py:tiny \
      --workdir=outputs/ablations --variants=G,A,B,C,D,E,F,dense --eval_split=test_tiny

Every variant is the SAME config (data, steps, seeds, sizes) with one field of
config.model.dit changed (see VARIANTS); each is trained with
moca_jax.dit_task.train_and_evaluate(config, workdir/<variant>), then evaluated on a
held-out procedural split with moca_jax.evaluation and moca_jax.pipeline (generation -> CD,
F-score@0.1/0.05,
self-IoU). Writes into --workdir:
  table3.md        Table-3-shaped markdown (the variant's switches, then the metrics, then
                   the training helper's own scalar results, e.g. its validation loss)
  ablations.json   everything: per variant the overrides, training result, evaluation means
  <variant>/       the training workdir (checkpoints, TensorBoard) and eval/ (metrics.json,
                   table.md, grid.png)
A variant that fails is reported in the table ("failed: reason") and the others go on.
Re-running skips variants whose <variant>/ablation_result.json exists (delete it to redo);
a variant whose training finished (<variant>/train_result.json) but whose evaluation failed
is only re-evaluated. At tiny size on CPU, generation costs about a minute per item (2
cores): use --eval_limit, or --eval_split='' for the flow-loss comparison alone.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

from moca_jax import io as mio

# Variant name -> (overrides of config.model.dit, Table 3 switches). Switch columns follow
# the paper: Routing | Compressed | Gate on | Activation | Load balance | Multi-head.
VARIANTS: Dict[str, dict] = {
    "G": dict(label="G (full model)", dit={}),
    "A": dict(label="A: no routing (compressed tokens only)", dit=dict(routing="none")),
    "B": dict(label="B: no compressed tokens (top-k full only)", dit=dict(compressed_tokens=False)),
    "C": dict(label="C: gates on values", dit=dict(gate_on="values")),
    "D": dict(label="D: softmax router", dit=dict(router_activation="softmax")),
    "E": dict(
        label="E: deterministic routing in training", dit=dict(train_routing="deterministic")
    ),
    "F": dict(
        label="F: one routing shared by all heads", dit=dict(shared_routing_across_heads=True)
    ),
    "dense": dict(
        label="dense global attention (PartCrafter baseline)", dit=dict(global_attention="dense")
    ),
}
DEFAULT_ORDER = ("A", "B", "C", "D", "E", "F", "G", "dense")

# The paper's Table 3 (Trellis-500K training, PartObjaverse-Tiny evaluation), for scale only.
PAPER_TABLE3 = {
    "A": (0.1969, 0.6604, 0.4750),
    "B": (0.1523, 0.7494, 0.5465),
    "C": (0.1519, 0.7612, 0.5531),
    "D": (0.1451, 0.7638, 0.5539),
    "E": (0.1361, 0.7947, 0.5975),
    "F": (0.1212, 0.8215, 0.6178),
    "G": (0.1180, 0.8259, 0.6233),
}


def variant_config(base_config, name: str):
  """A deep copy of base_config with variant `name`'s DiT overrides applied.

  Everything else (data, steps, seeds, optimiser, sizes) is the base config's, so the
  variants differ in exactly the ablated switch.
  """
  if name not in VARIANTS:
    raise ValueError(f"variant: unknown {name!r}; expected one of {list(VARIANTS)}")
  cfg = copy.deepcopy(base_config)
  for k, v in VARIANTS[name]["dit"].items():
    if k not in cfg.model.dit:
      raise ValueError(f"config.model.dit has no field {k!r} (needed by variant {name})")
    cfg.model.dit[k] = v
  return cfg


def switches(dit_cfg) -> List[str]:
  """The Table 3 switch cells of a DiT config (✓ / ✗ / Key / Sigmoid ...)."""
  yes = lambda b: "✓" if b else "✗"  # pylint: disable=unnecessary-lambda-assignment
  if dit_cfg.global_attention == "dense":
    return ["dense", "dense", "-", "-", "-", "-"]
  return [
      yes(dit_cfg.routing == "topk"),
      yes(dit_cfg.compressed_tokens),
      dit_cfg.gate_on.capitalize()[:-1] if dit_cfg.gate_on.endswith("s") else dit_cfg.gate_on,
      dit_cfg.router_activation.capitalize(),
      yes(dit_cfg.train_routing == "gumbel"),
      yes(not dit_cfg.shared_routing_across_heads),
  ]


def _fmt(v) -> str:
  if v is None:
    return "-"
  try:
    v = float(v)
  except (TypeError, ValueError):
    return str(v)
  return "-" if math.isnan(v) else f"{v:.4f}"


def _scalar_items(d) -> Dict[str, float]:
  """Flattens the scalar numbers of a (nested) result dict: {'a/b': 1.0}."""
  out = {}
  if not isinstance(d, dict):
    return out
  for k, v in d.items():
    if isinstance(v, dict):
      out.update({f"{k}/{kk}": vv for kk, vv in _scalar_items(v).items()})
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[str(k)] = float(v)
    elif hasattr(v, "shape") and getattr(v, "shape", None) == ():
      out[str(k)] = float(v)
  return out


def table3_markdown(
    results: Dict[str, dict], base_config, train_keys: Sequence[str] = (), with_paper: bool = True
) -> str:
  """Table 3 shape: Variant | Routing | Compressed | Gate on | Activation | Load balance |
  Multi-head | CD | Fscore-0.1 | Fscore-0.05 | Self-IoU | <train_keys...>.

  results: {variant: {'eval': mean metrics or None, 'train': scalars, 'error': str|None}}.
  """
  head = [
      "Variant",
      "Routing",
      "Compressed",
      "Gate on",
      "Activation",
      "Load balance",
      "Multi-head",
      "CD ↓",
      "Fscore-0.1 ↑",
      "Fscore-0.05 ↑",
      "Self-IoU ↓",
  ] + list(train_keys)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    cfg = variant_config(base_config, name)
    cells = [VARIANTS[name]["label"]] + switches(cfg.model.dit)
    if r.get("error"):
      cells += [f"failed: {r['error'][:80]}"] + [""] * (len(head) - len(cells) - 1)
    else:
      ev = r.get("eval") or {}
      if r.get("eval_error"):
        cells += [f"eval failed: {r['eval_error'][:80]}", "", "", ""]
      else:
        cells += [
            _fmt(ev.get("cd")),
            _fmt(ev.get("fscore@0.1")),
            _fmt(ev.get("fscore@0.05")),
            _fmt(ev.get("self_iou")),
        ]
      cells += [_fmt((r.get("train") or {}).get(k)) for k in train_keys]
    lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
  text = "\n".join(lines) + "\n"
  if with_paper:
    text += (
        "\nThe paper (Trellis-500K training, PartObjaverse-Tiny evaluation; different "
        "data, for scale only), CD / Fscore-0.1 / Fscore-0.05: "
        + "; ".join(f"{k} {a:.4f} / {b:.4f} / {c:.4f}" for k, (a, b, c) in PAPER_TABLE3.items())
        + ".\n"
    )
  return text


def summarize_training(result, workdir: str) -> Dict[str, float]:
  """Scalars of a training run: final_train_loss (mean 'loss' over the last 10% of the
  logged steps), steps, and workdir/eval.json's scalars (the training helper's held-out
  flow loss, eval_loss_ema / eval_loss_params)."""
  out = _scalar_items(result) if isinstance(result, dict) else {}
  hist = list(getattr(result, "history", None) or [])
  losses = [float(h["loss"]) for h in hist if "loss" in h]
  if losses:
    out["final_train_loss"] = float(
        sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10)
    )
    out["steps"] = float(hist[-1].get("step", len(hist)))
  path = os.path.join(workdir, "eval.json")
  if os.path.exists(path):
    with open(path) as f:
      out.update(_scalar_items(json.load(f)))
  return out


def make_train_fn(show_progress: bool = True, eval_batches: int = 2, mesh=None) -> Callable:
  """train_fn(config, workdir) -> scalars, via moca_jax.dit_task.train_and_evaluate.

  mesh: a jax.sharding.Mesh for training (default: dit_task's, from config.mesh).
  """

  def train_fn(config, workdir):
    from moca_jax import dit_task  # pylint: disable=g-import-not-at-top

    res = dit_task.train_and_evaluate(
        config, workdir, show_progress=show_progress, eval_batches=eval_batches, mesh=mesh
    )
    return summarize_training(res, workdir)

  return train_fn


def make_generation_eval_fn(
    split: str = "test_tiny",
    limit: Optional[int] = None,
    kind: str = "object",
    steps: int = 50,
    cfg_scale: float = 7.0,
    num_samples: int = 100_000,
    voxel_resolution: int = 64,
    seed: int = 0,
    image_size: int = 224,
) -> Callable:
  """eval_fn(config, workdir) -> mean metrics: generate from workdir's checkpoint on a split.

  Every variant sees the same items, seeds and settings.
  """

  def eval_fn(config, workdir):
    del config
    from moca_jax import evaluation as E  # pylint: disable=g-import-not-at-top

    items = E.items_from_split(split, kind, limit, image_size)
    predict = E.pipeline_predict_fn(workdir, steps=steps, cfg=cfg_scale, seed=seed)
    settings = E.MetricSettings(
        num_samples=num_samples, seed=seed, voxel_resolution=voxel_resolution
    )
    res = E.evaluate_items(items, predict, settings)
    E.write_report(
        os.path.join(workdir, "eval"),
        res,
        kind,
        method=os.path.basename(workdir),
        meta={"split": split, "steps": steps, "cfg": cfg_scale, "seed": seed},
    )
    if not res["rows"]:
      raise RuntimeError(f'no item evaluated: {res["skipped"][:1]}')
    return res["mean"]

  return eval_fn


def run_ablations(
    base_config,
    workdir: str,
    variants: Sequence[str] = DEFAULT_ORDER,
    train_fn: Optional[Callable] = None,
    eval_fn: Optional[Callable] = None,
    train_keys: Optional[Sequence[str]] = None,
) -> dict:
  """Trains and evaluates every variant; writes table3.md and ablations.json in workdir.

  train_fn(config, workdir) -> dict of scalars (default `make_train_fn()`: dit_task);
  eval_fn(config, workdir) -> mean metrics dict or None (default: none, keep the training
  helper's own evaluation). train_keys: scalar entries of the training result to show as
  table columns (default: every scalar key whose name contains 'loss', up to 3).
  Returns {'results': {variant: {...}}, 'table': markdown}.
  """
  train_fn = train_fn or make_train_fn()
  for v in variants:
    variant_config(base_config, v)  # validate names and fields before any training
  os.makedirs(workdir, exist_ok=True)
  results = {}
  for v in variants:
    vdir = os.path.join(workdir, v)
    done = os.path.join(vdir, "ablation_result.json")
    if os.path.exists(done):
      with open(done) as f:
        results[v] = json.load(f)
      print(f"[ablations] {v}: reusing {done}", flush=True)
      continue
    cfg = variant_config(base_config, v)
    print(f"[ablations] {v}: {VARIANTS[v]['label']}  overrides {VARIANTS[v]['dit']}", flush=True)
    r = {
        "label": VARIANTS[v]["label"],
        "overrides": VARIANTS[v]["dit"],
        "error": None,
        "eval_error": None,
        "train": {},
        "eval": None,
    }
    os.makedirs(vdir, exist_ok=True)
    trained = os.path.join(vdir, "train_result.json")
    t0 = time.time()
    try:  # one variant failing must not stop the others
      if os.path.exists(trained):  # trained earlier, evaluation failed or was interrupted
        with open(trained) as f:
          r["train"] = json.load(f)
      else:
        r["train"] = _scalar_items(train_fn(cfg, vdir))
        r["seconds_train"] = time.time() - t0
        mio.atomic_write_text(trained, json.dumps(r["train"], indent=1) + "\n")
    except Exception as e:  # pylint: disable=broad-except
      r["error"] = f"{type(e).__name__}: {e}"
      traceback.print_exc(file=sys.stderr)
    if r["error"] is None and eval_fn is not None:
      try:
        ev = eval_fn(cfg, vdir)
        r["eval"] = None if ev is None else {k: float(x) for k, x in ev.items()}
      except Exception as e:  # pylint: disable=broad-except
        r["eval_error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    r["seconds_total"] = time.time() - t0
    if r["error"] is None and r["eval_error"] is None:
      mio.atomic_write_text(done, json.dumps(r, indent=1) + "\n")
    results[v] = r
  if train_keys is None:
    keys = []
    for r in results.values():
      keys += [k for k in r.get("train", {}) if "loss" in k and k not in keys]
    train_keys = keys[:3]
  table = table3_markdown(results, base_config, train_keys)
  header = (
      f'# Ablations (paper Table 3) at size {base_config.get("size", "?")}\n\n'
      f'Same config, data, steps ({base_config.get("num_steps", "?")}) and seed '
      f'({base_config.get("seed", "?")}) for every variant.\n\n'
  )
  mio.atomic_write_text(os.path.join(workdir, "table3.md"), header + table)
  doc = {"base_config": json.loads(base_config.to_json_best_effort()), "results": results}
  mio.atomic_write_text(os.path.join(workdir, "ablations.json"), json.dumps(doc, indent=1) + "\n")
  return {"results": results, "table": header + table}


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config",
      "experiments/configs/dit.py:tiny",
      "Base DiT training config (all variants share it).",
      lock_config=False,
  )
  flags.DEFINE_string("workdir", "outputs/ablations", "Output folder.")
  flags.DEFINE_string("variants", ",".join(DEFAULT_ORDER), "Comma list of " + "/".join(VARIANTS))
  flags.DEFINE_string(
      "eval_split",
      "test_tiny",
      "Procedural split to generate on; empty: only the training helper's own evaluation.",
  )
  flags.DEFINE_integer("eval_limit", None, "Items of the split to evaluate.")
  flags.DEFINE_enum("eval_kind", "object", ["object", "scene"], "Items to evaluate.")
  flags.DEFINE_integer("eval_steps", 50, "Flow ODE steps at evaluation.")
  flags.DEFINE_float("eval_cfg", 7.0, "CFG scale at evaluation.")
  flags.DEFINE_integer("eval_num_samples", 100_000, "Surface samples per shape.")
  flags.DEFINE_integer("eval_voxel_resolution", 64, "Self-IoU grid.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  variants = [v.strip() for v in f.variants.split(",") if v.strip()]
  eval_fn = None
  if f.eval_split:
    if not f.config.vae.get("workdir"):
      raise app.UsageError(
          "--config.vae.workdir is empty: evaluating by generation needs "
          "the VAE; set it, or pass --eval_split='' to keep only the "
          "training evaluation (flow loss)"
      )
    eval_fn = make_generation_eval_fn(
        f.eval_split,
        f.eval_limit,
        f.eval_kind,
        f.eval_steps,
        f.eval_cfg,
        f.eval_num_samples,
        f.eval_voxel_resolution,
        seed=f.config.seed,
    )
  out = run_ablations(f.config, f.workdir, variants, eval_fn=eval_fn)
  print(out["table"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
