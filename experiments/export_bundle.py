r"""Packs a trained DiT and its VAE into a model bundle with its model card (moca_jax.bundle).

  python -m experiments.export_bundle --dit=/root/bw/dit --out=assets/moca-small \
      [--vae=/root/bw/vae] [--eval_dirs=eval_objects,eval_scenes] [--max_mib=24] \
      [--notes="what the card should say about how it was trained"]
  # attach evaluations made elsewhere (and --notes, --card_data) to an existing bundle's
  # card, optionally setting its sampling defaults (--scene_cfg_scale, --cfg_interval=lo,hi
  # or none, --time_shift):
  python -m experiments.export_bundle --update=assets/moca-small --eval_dirs=eval_objects
  # swap in a decoder-only fine-tune of the bundle's VAE (train_vae with
  # --config.init.from_bundle=assets/moca-small --config.train_encoder=false), DiT kept:
  python -m experiments.export_bundle --update=assets/moca-small --vae=/root/bw/vae_ft

What is written into --out:
  bundle.json, dit.npz, vae.npz   the EMA weights (bf16 by default) and both configs
  MODEL_CARD.md                   architecture, training runs (steps, examples seen, device
                                  minutes, from each workdir's runs.jsonl), losses, the VAE's
                                  held-out reconstruction, the evaluation tables
  loss_vae.png, loss_dit.png      the training loss curves (copied from the workdirs)
  <name>.png                      each --eval_dirs folder's grid.png (input | parts | truth),
                                  named after the folder
The bundle's config is the trained one with a portable inference setting: float32 compute
and XLA attention (the model may have trained in bf16 with cuDNN), no rematerialisation, and
the training machine's paths (VAE workdir, data folders) moved into the card. A DiT that
warm-started from a bundle (config.init.from_bundle, found here) keeps that bundle's
sampling defaults (`warm_start_sampling`); --update changes them.
Exit codes: 0 written; 2 a bad argument, a checkpoint that cannot be read or a bundle over
--max_mib (one line on stderr, nothing written).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import numpy as np
from absl import app, flags, logging

from moca_jax import cli
from moca_jax import bundle, checkpointing, dit_task, train_lib
from moca_jax import io as mio

MIB = 2**20


def define_flags() -> None:
  flags.DEFINE_string("dit", None, "train_dit workdir.")
  flags.DEFINE_string("vae", None, "train_vae workdir (default: the one the DiT config names); "
                      "with --update: a decoder-only fine-tune of that bundle's VAE, swapped "
                      "in (`replace_vae`).")
  flags.DEFINE_string("out", None, "Bundle folder to write.")
  flags.DEFINE_list("eval_dirs", [], "experiments.evaluate --out_dir folders to report.")
  flags.DEFINE_enum("storage_dtype", "bfloat16", list(bundle.STORAGE_DTYPES), "Weights dtype.")
  flags.DEFINE_float("max_mib", 24.0, "Refuse a bundle larger than this (MiB, all files).")
  flags.DEFINE_string("notes", "", "Free text for the card's training section.")
  flags.DEFINE_string("card_data", "", "--update: replace the card's text on what the models "
                      "trained on (the first paragraph of its training section).")
  flags.DEFINE_string("update", None, "An existing bundle folder: attach --eval_dirs (and "
                      "--notes) to its card and rewrite MODEL_CARD.md; weights untouched.")
  flags.DEFINE_float("scene_cfg_scale", None, "--update: set the default CFG scale for scene "
                     "inputs (config.sample.scene_cfg_scale).")
  flags.DEFINE_list("cfg_interval", None, "--update: set the default guidance interval lo,hi "
                    "(config.sample.cfg_interval: guidance only at flow times lo <= t <= hi, "
                    "t = 1 is noise), or 'none' for guidance at every step.")
  flags.DEFINE_float("time_shift", None, "--update: set the sampler's default time shift "
                     "(config.sample.time_shift, > 0; 1 = the uniform Euler grid).")


def inference_config(config) -> tuple:
  """(the DiT config the bundle stores, the training-only fields moved out of it)."""
  config = config.copy_and_resolve_references()
  moved = {"vae.workdir": config.vae.get("workdir", ""), "data.dir": config.data.get("dir", ""),
           "data.val_dir": config.data.get("val_dir", ""),
           "trained_dtype": config.model.dit.get("dtype", ""),
           "trained_attention": config.model.dit.get("attention_implementation", "")}
  if config.get("init") and config.init.get("from_bundle"):  # a training-time warm start
    moved["init.from_bundle"] = config.init.from_bundle
    config.init.from_bundle = ""
  config.vae.workdir = ""
  config.data.dir = config.data.val_dir = ""
  config.model.dit.dtype = "float32"
  config.model.dit.attention_implementation = "xla"
  config.model.dit.remat = "none"
  config.model.encoder.dtype = "float32"
  config.model.encoder.attention_implementation = "xla"
  config.model.encoder.remat = False
  return config, moved


def warm_start_sampling(config, from_bundle: str):
  """`config` (an inference DiT config) with the sampling defaults (config.sample) of the
  bundle its training warm-started from, and that bundle's folder; or `config` unchanged
  and None when there is no such bundle (none named, or not found here).

  A bundle's sampling defaults were chosen for its model on `val` (CFG interval, scene CFG
  scale, time shift) or set with `--update`, while a training config carries
  experiments/configs/dit.py's generic ones; a warm restart continues the bundle's model,
  so its export keeps the bundle's (change them with --update). Without this, round 11's
  export silently sampled with guidance at every step instead of the shipped t >= 0.8."""
  if not from_bundle or not bundle.is_bundle(from_bundle):
    return config, None
  sample = bundle.read_info(from_bundle)["dit_config"].get("sample")
  if not sample:
    return config, None
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sample = type(config)(dict(sample))
  return config, os.path.normpath(from_bundle)


def _vae_inference_config(config):
  config = config.copy_and_resolve_references()
  if config.get("init") and config.init.get("from_bundle"):
    config.init.from_bundle = ""  # a training-time warm start (the card's runs table says it)
  config.model.dtype = "float32"
  config.model.attention_implementation = "xla"
  return config


def _read_json(path: str) -> Optional[dict]:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_summary(workdir: str) -> dict:
  """What the training calls of a workdir did, from its runs.jsonl (train_lib)."""
  return summary_of_runs(train_lib.read_run_records(workdir))


def summary_of_runs(runs: list) -> dict:
  """`run_summary`'s totals over a list of run records."""
  return {
      "runs": runs,
      "steps": max((r["end_step"] for r in runs), default=0),
      "examples": sum(r["examples"] for r in runs),
      "train_minutes": round(sum(r["train_seconds"] for r in runs) / 60.0, 2),
      "compile_minutes": round(sum(r["compile_seconds"] for r in runs) / 60.0, 2),
      "devices": sorted({f"{r['devices']} x {r['device_kind']}" for r in runs}),
  }


