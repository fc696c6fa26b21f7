"""Record schema and ArrayRecord shard I/O.

One record = one object or scene, serialised with `numpy.savez_compressed` into bytes
(`encode_record` / `decode_record`; no pickle, loadable with plain numpy). Keys
(N parts/instances, V views, H = W = image size):

  meta_json        uint8 [bytes]  UTF-8 JSON: schema_version, kind ('samples'|'latents'),
                                  key (unique id), source, type ('object'|'scene'), category,
                                  num_parts, part_names, seed info, normalisation, config
  part_colors      uint8 [N,3]    render colour of each component
  part_bounds      f32 [N,2,3]    min/max corner of each component (normalised frame)
  images           uint8 [V,H,W,3] shaded renders on white
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
'group_size:1' (random access) to a hidden temporary name then renamed (moca_jax.io), each with a sidecar
`shard-IIIII-of-SSSSS.json` (count, bytes, keys, skipped inputs); `manifest.json` merges them.
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import Dict, Iterable, List

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


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (moca_jax.io.atomic_write_bytes)."""
  mio.atomic_write_bytes(path, data)


def atomic_write_json(path: str, obj) -> None:
  """Writes `obj` as sorted JSON (indent 1) atomically (moca_jax.io.write_json)."""
  mio.write_json(path, obj, indent=1)


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


def load_manifest(directory: str) -> dict:
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing manifest")
  with open(path) as f:
    return json.load(f)


def merge_manifest(directory: str, num_shards: int, info: dict) -> dict:
  """(Re)writes manifest.json from the shard sidecars present; returns it."""
  shards, skipped = [], []
  count = nbytes = 0
  for i in range(num_shards):
    side = os.path.join(directory, shard_name(i, num_shards) + ".json")
    if not os.path.exists(side):
      continue
    with open(side) as f:
      s = json.load(f)
    shards.append({"file": s["file"], "count": s["count"], "bytes": s["bytes"]})
    skipped += s["skipped"]
    count += s["count"]
    nbytes += s["bytes"]
  manifest = dict(info)
  manifest.update(schema_version=SCHEMA_VERSION, num_shards=num_shards, shards=shards,
                  count=count, bytes=nbytes, skipped=skipped,
                  complete=len(shards) == num_shards)
  atomic_write_json(os.path.join(directory, "manifest.json"), manifest)
  return manifest
