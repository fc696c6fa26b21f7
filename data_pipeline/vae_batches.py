"""VAE training examples from the data pipeline's 'samples' shards.

`loader.vae_dataset` yields padded multi-part elements (see data_pipeline/loader.py):
  surface_points [n_max,Ns,3], surface_normals [n_max,Ns,3], sdf_points [n_max,Nq,3],
  sdf_values [n_max,Nq], component_mask [n_max] bool, num_components [] int32, index [] int64
where each real part's Nq SDF points are stored near-surface first (n_near of them) then
uniform in the volume (Nq - n_near), as written by data_pipeline/sampling.py.

`part_examples` (pure, numpy) turns one such element into `k` VAE examples, each a real part
(never a padding slot) with the layout of `moca_jax.vae.vae_loss`:
  surface_points [k,P,3], surface_normals [k,P,3]   a random subset in random order
  near_points [k,Qn,3], near_sdf [k,Qn]             from the near-surface block
  volume_points [k,Qv,3], volume_sdf [k,Qv]         from the volume block
  index [k] int64                                   the element's record index

`vae_records_dataset` is the grain pipeline: vae_dataset (unbatched) -> PartExamples (a
RandomMap, so the draw is a function of the element's position and the seed, and a resumed
iterator replays it) -> batch(elements) -> flatten [E,k,...] -> [E*k,...].

`AnalyticShapeSource` is the other VAE data source: random primitives
(data_pipeline.primitives) sampled on the fly, each example made by `example_from_shape` with
the same keys; batch `i` is `analytic_batch(spec, B, seed, i)`, a function of (seed, i) only,
made in the calling process or in grain worker processes (`analytic_dataset` +
`mp_prefetch`) with the same result and the same resumable state.

`MixedSource` puts both in every batch (records rows first, then analytic rows;
`mixed_split` sizes the two shares), its state holding both positions.
"""

from __future__ import annotations

import os
from typing import Optional

import grain
import numpy as np

from data_pipeline import loader, primitives, records

EXAMPLE_KEYS = (
    "surface_points",
    "surface_normals",
    "near_points",
    "near_sdf",
    "volume_points",
    "volume_sdf",
)


def stored_near_count(data_dir: str) -> int:
  """The number of near-surface SDF points per part stored in a 'samples' shard set
  (manifest.json: config.sample.n_near). FileNotFoundError / ValueError naming the path."""
  manifest = records.load_manifest(data_dir)
  try:
    return int(manifest["config"]["sample"]["n_near"])
  except (KeyError, TypeError) as e:
    raise ValueError(
        f"{data_dir}/manifest.json: no config.sample.n_near (not a 'samples' shard set?)"
    ) from e


def _take(rng: np.random.Generator, have: int, want: int, what: str) -> np.ndarray:
  if want > have:
    raise ValueError(f"asks {want} {what} points per part, the element stores {have}")
  return rng.permutation(have)[:want]


def part_examples(
    element: dict,
    rng: np.random.Generator,
    *,
    stored_near: int,
    num_points: int,
    num_near: int,
    num_volume: int,
    parts_per_element: int = 1,
) -> dict:
  """k = parts_per_element VAE examples from one padded element (see module docstring).

  Parts are drawn among the real slots (component_mask True) without replacement when the
  element has at least k of them, with replacement otherwise. Points are random subsets
  (random order) of the stored surface / near / volume blocks.

  Args:
    element: one unbatched `loader.vae_dataset` element.
    rng: numpy Generator (the only source of randomness).
    stored_near: near-surface SDF points stored first in each part's sdf block.
  Returns:
    dict of float32 arrays with leading axis k, plus 'index' [k] int64.
  Raises:
    ValueError naming the record when it has no real part or too few stored points.
  """
  mask = np.asarray(element["component_mask"], bool)
  real = np.flatnonzero(mask)
  rid = int(np.asarray(element.get("index", -1)))
  if real.size == 0:
    raise ValueError(f"record {rid}: element has no real part")
  k = parts_per_element
  parts = rng.choice(real, size=k, replace=real.size < k)
  nq = element["sdf_points"].shape[1]
  if not 0 < stored_near < nq:
    raise ValueError(f"record {rid}: stored_near={stored_near} must lie in (0, {nq})")
  out = {key: [] for key in EXAMPLE_KEYS}
  try:
    for p in parts:
      s = _take(rng, element["surface_points"].shape[1], num_points, "surface")
      n = _take(rng, stored_near, num_near, "near-surface")
      v = stored_near + _take(rng, nq - stored_near, num_volume, "volume")
      out["surface_points"].append(element["surface_points"][p, s])
      out["surface_normals"].append(element["surface_normals"][p, s])
      out["near_points"].append(element["sdf_points"][p, n])
      out["near_sdf"].append(element["sdf_values"][p, n])
      out["volume_points"].append(element["sdf_points"][p, v])
      out["volume_sdf"].append(element["sdf_values"][p, v])
  except ValueError as e:
    raise ValueError(f"record {rid}: {e}") from None
  res = {key: np.stack(val).astype(np.float32) for key, val in out.items()}
  res["index"] = np.full((k,), rid, np.int64)
  return res


