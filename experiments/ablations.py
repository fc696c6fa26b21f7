r"""The paper's Table 3 ablation study, plus the dense global-attention baseline, and the
quality study of issue 17 §5 (all variants on one GPU, concurrently).

  python -m experiments.ablations --config=experiments/configs/dit.py:tiny \
      --workdir=outputs/ablations --variants=G,A,B,C,D,E,F,dense --eval_split=test_tiny

Every variant is the SAME config (data, steps, seeds, sizes) with one field of
config.model.dit changed (see VARIANTS); each is trained with
moca_jax.dit_task.train_and_evaluate(config, workdir/<variant>), then evaluated on a
held-out procedural split with moca_jax.evaluation and moca_jax.pipeline (generation -> CD,
F-score@0.1/0.05, self-IoU), every variant on the same items with the same seeds. Writes
into --workdir:
  table3.md        Table-3-shaped markdown (the variant's switches, then the metrics, then
                   the training helper's own scalar results, e.g. its validation loss)
  ablations.json   everything: per variant the overrides, training result, evaluation means
  <variant>/       the training workdir (checkpoints, TensorBoard, runs.jsonl), eval/
                   (metrics.json with per-item rows, table.md, grid.png, preds/NN.npz: the
                   first --grid_rows predictions), log.txt (--jobs), variant_result.json
A variant that fails is reported in the table ("failed: reason") and the others go on.
Re-running skips variants whose <variant>/ablation_result.json exists (delete it to redo);
a variant whose training finished (<variant>/train_result.json) but whose evaluation failed
is only re-evaluated; one stopped by --config.time_limit_s or --config.stop_at_unix resumes
from its checkpoint.
At tiny size on CPU, generation costs about a minute per item (2 cores): use --eval_limit,
or --eval_split='' for the flow-loss comparison alone.

--jobs=K runs the variants as K concurrent processes (this module, one variant each, same
flags) sharing the device: no memory preallocation, each capped at --mem_fraction of it
(default 0.95 / K), a persistent compilation cache in <workdir>/jax_cache, output in
<variant>/log.txt; the parent prints a status line per variant and assembles the tables
from the variants' result files. After training, each variant's compiled train step is
timed ALONE (--time_steps steps after warm-up, median, one batch of its training data):
the children wait at a file barrier (<workdir>/_sync) and the parent lets one at a time
use the device, then all evaluate. So the table has both 'step ms alone' and the shared
'train min' / 'step ms (shared)'. --results_name=quality_study writes
<results_dir>/quality_study.{md,json} and quality_study_grid.png (rows: the first held-out
inputs; columns: input, each variant's parts, ground truth) with an automatic paragraph on
whether the paper's ordering holds (`ordering_paragraph`).

The quality study on one H200 (bundle size: DiT 256 x 6, 10M params, 112 px inputs):

  python -m experiments.ablations --config=experiments/configs/dit.py:bundle \
      --config.data.dir=LATENTS --config.vae.workdir=VAE \
      --config.model.dit.dtype=bfloat16 --config.model.encoder.dtype=bfloat16 \
      --config.num_steps=2000 --config.checkpoint.every=2000 --jobs=8 --workdir=/root/study \
      --eval_split=test --eval_limit=20 --eval_image_size=112 --eval_steps=25 \
      --eval_num_samples=20000 --results_dir=experiments/results --results_name=quality_study

Seen on an H200 (synthetic data, untrained VAE, 2026-12-01, 8 processes, no memory cap):
compilation took ~4.5 min before the first step (init 42 s + train step 229 s; ~1 min for
one process alone: the 16 CPU cores are shared); a MoC train step needs ~13.2 GB of
temporaries, and two of the 8 uncapped processes ran out of memory (hence the default cap
of 1/8 each, not yet run on the GPU); the 6 others advanced ~20 steps/s in total with the
GPU 100% busy, about what one run alone does (~22 steps/s, assets/moca-small's card), so
concurrency saves compilation and evaluation wall time, not training time: 8 x 2000 steps
at batch 64 is ~12 min of training, more than one 10-minute call. Either lower
--config.num_steps, or train in chunks: add --config.time_limit_s=S (each variant stops
after S s of training, saves, and is reported as incomplete) or --config.stop_at_unix=T (the
same at the wall-clock time T, compilation included: what a device call with a hard limit
needs; experiments/results/bundle_train.sh's study stage sets it) and re-run the same command
on the same machine (while it is still warm): variants resume from their checkpoints and
their programs come from the compilation cache.
Seen on the H200 with real latents (2026-12-01, 8 processes capped at 1/8 each): at batch 64
every process ran out of its share at the first step (13.2-13.8 GB of temporaries, plus
the rest); at batch 32 the eight trained at 4.1-5.2 steps/s each after 293 s of concurrent
compilation; their evaluation (16 objects each: a sampler compiled per component-count
bucket, 8 processes on 16 cores) had not finished after 6 minutes (how many items were done
was not visible: the progress bar had no total, now it has) when the call ended, and the
checkpoints were lost with the machine. Hence
--export_bundles with --eval_split='': the GPU trains, times and exports each variant's
EMA weights as <variant>/bundle (~20 MiB at bundle size), the bundles come back, and a
re-run with an --eval_split evaluates them elsewhere (the CPU) without training
(experiments/results/bundle_train.sh, stages study and study_eval).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moca_jax import cli
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


# Table 3's switch columns, in the order `switches` fills them.
SWITCH_COLUMNS = ("Routing", "Compressed", "Gate on", "Activation", "Load balance", "Multi-head")


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
      *SWITCH_COLUMNS,
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
  logged steps), steps, and workdir/eval.json's scalars (the training helper's flow loss on
  fixed batches, eval_loss_ema / eval_loss_params, with eval_held_out 1.0 when those were
  data.val_dir's held-out batches and 0.0 when they were the first training batches)."""
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
      ev = json.load(f)
    out.update(_scalar_items(ev))
    if "eval_split" in ev:
      out["eval_held_out"] = float(ev["eval_split"] == "val")
  return out


# ----------------------------------------------------------------------------------------
# Step time alone on the device, and the barrier that makes it so under --jobs
# ----------------------------------------------------------------------------------------


class TrainingIncomplete(RuntimeError):
  """Training stopped at its time limit (config.time_limit_s or config.stop_at_unix) before
  config.num_steps; the variant is neither timed nor evaluated, and a re-run resumes it from
  its checkpoint."""


