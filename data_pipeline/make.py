"""Building dataset shards (the library behind `python -m data_pipeline.build`).

  resolve_source('procedural:tiny' | DIR, base_seed) -> list of work items
  build_record(work_item, cfg) -> (key, record bytes)      raises ValueError on bad input
  plan_build(source, out, num_shards, cfg) -> BuildPlan    what to build, what is finished
  build(source, out, num_shards=1, shard_index=-1, cfg=BuildConfig(), workers=0) -> manifest
  (`data_pipeline.beam_build` runs the same plan and the same record/shard functions as an
  Apache Beam pipeline.)

Sharding: an item goes to shard crc32(key) % num_shards, so its shard depends on its key
only (adding an input touches one shard), and a shard holds its items in source order.
Provenance: every shard's sidecar JSON records what the shard was made from: the hash and
the fields of the record-shaping config (`config_hash`), and every input key with a
fingerprint of its files (size and mtime of each file; procedural items: their key). A shard
is finished when its ArrayRecord file and its sidecar exist (the sidecar is written after
the shard's atomic rename) and the sidecar's provenance equals the current one. On a rerun:
  * finished shards are skipped (resume after a kill: no duplicates, no partial shard);
  * a shard whose inputs changed (a mesh added, removed or edited) is rebuilt;
  * a folder built with another config (e.g. --n_surface=1024 after 512) or another shard
    count is refused with the differing fields (BuildConflict): use a new --out;
  * temporary files of a killed writer are removed first (by a run over all shards only: a
    hand-split job cannot tell whether a writer on another machine is alive).
The manifest counts only finished shards, so it never claims what the records do not hold.
Bad inputs are skipped and listed with their reason in the sidecar and in manifest.json
(the dead-letter list). Randomness: item generation, sampling and camera choice are seeded
by (base_seed, item key), so a shard's content does not depend on workers or order.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import time
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from data_pipeline import ingest as ingest_lib
from data_pipeline import procedural, records, render, sampling

# Bump when the records built from one config change (new fields, other sampling): a
# folder built by another pipeline version is then refused like one of another config.
# 3: object renders use one material per object (`render.material_colors`), not one per part.
PIPELINE_VERSION = 3


class BuildConflict(records.ProvenanceConflict):
  """The output folder holds shards made from another config or shard count."""


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

  def record_config(self) -> dict:
    """The fields that shape the records (previews are not records), JSON-ready."""
    out = json.loads(json.dumps(self.to_json()))
    out.pop("num_previews")
    return out


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


def work_item(source: str, key: str, base_seed: int = 0) -> WorkItem:
  """The work item of `key` in `source` without listing the source (for distributed
  workers, which receive keys): inverse of the keys `resolve_source` makes."""
  if key.startswith("procedural/"):
    _, split, kind, index = key.split("/")
    item = procedural.Item(split, kind, int(index), base_seed)
    return WorkItem(key=item.key, procedural=item)
  if not key.startswith("user/"):
    raise ValueError(f"{key}: not a work item key of {source}")
  return WorkItem(key=key, path=os.path.join(source, key[len("user/"):]))


def shard_of(key: str, num_shards: int) -> int:
  """The shard of an item: crc32 of its key modulo the shard count."""
  return zlib.crc32(key.encode()) % num_shards


def shard_items(items: List[WorkItem], num_shards: int) -> List[List[WorkItem]]:
  """Items of each shard, in source order."""
  out: List[List[WorkItem]] = [[] for _ in range(num_shards)]
  for w in items:
    out[shard_of(w.key, num_shards)].append(w)
  return out


def input_files(w: WorkItem) -> List[str]:
  """The files an item is read from (its mesh, its label array, a folder's files)."""
  if w.path is None:
    return []
  if os.path.isdir(w.path):
    return sorted(os.path.join(w.path, f) for f in os.listdir(w.path)
                  if os.path.isfile(os.path.join(w.path, f)))
  labels = ingest_lib.label_file(w.path)
  return [w.path] + ([labels] if labels else [])


def fingerprint(w: WorkItem) -> str:
  """What an item's record is made from, cheap to compute for millions of inputs: the key
  of a procedural item; name, size and mtime of every file of a user input."""
  if w.path is None:
    return w.key
  parts = []
  try:
    for f in input_files(w):
      st = os.stat(f)
      parts.append(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}")
  except OSError as e:  # unreadable input: its build fails later and is listed as skipped
    parts.append(f"unreadable:{e.errno}")
  return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def config_hash(record_config: dict) -> str:
  """Hash of the record-shaping config, the schema and the pipeline version."""
  text = json.dumps(dict(config=record_config, schema=records.SCHEMA_VERSION,
                         pipeline=PIPELINE_VERSION), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_provenance(items: List[WorkItem], cfg: "BuildConfig") -> dict:
  """What a shard is made from (stored in its sidecar, compared on every rerun)."""
  rc = cfg.record_config()
  return dict(config_hash=config_hash(rc), config=rc, pipeline_version=PIPELINE_VERSION,
              inputs={w.key: fingerprint(w) for w in items})


def _rng(cfg: BuildConfig, key: str, stream: int) -> np.random.Generator:
  return np.random.default_rng([cfg.base_seed, zlib.crc32(key.encode()), stream])


def _common_arrays(meshes, colors, render_colors, cameras, cfg, background=()):
  images, masks = render.render_views(meshes, render_colors, cameras, cfg.image_size, background)
  bounds = np.stack([m.bounds for m in meshes]).astype(np.float32)
  return dict(part_colors=np.asarray(colors, np.uint8), part_bounds=bounds, images=images,
              masks=masks, cameras=np.stack([c.as_array() for c in cameras]))


def build_record(w: WorkItem, cfg: BuildConfig) -> Tuple[str, bytes]:
  """Builds one record (samples + renders + metadata). Bad input -> ValueError naming it."""
  key, data, _ = build_record_with_info(w, cfg)
  return key, data


def build_record_with_info(w: WorkItem, cfg: BuildConfig) -> Tuple[str, bytes, dict]:
  """`build_record` plus what the manifest lists about the item: {'repaired': [...]}, the
  parts made watertight before sampling (see `ingest.make_watertight`)."""
  rng = _rng(cfg, w.key, 1)
  cam_rng = _rng(cfg, w.key, 2)
  repaired = []
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
    meshes = obj.parts
    shapes = obj.solid_parts  # watertight versions for the samples; renders keep the input
    colors = procedural.random_colors(rng, len(meshes))
    names = obj.names
    repaired = obj.repaired
    meta = dict(source=os.path.abspath(w.path), type="object", category="user",
                dropped_parts=obj.dropped, merged_parts=obj.merged,
                max_part_iou=obj.max_iou, repaired_parts=repaired, normalization=dict(
                    center=np.asarray(obj.center).tolist(), scale=float(obj.scale)))
    background = ()
  if meta["type"] == "scene":
    cams = render.scene_cameras(cam_rng, cfg.num_views)
  else:
    radius = max(float(np.linalg.norm(m.vertices, axis=1).max()) for m in meshes)
    cams = render.object_cameras(cam_rng, cfg.num_views, radius=radius)
  render_colors = render.material_colors(meta["type"], colors, _rng(cfg, w.key, 3))
  arrays = _common_arrays(meshes, colors, render_colors, cams, cfg, background)
  arrays.update(sampling.sample_parts(shapes, rng, cfg.sample))
  meta.update(kind="samples", key=w.key, num_parts=len(shapes), part_names=list(names),
              image_size=cfg.image_size, num_views=cfg.num_views,
              sample_config=dataclasses.asdict(cfg.sample))
  return w.key, records.encode_record(arrays, meta), dict(repaired=repaired)


def build_safe(w: WorkItem, cfg: BuildConfig) -> dict:
  """Builds one item and never raises for a bad input: {'key', 'data', 'info'} or, for a
  bad input (the dead letter), {'key', 'bad': {'input', 'reason'}}. A missing Python module
  (ImportError; 2026-12-02, a GPU machine without 'rtree' skipped all 10,598 items) is the
  environment's fault, not the input's: it is raised, naming the item and the module."""
  try:
    key, data, info = build_record_with_info(w, cfg)
    return dict(key=key, data=data, info=info)
  except ImportError as e:  # the machine, not the input: every item would be skipped
    raise ImportError(
        f"{w.path or w.key}: the build needs a Python module this environment lacks ({e}); "
        "install it and build again (no item was skipped)"
    ) from e
  except Exception as e:  # pylint: disable=broad-except  (a batch build never crashes)
    name = w.path or w.key
    reason = str(e)
    if reason.startswith(f"{name}: "):
      reason = reason[len(name) + 2:]
    if not isinstance(e, (ValueError, OSError)):
      reason = f"{type(e).__name__}: {reason}"
    return dict(key=w.key, bad={"input": name, "reason": reason})


def _build_safe_star(args):
  return build_safe(*args)


def _write_previews(out_dir, key, data):
  rec = records.decode_record(data)
  os.makedirs(os.path.join(out_dir, "previews"), exist_ok=True)
  img = render.preview(rec["images"][0], rec["masks"][0], rec["part_colors"])
  name = key.replace("/", "_") + ".png"
  render.save_png(os.path.join(out_dir, "previews", name), img)


def write_built_shard(path: str, results: Iterable[dict], provenance: dict,
                      cfg: BuildConfig) -> dict:
  """Writes the records of `results` (build_safe outputs, in shard order) to the shard at
  `path` (atomic), then its previews and its sidecar JSON; returns the sidecar dict."""
  keys, skipped, repaired = [], [], []
  nbytes = 0
  out_dir = os.path.dirname(path)

  def gen():
    nonlocal nbytes
    for r in results:
      if "bad" in r:
        skipped.append(r["bad"])
        continue
      if len(keys) < cfg.num_previews:
        _write_previews(out_dir, r["key"], r["data"])
      keys.append(r["key"])
      repaired.extend({"key": r["key"], **x} for x in r["info"]["repaired"])
      nbytes += len(r["data"])
      yield r["data"]

  n = records.write_shard(path, gen())
  side = {"file": os.path.basename(path), "count": n, "bytes": os.path.getsize(path),
          "payload_bytes": nbytes, "keys": keys, "skipped": skipped, "repaired": repaired,
          "provenance": provenance}
  records.atomic_write_json(path[:-len(".array_record")] + ".json", side)
  return side


def build_shard(items: List[WorkItem], path: str, cfg: BuildConfig, pool=None,
                progress: bool = True, desc: str = "") -> dict:
  """Builds one shard from `items` (atomic, sidecar included) and returns its sidecar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  args = [(w, cfg) for w in items]
  it = pool.imap(_build_safe_star, args) if pool is not None else map(_build_safe_star, args)
  results = tqdm(it, total=len(items), desc=desc, disable=not progress)
  return write_built_shard(path, results, shard_provenance(items, cfg), cfg)


@dataclasses.dataclass
class BuildPlan:
  """What a (re)run builds: per shard its items and provenance; `todo` the shards to build
  (missing, unfinished or with changed inputs), `reasons` why each one is rebuilt."""
  source: str
  out: str
  num_shards: int
  cfg: BuildConfig
  items: List[WorkItem]
  shards: List[List[WorkItem]]
  provenance: List[dict]
  todo: List[int]
  reasons: Dict[int, str]
  removed_temps: List[str]

  def base(self, shard: int) -> str:
    return os.path.join(self.out, records.shard_name(shard, self.num_shards))

  def info(self) -> dict:
    rc = self.cfg.record_config()
    return dict(source=self.source, generator_seed=self.cfg.base_seed,
                config=self.cfg.to_json(), config_hash=config_hash(rc),
                pipeline_version=PIPELINE_VERSION, num_items=len(self.items), kind="samples")

  def manifest(self) -> dict:
    """Writes manifest.json from the finished shards whose provenance is current."""
    current = {records.shard_name(i, self.num_shards) + ".array_record": p
               for i, p in enumerate(self.provenance)}
    return records.merge_manifest(
        self.out, self.num_shards, self.info(),
        is_current=lambda side: side.get("provenance") == current.get(side["file"]))


def _inputs_change(old: dict, new: dict) -> str:
  added = sorted(set(new) - set(old))
  removed = sorted(set(old) - set(new))
  changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
  parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
           for what, v in (("added", added), ("removed", removed), ("changed", changed)) if v]
  return "inputs " + "; ".join(parts)


def plan_build(source: str, out: str, num_shards: int = 1, shard_index: int = -1,
               cfg: BuildConfig = BuildConfig()) -> BuildPlan:
  """Lists the source, removes a killed run's temporary files, compares the provenance of
  the shards present with the current one and returns what to build.

  Raises ValueError (bad sharding, unknown split), FileNotFoundError (missing source) or
  BuildConflict (the folder holds shards of another config or shard count).
  """
  if num_shards < 1 or not -1 <= shard_index < num_shards:
    raise ValueError(f"bad sharding: num_shards={num_shards}, shard_index={shard_index}")
  items = resolve_source(source, cfg.base_seed)
  os.makedirs(out, exist_ok=True)
  removed = records.remove_stale_temps(out) if shard_index < 0 else []
  other = sorted(p for p in glob.glob(os.path.join(out, "shard-*-of-*.json"))
                 if not p.endswith(f"-of-{num_shards:05d}.json"))
  if other:
    raise BuildConflict(f"{out}: holds shards of another shard count "
                        f"({os.path.basename(other[0])}); build into a new --out")
  per_shard = shard_items(items, num_shards)
  provenance = [shard_provenance(s, cfg) for s in per_shard]
  todo, reasons = [], {}
  for i in (range(num_shards) if shard_index < 0 else [shard_index]):
    base = os.path.join(out, records.shard_name(i, num_shards))
    if not os.path.exists(base + ".json"):
      todo.append(i)
      continue
    old = records.read_sidecar(base + ".json").get("provenance")
    new = provenance[i]
    if old is None or old.get("config_hash") != new["config_hash"]:
      diff = records.config_diff((old or {}).get("config", {}), new["config"])
      why = ", ".join(diff) if old is not None else "no provenance (an older build)"
      raise BuildConflict(f"{out}: was built with another config ({why}); build into a new "
                          "--out or delete it")
    if not os.path.exists(base + ".array_record"):
      todo.append(i)
      reasons[i] = "shard file missing"
    elif old["inputs"] != new["inputs"]:
      todo.append(i)
      reasons[i] = _inputs_change(old["inputs"], new["inputs"])
  return BuildPlan(source=source, out=out, num_shards=num_shards, cfg=cfg, items=items,
                   shards=per_shard, provenance=provenance, todo=todo, reasons=reasons,
                   removed_temps=removed)


def build(source: str, out: str, num_shards: int = 1, shard_index: int = -1,
          cfg: BuildConfig = BuildConfig(), workers: int = 0, progress: bool = True) -> dict:
  """Builds (or resumes) the shards of `source` into `out`; returns the merged manifest.

  shard_index = -1 builds every unfinished shard; otherwise just that one (for S parallel
  jobs). workers > 1 uses a multiprocessing pool (spawn) over the items of each shard.
  Raises as `plan_build`.
  """
  plan = plan_build(source, out, num_shards, shard_index, cfg)
  pool = None
  if workers > 1 and plan.todo:
    pool = multiprocessing.get_context("spawn").Pool(workers)
  t0 = time.time()
  try:
    for s in plan.todo:
      build_shard(plan.shards[s], plan.base(s) + ".array_record", cfg, pool, progress,
                  desc=f"shard {s + 1}/{num_shards}")
  except BaseException:
    if pool is not None:  # the queued items are not waited for (e.g. a missing module)
      pool.terminate()
      pool.join()
      pool = None
    raise
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  manifest = plan.manifest()
  manifest["built_now"] = list(plan.todo)
  manifest["rebuilt"] = {str(k): v for k, v in plan.reasons.items()}
  manifest["removed_temps"] = [os.path.basename(p) for p in plan.removed_temps]
  manifest["seconds_now"] = time.time() - t0
  return manifest
