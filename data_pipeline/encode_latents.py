r"""Encode every part of a 'samples' dataset with the frozen VAE into 'latents' shards.

  python -m data_pipeline.encode_latents --vae_checkpoint=outputs/vae \
      --input=data/tiny --output=data/tiny_latents [--batch_size=64] [--step=N]
  # K local processes on disjoint shards, then one run that writes the complete manifest:
  for i in 0 1 2 3; do python -m data_pipeline.encode_latents ... --shard_group=$i/4 & done; wait
  python -m data_pipeline.encode_latents ...
  # as an Apache Beam pipeline (one shard per element, the VAE loaded once per worker):
  python -m data_pipeline.encode_latents ... --runner=DirectRunner --direct_num_workers=2

Beam options (with --runner) pass to Beam's PipelineOptions unchanged, as for
data_pipeline.build. Exit codes: 0 encoded; 2 bad arguments, a missing input or an output
folder encoded with another VAE or settings.

--vae_checkpoint is an `experiments/train_vae.py` workdir (its orbax checkpoints are read with
`moca_jax.vae_task.load_vae`). Each input shard becomes an output shard of the same name
holding, per record, `latents` [N,L,C] f32 (the posterior mean, `VecSetVAE.encode` with
deterministic=True) plus the renders, masks, cameras, colours, bounds and metadata of the
input record (the point samples are dropped); meta.kind becomes 'latents' and meta.vae
records the checkpoint. Parts from consecutive records are packed into fixed batches of
`batch_size` parts (the last one padded), so the jitted encoder compiles once. Surface points
fed to the encoder: a seeded random subset of `num_points` of the stored ones (default: the
VAE config's num_points). Writes are atomic; manifest.json is written like the build's.

Provenance: each output shard's sidecar records what it was made from: the VAE (`vae_info`:
checkpoint, step, a hash of its parameter values, latent shape), num_points, seed, and a
digest of its input shard's sidecar (keys, byte count, the input's own provenance). On a
rerun into the same folder a shard whose provenance is unchanged is skipped (resume), a
shard whose input shard was rebuilt is re-encoded, and a folder encoded with another VAE or
other settings is refused (records.ProvenanceConflict naming the differing fields): the
manifest never names a VAE that did not make the latents. Temporary files of a killed run
are removed first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import zlib
from typing import Callable, Dict, Iterator, List, Optional

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


@dataclasses.dataclass
class EncodePlan:
  """What an encode (re)run does: `todo` the input shard paths to encode; `wanted` the
  provenance every output shard must have (by file name)."""
  input_dir: str
  output_dir: str
  num_shards: int
  num_points: int
  batch_size: int
  seed: int
  vae_info: dict
  in_manifest: dict
  wanted: Dict[str, dict]
  todo: List[str]
  removed_temps: List[str]

  def manifest(self, built: List[str], seconds: float) -> dict:
    """Writes the output manifest.json from the current output shards; returns it."""
    info = dict(source=os.path.abspath(self.input_dir), kind="latents", vae=self.vae_info,
                generator_seed=self.in_manifest.get("generator_seed"),
                input_schema_version=self.in_manifest.get("schema_version"),
                num_points=self.num_points, seed=self.seed)
    m = records.merge_manifest(
        self.output_dir, self.num_shards, info,
        is_current=lambda side: side.get("provenance") == self.wanted.get(side["file"]))
    m["built_now"] = list(built)
    m["removed_temps"] = [os.path.basename(p) for p in self.removed_temps]
    m["seconds_now"] = seconds
    return m


def plan_encode(input_dir: str, output_dir: str, num_points: int, batch_size: int = 64,
                seed: int = 0, vae_info: Optional[dict] = None) -> EncodePlan:
  """Compares the output shards present with what this run would write (see the module
  docstring); removes a killed run's temporary files. Raises records.ProvenanceConflict when
  `output_dir` was encoded with another VAE, num_points or seed (nothing is written then)."""
  in_manifest = records.load_manifest(input_dir)
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
    out_base = os.path.join(output_dir, os.path.basename(path)[:-len(".array_record")])
    if not os.path.exists(out_base + ".json"):
      todo.append(path)
      continue
    old = records.read_sidecar(out_base + ".json").get("provenance") or {}
    diff = records.config_diff({k: old.get(k, "<unset>") for k in settings}, settings)
    if diff:
      raise records.ProvenanceConflict(
          f"{output_dir}: was encoded with another VAE or settings ({'; '.join(diff)}); "
          "encode into a new --output or delete it")
    if (old.get("input") != wanted[os.path.basename(path)]["input"]
        or not os.path.exists(out_base + ".array_record")):
      todo.append(path)
  return EncodePlan(input_dir=input_dir, output_dir=output_dir,
                    num_shards=int(in_manifest["num_shards"]), num_points=int(num_points),
                    batch_size=int(batch_size), seed=int(seed), vae_info=vae_info,
                    in_manifest=in_manifest, wanted=wanted, todo=todo, removed_temps=removed)


def encode_shard(plan: EncodePlan, path: str, encode_fn: EncodeFn,
                 progress: bool = False) -> str:
  """Encodes one input shard into the output shard of the same name (atomic), then writes
  its sidecar with the provenance; returns the shard's name."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  name = os.path.basename(path)[:-len(".array_record")]
  out_base = os.path.join(plan.output_dir, name)
  raw = records.read_shard(path)
  decoded = (records.decode_record(r) for r in tqdm(raw, desc=f"encode {name}",
                                                    disable=not progress))
  keys = []
  nbytes = 0

  def gen():
    nonlocal nbytes
    for rec in encode_records(decoded, encode_fn, plan.num_points, plan.batch_size,
                              plan.seed):
      data = _latent_record(rec, plan.vae_info)
      keys.append(rec["meta"]["key"])
      nbytes += len(data)
      yield data

  n = records.write_shard(out_base + ".array_record", gen())
  skipped = records.read_sidecar(path[:-len(".array_record")] + ".json").get("skipped", [])
  records.atomic_write_json(out_base + ".json", {
      "file": name + ".array_record", "count": n,
      "bytes": os.path.getsize(out_base + ".array_record"), "payload_bytes": nbytes,
      "keys": keys, "skipped": skipped, "provenance": plan.wanted[name + ".array_record"]})
  return name