class FileBarrier:
  """The child side of the --jobs timing barrier: marker files in `sync_dir`.

  The child writes `<name>.<stage>` when it reaches a stage and waits for the parent's
  `<name>.<go>` file. Stages, in order: 'trained' -> wait 'go' (the parent gives the device
  to one child at a time) -> 'timed' -> wait 'eval_go' (the parent lets all evaluate once
  every waiting child was timed). If the parent process goes away, the child stops waiting.
  """

  def __init__(self, sync_dir: str, name: str, poll_s: float = 0.2):
    self.sync_dir, self.name, self.poll_s = sync_dir, name, poll_s
    self._parent = os.getppid()

  def path(self, stage: str) -> str:
    return os.path.join(self.sync_dir, f"{self.name}.{stage}")

  def arrive(self, stage: str) -> None:
    mio.atomic_write_text(self.path(stage), f"{time.time()}\n")

  def wait(self, stage: str) -> bool:
    """Waits for the parent's `<name>.<stage>`; False if the parent went away first."""
    while not os.path.exists(self.path(stage)):
      if os.getppid() != self._parent:
        return False
      time.sleep(self.poll_s)
    return True


def time_trained_step(config, loop_result, steps: int = 20, warmup: int = 3) -> Dict[str, float]:
  """Step time of the already compiled train step of a finished run, alone on its device.

  Uses `loop_result.compiled_step` and `.state` (no recompilation) on one batch of the
  run's own data (same shapes as training), with experiments.benchmark_train.time_steps:
  `warmup` untimed steps, then the median of `steps`. The state is stepped further; the
  checkpoint on disk is unchanged. Returns {'step_ms_alone', 'step_ms_alone_min',
  'step_ms_alone_n'}.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from experiments import benchmark_train  # pylint: disable=g-import-not-at-top
  from moca_jax import dit_task, sharding  # pylint: disable=g-import-not-at-top

  cfg = copy.deepcopy(config)
  cfg.data.num_workers = 0  # one batch: no worker processes
  batch = dit_task.model_batch(next(dit_task.make_iterator_fn(cfg, "train", shuffle=False)()))
  state = loop_result.state
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  device_batch = sharding.shard_batch(batch, mesh)
  key = jax.random.PRNGKey(int(config.seed))
  _, _, times = benchmark_train.time_steps(
      loop_result.compiled_step, state, device_batch, key, steps, warmup
  )
  times_ms = sorted(1e3 * t for t in times)
  return {
      "step_ms_alone": float(statistics.median(times_ms)),
      "step_ms_alone_min": float(times_ms[0]),
      "step_ms_alone_n": float(len(times_ms)),
  }


def make_train_fn(
    show_progress: bool = True,
    eval_batches: int = 2,
    mesh=None,
    time_steps: int = 0,
    barrier: Optional[FileBarrier] = None,
    concurrent_jobs: int = 1,
) -> Callable:
  """train_fn(config, workdir) -> scalars, via moca_jax.dit_task.train_and_evaluate.

  mesh: a jax.sharding.Mesh for training (default: dit_task's, from config.mesh).
  time_steps > 0: after training, time that many steps of the compiled train step alone
  (`time_trained_step`; 'step_ms_alone' in the scalars); with a `barrier` (--jobs), only
  when the parent gives this process the device. Also adds 'params' (parameter count) and
  'concurrent_jobs' (how many variants shared the device while training).
  """

  def train_fn(config, workdir):
    from moca_jax import dit_task, train_lib  # pylint: disable=g-import-not-at-top

    res = dit_task.train_and_evaluate(
        config, workdir, show_progress=show_progress, eval_batches=eval_batches, mesh=mesh
    )
    if getattr(res, "stopped_early", False):
      raise TrainingIncomplete(
          f"stopped by the time limit at step {int(res.state.step)} of {config.num_steps}; "
          "re-run to resume"
      )
    out = summarize_training(res, workdir)
    out["params"] = float(train_lib.count_params(res.state.params))
    out["concurrent_jobs"] = float(concurrent_jobs)
    if time_steps > 0:
      alone = True
      if barrier is not None:
        barrier.arrive("trained")
        alone = barrier.wait("go")
      try:
        out.update(time_trained_step(config, res, time_steps))
        out["step_ms_alone_exclusive"] = float(alone)
      except Exception:  # pylint: disable=broad-except  (a timing failure keeps the run)
        traceback.print_exc(file=sys.stderr)
      if barrier is not None:
        barrier.arrive("timed")
        barrier.wait("eval_go")
    return out

  return train_fn


# ----------------------------------------------------------------------------------------
# Evaluation by generation; the first predictions kept for the study's picture
# ----------------------------------------------------------------------------------------


def save_grid_rows(rows: Sequence[dict], out_dir: str) -> List[str]:
  """Writes `evaluation.evaluate_items`' grid rows (image, pred, gt, view, label) as
  out_dir/NN.npz (vertices / faces per part, no pickles); returns the paths."""
  from moca_jax import metrics as M  # pylint: disable=g-import-not-at-top

  paths = []
  for i, row in enumerate(rows):
    arrays = {
        "name": np.asarray(str(row.get("label", "")).split("  ")[0]),
        "label": np.asarray(str(row.get("label", ""))),
        "image": np.asarray(row["image"]),
        "view": np.asarray(row.get("view") or (45.0, 25.0), np.float64),
    }
    for key in ("pred", "gt"):
      parts = M.as_mesh_list(row.get(key) or [])
      arrays[f"n_{key}"] = np.asarray(len(parts))
      for j, m in enumerate(parts):
        arrays[f"{key}_v{j}"] = np.asarray(m.vertices, np.float32)
        arrays[f"{key}_f{j}"] = np.asarray(m.faces, np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    paths.append(mio.atomic_write_bytes(os.path.join(out_dir, f"{i:02d}.npz"), buf.getvalue()))
  return paths


def load_grid_rows(out_dir: str) -> List[dict]:
  """The rows `save_grid_rows` wrote (sorted by file name); [] when there are none."""
  import trimesh  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(out_dir):
    return []
  rows = []
  for fname in sorted(f for f in os.listdir(out_dir) if f.endswith(".npz")):
    with np.load(os.path.join(out_dir, fname), allow_pickle=False) as z:
      row = {
          "name": str(z["name"]),
          "label": str(z["label"]),
          "image": z["image"],
          "view": tuple(float(x) for x in z["view"]),
      }
      for key in ("pred", "gt"):
        row[key] = [
            trimesh.Trimesh(z[f"{key}_v{j}"], z[f"{key}_f{j}"], process=False)
            for j in range(int(z[f"n_{key}"]))
        ]
    rows.append(row)
  return rows


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
    grid_rows: int = 4,
    extract_resolution: int = 0,
) -> Callable:
  """eval_fn(config, workdir) -> mean metrics: generate from workdir's checkpoint on a split.

  Every variant sees the same items (the split's first `limit`, rendered at `image_size`
  px, 0: the config's encoder size), seeds and settings. The weights are the variant's
  exported bundle (workdir/bundle, `export_variant_bundle`: EMA weights in bf16 storage)
  when there is one, else its checkpoint's. Writes workdir/eval/ (metrics.json
  with per-item rows, table.md, grid.png) and the first `grid_rows` predictions as
  workdir/eval/preds/NN.npz (`save_grid_rows`) for the study's picture.
  extract_resolution > 0: marching-cubes grid of the pipeline (default: the pipeline's).
  """

  def eval_fn(config, workdir):
    from moca_jax import evaluation as E  # pylint: disable=g-import-not-at-top
    from moca_jax import pipeline  # pylint: disable=g-import-not-at-top

    size = image_size or config.model.encoder.image_size
    items = E.items_from_split(split, kind, limit, size)
    extract = {"resolution": extract_resolution} if extract_resolution else None
    weights = exported_bundle(workdir) or workdir
    pipe = pipeline.load_pipeline(weights, extract_kwargs=extract)
    predict = E.pipeline_predict_fn(weights, steps=steps, cfg=cfg_scale, seed=seed, pipe=pipe)
    settings = E.MetricSettings(
        num_samples=num_samples, seed=seed, voxel_resolution=voxel_resolution
    )
    res = E.evaluate_items(items, predict, settings, grid_rows=grid_rows, total=limit)
    out_dir = os.path.join(workdir, "eval")
    E.write_report(
        out_dir,
        res,
        kind,
        method=os.path.basename(workdir),
        meta={"split": split, "steps": steps, "cfg": cfg_scale, "seed": seed, "image_size": size},
    )
    save_grid_rows(res["grid"], os.path.join(out_dir, "preds"))
    if not res["rows"]:
      raise RuntimeError(f'no item evaluated: {res["skipped"][:1]}')
    return res["mean"]

  return eval_fn


# ----------------------------------------------------------------------------------------
# A variant's weights as a model bundle: evaluated later, on another machine
# ----------------------------------------------------------------------------------------

BUNDLE_DIR = "bundle"  # <variant>/bundle: the exported EMA weights


def exported_bundle(vdir: str) -> Optional[str]:
  """vdir/bundle when it is a complete model bundle (moca_jax.bundle), else None."""
  from moca_jax import bundle  # pylint: disable=g-import-not-at-top

  path = os.path.join(vdir, BUNDLE_DIR)
  return path if bundle.is_bundle(path) else None


def export_variant_bundle(config, vdir: str, max_mib: float = 64.0) -> str:
  """Exports a trained variant's EMA weights (DiT + image encoder, and the VAE of
  config.vae.workdir) as the model bundle vdir/bundle (experiments.export_bundle, bf16
  storage; loading restores the compute dtype), so the variant can be evaluated where its
  checkpoint is not: a GPU call trains, its bundles come back (a few MiB each), the CPU
  evaluates. Returns the folder. Raises what export_bundle raises (no checkpoint, over
  max_mib); nothing is half-written (bundle.json is written last)."""
  from experiments import export_bundle  # pylint: disable=g-import-not-at-top

  out = os.path.join(vdir, BUNDLE_DIR)
  export_bundle.export(
      vdir, out, vae_dir=config.vae.get("workdir") or None, max_mib=max_mib,
      name=f"study-{os.path.basename(os.path.normpath(vdir))}",
      notes="A quality-study variant (experiments.ablations), exported for evaluation.",
  )
  return out


# ----------------------------------------------------------------------------------------
# The sequential loop (one process)
# ----------------------------------------------------------------------------------------


def run_stats(records: Sequence[dict]) -> dict:
  """Sums the run records of a (resumed) training workdir (train_lib.append_run_record):
  {'train_seconds', 'compile_seconds', 'steps', 'device_kind', 'devices'}; {} if none."""
  if not records:
    return {}
  return {
      "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in records)),
      "compile_seconds": float(sum(r.get("compile_seconds", 0.0) for r in records)),
      "steps": int(records[-1].get("end_step", 0)),
      "steps_this_run": int(sum(r.get("end_step", 0) - r.get("start_step", 0) for r in records)),
      "device_kind": str(records[-1].get("device_kind", "?")),
      "devices": int(records[-1].get("devices", 0)),
  }


def read_run_stats(vdir: str) -> dict:
  """`run_stats` of vdir/runs.jsonl ({} when there is none)."""
  path = os.path.join(vdir, "runs.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return run_stats([json.loads(line) for line in f if line.strip()])


def _new_result(name: str) -> dict:
  return {
      "label": VARIANTS[name]["label"],
      "overrides": VARIANTS[name]["dit"],
      "error": None,
      "eval_error": None,
      "train": {},
      "eval": None,
  }


def run_variant(
    base_config, workdir: str, v: str, train_fn: Callable, eval_fn, export_fn=None
) -> dict:
  """Trains, exports (export_fn(config, vdir), e.g. `export_variant_bundle`, unless
  <v>/bundle exists) and evaluates one variant in workdir/<v>; never raises for the
  variant's own failures (they are in 'error' / 'export_error' / 'eval_error'). Writes
  <v>/variant_result.json always and <v>/ablation_result.json (the 'done' marker, reused
  on re-runs) on success. Without an eval_fn the variant is done once trained (and
  exported): a later run with one evaluates it (`reuse_result`)."""
  vdir = os.path.join(workdir, v)
  cfg = variant_config(base_config, v)
  print(f"[ablations] {v}: {VARIANTS[v]['label']}  overrides {VARIANTS[v]['dit']}", flush=True)
  r = _new_result(v)
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
  r["export_error"] = None
  if r["error"] is None and export_fn is not None and exported_bundle(vdir) is None:
    try:
      export_fn(cfg, vdir)
    except Exception as e:  # pylint: disable=broad-except  (training stays; re-run exports)
      r["export_error"] = f"{type(e).__name__}: {e}"
      traceback.print_exc(file=sys.stderr)
  r["bundle"] = exported_bundle(vdir)
  if r["error"] is None and eval_fn is not None:
    t1 = time.time()
    try:
      ev = eval_fn(cfg, vdir)
      r["eval"] = None if ev is None else {k: float(x) for k, x in ev.items()}
    except Exception as e:  # pylint: disable=broad-except
      r["eval_error"] = f"{type(e).__name__}: {e}"
      traceback.print_exc(file=sys.stderr)
    r["seconds_eval"] = time.time() - t1
  r["seconds_total"] = time.time() - t0
  r["run"] = read_run_stats(vdir)
  mio.atomic_write_text(os.path.join(vdir, "variant_result.json"), json.dumps(r, indent=1) + "\n")
  if r["error"] is None and r["eval_error"] is None and r["export_error"] is None:
    mio.atomic_write_text(
        os.path.join(vdir, "ablation_result.json"), json.dumps(r, indent=1) + "\n"
    )
  return r


def reuse_result(
    workdir: str, v: str, need_eval: bool = False, need_bundle: bool = False
) -> Optional[dict]:
  """workdir/<v>/ablation_result.json (a finished variant) or None; also None when
  need_eval and it was not evaluated (trained without an eval_fn: evaluate it now) or
  need_bundle and workdir/<v>/bundle is missing (export it now)."""
  done = os.path.join(workdir, v, "ablation_result.json")
  if not os.path.exists(done):
    return None
  with open(done) as f:
    r = json.load(f)
  if need_eval and r.get("eval") is None:
    return None
  if need_bundle and exported_bundle(os.path.join(workdir, v)) is None:
    return None
  return r


def write_summary(
    results: Dict[str, dict], base_config, workdir: str, train_keys: Optional[Sequence[str]] = None
) -> str:
  """Writes workdir/table3.md and ablations.json; returns the markdown.

  train_keys: scalar entries of the training results shown as columns (default: every key
  whose name contains 'loss', up to 3)."""
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
  return header + table


def run_ablations(
    base_config,
    workdir: str,
    variants: Sequence[str] = DEFAULT_ORDER,
    train_fn: Optional[Callable] = None,
    eval_fn: Optional[Callable] = None,
    train_keys: Optional[Sequence[str]] = None,
    summary: bool = True,
    export_fn: Optional[Callable] = None,
) -> dict:
  """Trains and evaluates every variant, one after another; writes table3.md and
  ablations.json in workdir (unless summary=False: a --jobs child).

  train_fn(config, workdir) -> dict of scalars (default `make_train_fn()`: dit_task);
  eval_fn(config, workdir) -> mean metrics dict or None (default: none, keep the training
  helper's own evaluation). export_fn(config, vdir): after training, e.g.
  `export_variant_bundle` (default: none). train_keys: see `write_summary`.
  Returns {'results': {variant: {...}}, 'table': markdown}.
  """
  train_fn = train_fn or make_train_fn()
  for v in variants:
    variant_config(base_config, v)  # validate names and fields before any training
  os.makedirs(workdir, exist_ok=True)
  results = {}
  for v in variants:
    old = reuse_result(workdir, v, eval_fn is not None, export_fn is not None)
    if old is not None:
      results[v] = old
      print(
          f"[ablations] {v}: reusing {os.path.join(workdir, v, 'ablation_result.json')}", flush=True
      )
      continue
    results[v] = run_variant(base_config, workdir, v, train_fn, eval_fn, export_fn)
  table = write_summary(results, base_config, workdir, train_keys) if summary else ""
  return {"results": results, "table": table}


# ----------------------------------------------------------------------------------------
# --jobs K: the variants as K concurrent processes sharing the device
# ----------------------------------------------------------------------------------------

_PROGRESS = re.compile(r"(train|evaluate)\S*\s*\d*%?\|?[^\r\n|]*\|?\s*(\d+)/(\d+)")


def log_progress(text: str) -> str:
  """The last tqdm progress ('train 120/2000', 'evaluate 3/20') in a log's text, or ''."""
  found = _PROGRESS.findall(text)
  if not found:
    return ""
  what, done, total = found[-1]
  return f"{what} {done}/{total}"


def read_tail(path: str, nbytes: int = 65536) -> str:
  """The last `nbytes` of a text file ('' if it does not exist)."""
  if not os.path.exists(path):
    return ""
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - nbytes))
    return f.read().decode("utf-8", errors="replace")


