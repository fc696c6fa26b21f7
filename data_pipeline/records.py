"""Record schema and ArrayRecord shard I/O.

One record = one object or scene, serialised with `numpy.savez_compressed` into bytes
(`encode_record` / `decode_record`; no pickle, loadable with plain numpy). Keys
(N parts/instances, V views, H = W = image size):

  meta_json        uint8 [bytes]  UTF-8 JSON: schema_version, kind ('samples'|'latents'),
                                  key (unique id), source, type ('object'|'scene'), category,
                                  num_parts, part_names, seed info, normalisation, config
  part_colors      uint8 [N,3]    a distinct colour per component, for pictures (previews,
                                  colourised masks); not the colours of `images`
  part_bounds      f32 [N,2,3]    min/max corner of each component (normalised frame)
  images           uint8 [V,H,W,3] shaded renders on white, one material per object: an
                                  object in one random colour, a scene's instances each in
                                  their own (make.material_colors)
  masks            uint8 [V,H,W]  0 = background, i + 1 = component i (parts for objects,
                                  instances for scenes); instance-on-white views are
                                  `where(masks == i + 1, images, 255)`
  cameras          f32 [V,18]     camera-to-world 4x4 (row-major, OpenGL), fov_deg,
                                  ortho_half_height (0 = perspective)
 kind 'samples' adds (see data_pipeline/sampling.py):
  surface_points   f32 [N,Ns,3]; surface_normals f32 [N,Ns,3]
  sdf_points       f32 [N,Nq,3]; sdf_values f32 [N,Nq] (negative inside)
 kind 'latents' adds (see data_pipeline/encode_latents.py):
  latents          f32 [N,L,C]  (posterior means of the frozen VAE)

All geometry is in the item's normalised frame ([-1,1]^3, +y up); scene instances are in the
scene's frame. Shards: `shard-IIIII-of-SSSSS.array_record` written with options
'group_size:1' (random access) to a temporary name then renamed, each with a sidecar
`shard-IIIII-of-SSSSS.json` (count, bytes, keys, skipped inputs = the dead letters, repaired
parts, and the shard's provenance: what it was made from, see data_pipeline/make.py and
encode_latents.py); `manifest.json` merges the sidecars of the shards that are current.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from moca_jax import io as mio

SCHEMA_VERSION = 1
SAMPLE_KEYS = ("surface_points", "surface_normals", "sdf_points", "sdf_values")
COMMON_KEYS = ("part_colors", "part_bounds", "images", "masks", "cameras")


def encode_record(arrays: Dict[str, np.ndarray], meta: dict) -> bytes:
  """Serialises arrays + JSON metadata to bytes (numpy savez_compressed)."""
  if "meta_json" in arrays:
    raise ValueError("'meta_json' is reserved")
  meta = dict(meta)
  meta.setdefault("schema_version", SCHEMA_VERSION)
  buf = io.BytesIO()
  payload = {k: np.asarray(v) for k, v in arrays.items()}
  payload["meta_json"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
  np.savez_compressed(buf, **payload)
  return buf.getvalue()


def decode_record(data: bytes) -> Dict[str, np.ndarray]:
  """Inverse of encode_record: dict of arrays plus 'meta' (the parsed JSON dict)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    out = {k: z[k] for k in z.files}
  out["meta"] = json.loads(out.pop("meta_json").tobytes().decode())
  return out


def shard_name(index: int, num_shards: int) -> str:
  return f"shard-{index:05d}-of-{num_shards:05d}"


def cli_argument_error(required: dict, beam_args: List[str]) -> Optional[str]:
  """The one-line error of the data CLIs (build, encode_latents) for missing required flags
  ({name: value}) or arguments left over for Beam without --runner; None when fine."""
  missing = [name for name, value in required.items() if not value]
  if missing:
    return f"--{' and --'.join(missing)} required"
  if beam_args and not any(a.startswith("--runner") for a in beam_args):
    return f"unknown arguments {' '.join(beam_args)} (Beam options need --runner)"
  return None


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (moca_jax.io.atomic_write_bytes)."""
  mio.atomic_write_bytes(path, data)


def atomic_write_json(path: str, obj) -> None:
  """Writes `obj` as sorted JSON (indent 1) atomically (moca_jax.io.write_json)."""
  mio.write_json(path, obj, indent=1)


class ProvenanceConflict(ValueError):
  """An output folder holds shards made from other inputs or settings than a rerun's, and
  rebuilding them silently would mix two datasets: the message names the differences."""


# `<name>.tmp-<pid>` temporaries of the shard writer before it used moca_jax.io.
_LEGACY_TEMP_RE = re.compile(r"^shard-.+\.tmp-(?P<pid>\d+)$")


def _pid_dead(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def remove_stale_temps(directory: str) -> List[str]:
  """Deletes the temporary files a killed build or encode left in a dataset folder (those of
  `moca_jax.io.atomic_path` and the older `shard-*.tmp-<pid>` ones) whose writer is dead;
  returns the paths removed."""
  removed = mio.remove_stale_temps(directory)
  if os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      m = _LEGACY_TEMP_RE.match(name)
      if m and int(m.group("pid")) != os.getpid() and _pid_dead(int(m.group("pid"))):
        os.remove(os.path.join(directory, name))
        removed.append(os.path.join(directory, name))
  return removed


def read_sidecar(path: str) -> dict:
  """A shard's sidecar JSON (ValueError naming the file when it is not valid JSON)."""
  return mio.read_json(path)


