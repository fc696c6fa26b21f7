"""grain loaders over the ArrayRecord shards (see records.py for the stored schema).

Pipeline (a `grain.MapDataset`, so it is indexable, deterministic and checkpointable):

  source(ArrayRecordDataSource(shards)) -> shuffle(seed) -> repeat(num_epochs) -> decode
    -> random component order, pad to n_max + mask -> process_blocks(this process's rows)
    -> batch(batch_size, drop_remainder)

then `make_iterator(ds, prefetch_workers)` turns it into an iterator (optionally through
`mp_prefetch` worker processes) whose state round-trips with `get_state()` / `set_state()`.
With `in_memory=True` the source is `InMemoryRecords` instead: every record is decoded once
into host memory when the dataset is made (no per-step decompression), and the pipeline
after it is the same, so it yields exactly the same batches; its iterator reads them with
threads of the training process (`make_iterator(..., read_threads=T)`), since worker
processes would each need their own copy of the records.
Every process sees the same global permutation and the same per-element randomness (grain
seeds each element by its global index); `process_blocks` gives process p rows
[p * b, (p + 1) * b) of every global batch of process_count * b elements (b = batch_size, the
per-process batch). So processes read disjoint covers of the data, and the global batch (the
processes' batches concatenated in process order) is the same whatever the process count:
a 2-process job trains on exactly the batches of a 1-process job. Each epoch is reshuffled
(grain folds the epoch into the seed).

Two views (per element, before batching; a batch adds a leading [B] axis):

  vae_dataset(...)     'samples' shards. surface_points [n_max,Ns,3] f32, surface_normals
                       [n_max,Ns,3] f32, sdf_points [n_max,Nq,3] f32, sdf_values [n_max,Nq] f32
                       (Ns / Nq: random subsets of the stored points when n_surface / n_query
                       are given), + the common keys below.
  latent_dataset(...)  'latents' shards. latents [n_max,L,C] f32, + the common keys.

  common: component_mask [n_max] bool, num_components [] int32 (after the n_max cut),
          image [H,W,3] uint8 (one random stored view), mask [H,W] uint8 (ids remapped to the
          new component order: 0 = background, j + 1 = padded slot j), is_scene [] bool,
          index [] int64 (record index in the source).
          With per_instance_cond=True also cond [n_max,H,W,7] uint8: per component
          [instance pixels on white (3), whole image (3), binary mask * 255 (1)] (MIDI).

Components are put in random order each time (objects with more than n_max parts keep a
random n_max of them); padded slots are zeros with component_mask False.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
from typing import Optional, Sequence

import grain
import numpy as np

from data_pipeline import records

SAMPLE_KEYS = records.SAMPLE_KEYS


def _paths(data_dir_or_paths) -> list:
  if isinstance(data_dir_or_paths, str):  # one folder or several, comma-separated
    return records.dataset_shard_paths(data_dir_or_paths)
  paths = list(data_dir_or_paths)
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p}: no such shard")
  return paths


class _DecodeWithIndex(grain.transforms.Map):
  """(index, bytes) -> decoded record dict with 'index'."""

  def map(self, pair):
    i, data = pair
    rec = records.decode_record(data)
    rec["index"] = np.int64(i)
    return rec


class _WithIndex(grain.transforms.MapWithIndex):
  """data -> (record index, data); grain passes epoch-offset indices past len, so wrap."""

  def __init__(self, n: int):
    self.n = n

  def map_with_index(self, i, data):
    return i % self.n, data


class InMemoryRecords:
  """The records of `paths`, decoded once into host memory: a random-access grain source.

  Element i is the decoded record dict of the i-th record over the shards in order (as
  `grain.sources.ArrayRecordDataSource(paths)` numbers them) with 'index' = i. Decoding
  (numpy savez_compressed: zlib, which releases the GIL) runs on `num_threads` threads. The
  records stay resident: about 180 KB each for a 112 px, 2-view, L = 64 x C = 32 latent
  record of 9 parts (the `small` split's 10,598 records: about 1.9 GB). Records are
  read-only to the pipeline (`PadComponents` copies what it returns).
  """

  def __init__(self, paths: Sequence[str], num_threads: int = 8):
    raw = []
    for p in paths:
      raw.extend(records.read_shard(p))
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
      self._records = list(pool.map(records.decode_record, raw))
    for i, rec in enumerate(self._records):
      rec["index"] = np.int64(i)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._records[index]

  def __repr__(self) -> str:
    return f"InMemoryRecords({len(self._records)} records)"


def instance_conditions(image: np.ndarray, mask: np.ndarray, n_max: int) -> np.ndarray:
  """[n_max,H,W,7] uint8: (instance on white, full image, binary mask*255) per slot."""
  h, w, _ = image.shape
  ids = np.arange(1, n_max + 1)[:, None, None]
  m = mask[None] == ids  # [n_max,H,W]
  inst = np.where(m[..., None], image[None], np.uint8(255))
  full = np.broadcast_to(image[None], (n_max, h, w, 3))
  return np.concatenate([inst, full, (m[..., None] * 255).astype(np.uint8)], axis=-1)


class PadComponents(grain.transforms.RandomMap):
  """Random component order, point subsets, pad to n_max + component mask, random view.

  n_points: {'surface': Ns or None, 'query': Nq or None}: random subsets (the same indices
  for every part of one element) of the stored surface / SDF points.
  """

  def __init__(self, n_max: int, keys: Sequence[str], n_points: Optional[dict] = None,
               per_instance_cond: bool = False):
    self.n_max = n_max
    self.keys = tuple(keys)
    self.n_points = dict(n_points or {})
    self.per_instance_cond = per_instance_cond

  def _point_subsets(self, rec, rng):
    groups = {"surface": ("surface_points", "surface_normals"),
              "query": ("sdf_points", "sdf_values")}
    idx = {}
    for g, ks in groups.items():
      want = self.n_points.get(g)
      if want is None or ks[0] not in rec:
        continue
      have = rec[ks[0]].shape[1]
      if want > have:
        raise ValueError(f"record {rec['meta'].get('key')}: asks {want} {g} points, has {have}")
      if want < have:
        sel = np.sort(rng.choice(have, size=want, replace=False))
        for k in ks:
          idx[k] = sel
    return idx

  def random_map(self, rec: dict, rng: np.random.Generator) -> dict:
    meta = rec["meta"]
    n = int(meta["num_parts"])
    order = rng.permutation(n)[: self.n_max]
    k = len(order)
    sub = self._point_subsets(rec, rng)
    out = {}
    for key in self.keys:
      arr = rec[key]
      if arr.shape[0] != n:
        raise ValueError(f"record {meta.get('key')}: {key} has {arr.shape[0]} parts, "
                         f"meta says {n}")
      take = arr[order]
      if key in sub:
        take = take[:, sub[key]]
      pad = np.zeros((self.n_max,) + take.shape[1:], dtype=np.float32)
      pad[:k] = take
      out[key] = pad
    mask = np.zeros(self.n_max, dtype=bool)
    mask[:k] = True
    out["component_mask"] = mask
    out["num_components"] = np.int32(k)
    v = int(rng.integers(rec["images"].shape[0]))
    remap = np.zeros(256, dtype=np.uint8)  # old id (i + 1) -> new slot (j + 1), dropped -> 0
    remap[order + 1] = np.arange(1, k + 1, dtype=np.uint8)
    out["image"] = np.array(rec["images"][v])  # a copy: records may be cached (InMemoryRecords)
    out["mask"] = remap[rec["masks"][v]]
    out["is_scene"] = np.bool_(meta.get("type") == "scene")
    out["index"] = rec["index"]
    if self.per_instance_cond:
      out["cond"] = instance_conditions(out["image"], out["mask"], self.n_max)
    return out


class _ProcessBlocks(grain.MapDataset):
  """Process p's rows of every global batch (see `process_blocks`)."""

  def __init__(self, parent: grain.MapDataset, local_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._local = local_batch
    self._index = process_index
    self._global = local_batch * process_count
    n = len(parent)
    if n >= sys.maxsize:
      self._length = sys.maxsize
    else:
      rest = n % self._global - process_index * local_batch
      self._length = (n // self._global) * local_batch + min(max(rest, 0), local_batch)

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return (f"ProcessBlocks(local_batch={self._local}, process_index={self._index}, "
            f"global_batch={self._global})")

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local)
    return self._parent[step * self._global + self._index * self._local + row]


def process_blocks(ds: grain.MapDataset, local_batch: int, process_index: int,
                   process_count: int) -> grain.MapDataset:
  """The elements of `ds` that process `process_index` batches, `local_batch` at a time.

  Global batch s is elements [s * G, (s + 1) * G) of `ds` (G = local_batch * process_count);
  process p reads its rows [p * local_batch, (p + 1) * local_batch). With local_batch = 1
  this is grain's usual `ds[p::process_count]`. Raises ValueError on an index outside
  [0, process_count) or a non-positive batch.
  """
  if local_batch < 1 or process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_blocks: need local_batch >= 1 and 0 <= process_index < "
                     f"process_count, got {local_batch}, {process_index}, {process_count}")
  if process_count == 1:
    return ds
  return _ProcessBlocks(ds, local_batch, process_index, process_count)


def _pipeline(paths, *, keys, n_points, batch_size, n_max, seed, num_epochs, shuffle,
              process_index, process_count, drop_remainder, per_instance_cond,
              in_memory=False):
  if (process_index is None) != (process_count is None):
    raise ValueError("give both process_index and process_count, or neither")
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top  (only to ask which process we are)
    process_index, process_count = jax.process_index(), jax.process_count()
  if in_memory:  # decoded once; the same elements as decoding on every read (below)
    ds = grain.MapDataset.source(InMemoryRecords(paths))
  else:
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    ds = ds.map_with_index(_WithIndex(len(ds)))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if not in_memory:
    ds = ds.map(_DecodeWithIndex())
  ds = ds.random_map(PadComponents(n_max, keys, n_points, per_instance_cond), seed=seed + 1)
  ds = process_blocks(ds, batch_size or 1, process_index, process_count)
  if batch_size:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds


def vae_dataset(data_dir_or_paths, *, batch_size: int, n_max: int = 32, seed: int = 0,
                n_surface: Optional[int] = None, n_query: Optional[int] = None,
                num_epochs: Optional[int] = None, shuffle: bool = True,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                drop_remainder: bool = True, per_instance_cond: bool = False):
  """MapDataset of padded VAE-sample batches (see the module docstring for the keys).

  num_epochs=None repeats forever; process_index/count default to jax.process_index/count.
  """
  return _pipeline(_paths(data_dir_or_paths), keys=SAMPLE_KEYS + ("part_bounds",),
                   n_points={"surface": n_surface, "query": n_query},
                   batch_size=batch_size, n_max=n_max, seed=seed, num_epochs=num_epochs,
                   shuffle=shuffle, process_index=process_index, process_count=process_count,
                   drop_remainder=drop_remainder, per_instance_cond=per_instance_cond)


def latent_dataset(data_dir_or_paths, *, batch_size: int, n_max: int = 32, seed: int = 0,
                   num_epochs: Optional[int] = None, shuffle: bool = True,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   drop_remainder: bool = True, per_instance_cond: bool = False,
                   in_memory: bool = False):
  """MapDataset of padded latent batches for the DiT (see the module docstring).

  in_memory=True decodes every record once, now (`InMemoryRecords`), for the same batches
  without per-read decompression; iterate it with `make_iterator(ds, read_threads=T)`.
  """
  return _pipeline(_paths(data_dir_or_paths), keys=("latents", "part_bounds"), n_points={},
                   batch_size=batch_size, n_max=n_max, seed=seed, num_epochs=num_epochs,
                   shuffle=shuffle, process_index=process_index, process_count=process_count,
                   drop_remainder=drop_remainder, per_instance_cond=per_instance_cond,
                   in_memory=in_memory)


# Threads that make elements (here whole batches) when make_iterator is given read_threads=0.
# grain's own default (16 threads, 500 elements ahead) is meant for single records; with
# batches as elements it decodes 500 batches ahead in the background of every process that
# iterates (DiT bundle records at batch 64: ~5.8 GB and minutes of GIL-bound decoding per
# process; measured on 2 cores: one core busy for as long as the read-ahead lasts, against
# 1% with this bound), which slowed the training step it was meant to feed and multiplied the
# memory of every grain worker process.
DEFAULT_READ_THREADS = 4


def read_options(read_threads: int = 0) -> grain.ReadOptions:
  """grain.ReadOptions with read_threads threads (0: DEFAULT_READ_THREADS) that make at most
  2 x read_threads elements ahead. ValueError for read_threads < 0."""
  if read_threads < 0:
    raise ValueError(f"read_threads must be >= 0, got {read_threads}")
  threads = read_threads or DEFAULT_READ_THREADS
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


class EmptyDataError(ValueError):
  """Training data that give no batch: a shard set whose items were all skipped, or an empty
  dataset. Front-ends report it in one line (exit code 2)."""


def make_iterator(ds: grain.MapDataset, prefetch_workers: int = 0,
                  prefetch_buffer: int = 2, read_threads: int = 0) -> "PositionIterator":
  """Iterator over `ds`; prefetch_workers > 0 adds grain mp_prefetch worker processes.

  The elements (here batches) are made by read_threads threads of the iterating process
  (each worker process when there are workers; 0: DEFAULT_READ_THREADS), at most
  2 x read_threads ahead (`read_options`). The returned `PositionIterator` supports
  get_state() / set_state(state) (a small JSON-able dict) to resume exactly where it was
  (checkpoint it with the model); the state depends neither on read_threads nor on
  prefetch_workers, so a run may resume on a machine with another number of cores.
  """
  return PositionIterator(ds, prefetch_workers, prefetch_buffer, read_threads)


def _grain_iterator(ds: grain.MapDataset, prefetch_workers: int, prefetch_buffer: int,
                    read_threads: int):
  it_ds = ds.to_iter_dataset(read_options(read_threads))
  if prefetch_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=prefetch_workers, per_worker_buffer_size=prefetch_buffer))
  return iter(it_ds)