class PartExamples(grain.transforms.RandomMap):
  """grain RandomMap wrapper of `part_examples`."""

  def __init__(self, **kwargs):
    self.kwargs = kwargs

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return part_examples(element, rng, **self.kwargs)


def _flatten(batch: dict) -> dict:
  """[E,k,...] -> [E*k,...] for every array."""
  return {key: v.reshape((-1,) + v.shape[2:]) for key, v in batch.items()}


def vae_records_dataset(
    data_dir: str,
    *,
    batch_size: int,
    num_points: int,
    num_near: int,
    num_volume: int,
    parts_per_element: int = 1,
    n_max: int = 32,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    stored_near: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.MapDataset:
  """MapDataset of VAE batches (batch_size examples = batch_size / parts_per_element
  elements) from 'samples' shards; keys EXAMPLE_KEYS + 'index', leading axis batch_size.

  stored_near defaults to the shard set's manifest (`stored_near_count`). The manifest is
  read either way: a complete shard set without records (every item skipped by its build)
  raises loader.EmptyDataError naming the folder and a skipped item's reason.
  """
  if batch_size % parts_per_element:
    raise ValueError(
        f"batch_size={batch_size} must be a multiple of parts_per_element={parts_per_element}"
    )
  manifest = records.load_manifest(data_dir)
  if manifest.get("complete") and not manifest.get("count", 1):
    skipped = manifest.get("skipped") or []
    example = ""
    if skipped and isinstance(skipped[0], dict):
      example = f", e.g. {skipped[0].get('input')}: {skipped[0].get('reason')}"
    raise loader.EmptyDataError(
        f"{data_dir}: the shard set holds no records ({len(skipped)} items skipped by its "
        f"build{example}): nothing to train on"
    )
  if stored_near is None:
    stored_near = stored_near_count(data_dir)
  ds = loader.vae_dataset(
      data_dir,
      batch_size=0,
      n_max=n_max,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      process_index=process_index,
      process_count=process_count,
  )
  ds = ds.random_map(
      PartExamples(
          stored_near=stored_near,
          num_points=num_points,
          num_near=num_near,
          num_volume=num_volume,
          parts_per_element=parts_per_element,
      ),
      seed=seed + 2,
  )
  ds = ds.batch(batch_size // parts_per_element, drop_remainder=True)
  return ds.map(_flatten)


# ----------------------------------------------------------------------------------------
# Analytic source: random primitives sampled on the fly
# ----------------------------------------------------------------------------------------


def example_from_shape(
    shape,
    rng: np.random.Generator,
    num_points: int,
    num_near: int,
    num_volume: int,
    near_scales=(0.005, 0.05),
) -> dict:
  """One training example of an analytic shape (a Primitive or Part); arrays float32.

  Surface points are exact area-uniform samples with analytic normals
  (`primitives.sample_surface`); near and volume points are labelled with the exact SDF.
  Returns dict with 'surface_points' [P,3], 'surface_normals' [P,3], 'near_points' [Qn,3],
  'near_sdf' [Qn], 'volume_points' [Qv,3], 'volume_sdf' [Qv] (SDF negative inside).
  """
  pts, nrm = primitives.sample_surface(shape, num_points, rng)
  q, d = primitives.sample_sdf_points(shape.sdf, pts, rng, num_near, num_volume, scales=near_scales)
  return {
      "surface_points": pts,
      "surface_normals": nrm,
      "near_points": q[:num_near],
      "near_sdf": d[:num_near],
      "volume_points": q[num_near:],
      "volume_sdf": d[num_near:],
  }


def stack_examples(examples: list[dict]) -> dict:
  """A list of `example_from_shape` dicts -> one dict of arrays with a leading batch axis."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


_ANALYTIC_SPEC_KEYS = (
    "kinds",
    "size_range",
    "num_points",
    "num_near",
    "num_volume",
    "near_scales",
)
# Batch indices an analytic MapDataset covers from its start: more than any run takes.
_ANALYTIC_HORIZON = 2**40


def analytic_spec(data_config) -> dict:
  """The fields of a data config (ConfigDict or dict) that analytic sampling reads, as a
  plain dict of Python values (cheap to pickle into worker processes)."""
  spec = {}
  for key in _ANALYTIC_SPEC_KEYS:
    value = data_config[key]
    spec[key] = tuple(value) if isinstance(value, (list, tuple)) else value
  return spec


def random_analytic_shape(spec, rng: np.random.Generator):
  """A random primitive of the spec's kinds with bounding radius in its size_range."""
  return primitives.random_primitive(
      rng, kinds=tuple(spec["kinds"]), size_range=tuple(spec["size_range"])
  )


def analytic_batch(spec, batch_size: int, seed: int, index: int) -> dict:
  """Batch `index` of the analytic source: a pure function of (spec, batch_size, seed, index).

  Returns `stack_examples` of batch_size random primitives (leading axis batch_size) plus
  'index' [batch_size] int64 (= index).
  """
  rng = np.random.default_rng([seed, index])
  examples = []
  for _ in range(batch_size):
    shape = random_analytic_shape(spec, rng)
    examples.append(
        example_from_shape(
            shape,
            rng,
            spec["num_points"],
            spec["num_near"],
            spec["num_volume"],
            tuple(spec["near_scales"]),
        )
    )
  out = stack_examples(examples)
  out["index"] = np.full((batch_size,), index, np.int64)
  return out


class AnalyticBatch(grain.transforms.Map):
  """grain Map: batch index -> `analytic_batch` (whole batches, so workers ship one array
  per key and step)."""

  def __init__(self, spec: dict, batch_size: int, seed: int):
    self.spec, self.batch_size, self.seed = spec, batch_size, seed

  def map(self, element: int) -> dict:
    return analytic_batch(self.spec, self.batch_size, self.seed, int(element))


def analytic_dataset(data_config, batch_size: int, seed: int, start: int = 0) -> grain.MapDataset:
  """MapDataset whose element j is `analytic_batch(..., start + j)` (2**40 elements)."""
  spec = analytic_spec(data_config)
  return grain.MapDataset.range(start, start + _ANALYTIC_HORIZON).map(
      AnalyticBatch(spec, batch_size, seed)
  )


def _numpy_only_worker(worker_index: int, worker_count: int) -> None:
  """grain worker_init_fn: a sampling worker never takes an accelerator (JAX, should anything
  in the worker touch it, stays on the CPU instead of claiming GPU memory)."""
  del worker_index, worker_count
  os.environ["JAX_PLATFORMS"] = "cpu"


class AnalyticShapeSource:
  """Infinite, checkpointable iterator of batches of random primitives.

  Batch `i` is `analytic_batch(spec, batch_size, seed, i)`, a function of (seed, i) only, so
  the state is the next batch's index: `get_state()` / `set_state()` carry {'position': i}
  (JSON; train_lib checkpoints it like a grain iterator), whatever the number of workers, and
  a resumed run sees exactly the batches a straight one would.

  num_workers = 0 samples in the calling process. num_workers > 0 samples in grain worker
  processes (`mp_prefetch` over `analytic_dataset`, each worker `prefetch_buffer` batches
  ahead), so the host keeps up with an accelerator: sampling one 'small' example costs
  about 0.8 ms of numpy (a batch of 64 about 0.05 s on one core). The first batch after
  construction or `set_state` is still made in the calling process and the workers start on
  the second, so the throwaway iterator `train_lib.run_training` takes the batch shapes from
  never starts processes. `close()` stops the workers (they are also stopped when the
  iterator is garbage collected).
  """

  def __init__(
      self,
      data_config,
      batch_size: int,
      seed: int,
      num_workers: int = 0,
      prefetch_buffer: int = 2,
  ):
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    self.cfg = data_config
    self.spec = analytic_spec(data_config)
    self.batch_size = batch_size
    self.seed = seed
    self.num_workers = num_workers
    self.prefetch_buffer = prefetch_buffer
    self.position = 0
    self._workers = None  # grain iterator over batches position.., when started
    self._first_done = False

  def random_shape(self, rng: np.random.Generator):
    return random_analytic_shape(self.spec, rng)

  def batch(self, step: int) -> dict:
    return analytic_batch(self.spec, self.batch_size, self.seed, step)

  def _start_workers(self, start: int):
    ds = analytic_dataset(self.spec, self.batch_size, self.seed, start)
    # One thread per worker: the sampling holds the GIL; the buffer bounds host memory.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=self.num_workers, per_worker_buffer_size=self.prefetch_buffer
        ),
        worker_init_fn=_numpy_only_worker,
    )
    return iter(iter_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.num_workers == 0 or not self._first_done:
      b = self.batch(self.position)
      self._first_done = True
    else:
      if self._workers is None:
        self._workers = self._start_workers(self.position)
      b = next(self._workers)
    self.position += 1
    return b

  def close(self) -> None:
    """Stops the worker processes, if any (the next batch restarts them)."""
    if self._workers is not None:
      self._workers.close()
      self._workers = None

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.close()
    self.position = int(state["position"])
    self._first_done = False


# ----------------------------------------------------------------------------------------
# Mixed source: real parts and random primitives in every batch
# ----------------------------------------------------------------------------------------


def mixed_split(batch_size: int, analytic_fraction: float, parts_per_element: int = 1):
  """(records examples, analytic examples) of one batch for `analytic_fraction` in (0, 1).

  The analytic count is the rounded fraction of batch_size, moved to the nearest count that
  leaves the records share a multiple of parts_per_element (the records pipeline draws that
  many parts per item). ValueError when no such split has both shares > 0 (an exact 0 or 1
  is a single source: use 'records' or 'analytic').
  """
  if not 0.0 < analytic_fraction < 1.0:
    raise ValueError(
        f"config.data.analytic_fraction must be in (0, 1) for data.source='mixed', got "
        f"{analytic_fraction} (0: use 'records'; 1: use 'analytic')"
    )
  want = analytic_fraction * batch_size
  candidates = [
      a for a in range(1, batch_size) if (batch_size - a) % parts_per_element == 0
  ]
  if not candidates:
    raise ValueError(
        f"batch_size={batch_size} cannot hold both sources with parts_per_element="
        f"{parts_per_element} (the records share must be a positive multiple of it)"
    )
  analytic = min(candidates, key=lambda a: (abs(a - want), a))
  return batch_size - analytic, analytic


class MixedSource:
  """Infinite, checkpointable iterator whose every batch is a records batch followed by an
  analytic batch along the leading axis (keys EXAMPLE_KEYS + 'index'; 'index' is the record
  index for the first rows and the analytic batch index for the last ones).

  records: an iterator with get_state() / set_state() (`loader.make_iterator` over
  `vae_records_dataset`); analytic: an `AnalyticShapeSource`. The state is both states,
  {'records': ..., 'analytic': {'position': i}} (JSON), so a resumed run sees the batches a
  straight one would. Why mix: a decoder fine-tuned on one split's parts alone forgets
  shapes that split lacks (round 9 of the bundle: IoU on random primitives 0.83 -> 0.56);
  primitives in every batch keep them.
  """

  def __init__(self, records, analytic: AnalyticShapeSource):
    self.records = records
    self.analytic = analytic

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    r = next(self.records)
    a = next(self.analytic)
    return {key: np.concatenate([np.asarray(r[key]), a[key]]) for key in a}

  def close(self) -> None:
    """Stops both sources' worker processes, if any."""
    self.analytic.close()
    if hasattr(self.records, "close"):
      self.records.close()

  def get_state(self) -> dict:
    return {"records": self.records.get_state(), "analytic": self.analytic.get_state()}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or set(state) != {"records", "analytic"}:
      raise ValueError(
          "a 'mixed' VAE run resumes from a mixed data state ({'records', 'analytic'}), got "
          f"{sorted(state) if isinstance(state, dict) else type(state).__name__}: was the "
          "checkpoint written with another config.data.source?"
      )
    self.records.set_state(state["records"])
    self.analytic.set_state(state["analytic"])
