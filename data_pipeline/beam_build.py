"""The dataset build and the latent encoding as Apache Beam pipelines (the distributed paths
of data_pipeline.build and data_pipeline.encode_latents).

  plan = make.plan_build(source, out, num_shards, cfg=cfg)   # on the launching machine
  manifest = beam_build.run(plan, ["--runner=DirectRunner", "--direct_num_workers=2"])

Stages (each item is built by the same `make.build_safe` as the in-process build, each
shard written by the same `make.write_built_shard`, so the records are the same):

  Create(shards to build)                    the plan's unfinished / changed shards
  -> FlatMap(read the shard's plan file)     (shard, position, work item) from the keys
  -> Reshuffle                               spreads the items over the workers
  -> ParDo(BuildItem)                        main output: records; 'dead_letter': bad
                                             inputs with their reason (never fails the job)
  -> Flatten + GroupByKey(shard)             the shard's records and dead letters
  -> ParDo(WriteShard)                       records in source order, written atomically
                                             (ArrayRecord, temp + rename), then previews
                                             and the sidecar JSON (provenance, dead letters)
  then, on the launching machine, manifest.json from the finished shards.

The latent encoding (`run_encode`, a separate pipeline over a built folder) maps
`encode_latents.encode_shard` over the input shards to encode; each worker makes its encoder
once (`DoFn.setup`) from a picklable factory, so a VAE checkpoint is loaded, not shipped.

The plan (which keys each shard holds and its provenance) travels as one small JSON file per
shard under `<out>/plan/`, so the pipeline graph stays small for millions of inputs; workers
rebuild work items from keys (`make.work_item`). A rerun after a kill skips finished shards
(their sidecar exists and its provenance is current) and rebuilds the rest from scratch, so
the output has no duplicates; a Beam retry of a shard rewrites the same shard atomically.

Runner options are Beam's own (`apache_beam.options.pipeline_options.PipelineOptions`) and
pass through unchanged: DirectRunner (multi-processing on one machine by default),
DataflowRunner, FlinkRunner, SparkRunner. The source and `--out` must be paths that every
worker can read and write (one machine, or a shared file system mounted on every worker:
NFS, Filestore, a gcsfuse mount); object-store URLs (gs://, s3://) are not read or written.
Memory: a shard's records meet in one worker before they are written, so choose
`num_shards` such that a shard is a few hundred MB (records average 0.66 MB at the default
sizes); items are spread over all workers whatever the shard count.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.options import pipeline_options as po

from data_pipeline import encode_latents, make, records

DEAD_LETTER = "dead_letter"
PLAN_DIR = "plan"


def plan_file(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, PLAN_DIR, records.shard_name(shard, num_shards) + ".json")


def write_plan_files(plan: make.BuildPlan) -> None:
  """One JSON per shard to build: its keys (in source order) and its provenance."""
  for s in plan.todo:
    records.atomic_write_json(plan_file(plan.out, s, plan.num_shards), dict(
        source=plan.source, base_seed=plan.cfg.base_seed,
        keys=[w.key for w in plan.shards[s]], provenance=plan.provenance[s]))


def remove_plan_files(plan: make.BuildPlan) -> None:
  """Deletes the plan files of a finished run (and their folder when it is empty)."""
  for s in plan.todo:
    if os.path.exists(plan_file(plan.out, s, plan.num_shards)):
      os.remove(plan_file(plan.out, s, plan.num_shards))
  folder = os.path.join(plan.out, PLAN_DIR)
  if os.path.isdir(folder) and not os.listdir(folder):
    os.rmdir(folder)


def shard_work(shard: int, out: str, num_shards: int) -> Iterable[Tuple[int, Tuple]]:
  """(shard, (position, work item)) for every item of a shard, from its plan file."""
  p = records.read_sidecar(plan_file(out, shard, num_shards))
  for i, key in enumerate(p["keys"]):
    yield shard, (i, make.work_item(p["source"], key, p["base_seed"]))


class BuildItem(beam.DoFn):
  """(shard, (position, item)) -> records; bad inputs to the dead-letter output."""

  def __init__(self, cfg: make.BuildConfig):
    super().__init__()
    self.cfg = cfg
    self.built = beam.metrics.Metrics.counter("build", "records")
    self.failed = beam.metrics.Metrics.counter("build", "dead_letters")

  def process(self, element):
    shard, (pos, item) = element
    result = make.build_safe(item, self.cfg)
    if "bad" in result:
      self.failed.inc()
      yield beam.pvalue.TaggedOutput(DEAD_LETTER, (shard, (pos, result)))
    else:
      self.built.inc()
      yield shard, (pos, result)


class WriteShard(beam.DoFn):
  """(shard, [(position, result) | None]) -> the shard's sidecar dict (shard written)."""

  def __init__(self, out: str, num_shards: int, cfg: make.BuildConfig):
    super().__init__()
    self.out, self.num_shards, self.cfg = out, num_shards, cfg

  def process(self, element):
    shard, group = element
    results = [r for _, r in sorted((g for g in group if g is not None), key=lambda g: g[0])]
    prov = records.read_sidecar(plan_file(self.out, shard, self.num_shards))["provenance"]
    path = os.path.join(self.out, records.shard_name(shard, self.num_shards))
    yield make.write_built_shard(path + ".array_record", results, prov, self.cfg)