def runs_before(earlier: dict, summary: dict) -> dict:
  """`earlier` (a card's run summary) cut before the first of its runs that `summary` (a
  workdir's) also holds, matched by finish time: swapping the same, or a resumed, fine-tune
  into a bundle again replaces its runs instead of listing them twice."""
  finished = {r.get("finished_utc") for r in summary.get("runs", [])} - {None}
  runs = earlier.get("runs") or []
  for i, r in enumerate(runs):
    if r.get("finished_utc") in finished:
      return summary_of_runs(runs[:i]) if i else {}
  return earlier


def with_earlier_runs(summary: dict, earlier: dict, source: str) -> dict:
  """The `run_summary` of a run that warm-started from a bundle (config.init.from_bundle,
  params only, fresh optimizer), preceded by the runs that trained that bundle (its card's
  summary `earlier`): one history whose steps count on from the bundle's (the warm-started
  run, the one that began at its own step 0, is marked 'warm_restart_from': source; the
  runs resuming it stay resumes) and whose totals add both."""
  earlier = earlier if earlier and earlier.get("runs") else {}
  offset = int(earlier.get("steps", 0))
  runs = [dict(r) for r in earlier.get("runs", [])]
  for r in summary["runs"]:
    moved = dict(r, start_step=r["start_step"] + offset, end_step=r["end_step"] + offset)
    if r["start_step"] == 0:  # the warm restart itself; later runs resumed its checkpoints
      moved["warm_restart_from"] = source
    runs.append(moved)
  return {
      "runs": runs,
      "steps": offset + summary["steps"],
      "examples": int(earlier.get("examples", 0)) + summary["examples"],
      "train_minutes": round(float(earlier.get("train_minutes", 0)) + summary["train_minutes"], 2),
      "compile_minutes": round(float(earlier.get("compile_minutes", 0))
                               + summary["compile_minutes"], 2),
      "devices": sorted(set(earlier.get("devices", [])) | set(summary["devices"])),
  }


