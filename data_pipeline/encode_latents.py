r"""Encode every part of a 'samples' dataset with the frozen VAE into 'latents' shards.

  python -m data_pipeline.encode_latents --vae_checkpoint=outputs/vae \
      --input=data/tiny --output=data/tiny_latents [--batch_size=64] [--step=N]

--vae_checkpoint is an `experiments/train_vae.py` workdir (its orbax checkpoints are read with
`experiments.train_vae.load_vae`). Each input shard becomes an output shard of the same name
holding, per record, `latents` [N,L,C] f32 (the posterior mean, `VecSetVAE.encode` with
deterministic=True) plus the renders, masks, cameras, colours, bounds and metadata of the
input record (the point samples are dropped); meta.kind becomes 'latents' and meta.vae
records the checkpoint. Parts from consecutive records are packed into fixed batches of
`batch_size` parts (the last one padded), so the jitted encoder compiles once. Surface points
fed to the encoder: a seeded random subset of `num_points` of the stored ones (default: the
VAE config's num_points). Writes are atomic; manifest.json is written like the build's.

Provenance: each output shard's sidecar records what it was made from: the VAE (`vae_info`:
checkpoint, step, latent shape), num_points, seed, and a digest of its input shard's sidecar
(keys, byte count, the input's own provenance). On a rerun into the same folder a shard
whose provenance is unchanged is skipped (resume), a shard whose input shard was rebuilt is
re-encoded, and a folder encoded with another VAE or other settings is refused
(records.ProvenanceConflict naming the differing fields): the manifest never names a VAE
that did not make the latents. Temporary files of a killed run are removed first.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from typing import Callable, Iterator, List, Optional

import numpy as np

from data_pipeline import records

KEEP_KEYS = ("part_colors", "part_bounds", "images", "masks", "cameras")
EncodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _subset(rec: dict, num_points: int, seed: int):
  pts, nrm = rec["surface_points"], rec["surface_normals"]
  have = pts.shape[1]
  if have < num_points:
    raise ValueError(f"record {rec['meta'].get('key')}: has {have} surface points per part, "
                     f"the encoder needs {num_points}")
  if have > num_points:
    rng = np.random.default_rng([seed, zlib.crc32(str(rec["meta"].get("key")).encode())])
    idx = np.sort(rng.choice(have, size=num_points, replace=False))
    pts, nrm = pts[:, idx], nrm[:, idx]
  return pts.astype(np.float32), nrm.astype(np.float32)


def encode_records(recs: Iterator[dict], encode_fn: EncodeFn, num_points: int,
                   batch_size: int, seed: int = 0) -> Iterator[dict]:
  """Yields each record with `latents` [N,L,C], in input order (parts packed across records)."""
  pending: List[dict] = []
  inputs_p: List[np.ndarray] = []
  inputs_n: List[np.ndarray] = []
  outputs: List[np.ndarray] = []

  def run(final: bool):
    nonlocal inputs_p, inputs_n
    while inputs_p and (final or sum(len(x) for x in inputs_p) >= batch_size):
      p = np.concatenate(inputs_p)
      n = np.concatenate(inputs_n)
      take = min(batch_size, len(p))
      bp, bn = p[:take], n[:take]
      if take < batch_size:  # pad the last batch to the fixed shape
        reps = batch_size - take
        bp = np.concatenate([bp, np.repeat(bp[:1], reps, 0)])
        bn = np.concatenate([bn, np.repeat(bn[:1], reps, 0)])
      outputs.append(np.asarray(encode_fn(bp, bn))[:take])
      inputs_p, inputs_n = [p[take:]], [n[take:]]
      if len(inputs_p[0]) == 0:
        inputs_p, inputs_n = [], []

  def ready():
    done = sum(len(o) for o in outputs)
    out = []
    while pending and done >= pending[0]["meta"]["num_parts"]:
      rec = pending.pop(0)
      n = rec["meta"]["num_parts"]
      lat = np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
      rec["latents"] = lat[:n].astype(np.float32)
      rest = lat[n:]
      outputs.clear()
      if len(rest):
        outputs.append(rest)
      done -= n
      out.append(rec)
    return out

  for rec in recs:
    pts, nrm = _subset(rec, num_points, seed)
    pending.append(rec)
    inputs_p.append(pts)
    inputs_n.append(nrm)
    run(final=False)
    yield from ready()
  run(final=True)
  yield from ready()
  if pending:
    raise AssertionError("encode_records: parts left unencoded")


def _latent_record(rec: dict, vae_info: dict) -> bytes:
  meta = dict(rec["meta"])
  meta.update(kind="latents", vae=vae_info, latent_shape=list(rec["latents"].shape[1:]))
  meta.pop("sample_config", None)
  arrays = {k: rec[k] for k in KEEP_KEYS if k in rec}
  arrays["latents"] = rec["latents"]
  return records.encode_record(arrays, meta)


def _input_digest(sidecar: dict) -> str:
  text = json.dumps({k: sidecar.get(k) for k in ("keys", "bytes", "count", "provenance")},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_dataset(input_dir: str, output_dir: str, encode_fn: EncodeFn, num_points: int,
                   batch_size: int = 64, seed: int = 0, vae_info: Optional[dict] = None,
                   progress: bool = True) -> dict:
  """Encodes every finished input shard into `output_dir`; returns the output manifest.

  Raises records.ProvenanceConflict when `output_dir` holds shards encoded with another VAE,
  num_points or seed (nothing is written then).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  in_manifest = records.load_manifest(input_dir)
  num_shards = int(in_manifest["num_shards"])
  paths = records.shard_paths(input_dir)
  os.makedirs(output_dir, exist_ok=True)
  removed = records.remove_stale_temps(output_dir)
  vae_info = json.loads(json.dumps(dict(vae_info or {})))
  settings = dict(vae=vae_info, num_points=int(num_points), seed=int(seed))
  wanted = {}  # output shard file -> provenance
  for path in paths:
    side = records.read_sidecar(path[:-len(".array_record")] + ".json")
    wanted[os.path.basename(path)] = dict(settings, input=dict(
        file=os.path.basename(path), digest=_input_digest(side)))
  todo = []
  for path in paths:
    name = os.path.basename(path)[:-len(".array_record")]
    out_base = os.path.join(output_dir, name)
    if not os.path.exists(out_base + ".json"):
      todo.append(path)
      continue
    old = records.read_sidecar(out_base + ".json").get("provenance") or {}
    diff = records.config_diff({k: old.get(k, "<unset>") for k in settings}, settings)
    if diff:
      raise records.ProvenanceConflict(
          f"{output_dir}: was encoded with another VAE or settings ({'; '.join(diff)}); "
          "encode into a new --output or delete it")
    if (old.get("input") != wanted[name + ".array_record"]["input"]
        or not os.path.exists(out_base + ".array_record")):
      todo.append(path)
  t0 = time.time()
  built = []
  for path in todo:
    name = os.path.basename(path)[:-len(".array_record")]
    out_base = os.path.join(output_dir, name)
    raw = records.read_shard(path)
    decoded = (records.decode_record(r) for r in tqdm(raw, desc=f"encode {name}",
                                                      disable=not progress))
    keys = []
    nbytes = 0

    def gen():
      nonlocal nbytes
      for rec in encode_records(decoded, encode_fn, num_points, batch_size, seed):
        data = _latent_record(rec, vae_info)
        keys.append(rec["meta"]["key"])
        nbytes += len(data)
        yield data

    n = records.write_shard(out_base + ".array_record", gen())
    skipped = records.read_sidecar(path[:-len(".array_record")] + ".json").get("skipped", [])
    records.atomic_write_json(out_base + ".json", {
        "file": name + ".array_record", "count": n,
        "bytes": os.path.getsize(out_base + ".array_record"), "payload_bytes": nbytes,
        "keys": keys, "skipped": skipped, "provenance": wanted[name + ".array_record"]})
    built.append(name)
  info = dict(source=os.path.abspath(input_dir), kind="latents", vae=vae_info,
              generator_seed=in_manifest.get("generator_seed"),
              input_schema_version=in_manifest.get("schema_version"), num_points=num_points,
              seed=seed)
  manifest = records.merge_manifest(
      output_dir, num_shards, info,
      is_current=lambda side: side.get("provenance") == wanted.get(side["file"]))
  manifest["built_now"] = built
  manifest["removed_temps"] = [os.path.basename(p) for p in removed]
  manifest["seconds_now"] = time.time() - t0
  return manifest


