"""Building dataset shards (the library behind `python -m data_pipeline.build`).

  resolve_source('procedural:tiny' | DIR, base_seed) -> list of work items
  build_record(work_item, cfg) -> (key, record bytes)      raises ValueError on bad input
  build(source, out, num_shards=1, shard_index=-1, cfg=BuildConfig(), workers=0) -> manifest

Sharding: item k goes to shard k % num_shards. A shard is finished when its ArrayRecord file
and its sidecar JSON exist (the sidecar is written after the shard's atomic rename), so a
killed build resumes by skipping finished shards and rebuilding the rest from scratch: no
duplicates, no partial shard. Bad inputs are skipped and listed with their reason in the
sidecar and in manifest.json. Randomness: item generation, sampling and camera choice are
seeded by (base_seed, item key), so a shard's content does not depend on workers or order.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
import zlib
from typing import List, Optional, Tuple

import numpy as np

from data_pipeline import ingest as ingest_lib
from data_pipeline import procedural, records, render, sampling


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  sample: sampling.SampleConfig = sampling.SampleConfig()
  ingest: ingest_lib.IngestConfig = ingest_lib.IngestConfig()
  image_size: int = 224
  num_views: int = 2
  render_segments: int = 32
  base_seed: int = 0
  num_previews: int = 4  # PNG previews per shard (render | mask), 0 = none

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class WorkItem:
  key: str
  procedural: Optional[procedural.Item] = None
  path: Optional[str] = None


def resolve_source(source: str, base_seed: int = 0) -> List[WorkItem]:
  """'procedural:SPLIT[:objects|:scenes]' -> the split's items (both kinds unless one is
  named); a directory -> its object inputs (sorted)."""
  if source.startswith("procedural:"):
    split, _, which = source.split(":", 1)[1].partition(":")
    kinds = {"": ("object", "scene"), "objects": ("object",), "scenes": ("scene",)}
    if which not in kinds:
      raise ValueError(f"{source}: expected procedural:SPLIT[:objects|:scenes]")
    return [WorkItem(key=it.key, procedural=it)
            for it in procedural.split_items(split, base_seed, kinds[which])]
  items = ingest_lib.list_inputs(source)
  root = os.path.abspath(source)
  return [WorkItem(key="user/" + os.path.relpath(os.path.abspath(p), root), path=p)
          for p in items]


def _rng(cfg: BuildConfig, key: str, stream: int) -> np.random.Generator:
  return np.random.default_rng([cfg.base_seed, zlib.crc32(key.encode()), stream])


def _common_arrays(meshes, colors, cameras, cfg, background=()):
  images, masks = render.render_views(meshes, colors, cameras, cfg.image_size, background)
  bounds = np.stack([m.bounds for m in meshes]).astype(np.float32)
  return dict(part_colors=np.asarray(colors, np.uint8), part_bounds=bounds, images=images,
              masks=masks, cameras=np.stack([c.as_array() for c in cameras]))


def build_record(w: WorkItem, cfg: BuildConfig) -> Tuple[str, bytes]:
  """Builds one record (samples + renders + metadata). Bad input -> ValueError naming it."""
  rng = _rng(cfg, w.key, 1)
  cam_rng = _rng(cfg, w.key, 2)
  if w.procedural is not None:
    s = w.procedural.generate()
    shapes = s.parts
    meshes = [p.to_mesh(cfg.render_segments) for p in s.parts]
    colors = s.colors
    names = s.meta["part_names"]
    meta = dict(source="procedural", type=s.kind, category=s.category,
                split=w.procedural.split, index=w.procedural.index,
                base_seed=w.procedural.base_seed)
    background = s.background
  else:
    obj = ingest_lib.load_object(w.path, cfg.ingest)
    shapes = meshes = obj.parts
    colors = procedural.random_colors(rng, len(meshes))
    names = obj.names
    meta = dict(source=os.path.abspath(w.path), type="object", category="user",
                dropped_parts=obj.dropped, merged_parts=obj.merged,
                max_part_iou=obj.max_iou, normalization=dict(
                    center=np.asarray(obj.center).tolist(), scale=float(obj.scale)))
    background = ()
  if meta["type"] == "scene":
    cams = render.scene_cameras(cam_rng, cfg.num_views)
  else:
    radius = max(float(np.linalg.norm(m.vertices, axis=1).max()) for m in meshes)
    cams = render.object_cameras(cam_rng, cfg.num_views, radius=radius)
  arrays = _common_arrays(meshes, colors, cams, cfg, background)
  arrays.update(sampling.sample_parts(shapes, rng, cfg.sample))
  meta.update(kind="samples", key=w.key, num_parts=len(shapes), part_names=list(names),
              image_size=cfg.image_size, num_views=cfg.num_views,
              sample_config=dataclasses.asdict(cfg.sample))
  return w.key, records.encode_record(arrays, meta)


def _build_safe(args):
  w, cfg = args
  try:
    key, data = build_record(w, cfg)
    return key, data, None
  except Exception as e:  # pylint: disable=broad-except  (a batch build never crashes)
    name = w.path or w.key
    reason = str(e)
    if reason.startswith(f"{name}: "):
      reason = reason[len(name) + 2:]
    if not isinstance(e, (ValueError, OSError)):
      reason = f"{type(e).__name__}: {reason}"
    return w.key, None, {"input": name, "reason": reason}


def _write_previews(out_dir, key, data, cfg):
  rec = records.decode_record(data)
  os.makedirs(os.path.join(out_dir, "previews"), exist_ok=True)
  img = render.preview(rec["images"][0], rec["masks"][0], rec["part_colors"])
  name = key.replace("/", "_") + ".png"
  render.save_png(os.path.join(out_dir, "previews", name), img)


def build_shard(items: List[WorkItem], path: str, cfg: BuildConfig, pool=None,
                progress: bool = True, desc: str = "") -> dict:
  """Builds one shard from `items` (atomic) and returns its sidecar dict (not yet written)."""
  from tqdm import tqdm
  args = [(w, cfg) for w in items]
  it = pool.imap(_build_safe, args) if pool is not None else map(_build_safe, args)
  keys, skipped, nbytes = [], [], 0
  out_dir = os.path.dirname(path)

  def gen():
    nonlocal nbytes
    for key, data, bad in tqdm(it, total=len(items), desc=desc, disable=not progress):
      if bad is not None:
        skipped.append(bad)
        continue
      if len(keys) < cfg.num_previews:
        _write_previews(out_dir, key, data, cfg)
      keys.append(key)
      nbytes += len(data)
      yield data

  n = records.write_shard(path, gen())
  return {"file": os.path.basename(path), "count": n, "bytes": os.path.getsize(path),
          "payload_bytes": nbytes, "keys": keys, "skipped": skipped}


def build(source: str, out: str, num_shards: int = 1, shard_index: int = -1,
          cfg: BuildConfig = BuildConfig(), workers: int = 0, progress: bool = True) -> dict:
  """Builds (or resumes) the shards of `source` into `out`; returns the merged manifest.

  shard_index = -1 builds every unfinished shard; otherwise just that one (for S parallel
  jobs). workers > 1 uses a multiprocessing pool (spawn) over the items of each shard.
  """
  if num_shards < 1 or not -1 <= shard_index < num_shards:
    raise ValueError(f"bad sharding: num_shards={num_shards}, shard_index={shard_index}")
  items = resolve_source(source, cfg.base_seed)
  os.makedirs(out, exist_ok=True)
  todo = range(num_shards) if shard_index < 0 else [shard_index]
  pool = None
  if workers > 1:
    pool = multiprocessing.get_context("spawn").Pool(workers)
  t0 = time.time()
  built = []
  try:
    for s in todo:
      base = os.path.join(out, records.shard_name(s, num_shards))
      if os.path.exists(base + ".array_record") and os.path.exists(base + ".json"):
        continue  # finished earlier: resume skips it
      side = build_shard(items[s::num_shards], base + ".array_record", cfg, pool, progress,
                         desc=f"shard {s + 1}/{num_shards}")
      records.atomic_write_json(base + ".json", side)
      built.append(s)
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  info = dict(source=source, generator_seed=cfg.base_seed, config=cfg.to_json(),
              num_items=len(items), kind="samples")
  manifest = records.merge_manifest(out, num_shards, info)
  manifest["built_now"] = built
  manifest["seconds_now"] = time.time() - t0
  return manifest