def lineage_summary(workdir: str, config, key: str) -> dict:
  """`run_summary(workdir)`, with the earlier runs of the bundle that config.init.from_bundle
  names (when it is a readable bundle) in front (`with_earlier_runs`)."""
  summary = run_summary(workdir)
  source = (config.get("init") or {}).get("from_bundle", "")
  if not source or not bundle.is_bundle(source):
    return summary
  earlier = bundle.read_info(source).get("card", {}).get(key, {})
  label = os.path.normpath(source)
  parts = tuple(config.init.get("bundle_parts", ()) or ())
  if key == "dit" and parts and set(parts) != {"encoder", "dit"}:
    label += f" ({', '.join(parts)} only; the rest freshly initialised)"
  return with_earlier_runs(summary, earlier, label)


def _copy_if_present(src: str, dst: str) -> None:
  if os.path.isfile(src):
    with open(src, "rb") as f:
      mio.atomic_write_bytes(dst, f.read())


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4f}"
  return "-" if v is None else str(v)


def _runs_table(summary: dict) -> str:
  rows = ["| call | steps | examples | train min | compile min | device | stopped by time limit "
          "| start |", "|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(summary["runs"], 1):
    start = (f"params-only warm restart from {r['warm_restart_from']} (fresh optimizer)"
             if r.get("warm_restart_from") else "resume" if r["start_step"] else "fresh")
    rows.append(f"| {i} | {r['start_step']} -> {r['end_step']} | {r['examples']} | "
                f"{r['train_seconds'] / 60:.1f} | {r['compile_seconds'] / 60:.1f} | "
                f"{r['devices']} x {r['device_kind']} | {r['stopped_early']} | {start} |")
  return "\n".join(rows)


def _latent_norm_line(ln: dict) -> str:
  if ln.get("kind", "none") == "none":
    return "The DiT diffuses the VAE's latents as they are."
  post = (", the VAE's posterior std added in quadrature" if ln.get("posterior_noise")
          else "")
  return (f"The DiT diffuses normalised latents (`moca_jax.latent_norm`, kind {ln['kind']}: "
          "each part's token mean and the tokens' deviations from it at unit variance per "
          f"channel{post}; statistics of {ln.get('parts', 0):,} training parts, stored in the "
          "config); generation maps them back before the VAE decodes.")


def _sampling_line(sample: dict) -> str:
  """The sampling defaults of config.sample, as a sentence for the card."""
  line = (f"Sampling defaults: {sample.get('steps', '?')} {sample.get('method', 'euler')} "
          f"steps, CFG {sample.get('cfg_scale', '?')}")
  if sample.get("cfg_interval"):
    lo, hi = sample["cfg_interval"]
    line += f" applied only at flow times {lo:g} <= t <= {hi:g} (t = 1 is noise)"
  if sample.get("scene_cfg_scale") is not None:
    line += f" (scene inputs: CFG {sample['scene_cfg_scale']})"
  if sample.get("time_shift", 1.0) != 1.0:
    s = sample["time_shift"]
    toward = "noise" if s > 1 else "the data"
    slope = f"+ {s - 1:g}" if s > 1 else f"- {1 - s:g}"
    line += (f"; the Euler grid is shifted toward {toward} by {s:g} (t' = {s:g}t / (1 {slope}t) "
             "on the uniform grid)")
  return line + "."


def model_card(info: dict) -> str:
  """MODEL_CARD.md text from the bundle's bundle.json contents."""
  card, dit_cfg, vae_cfg = info["card"], info["dit_config"], info["vae_config"]
  fingerprint = bundle.fingerprint_of_info(info)
  d, e, v = dit_cfg["model"]["dit"], dit_cfg["model"]["encoder"], vae_cfg["model"]
  files = info["files"]
  total = sum(f["bytes"] for f in files.values())
  lines = [
      f"# {card.get('name', 'moca-jax model')}",
      "",
      "An image-to-parts compositional 3D generator (MoCA: a MoC DiT over vecset latents), "
      "trained by this repository's own pipeline on its procedural data. Load it with "
      "`moca_jax.pipeline.Pipeline.from_bundle(folder)` or pass the folder to "
      "`experiments.generate --checkpoint` (the default).",
      "",
      "## Model",
      "",
      "| part | shape | parameters |",
      "|---|---|---|",
      f"| DiT ({dit_cfg['mode']} mode) | {d['num_blocks']} blocks, width {d['width']}, "
      f"{d['num_heads']} heads, global attention {d['global_attention']} (top-k {d['top_k']}, "
      f"{d['num_compressed']} compressed tokens), N <= {dit_cfg['data']['max_components']} | "
      f"{files['dit.npz']['params']:,} (with the encoder) |",
      f"| image encoder | ViT {e['width']} wide, {e['depth']} blocks, {e['image_size']} px input, "
      f"trained from scratch with the DiT | (in the DiT's) |",
      f"| VAE | vecset, L = {v['num_latents']} tokens x C = {v['latent_channels']}, "
      f"decoder {v['dec_width']} x {v['dec_layers']} | {files['vae.npz']['params']:,} |",
      "",
      _latent_norm_line(dit_cfg["model"].get("latent_norm") or {}),
      "",
      f"Stored in {info['storage_dtype']}: {total / MIB:.2f} MiB of weights. The config runs "
      "in float32 with XLA attention (portable); training used "
      f"{card.get('moved', {}).get('trained_dtype', '?')} compute.",
      "",
      _sampling_line(dit_cfg.get("sample") or {}),
      "",
      "## Training",
      "",
      card.get("data", ""),
      "",
  ]
  for name, key in (("VAE", "vae"), ("DiT", "dit")):
    s = card.get(key, {})
    if not s:
      continue
    lines += [f"### {name}: {s['steps']} steps, {s['examples']:,} examples, "
              f"{s['train_minutes']:.1f} training minutes on {', '.join(s['devices'])}", "",
              _runs_table(s), "", f"![{name} loss](loss_{key}.png)", ""]
  if card.get("notes"):
    lines += [card["notes"], ""]
  vae_eval = card.get("vae_eval") or {}
  if vae_eval.get("by_size"):
    lines += ["## VAE: held-out analytic primitives by part size", "",
              f"The VAE's own evaluation (`vae_task.evaluate_reconstruction`): "
              f"{sum(int(m.get('count', 0)) for m in vae_eval['by_size'].values())} random "
              "primitives, encoded from area-uniform surface samples, decoded on a "
              f"{vae_eval.get('resolution', '?')}^3 grid; IoU of the occupancy, Chamfer of the "
              "extracted mesh.", "",
              "| size | count | IoU | Chamfer |", "|---|---|---|---|"]
    for size, m in vae_eval["by_size"].items():
      lines.append(f"| {size} | {_fmt(m.get('count'))} | {_fmt(m.get('iou_mean'))} | "
                   f"{_fmt(m.get('chamfer_mean'))} |")
    lines.append("")
  for name, ev in (card.get("evaluation") or {}).items():
    meta = ev.get("meta", {})
    # at CFG 1 no unconditional pass is made, so an interval has no effect
    interval = meta.get("cfg_interval") if meta.get("cfg") != 1.0 else None
    guidance = f"CFG {meta.get('cfg', '?')}" + (
        f" at flow times {interval[0]:g} <= t <= {interval[1]:g}" if interval else "")
    size = f", inputs rendered at {meta['image_size']} px" if meta.get("image_size") else ""
    how = ("no DiT: the ground truth's parts encoded to their posterior means and decoded "
           "by the VAE (`evaluate --reconstruct`)" if meta.get("reconstruct") else
           f"{meta.get('steps', '?')} Euler steps, {guidance}{size}")
    lines += [f"## Evaluation: {name}", "", f"{ev.get('items', '?')} held-out items "
              f"({meta.get('source', '?')}, {how}; {meta.get('machine', '')}), "
              f"{ev.get('skipped', 0)} skipped.", ""]
    evaluated = meta.get("weights_sha256")
    if evaluated and evaluated != fingerprint:  # e.g. attached before a VAE swap
      lines += [f"**Not this bundle's weights:** evaluated with weights {evaluated[:12]}, "
                f"this bundle's are {fingerprint[:12]} (an earlier model). Evaluate again "
                "and attach it with `export_bundle --update --eval_dirs`.", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(val)} |" for k, val in ev.get("mean", {}).items()]
    lines += ["", f"![{name}]({name}.png)", ""]
  return "\n".join(lines) + "\n"


def export(dit_dir: str, out: str, vae_dir: Optional[str] = None, eval_dirs=(),
           storage_dtype: str = "bfloat16", max_mib: float = 24.0, notes: str = "",
           name: str = "moca-small") -> dict:
  """Writes the bundle folder (module docstring); returns its bundle.json contents.

  Raises FileNotFoundError / ValueError (checkpoints) or bundle.BundleError (over max_mib:
  nothing is written then).
  """
  from moca_jax.vae_task import load_vae  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  ckpt = os.path.join(os.path.abspath(dit_dir), "checkpoints")
  cfg_dict, step = checkpointing.read_checkpoint_config(ckpt)
  trained = ml_collections.ConfigDict(cfg_dict)
  params = checkpointing.restore_params(ckpt, dit_task.abstract_params(trained), step, "ema")
  vae_dir = vae_dir or trained.vae.workdir
  _, vae_params, vae_config = load_vae(vae_dir)
  config, moved = inference_config(trained)
  config, sample_from = warm_start_sampling(config, moved.get("init.from_bundle", ""))
  if sample_from:
    moved["sample_from"] = sample_from
    print(f"export_bundle: sampling defaults of {sample_from} kept: {dict(config.sample)}")
  encoded = {n: bundle.encode_params(p, storage_dtype)
             for n, p in (("dit.npz", params), ("vae.npz", vae_params["params"]))}
  size = sum(len(b) for b in encoded.values())
  if size > max_mib * MIB:
    raise bundle.BundleError(f"{out}: the weights take {size / MIB:.2f} MiB > --max_mib "
                             f"{max_mib}; nothing written")
  evaluation = read_evaluations(eval_dirs)
  if bundle.is_bundle(vae_dir):  # the VAE of an earlier bundle, as it was: its card's record
    earlier = bundle.read_info(vae_dir).get("card", {})
    vae_summary, vae_eval = earlier.get("vae", {}), earlier.get("vae_eval")
  else:
    vae_summary = lineage_summary(vae_dir, vae_config, "vae")
    vae_eval = _read_json(os.path.join(vae_dir, "eval.json"))
  card = {"name": name, "dit": lineage_summary(dit_dir, trained, "dit"),
          "vae": vae_summary, "vae_eval": vae_eval, "evaluation": evaluation,
          "moved": moved, "notes": notes, "dit_step": step,
          "data": f"DiT data: {moved['data.dir'] or '?'}; VAE: its config's data source "
                  f"({vae_config.data.source})."}
  bundle.write_bundle(out, config, params, _vae_inference_config(vae_config), vae_params,
                      card=card, storage_dtype=storage_dtype)
  copy_png_compact(os.path.join(dit_dir, "loss_curve.png"), os.path.join(out, "loss_dit.png"))
  copy_png_compact(os.path.join(vae_dir, "loss_vae.png" if bundle.is_bundle(vae_dir)
                                else "loss_curve.png"), os.path.join(out, "loss_vae.png"))
  _copy_grids(eval_dirs, out)
  info = bundle.read_info(out)
  mio.atomic_write_text(os.path.join(out, "MODEL_CARD.md"), model_card(info))
  return info


def read_evaluations(eval_dirs) -> dict:
  """{folder name: {'mean', 'items', 'skipped', 'meta'}} of experiments.evaluate --out_dir
  folders. Raises FileNotFoundError naming a folder without metrics.json."""
  evaluation = {}
  for d in eval_dirs:
    m = _read_json(os.path.join(d, "metrics.json"))
    if m is None:
      raise FileNotFoundError(f"{d}: no metrics.json (an experiments.evaluate --out_dir?)")
    key = os.path.basename(os.path.normpath(d))
    evaluation[key] = {"mean": m.get("mean", {}), "items": len(m.get("rows", [])),
                       "skipped": len(m.get("skipped", [])), "meta": m.get("meta", {})}
  return evaluation


def copy_png_compact(src: str, dst: str) -> None:
  """Copies a picture into the bundle as a 256-colour palette PNG (about half the bytes of
  the renders' RGB PNGs; the bundle folder has a size budget). Nothing when src is missing;
  bytes that are not an image are copied as they are."""
  if not os.path.isfile(src):
    return
  try:
    image = mio.load_image(src)
  except ValueError:  # not an image
    _copy_if_present(src, dst)
    return
  mio.write_png(dst, image, palette=True)


def _copy_grids(eval_dirs, out: str) -> None:
  for d in eval_dirs:
    key = os.path.basename(os.path.normpath(d))
    copy_png_compact(os.path.join(d, "grid.png"), os.path.join(out, f"{key}.png"))


def parse_cfg_interval(values) -> Optional[list]:
  """--cfg_interval's values -> [lo, hi] (checked by `flow.check_cfg_interval`), or None for
  ['none'] (guidance at every step). ValueError names a bad value."""
  from moca_jax import flow  # pylint: disable=g-import-not-at-top

  if [str(v).strip().lower() for v in values] == ["none"]:
    return None
  return list(flow.check_cfg_interval(values))


_KEEP = object()


def check_sample_updates(scene_cfg_scale: Optional[float], time_shift: Optional[float]) -> None:
  """ValueError unless scene_cfg_scale (when given) is finite and >= 0 and time_shift (when
  given) is finite and > 0: `update_card`'s checks, also run before a VAE swap."""
  if scene_cfg_scale is not None and not (math.isfinite(scene_cfg_scale)
                                          and scene_cfg_scale >= 0):
    raise ValueError(f"scene_cfg_scale={scene_cfg_scale!r}: must be a finite number >= 0")
  if time_shift is not None and not (math.isfinite(time_shift) and time_shift > 0):
    raise ValueError(f"time_shift={time_shift!r}: must be a finite number > 0")


def update_card(folder: str, eval_dirs=(), notes: Optional[str] = None,
                scene_cfg_scale: Optional[float] = None, cfg_interval=_KEEP,
                time_shift: Optional[float] = None, data: Optional[str] = None) -> dict:
  """Attaches evaluations made elsewhere (e.g. on a CPU after the GPU trained the model) and
  optionally new notes (and a new `data` text: what the models trained on) to an existing
  bundle: its card in bundle.json (the weights and their
  checksums are untouched), the grids and MODEL_CARD.md. scene_cfg_scale: also sets the
  sampling default for scene inputs (config.sample.scene_cfg_scale, `Pipeline.sample_settings`;
  finite and >= 0). cfg_interval: also sets the default guidance interval
  (config.sample.cfg_interval, [lo, hi] or None for every step; `parse_cfg_interval`).
  time_shift: also sets the sampler's time shift (config.sample.time_shift, finite and > 0;
  `moca_jax.flow.time_grid`). Returns the new bundle.json contents.
  Raises FileNotFoundError / bundle.BundleError / ValueError (a bad scale, interval or
  shift)."""
  info = bundle.read_info(folder)
  if cfg_interval is not _KEEP:
    from moca_jax import flow  # pylint: disable=g-import-not-at-top

    checked = flow.check_cfg_interval(cfg_interval)
    info["dit_config"].setdefault("sample", {})["cfg_interval"] = (
        None if checked is None else list(checked))
  check_sample_updates(scene_cfg_scale, time_shift)
  if scene_cfg_scale is not None:
    info["dit_config"].setdefault("sample", {})["scene_cfg_scale"] = float(scene_cfg_scale)
  if time_shift is not None:
    info["dit_config"].setdefault("sample", {})["time_shift"] = float(time_shift)
  card = dict(info.get("card") or {})
  card["evaluation"] = {**(card.get("evaluation") or {}), **read_evaluations(eval_dirs)}
  if notes is not None:
    card["notes"] = notes
  if data is not None:
    card["data"] = data
  info["card"] = card
  mio.write_json(os.path.join(folder, bundle.INFO_FILE), info, indent=1)
  _copy_grids(eval_dirs, folder)
  info = bundle.read_info(folder)
  mio.atomic_write_text(os.path.join(folder, "MODEL_CARD.md"), model_card(info))
  return info


# The VAE config fields that decide what its encoder makes of a part: a replacement VAE must
# agree on them (`replace_vae`), or the bundle's DiT would see latents of another space.
ENCODER_CONFIG_KEYS = ("num_points", "num_latents", "latent_channels", "enc_width", "enc_heads",
                       "enc_cross_layers", "enc_self_layers", "num_freqs", "include_pi",
                       "subset_factor", "qk_norm", "norm_eps", "gelu_exact", "mlp_ratio")


def replace_vae(folder: str, vae_dir: str) -> dict:
  """Swaps a bundle's VAE for a decoder-only fine-tune of it, keeping its DiT.

  vae_dir: a train_vae workdir (its EMA weights) that started from this bundle with its
  encoder frozen (`--config.init.from_bundle=FOLDER --config.train_encoder=false`), e.g. on
  the data pipeline's real parts. The bundle's DiT was trained on latents of the bundle's
  encoder, so the new VAE must have the same architecture, the same encoder config
  (ENCODER_CONFIG_KEYS) and the same encoder weights as stored (equal after the cast to the
  bundle's storage dtype); its decoder, its config and the card's VAE record (runs with the
  earlier ones in front, loss curve, held-out reconstruction by part size) replace the old.
  The folder is rewritten through a copy (`moca_jax.io.replace_folder`). Returns the new bundle.json.
  Raises FileNotFoundError / bundle.BundleError naming what differs.
  """
  from moca_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from moca_jax.vae_task import load_vae  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  current = bundle.read_bundle(folder)
  _, vae_params, vae_config = load_vae(vae_dir)
  old_model, new_model = current.vae_config.model, vae_config.model
  changed = [k for k in ENCODER_CONFIG_KEYS if old_model.get(k) != new_model.get(k)]
  if changed:
    raise bundle.BundleError(
        f"{vae_dir}: its encoder config differs from the bundle's in {', '.join(changed)} "
        f"(e.g. {changed[0]}: {new_model.get(changed[0])!r}, bundle "
        f"{old_model.get(changed[0])!r}); only a decoder fine-tune of {folder} can replace "
        "its VAE")
  dtype = current.info["storage_dtype"]
  encoded = bundle.encode_params(vae_params["params"], dtype)
  stored = bundle.decode_params(encoded, dtype, current.vae_params, f"{vae_dir} (EMA weights)")
  old_flat = traverse_util.flatten_dict(current.vae_params, sep="/")
  new_flat = traverse_util.flatten_dict(stored, sep="/")
  differ = [k for k in old_flat if vae_lib.is_encoder_param(k.split("/")[0])
            and not np.array_equal(np.asarray(old_flat[k]), np.asarray(new_flat[k]))]
  if differ:
    worst = max(float(np.max(np.abs(np.asarray(old_flat[k]) - np.asarray(new_flat[k]))))
                for k in differ)
    raise bundle.BundleError(
        f"{vae_dir}: {len(differ)} encoder parameters differ from the bundle's (e.g. "
        f"{differ[0]}; largest |difference| {worst:.3g}): the bundle's DiT was trained on its "
        "encoder's latents, so only a decoder fine-tune (--config.train_encoder=false) can "
        "replace its VAE")
  card = dict(current.info.get("card") or {})
  # its runs after the bundle's (it started from this bundle's weights: the encoders are
  # equal), labelled with the folder the fine-tune warm-started from (often a copy's source)
  init = vae_config.get("init") or {}
  source = os.path.normpath(init.get("from_bundle") or folder)
  summary = run_summary(vae_dir)
  card["vae"] = with_earlier_runs(summary, runs_before(card.get("vae") or {}, summary), source)
  card["vae_eval"] = _read_json(os.path.join(vae_dir, "eval.json"))
  data = vae_config.data
  share = (f", {data.analytic_fraction:.0%} of each batch analytic primitives"
           if data.source == "mixed" else "")
  later = (f"Later the VAE's decoder was fine-tuned with its encoder frozen "
           f"({data.source} data{': ' + data.dir if data.get('dir') else ''}{share}).")
  if later not in card.get("data", ""):  # a second swap of the same fine-tune says it once
    card["data"] = f"{card.get('data', '')} {later}"
  inference = _vae_inference_config(vae_config)

  def write(staging: str) -> None:
    bundle.write_bundle(staging, current.info["dit_config"], current.dit_params, inference,
                        vae_params, card=card, storage_dtype=dtype)
    copy_png_compact(os.path.join(vae_dir, "loss_curve.png"),  # the fine-tune's own curve
                     os.path.join(staging, "loss_vae.png"))
    mio.atomic_write_text(os.path.join(staging, "MODEL_CARD.md"),
                          model_card(bundle.read_info(staging)))

  mio.replace_folder(folder, write)
  return bundle.read_info(folder)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
  f = flags.FLAGS
  if f.update:
    try:
      interval = _KEEP if f.cfg_interval is None else parse_cfg_interval(f.cfg_interval)
      # bad folders or settings are refused before anything changes
      read_evaluations(f.eval_dirs)
      check_sample_updates(f.scene_cfg_scale, f.time_shift)
      if f.vae:
        replace_vae(f.update, f.vae)
        print(f"replaced the VAE of {f.update} by the decoder fine-tune in {f.vae}")
      update_card(f.update, f.eval_dirs, f.notes or None, f.scene_cfg_scale, interval,
                  f.time_shift, f.card_data or None)
    except (FileNotFoundError, ValueError) as e:
      print(f"export_bundle: error: {e}", file=sys.stderr)
      sys.exit(2)
    extra = (f"; scene inputs now default to CFG {f.scene_cfg_scale:g}"
             if f.scene_cfg_scale is not None else "")
    if f.cfg_interval is not None:
      extra += ("; guidance now at every step" if interval is None else
                f"; guidance now only at flow times {interval[0]:g} <= t <= {interval[1]:g}")
    if f.time_shift is not None:
      extra += f"; sampler time shift now {f.time_shift:g}"
    print(f"updated the card of {f.update}{extra}")
    return
  if not f.dit or not f.out:
    print("export_bundle: error: --dit and --out are required (or --update)", file=sys.stderr)
    sys.exit(2)
  try:
    info = export(f.dit, f.out, f.vae, f.eval_dirs, f.storage_dtype, f.max_mib, f.notes)
  except (FileNotFoundError, ValueError) as e:
    print(f"export_bundle: error: {e}", file=sys.stderr)
    sys.exit(2)
  total = sum(x["bytes"] for x in info["files"].values())
  print(f"wrote {f.out}: {total / MIB:.2f} MiB of weights ({info['storage_dtype']})")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