def variant_phase(log_path: str, mark: Callable[[str, str], str], v: str) -> str:
  """What a --jobs child is doing, from its barrier markers and its log's last progress:
  'compiling / starting', 'train 120/2000', 'waiting to time the step alone', 'evaluate 3/20'."""
  prog = log_progress(read_tail(log_path))
  if os.path.exists(mark(v, "eval_go")):
    return prog if prog.startswith("evaluate") else "evaluating (loading, compiling)"
  if os.path.exists(mark(v, "timed")):
    return "step timed, waiting for the others"
  if os.path.exists(mark(v, "trained")):
    return "trained, waiting to time the step alone"
  return prog or "compiling / starting"


def child_command(
    argv: Sequence[str], variant: str, sync_dir: str, concurrent_jobs: int = 1
) -> List[str]:
  """The command of one --jobs child: this module with the parent's flags, then (absl: the
  last value of a flag wins) one variant, --jobs=1, the barrier folder, no study files and
  how many children share the device (recorded with its training result)."""
  return [
      sys.executable,
      "-m",
      "experiments.ablations",
      *argv,
      f"--variants={variant}",
      "--jobs=1",
      f"--sync_dir={sync_dir}",
      "--results_name=",
      f"--concurrent_jobs={concurrent_jobs}",
  ]


