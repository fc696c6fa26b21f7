r"""Build dataset shards of per-part samples and renders.

  python -m data_pipeline.build --source=procedural:tiny --out=data/tiny
  python -m data_pipeline.build --source=/path/to/meshes --out=data/mine --num_shards=8 \
      --shard_index=3 --workers=4

--source: 'procedural:SPLIT' (tiny | test_tiny | small | test; append ':objects' or ':scenes'
for one kind only) or a directory of user meshes
(GLB/glTF/OBJ/PLY files, each geometry a part, or sub-folders of per-part files).
--shard_index=-1 (default) builds all unfinished shards in this process; S jobs with
--shard_index=0..S-1 build in parallel. Finished shards are skipped (resume). Bad inputs are
skipped and listed in manifest.json. See data_pipeline/records.py for the record schema.
"""
from __future__ import annotations

import json

from absl import app, flags

from data_pipeline import ingest, make, sampling

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (called only when run as a program)."""
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


def main(argv):
  del argv
  m = make.build(FLAGS.source, FLAGS.out, FLAGS.num_shards, FLAGS.shard_index,
                 config_from_flags(), FLAGS.workers, FLAGS.progress)
  summary = {k: m[k] for k in ("count", "bytes", "num_shards", "complete", "built_now")}
  summary["skipped"] = len(m["skipped"])
  summary["seconds"] = round(m["seconds_now"], 2)
  print(json.dumps(summary))
  for s in m["skipped"]:
    print(f"skipped {s['input']}: {s['reason']}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["source", "out"])
  app.run(main)