def position_from_state(state) -> int:
  """The index of the next element in a data state: this module's {'position': i}, or the
  state of a grain iterator written by checkpoints of earlier versions ({'next_index': i}
  without workers; with mp_prefetch workers, one state per worker, each counting the
  elements that worker gave: their sum). ValueError naming the state otherwise."""
  if isinstance(state, dict):
    if "position" in state:
      return int(state["position"])
    if "next_index" in state:
      return int(state["next_index"])
    per_worker = state.get("iterators_in_use_states")
    if isinstance(per_worker, list) and all(
        isinstance(w, dict) and "next_index" in w for w in per_worker):
      return sum(int(w["next_index"]) for w in per_worker)
  raise ValueError(f"not a data-iterator state this loader can resume from: {state!r:.200}")


class PositionIterator:
  """Iterator over a grain MapDataset whose state is the index of the next element.

  grain's own iterator state with mp_prefetch workers is one state per worker and resumes
  only with the same worker count (2026-12-02: a VAE run resumed with 13 workers instead of
  12 failed inside grain with an IndexError). Here the state is {'position': i} and a resume
  iterates `ds[i:]` afresh, with any number of workers or threads: element j of the slice is
  element i + j of `ds` (a MapDataset's shuffle and per-element randomness are functions of
  the index), so the batches are those a straight run sees.
  """

  def __init__(self, ds: grain.MapDataset, prefetch_workers: int = 0,
               prefetch_buffer: int = 2, read_threads: int = 0):
    read_options(read_threads)  # validates read_threads now, not at the first batch
    self.ds = ds
    self.prefetch_workers = prefetch_workers
    self.prefetch_buffer = prefetch_buffer
    self.read_threads = read_threads
    self.position = 0
    self._it = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = _grain_iterator(self.ds[self.position:], self.prefetch_workers,
                                 self.prefetch_buffer, self.read_threads)
    element = next(self._it)
    self.position += 1
    return element

  def close(self) -> None:
    """Stops the read-ahead threads and worker processes, if any (the next element starts
    them again at the current position)."""
    if self._it is not None:
      if hasattr(self._it, "close"):
        self._it.close()
      self._it = None

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state) -> None:
    position = position_from_state(state)
    if not 0 <= position <= len(self.ds):
      raise ValueError(
          f"data state position {position} is outside this dataset of {len(self.ds)} "
          "elements (a checkpoint of another dataset?)"
      )
    self.close()
    self.position = position