def child_env(mem_fraction: float = 0.0, base: Optional[dict] = None, cache_dir: str = "") -> dict:
  """Environment of a --jobs child: no preallocation of device memory (the processes share
  the device); mem_fraction > 0: each process's allocator is capped at that fraction of the
  device (XLA_PYTHON_CLIENT_MEM_FRACTION), so no process grows into another's share;
  cache_dir: JAX's persistent compilation cache there (unless the environment names one),
  so a re-run (a resumed study in a later call on the same machine) loads its programs;
  unbuffered output."""
  env = dict(os.environ if base is None else base)
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if mem_fraction > 0:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.3f}"
  if cache_dir and not env.get("JAX_COMPILATION_CACHE_DIR"):
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def auto_mem_fraction(mem_fraction: float, jobs: int) -> float:
  """--mem_fraction: < 0 means an equal share each, 0.95 / jobs; 0: not capped."""
  return 0.95 / max(1, jobs) if mem_fraction < 0 else mem_fraction


def failed_child_result(v: str, rc: int, log_path: str) -> dict:
  """The result of a child that ended without writing one: rc and its log's last line."""
  tail = ""
  if os.path.exists(log_path):
    with open(log_path, errors="replace") as f:
      lines = [l.strip() for l in f.read()[-4000:].replace("\r", "\n").splitlines() if l.strip()]
    tail = lines[-1] if lines else ""
  r = _new_result(v)
  r["error"] = f"process exited with {rc}: {tail}"[:400]
  return r


