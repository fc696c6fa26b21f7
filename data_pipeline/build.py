r"""Build dataset shards of per-part samples and renders.

  # in this process (or S hand-split jobs with --shard_index):
  python -m data_pipeline.build --source=procedural:tiny --out=data/tiny
  # as an Apache Beam pipeline (data_pipeline/beam_build.py), here on 2 local processes:
  python -m data_pipeline.build --source=/path/to/meshes --out=data/mine --num_shards=8 \
      --runner=DirectRunner --direct_num_workers=2

--source: 'procedural:SPLIT' (tiny | test_tiny | small | test; append ':objects' or ':scenes'
for one kind only) or a directory of user meshes in any of the layouts of
data_pipeline/ingest.py (scene-graph GLB/glTF/OBJ/PLY files, sub-folders of per-part files,
a mesh with a per-face label .npy).
--runner (and every other Beam option: --direct_num_workers, --project, --region,
--flink_master, --spark_master_url, ...) selects the Beam build; the options are passed to
Beam's PipelineOptions unchanged. Without --runner the build runs in this process
(--workers=N for a local process pool); --shard_index=-1 (default) builds all unfinished
shards, S jobs with --shard_index=0..S-1 build in parallel.
Both paths write the same records. Finished shards are skipped (resume), shards whose inputs
changed are rebuilt, a folder built with another config is refused; bad inputs are skipped
and listed in manifest.json (see data_pipeline/make.py).
Exit codes: 0 built (bad inputs listed, not fatal); 2 bad arguments, a missing or unknown
source, or an output folder that holds another build.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import List

from absl import flags

from data_pipeline import ingest, make, records, sampling

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (called only when run as a program; idempotent)."""
  if "source" in FLAGS:
    return
  flags.DEFINE_string("source", None, "procedural:SPLIT[:objects|:scenes] or a mesh directory.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("num_shards", 1, "Number of shards S.")
  flags.DEFINE_integer("shard_index", -1, "Shard to build (0..S-1), -1 = all unfinished.")
  flags.DEFINE_integer("workers", 0, "Worker processes (0/1 = in-process).")
  flags.DEFINE_integer("base_seed", 0, "Generator seed mixed into every item's seed.")
  flags.DEFINE_integer("n_surface", 2048, "Surface points per part.")
  flags.DEFINE_integer("n_near", 2048, "Near-surface SDF points per part.")
  flags.DEFINE_integer("n_volume", 1024, "Uniform SDF points per part.")
  flags.DEFINE_float("sharp_fraction", 0.2, "Share of surface points on sharp edges.")
  flags.DEFINE_integer("image_size", 224, "Render size (pixels).")
  flags.DEFINE_integer("num_views", 2, "Renders per item.")
  flags.DEFINE_integer("max_parts", 32, "Part limit for user meshes.")
  flags.DEFINE_enum("part_limit_policy", "merge", ["merge", "skip"], "Over the limit.")
  flags.DEFINE_float("max_part_iou", 0.5, "Skip user objects with a part pair above this IoU.")
  flags.DEFINE_integer("num_previews", 4, "PNG previews per shard.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def config_from_flags() -> make.BuildConfig:
  return make.BuildConfig(
      sample=sampling.SampleConfig(n_surface=FLAGS.n_surface, n_near=FLAGS.n_near,
                                   n_volume=FLAGS.n_volume, sharp_fraction=FLAGS.sharp_fraction),
      ingest=ingest.IngestConfig(max_parts=FLAGS.max_parts,
                                 part_limit_policy=FLAGS.part_limit_policy,
                                 max_part_iou=FLAGS.max_part_iou),
      image_size=FLAGS.image_size, num_views=FLAGS.num_views, base_seed=FLAGS.base_seed,
      num_previews=FLAGS.num_previews)


def print_summary(m: dict) -> None:
  summary = {k: m[k] for k in ("count", "bytes", "num_shards", "complete", "built_now")}
  summary["skipped"] = len(m["skipped"])
  summary["repaired"] = len(m["repaired"])
  summary["seconds"] = round(m["seconds_now"], 2)
  print(json.dumps(summary))
  for shard, why in sorted(m.get("rebuilt", {}).items()):
    print(f"rebuilt shard {shard}: {why}")
  for s in m["skipped"]:
    print(f"skipped {s['input']}: {s['reason']}")


def main(argv: List[str]) -> int:
  """Parses our flags, hands the rest to Beam when --runner is given; returns the exit code."""
  define_flags()
  try:
    rest = FLAGS(argv, known_only=True)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  beam_args = rest[1:]
  error = records.cli_argument_error({n: FLAGS[n].value for n in ("source", "out")}, beam_args)
  if error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  use_beam = bool(beam_args)
  if use_beam and (FLAGS.shard_index != -1 or FLAGS.workers):
    print("error: --shard_index and --workers are for the in-process build; with --runner "
          "use the runner's options (e.g. --direct_num_workers)", file=sys.stderr)
    return 2
  cfg = config_from_flags()
  try:
    if use_beam:
      logging.getLogger("apache_beam").setLevel(logging.ERROR)  # workers' chatter
      from data_pipeline import beam_build  # pylint: disable=g-import-not-at-top
      plan = make.plan_build(FLAGS.source, FLAGS.out, FLAGS.num_shards, cfg=cfg)
      m = beam_build.run(plan, beam_args)
    else:
      m = make.build(FLAGS.source, FLAGS.out, FLAGS.num_shards, FLAGS.shard_index, cfg,
                     FLAGS.workers, FLAGS.progress)
  except (ValueError, FileNotFoundError) as e:  # bad source, sharding or a conflicting --out
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ImportError as e:  # a module the build needs is not installed (make.build_safe)
    print(f"error: {e}", file=sys.stderr)
    return 1
  print_summary(m)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