def parse_shard_group(text: str) -> Optional[tuple[int, int]]:
  """'i/K' -> (i, K) with 0 <= i < K ('' -> None). Raises ValueError naming --shard_group."""
  if not text:
    return None
  try:
    i, k = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard_group: expected 'i/K' (e.g. 0/4), got {text!r}") from None
  if not 0 <= i < k:
    raise ValueError(f"--shard_group: expected 0 <= i < K, got {text!r}")
  return i, k


def encode_dataset(input_dir: str, output_dir: str, encode_fn: EncodeFn, num_points: int,
                   batch_size: int = 64, seed: int = 0, vae_info: Optional[dict] = None,
                   progress: bool = True,
                   shard_group: Optional[tuple[int, int]] = None) -> dict:
  """Encodes every finished input shard into `output_dir` in this process; returns the output
  manifest. Raises as `plan_encode`. (`data_pipeline.beam_build.run_encode` runs the same
  shards on a Beam runner.)

  shard_group (i, K): only the input shards at positions i, i + K, i + 2K, ... of those left
  to do, so K processes started with i = 0..K-1 encode disjoint shards in parallel; a last
  run without a group then finds every shard current (provenance) and writes the complete
  manifest.
  """
  plan = plan_encode(input_dir, output_dir, num_points, batch_size, seed, vae_info)
  todo = plan.todo
  if shard_group is not None:
    i, k = shard_group
    todo = [p for j, p in enumerate(records.shard_paths(input_dir)) if j % k == i and p in todo]
  t0 = time.time()
  built = [encode_shard(plan, path, encode_fn, progress) for path in todo]
  return plan.manifest(built, time.time() - t0)