class EncodeShard(beam.DoFn):
  """Input shard path -> the latent shard's name (written, sidecar included). The encoder is
  made once per worker from a picklable factory (e.g. encode_latents.CheckpointEncoder)."""

  def __init__(self, plan: "encode_latents.EncodePlan", encoder_factory):
    super().__init__()
    self.plan, self.encoder_factory = plan, encoder_factory
    self.encode_fn = None

  def setup(self):
    self.encode_fn = self.encoder_factory()

  def process(self, path):
    yield encode_latents.encode_shard(self.plan, path, self.encode_fn)


def _shard_marker(shard: int):
  return shard, None


def pipeline_options(pipeline_args: List[str]):
  """Beam PipelineOptions from command-line style args; with the DirectRunner and no
  --direct_running_mode given, multi-processing (one worker process per core by default)."""
  args = list(pipeline_args)
  opts = po.PipelineOptions(args)
  runner = opts.view_as(po.StandardOptions).runner
  if runner in (None, "DirectRunner", "direct"):
    direct = opts.view_as(po.DirectOptions)
    if not any(a.startswith("--direct_running_mode") for a in args):
      args.append("--direct_running_mode=multi_processing")
    if direct.direct_num_workers == 1 and not any(
        a.startswith("--direct_num_workers") for a in args):
      args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    opts = po.PipelineOptions(args)
  return opts


def run(plan: make.BuildPlan, pipeline_args: Optional[List[str]] = None) -> dict:
  """Builds the plan's shards on a Beam runner; returns the manifest (as make.build)."""
  t0 = time.time()
  if plan.todo:
    write_plan_files(plan)
    opts = pipeline_options(pipeline_args or [])
    with beam.Pipeline(options=opts) as p:
      shards = p | "ShardsToBuild" >> beam.Create(list(plan.todo))
      built = (shards
               | "Items" >> beam.FlatMap(shard_work, plan.out, plan.num_shards)
               | "Spread" >> beam.Reshuffle()
               | "Build" >> beam.ParDo(BuildItem(plan.cfg)).with_outputs(
                   DEAD_LETTER, main="records"))
      markers = shards | "EveryShard" >> beam.Map(_shard_marker)
      _ = ((built.records, built[DEAD_LETTER], markers)
           | "Join" >> beam.Flatten()
           | "ByShard" >> beam.GroupByKey()
           | "Write" >> beam.ParDo(WriteShard(plan.out, plan.num_shards, plan.cfg)))
    remove_plan_files(plan)
  manifest = plan.manifest()
  manifest["built_now"] = list(plan.todo)
  manifest["rebuilt"] = {str(k): v for k, v in plan.reasons.items()}
  manifest["removed_temps"] = [os.path.basename(p) for p in plan.removed_temps]
  manifest["seconds_now"] = time.time() - t0
  return manifest


def run_encode(plan: "encode_latents.EncodePlan", encoder_factory,
               pipeline_args: Optional[List[str]] = None) -> dict:
  """Encodes the plan's shards on a Beam runner (the latent pipeline, separate from the
  build); returns the manifest (as encode_latents.encode_dataset)."""
  t0 = time.time()
  if plan.todo:
    with beam.Pipeline(options=pipeline_options(pipeline_args or [])) as p:
      _ = (p
           | "ShardsToEncode" >> beam.Create(list(plan.todo))
           | "Spread" >> beam.Reshuffle()
           | "Encode" >> beam.ParDo(EncodeShard(plan, encoder_factory)))
  built = [os.path.basename(t)[:-len(".array_record")] for t in plan.todo]
  return plan.manifest(built, time.time() - t0)