def collect_result(workdir: str, v: str, rc: Optional[int]) -> dict:
  """A finished child's result: ablation_result.json, else variant_result.json (a failure
  it recorded), else `failed_child_result`."""
  old = reuse_result(workdir, v)
  if old is not None:
    return old
  path = os.path.join(workdir, v, "variant_result.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return failed_child_result(v, -1 if rc is None else rc, os.path.join(workdir, v, "log.txt"))


def _status(r: dict) -> str:
  """One line for a finished variant."""
  if r.get("error"):
    return f"FAILED ({r['error'][:120]})"
  ev, tr = r.get("eval") or {}, r.get("train") or {}
  bits = [f"loss {tr['final_train_loss']:.4f}"] if "final_train_loss" in tr else []
  if "step_ms_alone" in tr:
    bits.append(f"step {tr['step_ms_alone']:.1f} ms alone")
  if r.get("eval_error"):
    bits.append(f"eval FAILED ({r['eval_error'][:100]})")
  elif ev:
    bits.append(
        f"CD {ev.get('cd', float('nan')):.4f} F@0.1 {ev.get('fscore@0.1', float('nan')):.4f}"
    )
  return "done: " + ", ".join(bits)


def run_jobs(
    argv: Sequence[str],
    workdir: str,
    variants: Sequence[str],
    jobs: int,
    mem_fraction: float = 0.0,
    status_every_s: float = 60.0,
    poll_s: float = 0.5,
    cwd: Optional[str] = None,
    cache_dir: str = "",
    need_eval: bool = False,
    need_bundle: bool = False,
) -> Dict[str, dict]:
  """Runs the variants as `jobs` concurrent child processes (`child_command`), each logging
  to workdir/<v>/log.txt, and returns {variant: result} (`collect_result`).

  Finished variants (ablation_result.json; with need_eval / need_bundle only those
  evaluated / exported, `reuse_result`) are reused without a process. While children
  run, prints one status line per variant every status_every_s and one when it ends.
  Step timing: whenever every running child has finished training and waits (`FileBarrier`),
  the children's compiled steps are timed one at a time, then all go on to evaluate, so
  'step_ms_alone' is measured with the device otherwise idle.
  """
  import subprocess  # pylint: disable=g-import-not-at-top

  sync_dir = os.path.join(workdir, "_sync")
  os.makedirs(sync_dir, exist_ok=True)
  for f in os.listdir(sync_dir):
    os.remove(os.path.join(sync_dir, f))
  mark = lambda v, stage: os.path.join(sync_dir, f"{v}.{stage}")  # noqa: E731
  results: Dict[str, dict] = {}
  pending = []
  for v in variants:
    old = reuse_result(workdir, v, need_eval, need_bundle)
    if old is not None:
      results[v] = old
      print(f"[jobs] {v}: reusing {os.path.join(workdir, v, 'ablation_result.json')}", flush=True)
    else:
      pending.append(v)
  running: Dict[str, tuple] = {}  # v -> (Popen, start time, log file)
  cwd = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = child_env(mem_fraction, cache_dir=cache_dir)

  def reap() -> None:
    for v, (p, t0, log) in list(running.items()):
      rc = p.poll()
      if rc is None:
        continue
      log.close()
      del running[v]
      results[v] = collect_result(workdir, v, rc)
      print(
          f"[jobs] {v}: exited {rc} after {(time.time() - t0) / 60:.1f} min, "
          f"{_status(results[v])}",
          flush=True,
      )

  def timing_round() -> None:
    """Gives the device to each waiting child in turn, then lets them all evaluate."""
    for v in list(running):
      if os.path.exists(mark(v, "timed")):
        continue
      mio.atomic_write_text(mark(v, "go"), "")
      while v in running and not os.path.exists(mark(v, "timed")):
        time.sleep(poll_s / 5)
        reap()
      print(f"[jobs] {v}: step timed alone", flush=True)
    for v in list(running):
      mio.atomic_write_text(mark(v, "eval_go"), "")

  last_status = time.time()
  while pending or running:
    while pending and len(running) < max(1, jobs):
      v = pending.pop(0)
      vdir = os.path.join(workdir, v)
      os.makedirs(vdir, exist_ok=True)
      stale = os.path.join(vdir, "variant_result.json")
      if os.path.exists(stale):
        os.remove(stale)
      log = open(os.path.join(vdir, "log.txt"), "a")
      p = subprocess.Popen(
          child_command(argv, v, sync_dir, max(1, jobs)),
          cwd=cwd,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
      )
      running[v] = (p, time.time(), log)
      print(f"[jobs] {v}: started (pid {p.pid}), log {os.path.join(vdir, 'log.txt')}", flush=True)
    reap()
    if running and all(
        os.path.exists(mark(v, "trained")) and not os.path.exists(mark(v, "eval_go"))
        for v in running
    ):
      timing_round()
    if status_every_s and time.time() - last_status >= status_every_s:
      last_status = time.time()
      for v, (_, t0, _) in running.items():
        print(
            f"[jobs] {v}: {variant_phase(os.path.join(workdir, v, 'log.txt'), mark, v)} "
            f"({(time.time() - t0) / 60:.1f} min)",
            flush=True,
        )
    time.sleep(poll_s)
  return {v: results[v] for v in variants}


# ----------------------------------------------------------------------------------------
# The quality study (issue 17 §5): table, ordering paragraph, picture
# ----------------------------------------------------------------------------------------

# Lower is better for CD and self-IoU, higher for the F-scores.
_METRICS = (
    ("cd", "CD", -1),
    ("fscore@0.1", "F@0.1", 1),
    ("fscore@0.05", "F@0.05", 1),
    ("self_iou", "self-IoU", -1),
)


def _paired(per_item: Optional[dict], a: str, b: str, key: str):
  """(mean of a - b, its standard error, n) over the items both variants scored, or None."""
  if not per_item or a not in per_item or b not in per_item:
    return None
  xa, xb = per_item[a].get(key) or {}, per_item[b].get(key) or {}
  common = [n for n in xa if n in xb and math.isfinite(xa[n]) and math.isfinite(xb[n])]
  if len(common) < 2:
    return None
  d = np.asarray([xa[n] - xb[n] for n in common], np.float64)
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d)


def _diff_text(per_item, a: str, b: str, key: str, diff: float) -> str:
  """'0.0123' plus, with per-item values, the paired standard error and whether the
  difference is within two of them."""
  text = f"{abs(diff):.4f}"
  p = _paired(per_item, a, b, key)
  if p is not None:
    _, se, n = p
    within = abs(diff) <= 2 * se
    text += f" (paired over {n} items: standard error {se:.4f}; " + (
        "within 2 standard errors, not distinguishable on these items)"
        if within
        else "more than 2 standard errors)"
    )
  return text