def vae_encode_fn(model, params) -> EncodeFn:
  """Jitted deterministic encoder: (points [B,P,3], normals [B,P,3]) -> mean [B,L,C] numpy."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def enc(pts, nrm):
    mean, _ = model.apply(params, pts, nrm, deterministic=True, method=type(model).encode)
    return mean

  return lambda p, n: np.asarray(enc(p, n))


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments.train_vae import load_vae  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  model, params, config = load_vae(f.vae_checkpoint, f.step)
  if "params" not in params:
    params = {"params": params}
  num_points = f.num_points or int(config.model.num_points)
  info = dict(checkpoint=os.path.abspath(f.vae_checkpoint), step=f.step,
              num_latents=int(config.model.num_latents),
              latent_channels=int(config.model.latent_channels), size=str(config.model.size))
  m = encode_dataset(f.input, f.output, vae_encode_fn(model, params), num_points,
                     f.batch_size, f.seed, info, f.progress)
  print(json.dumps({k: m[k] for k in ("count", "bytes", "num_shards", "complete",
                                      "built_now")}))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("vae_checkpoint", None, "experiments/train_vae.py workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("input", None, "Input 'samples' dataset directory.")
  flags.DEFINE_string("output", None, "Output 'latents' dataset directory.")
  flags.DEFINE_integer("batch_size", 64, "Parts per encoder call (fixed shape).")
  flags.DEFINE_integer("num_points", 0, "Surface points per part (0 = the VAE config's).")
  flags.DEFINE_integer("seed", 0, "Seed of the surface point subsets.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.mark_flags_as_required(["vae_checkpoint", "input", "output"])
  app.run(main)