def vae_encode_fn(model, params) -> EncodeFn:
  """Jitted deterministic encoder: (points [B,P,3], normals [B,P,3]) -> mean [B,L,C] numpy."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def enc(pts, nrm):
    mean, _ = model.apply(params, pts, nrm, deterministic=True, method=type(model).encode)
    return mean

  return lambda p, n: np.asarray(enc(p, n))


def params_digest(params) -> str:
  """Hash of a parameter tree's values (leaf order is the tree's), identifying the VAE that
  made latents even when a workdir is retrained in place."""
  import jax  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


class LatentsMismatchError(ValueError):
  """Latent shards that do not fit the DiT config that would train on them."""


def check_latents_pairing(latents_dir: str, vae_workdir: Optional[str], latent_tokens: int,
                          latent_channels: int) -> None:
  """Latents made by one VAE must train a DiT whose generations that VAE decodes.

  Compares the VAE recorded in `latents_dir`'s manifest (written by this module) with the
  DiT's vecset shape [latent_tokens, latent_channels] and, when given, with `vae_workdir` (the
  DiT config's vae.workdir, the VAE generation will decode with). A folder without a VAE
  record (not made by this module) is not checked.

  Raises:
    LatentsMismatchError (a ValueError): naming the folder and every differing field.
  """
  vae = (records.load_manifest(latents_dir).get("vae") or {})
  if not vae:
    return
  diffs = []
  for name, got, want in (("latent tokens", vae.get("num_latents"), latent_tokens),
                          ("latent channels", vae.get("latent_channels"), latent_channels)):
    if got is not None and int(got) != int(want):
      diffs.append(f"{name} {got} (latents) vs {want} (DiT)")
  made_by = vae.get("checkpoint")
  if vae_workdir and made_by and os.path.abspath(vae_workdir) != os.path.abspath(made_by):
    diffs.append(f"encoded by the VAE {made_by}, but the config's vae.workdir is "
                 f"{os.path.abspath(vae_workdir)}")
  if diffs:
    raise LatentsMismatchError(
        f"{latents_dir}: latents do not match the DiT config: {'; '.join(diffs)}")


class CheckpointEncoder:
  """Picklable factory of the jitted encoder of a `train_vae` checkpoint, so that each Beam
  worker loads the VAE once (in `DoFn.setup`) instead of receiving it."""

  def __init__(self, checkpoint: str, step: Optional[int] = None):
    self.checkpoint, self.step = checkpoint, step

  def load(self):
    """(encode_fn, vae_info, the VAE config's num_points)."""
    from moca_jax.vae_task import load_vae  # pylint: disable=g-import-not-at-top
    model, params, config = load_vae(self.checkpoint, self.step)
    if "params" not in params:
      params = {"params": params}
    info = dict(checkpoint=os.path.abspath(self.checkpoint), step=self.step,
                params_sha256=params_digest(params), num_latents=int(config.model.num_latents),
                latent_channels=int(config.model.latent_channels), size=str(config.model.size))
    return vae_encode_fn(model, params), info, int(config.model.num_points)

  def __call__(self) -> EncodeFn:
    return self.load()[0]


def main(argv: List[str]) -> int:
  """Parses our flags, hands the rest to Beam when --runner is given; returns the exit code."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    rest = f(argv, known_only=True)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  beam_args = rest[1:]
  error = records.cli_argument_error(
      {n: f[n].value for n in ("vae_checkpoint", "input", "output")}, beam_args)
  if error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  use_beam = bool(beam_args)
  try:
    shard_group = parse_shard_group(f.shard_group)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if shard_group and use_beam:
    print("error: --shard_group is for parallel local runs, not with a Beam --runner",
          file=sys.stderr)
    return 2
  factory = CheckpointEncoder(f.vae_checkpoint, f.step)
  encode_fn, info, vae_points = factory.load()
  num_points = f.num_points or vae_points
  try:
    if use_beam:
      from data_pipeline import beam_build  # pylint: disable=g-import-not-at-top
      plan = plan_encode(f.input, f.output, num_points, f.batch_size, f.seed, info)
      m = beam_build.run_encode(plan, factory, beam_args)
    else:
      m = encode_dataset(f.input, f.output, encode_fn, num_points, f.batch_size, f.seed, info,
                         f.progress, shard_group)
  except (ValueError, FileNotFoundError) as e:  # missing input, a conflicting --output
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: m[k] for k in ("count", "bytes", "num_shards", "complete",
                                      "built_now")}))
  return 0


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("vae_checkpoint", None, "experiments/train_vae.py workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("input", None, "Input 'samples' dataset directory.")
  flags.DEFINE_string("output", None, "Output 'latents' dataset directory.")
  flags.DEFINE_integer("batch_size", 64, "Parts per encoder call (fixed shape).")
  flags.DEFINE_integer("num_points", 0, "Surface points per part (0 = the VAE config's).")
  flags.DEFINE_integer("seed", 0, "Seed of the surface point subsets.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.DEFINE_string("shard_group", "", "'i/K': encode only every K-th shard from the i-th "
                      "(K parallel processes; then one run without it writes the manifest).")
  sys.exit(main(sys.argv))