def ordering_paragraph(
    evals: Dict[str, Optional[dict]],
    per_item: Optional[Dict[str, Dict[str, Dict[str, float]]]] = None,
    reference: str = "G",
    dense: str = "dense",
) -> str:
  """The study's 'ordering' paragraph, stating only what the numbers show.

  evals: {variant: mean metrics ('cd', 'fscore@0.1', ...) or None (not evaluated)}.
  per_item: optional {variant: {metric: {item name: value}}} for paired standard errors.
  Checks the paper's claims: the full model (reference) is best on F@0.1 and on CD among
  the evaluated variants, and dense global attention is no better than it on either;
  where a claim fails, says by how much (absolute differences).
  """
  ok = {
      v: e
      for v, e in evals.items()
      if e
      and all(
          isinstance(e.get(k), (int, float)) and math.isfinite(e[k]) for k in ("cd", "fscore@0.1")
      )
  }
  if reference not in ok:
    return (
        f"{reference} (the full model) has no evaluation, so the paper's ordering cannot "
        "be checked."
    )
  g = ok[reference]
  out = []
  for key, name, sign in (("fscore@0.1", "F@0.1", 1), ("cd", "CD", -1)):
    others = {v: e[key] for v, e in ok.items() if v != reference}
    if not others:
      out.append(f"{reference} is the only evaluated variant; nothing to compare on {name}.")
      continue
    better = sorted(
        (v for v, x in others.items() if sign * (x - g[key]) > 0), key=lambda v: -sign * others[v]
    )
    rank = 1 + len(better)
    if not better:
      best_other = max(others, key=lambda v: sign * others[v])
      gap = abs(g[key] - others[best_other])
      tie = " (tied)" if gap == 0 else ""
      out.append(
          f"{name}: {reference} is best of {len(ok)} evaluated variants ({g[key]:.4f}){tie}, "
          f"ahead of the next, {best_other} ({others[best_other]:.4f}), by "
          f"{_diff_text(per_item, reference, best_other, key, gap)}."
      )
    else:
      lead = better[0]
      out.append(
          f"{name}: {reference} is NOT best; it ranks {rank} of {len(ok)} ({g[key]:.4f}). "
          f"Better: "
          + ", ".join(f"{v} ({others[v]:.4f})" for v in better)
          + f"; the best, {lead}, by "
          + _diff_text(per_item, lead, reference, key, others[lead] - g[key])
          + "."
      )
  if dense in ok:
    d = ok[dense]
    worse_or_equal = [
        (key, name)
        for key, name, sign in (("fscore@0.1", "F@0.1", 1), ("cd", "CD", -1))
        if sign * (d[key] - g[key]) <= 0
    ]
    if len(worse_or_equal) == 2:
      out.append(
          f"Dense global attention is no better than {reference}, as in the paper: F@0.1 "
          f"{d['fscore@0.1']:.4f} vs {g['fscore@0.1']:.4f}, CD {d['cd']:.4f} vs {g['cd']:.4f}."
      )
    else:
      parts = []
      for key, name, sign in (("fscore@0.1", "F@0.1", 1), ("cd", "CD", -1)):
        if sign * (d[key] - g[key]) > 0:
          parts.append(
              f"{name} {d[key]:.4f} vs {g[key]:.4f}, by "
              + _diff_text(per_item, dense, reference, key, d[key] - g[key])
          )
      out.append(
          f"Dense global attention is BETTER than {reference} on "
          + "; ".join(parts)
          + " (the paper has dense no better than MoC)."
      )
  else:
    out.append(f"Dense global attention ({dense}) has no evaluation.")
  paper_order = [v for v, _ in sorted(PAPER_TABLE3.items(), key=lambda kv: -kv[1][1])]
  ours = [v for v in sorted(ok, key=lambda v: -ok[v]["fscore@0.1"]) if v in PAPER_TABLE3]
  if len(ours) > 1:
    out.append(
        "F@0.1 order here: "
        + " > ".join(ours)
        + "; in the paper: "
        + " > ".join(v for v in paper_order if v in ours)
        + "."
    )
  return " ".join(out)


def loss_ordering_line(
    results: Dict[str, dict], reference: str = "G", dense: str = "dense"
) -> str:
  """One sentence ordering the variants by flow loss (the training helper's
  'eval_loss_ema': EMA weights, the same batches, noise and times for every variant; lower
  is better; called held-out only when every variant's batches were, 'eval_held_out'),
  with the reference's and dense's gaps to the lowest in absolute and relative terms. Variants without the number are left out; '' when fewer
  than two have it."""
  losses = {
      v: float(r["train"]["eval_loss_ema"])
      for v, r in results.items()
      if not r.get("error")
      and isinstance((r.get("train") or {}).get("eval_loss_ema"), (int, float))
      and math.isfinite(r["train"]["eval_loss_ema"])
  }
  if len(losses) < 2:
    return ""
  order = sorted(losses, key=losses.get)
  best = order[0]
  held_out = all(
      float(results[v]["train"].get("eval_held_out", 0.0)) == 1.0 for v in losses)
  what = "Held-out flow loss" if held_out else "Flow loss on the first training batches"
  text = (
      f"{what} (EMA weights, the same batches, noise and times for every variant; "
      "lower is better): " + " < ".join(f"{v} {losses[v]:.4f}" for v in order) + "."
  )
  for v in (reference, dense):
    if v in losses and v != best:
      gap = losses[v] - losses[best]
      text += (
          f" {v} is {gap:.4f} ({100 * gap / losses[best]:.1f}%) above the lowest, {best}."
      )
    elif v == best:
      text += f" {v} is the lowest."
  return text