def config_diff(old: dict, new: dict, prefix: str = "") -> List[str]:
  """'field: old -> new' for every leaf that differs between two nested config dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
    name = f"{prefix}{k}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_diff(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
  return out


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes records to an ArrayRecord file atomically; returns the number written.

  The records go to a hidden temporary file beside `path` (moca_jax.io.atomic_path), renamed
  onto `path` only when every record is written: a failure leaves no partial shard.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  n = 0
  with mio.atomic_path(path) as tmp:
    w = ArrayRecordWriter(tmp, "group_size:1")
    try:
      for r in records:
        w.write(r)
        n += 1
    finally:
      w.close()
  return n


def read_shard(path: str) -> List[bytes]:
  """All records of one ArrayRecord shard, in order."""
  from array_record.python.array_record_module import ArrayRecordReader
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such shard")
  r = ArrayRecordReader(path)
  try:
    return list(r.read_all())
  finally:
    r.close()


def shard_paths(directory: str) -> List[str]:
  """Finished shards of a dataset directory (sorted), i.e. those with a sidecar JSON."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: not a dataset directory")
  out = []
  for p in sorted(glob.glob(os.path.join(directory, "shard-*.array_record"))):
    if os.path.exists(p[:-len(".array_record")] + ".json"):
      out.append(p)
  if not out:
    raise FileNotFoundError(f"{directory}: no finished shards (shard-*.array_record + .json)")
  return out


def dataset_dirs(spec: str) -> List[str]:
  """The folders of a dataset spec: one folder, or several joined by commas ("a,b"), so that
  one training run reads datasets built separately (for example the same split built with
  two generator seeds). ValueError for an empty spec."""
  dirs = [d.strip() for d in str(spec).split(",") if d.strip()]
  if not dirs:
    raise ValueError(f"{spec!r}: no dataset folder given")
  return dirs


def dataset_shard_paths(spec: str) -> List[str]:
  """`shard_paths` of every folder of `spec` (see `dataset_dirs`), concatenated in the order
  given: records are numbered across the folders in that order."""
  return [p for d in dataset_dirs(spec) for p in shard_paths(d)]


def load_manifest(directory: str) -> dict:
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing manifest")
  with open(path) as f:
    return json.load(f)


def merge_manifest(directory: str, num_shards: int, info: dict,
                   is_current: Optional[Callable[[dict], bool]] = None) -> dict:
  """(Re)writes manifest.json from the finished shards and returns it.

  A shard counts when its ArrayRecord file and its sidecar exist and, given `is_current`,
  `is_current(sidecar)` holds (its provenance matches what the caller would build now);
  `complete` is true only when every shard counts, so the manifest never claims records
  that are not there. `skipped` lists the dead letters (bad inputs with their reason) and
  `repaired` the parts made watertight (see data_pipeline/ingest.py).
  """
  shards, skipped, repaired = [], [], []
  count = nbytes = 0
  for i in range(num_shards):
    base = os.path.join(directory, shard_name(i, num_shards))
    if not (os.path.exists(base + ".json") and os.path.exists(base + ".array_record")):
      continue
    s = read_sidecar(base + ".json")
    if is_current is not None and not is_current(s):
      continue
    shards.append({"file": s["file"], "count": s["count"], "bytes": s["bytes"]})
    skipped += s["skipped"]
    repaired += s.get("repaired", [])
    count += s["count"]
    nbytes += s["bytes"]
  manifest = dict(info)
  manifest.update(schema_version=SCHEMA_VERSION, num_shards=num_shards, shards=shards,
                  count=count, bytes=nbytes, skipped=skipped, repaired=repaired,
                  complete=len(shards) == num_shards)
  atomic_write_json(os.path.join(directory, "manifest.json"), manifest)
  return manifest