def per_item_metrics(workdir: str, variants: Sequence[str]) -> Dict[str, dict]:
  """{variant: {metric: {item name: value}}} from workdir/<v>/eval/metrics.json rows."""
  out = {}
  for v in variants:
    path = os.path.join(workdir, v, "eval", "metrics.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      rows = json.load(f).get("rows", [])
    out[v] = {
        k: {r["name"]: float(r[k]) for r in rows if isinstance(r.get(k), (int, float))}
        for k, _, _ in _METRICS
    }
  return out


def config_summary(base_config) -> dict:
  """The study's setting: size, L, N max, batch, steps, seed, DiT width / blocks, data."""
  dit = base_config.model.dit
  return {
      "size": base_config.get("size", "?"),
      "latent_tokens_L": int(dit.latent_tokens),
      "latent_channels": int(dit.latent_channels),
      "n_max": int(base_config.data.max_components),
      "batch": int(base_config.batch_size),
      "steps": int(base_config.num_steps),
      "seed": int(base_config.seed),
      "dit_width": int(dit.width),
      "dit_blocks": int(dit.num_blocks),
      "dit_dtype": str(dit.get("dtype", "?")),
      "lr": float(base_config.optim.lr),
      "data": (
          base_config.data.source + (f" {base_config.data.dir}" if base_config.data.dir else "")
      ),
  }


def _minutes(seconds) -> str:
  return "-" if seconds is None else f"{float(seconds) / 60:.1f}"


def quality_table_markdown(results: Dict[str, dict], base_config) -> str:
  """Table 3 shape plus losses and cost: Variant | 6 switches | CD | F@0.1 | F@0.05 |
  self-IoU | train loss | eval loss (EMA) | condition gain (`dit_task.evaluate`: ~0 when the
  model ignores its image) | steps | train min (shared device) | compile min | step ms
  (shared) | step ms alone | eval min."""
  head = [
      "Variant",
      *SWITCH_COLUMNS,
      "CD ↓",
      "F@0.1 ↑",
      "F@0.05 ↑",
      "Self-IoU ↓",
      "train loss",
      "eval loss (EMA)",
      "condition gain",
      "steps",
      "train min (shared device)",
      "compile min",
      "step ms (shared)",
      "step ms alone",
      "eval min",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    cells = [VARIANTS[name]["label"]] + switches(variant_config(base_config, name).model.dit)
    tr, run = r.get("train") or {}, r.get("run") or {}
    if r.get("error"):
      cells += [f"failed: {r['error'][:100]}"] + [""] * (len(head) - len(cells) - 1)
    else:
      ev = r.get("eval") or {}
      if r.get("eval_error"):
        cells += [f"eval failed: {r['eval_error'][:80]}", "", "", ""]
      else:
        cells += [_fmt(ev.get(k)) for k, _, _ in _METRICS]
      steps_run = run.get("steps_this_run") or 0
      shared_ms = (1e3 * run["train_seconds"] / steps_run) if steps_run else None
      cells += [
          _fmt(tr.get("final_train_loss")),
          _fmt(tr.get("eval_loss_ema")),
          _fmt(tr.get("condition_gain")),
          str(run.get("steps", int(tr.get("steps", 0)) or "-")),
          _minutes(run.get("train_seconds")),
          _minutes(run.get("compile_seconds")),
          "-" if shared_ms is None else f"{shared_ms:.1f}",
          "-" if "step_ms_alone" not in tr else f"{tr['step_ms_alone']:.1f}",
          _minutes(r.get("seconds_eval")),
      ]
    lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
  return "\n".join(lines) + "\n"


def device_line(results: Dict[str, dict]) -> str:
  """'1 x NVIDIA H200' from the variants' run records (the kinds seen, joined)."""
  seen = []
  for r in results.values():
    run = r.get("run") or {}
    if run.get("device_kind"):
      s = f"{run.get('devices', '?')} x {run['device_kind']}"
      if s not in seen:
        seen.append(s)
  return ", ".join(seen) or "unknown (no run records)"


def variant_grid_png(
    workdir: str, variants: Sequence[str], path: str, max_rows: int = 4, panel_px: int = 160
) -> Optional[str]:
  """The study's picture: rows = the first held-out items, columns = input image, each
  variant's generated parts (one colour per part, moca_jax.viz.render_parts from the
  input's view), ground truth (grey). Reads workdir/<v>/eval/preds (`save_grid_rows`);
  a variant without that item shows 'n/a'. Returns the path, or None with nothing to draw.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from moca_jax import viz  # pylint: disable=g-import-not-at-top

  preds = {
      v: {row["name"]: row for row in load_grid_rows(os.path.join(workdir, v, "eval", "preds"))}
      for v in variants
  }
  names = []
  for v in variants:
    names += [n for n in preds[v] if n not in names]
  names = names[:max_rows]
  if not names:
    return None
  cols = ["input"] + list(variants) + ["ground truth"]
  header = 30
  fig = plt.figure(
      figsize=(len(cols) * panel_px / viz.DPI, (len(names) * panel_px + header) / viz.DPI),
      dpi=viz.DPI,
  )
  top = 1 - header / (len(names) * panel_px + header)
  grey = [np.array([0.75, 0.75, 0.75])]
  for r, name in enumerate(names):
    ref = next(preds[v][name] for v in variants if name in preds[v])
    az, el = ref["view"]
    panels = [ref["image"][..., :3]]
    for v in variants:
      row = preds[v].get(name)
      panels.append(
          None if row is None else viz.render_parts(row["pred"], panel_px, azimuth=az, elevation=el)
      )
    panels.append(
        viz.render_parts(
            ref["gt"], panel_px, colours=grey * len(ref["gt"]), azimuth=az, elevation=el
        )
    )
    for c, im in enumerate(panels):
      ax = viz.image_panel(
          fig,
          [c / len(cols), top - (r + 1) * top / len(names), 1 / len(cols), top / len(names)],
          im,
          title=cols[c] if r == 0 else None,
          title_size=8,
      )
      if c == 0:
        ax.text(0.02, 0.02, name, transform=ax.transAxes, fontsize=6, backgroundcolor="white")
  return mio.save_figure(fig, path, format="png", dpi=viz.DPI)


def write_quality_study(
    results: Dict[str, dict],
    base_config,
    workdir: str,
    results_dir: str,
    name: str = "quality_study",
    eval_settings: Optional[dict] = None,
    jobs: int = 1,
    grid_rows: int = 4,
    notes: str = "",
) -> Dict[str, str]:
  """Writes results_dir/<name>.md, <name>.json and <name>_grid.png (issue 17 §5).

  The markdown: setting (device, config summary, evaluation settings), the Table 3-shaped
  table (`quality_table_markdown`), the paper's Table 3 for scale, the automatic ordering
  paragraph (`ordering_paragraph`, with paired standard errors over the shared items) and
  the held-out flow-loss order (`loss_ordering_line`), the optional `notes` (markdown, the
  study's reading by whoever ran it, under "## Reading the result") and the picture.
  Returns {kind: path}.
  """
  os.makedirs(results_dir, exist_ok=True)
  variants = list(results)
  trained_jobs = [int((r.get("train") or {}).get("concurrent_jobs", 0)) for r in results.values()]
  jobs = max(trained_jobs + [jobs])  # as trained (an evaluation-only re-run has jobs 1)
  device = device_line(results)
  setting = config_summary(base_config)
  per_item = per_item_metrics(workdir, variants)
  ordering = ordering_paragraph(
      {
          v: r.get("eval")
          for v, r in results.items()
          if not r.get("error") and not r.get("eval_error")
      },
      per_item,
  )
  png = variant_grid_png(
      workdir, variants, os.path.join(results_dir, f"{name}_grid.png"), grid_rows
  )
  ev = dict(eval_settings or {})
  lines = [
      f"# Quality study: MoC attention ablations and dense global attention ({setting['size']})",
      "",
      f"Training device: {device}; evaluated on "
      f"{ev.get('evaluated_on', 'the training device')}; {len(variants)} variants, {jobs} "
      "at a time on the same device "
      "(concurrent runs share it: 'train min' and 'step ms (shared)' are inflated by the "
      "sharing; 'step ms alone' is the compiled train step timed with the device otherwise "
      "idle, median of the timed steps after warm-up, same batch as training).",
      "",
      "Setting, the same for every variant (one DiT switch differs): "
      + ", ".join(f"{k} {v}" for k, v in setting.items())
      + ".",
      "",
      "Evaluation, the same items, seeds and settings for every variant: "
      + (", ".join(f"{k} {v}" for k, v in ev.items()) or "none")
      + ".",
      "",
      quality_table_markdown(results, base_config),
      "The paper's Table 3 (Trellis-500K training, PartObjaverse-Tiny evaluation; other data "
      "and a far larger model, for scale only), CD / F@0.1 / F@0.05: "
      + "; ".join(f"{k} {a:.4f} / {b:.4f} / {c:.4f}" for k, (a, b, c) in PAPER_TABLE3.items())
      + ". The paper has no dense row in Table 3; it reports dense global attention "
      "(PartCrafter-style) as no better than MoC.",
      "",
      "## Ordering",
      "",
      ordering,
      "",
  ]
  loss_line = loss_ordering_line(results)
  if loss_line:
    lines += [loss_line, ""]
  if notes.strip():
    lines += ["## Reading the result", "", notes.strip(), ""]
  if png:
    lines += [
        "## The same inputs across variants",
        "",
        f"![inputs, each variant's generated parts, ground truth]({os.path.basename(png)})",
        "",
    ]
  md = os.path.join(results_dir, f"{name}.md")
  mio.atomic_write_text(md, "\n".join(lines))
  doc = {
      "device": device,
      "jobs": jobs,
      "setting": setting,
      "eval_settings": ev,
      "paper_table3": {
          k: dict(zip(("cd", "fscore@0.1", "fscore@0.05"), x)) for k, x in PAPER_TABLE3.items()
      },
      "ordering": ordering,
      "loss_ordering": loss_line,
      "notes": notes.strip(),
      "variants": {
          v: {**r, "switches": switches(variant_config(base_config, v).model.dit)}
          for v, r in results.items()
      },
      "per_item": per_item,
      "base_config": json.loads(base_config.to_json_best_effort()),
  }
  js = mio.write_json(os.path.join(results_dir, f"{name}.json"), doc, indent=1)
  out = {"markdown": md, "json": js}
  if png:
    out["grid"] = png
  return out


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
  flags.DEFINE_integer(
      "eval_image_size", 0, "Render size of the evaluation inputs (0: the config's encoder size)."
  )
  flags.DEFINE_integer(
      "eval_extract_resolution", 0, "Marching-cubes grid at evaluation (0: the pipeline's)."
  )
  flags.DEFINE_integer("grid_rows", 4, "Held-out inputs kept per variant for the picture.")
  flags.DEFINE_bool(
      "export_bundles",
      False,
      "After training, export each variant's EMA weights as the model bundle <variant>/bundle "
      "(evaluation then reads it): train on a GPU with --eval_split='', bring the bundles "
      "back, evaluate elsewhere with the same --workdir layout.",
  )
  flags.DEFINE_float("bundle_max_mib", 64.0, "--export_bundles: refuse a larger bundle (MiB).")
  flags.DEFINE_integer("eval_batches", 2, "Batches of the training helper's flow-loss eval.")
  flags.DEFINE_integer(
      "time_steps", 20, "Timed train steps per variant alone on the device (0: no timing)."
  )
  flags.DEFINE_integer(
      "jobs", 1, "Variants trained and evaluated at once, as processes sharing the device."
  )
  flags.DEFINE_float(
      "mem_fraction",
      -1.0,
      "--jobs: XLA_PYTHON_CLIENT_MEM_FRACTION per process (< 0: 0.95 / jobs; 0: not set).",
  )
  flags.DEFINE_string(
      "compilation_cache",
      "",
      "--jobs: JAX persistent compilation cache folder (default <workdir>/jax_cache; 'none').",
  )
  flags.DEFINE_float("status_every", 60.0, "--jobs: seconds between status lines.")
  flags.DEFINE_string(
      "results_name", "", "Also write <results_dir>/<name>.md/.json/_grid.png (the quality study)."
  )
  flags.DEFINE_string("results_dir", "experiments/results", "Folder of --results_name's files.")
  flags.DEFINE_string(
      "study_notes", "", "A markdown file: the study's reading, written into --results_name's "
      "files under 'Reading the result'."
  )
  flags.DEFINE_string("sync_dir", "", "Internal: set by --jobs for its child processes.")
  flags.DEFINE_integer(
      "concurrent_jobs", 0, "Internal: set by --jobs for its children (0: --jobs)."
  )


def eval_settings_from_flags(f) -> dict:
  """The evaluation settings every variant shares, as recorded in the study."""
  return {
      "split": f.eval_split,
      "kind": f.eval_kind,
      "limit": f.eval_limit,
      "image_size": f.eval_image_size or int(f.config.model.encoder.image_size),
      "ode_steps": f.eval_steps,
      "cfg": f.eval_cfg,
      "num_samples": f.eval_num_samples,
      "voxel_resolution": f.eval_voxel_resolution,
      "extract_resolution": f.eval_extract_resolution or "pipeline default",
      "seed": int(f.config.seed),
      "evaluated_on": evaluation_machine(),
  }


def evaluation_machine() -> str:
  """'1 x NVIDIA H200' / 'cpu (2 cores)': where this process evaluates (jax's devices)."""
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()
  if dev[0].platform == "cpu":
    return f"cpu ({len(os.sched_getaffinity(0))} cores)"
  return f"{len(dev)} x {dev[0].device_kind}"


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  variants = [v.strip() for v in f.variants.split(",") if v.strip()]
  for v in variants:
    variant_config(f.config, v)  # unknown names fail here, before any process starts
  notes = ""
  if f.study_notes:  # read before any training, so a wrong path costs nothing
    try:
      with open(f.study_notes) as fh:
        notes = fh.read()
    except OSError as e:  # one line and the project's exit code for bad arguments
      print(f"ablations: error: --study_notes={f.study_notes}: cannot read it ({e})",
            file=sys.stderr)
      sys.exit(cli.BAD_ARGUMENTS)
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
        image_size=f.eval_image_size,
        grid_rows=f.grid_rows,
        extract_resolution=f.eval_extract_resolution,
    )
  if f.jobs > 1 and not f.sync_dir:
    os.makedirs(f.workdir, exist_ok=True)
    cache = f.compilation_cache or os.path.join(os.path.abspath(f.workdir), "jax_cache")
    results = run_jobs(
        sys.argv[1:],
        f.workdir,
        variants,
        f.jobs,
        auto_mem_fraction(f.mem_fraction, f.jobs),
        f.status_every,
        cache_dir="" if cache == "none" else cache,
        need_eval=eval_fn is not None,
        need_bundle=f.export_bundles,
    )
    table = write_summary(results, f.config, f.workdir)
  else:
    barrier = FileBarrier(f.sync_dir, variants[0]) if f.sync_dir and len(variants) == 1 else None
    train_fn = make_train_fn(
        eval_batches=f.eval_batches,
        time_steps=f.time_steps,
        barrier=barrier,
        concurrent_jobs=f.concurrent_jobs or max(1, f.jobs),
    )
    export_fn = None
    if f.export_bundles:
      export_fn = lambda cfg, vdir: export_variant_bundle(cfg, vdir, f.bundle_max_mib)  # noqa: E731
    out = run_ablations(
        f.config,
        f.workdir,
        variants,
        train_fn=train_fn,
        eval_fn=eval_fn,
        summary=not f.sync_dir,
        export_fn=export_fn,
    )
    results, table = out["results"], out["table"]
  if f.results_name and not f.sync_dir:
    written = write_quality_study(
        results,
        f.config,
        f.workdir,
        f.results_dir,
        f.results_name,
        eval_settings_from_flags(f) if f.eval_split else None,
        jobs=max(1, f.jobs),
        grid_rows=f.grid_rows,
        notes=notes,
    )
    print("[ablations] wrote " + ", ".join(written.values()), flush=True)
  print(table)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
