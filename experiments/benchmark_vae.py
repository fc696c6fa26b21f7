r"""VAE throughput and mesh-extraction time (not a test).

  python -m experiments.benchmark_vae --size=triposg-1024 --dtype=bfloat16   # GPU
  python -m experiments.benchmark_vae --size=tiny --resolution=64 --fine_resolution=128 \
      --batch=4 --num_points=512                                             # CPU

Measures, with random parameters (speed does not depend on training):
  encode      surface points [B, P, 3] + normals -> latents, eval mode (FPS over all points)
              and train mode (FPS of a random 4L subset), components/s
  fps         FPS alone (4L -> L points), components/s
  decode      decoder self-attention stack (latents -> features), components/s
  query       SDF queries through the query cross-attention, points/s
  extraction  one component: dense grid at --resolution, and coarse + band refined to
              --fine_resolution, incl. marching cubes (seconds)
For extraction the field is |x| - 0.5 + 0.01 * (decoder output): the full decoder cost with
a realistic (sphere) surface, since an untrained decoder's zero set fills the whole volume.
Writes <out>.json and <out>.md naming the machine. Times are medians over --repeats runs
after one warm-up (compilation excluded).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from moca_jax import cli
from moca_jax import extract
from moca_jax import io as mio
from moca_jax.fps import farthest_point_sampling
from moca_jax.vae import VecSetVAE, count_params, init_vae, vae_config

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("size", "triposg-1024", "VAE size (moca_jax.vae.vae_config).")
  flags.DEFINE_string(
      "dtype", "auto", "Compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."
  )
  flags.DEFINE_string("attention", "auto", "Attention implementation: auto, xla, cudnn.")
  flags.DEFINE_integer("batch", 8, "Components per encode/decode call.")
  flags.DEFINE_integer("num_points", 8192, "Surface points per component for the encoder.")
  flags.DEFINE_integer("num_queries", 65536, "Queries per component for the query benchmark.")
  flags.DEFINE_integer("chunk_size", 65536, "Queries per decoder call in extraction.")
  flags.DEFINE_integer("resolution", 256, "Coarse extraction grid (cells per axis).")
  flags.DEFINE_integer("fine_resolution", 512, "Refined band resolution (0: skip).")
  flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
  flags.DEFINE_integer("extract_repeats", 2, "Timed repeats for extraction.")
  flags.DEFINE_string("out", "experiments/results/vae_benchmark", "Output path stem (.json, .md).")


def _time(fn, repeats):
  """Median wall time of fn() (which must block on its result) after one warm-up call."""
  fn()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts), ts


def machine_description() -> dict:
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": dev.device_kind,
      "num_devices": jax.device_count(),
      "host": platform.node(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "load_average_1min": os.getloadavg()[0],
  }


def random_clouds(rng, b, p):
  pts = rng.normal(size=(b, p, 3)).astype(np.float32)
  nrm = pts / np.linalg.norm(pts, axis=-1, keepdims=True)
  return jnp.asarray(nrm * rng.uniform(0.3, 0.9, (b, 1, 1)).astype(np.float32)), jnp.asarray(nrm)


def run_benchmark() -> dict:
  backend = jax.default_backend()
  machine = machine_description()
  cfg = vae_config(FLAGS.size)
  cfg.dtype = (
      FLAGS.dtype if FLAGS.dtype != "auto" else ("bfloat16" if backend == "gpu" else "float32")
  )
  cfg.attention_implementation = FLAGS.attention
  model = VecSetVAE(cfg)
  params = jax.jit(lambda k: init_vae(model, k, num_points=FLAGS.num_points))(jax.random.PRNGKey(0))
  from flax.linen import meta

  params = meta.unbox(params)
  L = cfg.num_latents
  rng = np.random.default_rng(0)
  pts, nrm = random_clouds(rng, FLAGS.batch, FLAGS.num_points)
  res = {
      "machine": machine,
      "size": FLAGS.size,
      "dtype": cfg.dtype,
      "attention": FLAGS.attention,
      "num_latents": L,
      "batch": FLAGS.batch,
      "num_points": FLAGS.num_points,
      "params_millions": count_params(params) / 1e6,
      "rows": [],
  }

  def add(name, seconds, per_call, unit, note=""):
    res["rows"].append(
        {
            "name": name,
            "seconds": seconds,
            "throughput": per_call / seconds,
            "unit": unit,
            "note": note,
        }
    )
    print(
        f"{name:<34s} {seconds * 1e3:10.2f} ms   {per_call / seconds:12.1f} {unit}  {note}",
        flush=True,
    )

  enc_eval = jax.jit(
      lambda p, x, n: model.apply(p, x, n, deterministic=True, method=VecSetVAE.encode)[0]
  )
  enc_train = jax.jit(
      lambda p, x, n, k: model.apply(
          p, x, n, deterministic=False, method=VecSetVAE.encode, rngs={"fps": k}
      )[0]
  )
  t, _ = _time(lambda: enc_eval(params, pts, nrm).block_until_ready(), FLAGS.repeats)
  add("encode (eval, FPS over all P)", t, FLAGS.batch, "components/s")
  t, _ = _time(
      lambda: enc_train(params, pts, nrm, jax.random.PRNGKey(1)).block_until_ready(), FLAGS.repeats
  )
  add("encode (train, FPS of 4L subset)", t, FLAGS.batch, "components/s")
  m = min(FLAGS.num_points, cfg.subset_factor * L)
  start = jnp.zeros((FLAGS.batch,), jnp.int32)
  t, _ = _time(
      lambda: farthest_point_sampling(pts[:, :m], L, start).block_until_ready(), FLAGS.repeats
  )
  add(f"fps ({m} -> {L} points)", t, FLAGS.batch, "components/s")

  z = enc_eval(params, pts, nrm)
  feats_fn = jax.jit(lambda p, z: model.apply(p, z, method=VecSetVAE.decode_features))
  t, _ = _time(lambda: feats_fn(params, z).block_until_ready(), FLAGS.repeats)
  add("decode features (self-attn stack)", t, FLAGS.batch, "components/s")
  feats = feats_fn(params, z)
  q = jnp.asarray(rng.uniform(-1, 1, (1, FLAGS.num_queries, 3)).astype(np.float32))
  query_fn = jax.jit(lambda p, f, q: model.apply(p, f, q, method=VecSetVAE.query_sdf))
  t, _ = _time(lambda: query_fn(params, feats[:1], q).block_until_ready(), FLAGS.repeats)
  add(f"query sdf ({FLAGS.num_queries} pts, 1 comp.)", t, FLAGS.num_queries, "points/s")

  # ---- extraction of one component ----
  def sphere_field(params, features, queries):
    out = model.apply(params, features, queries, method=VecSetVAE.query_sdf)
    return jnp.linalg.norm(queries, axis=-1) - 0.5 + 0.01 * out

  sdf_fn = jax.tree_util.Partial(sphere_field, params)
  one = feats[:1]
  r = FLAGS.resolution
  t, _ = _time(
      lambda: extract.extract_meshes(
          sdf_fn, one, resolution=r, fine_resolution=None, chunk_size=FLAGS.chunk_size
      ),
      FLAGS.extract_repeats,
  )
  mesh = extract.extract_meshes(
      sdf_fn, one, resolution=r, fine_resolution=None, chunk_size=FLAGS.chunk_size
  )[0]
  add(f"extract dense {r}^3", t, 1, "components/s", f"{len(mesh.faces)} faces")
  t, _ = _time(
      lambda: extract.decode_dense_grid(sdf_fn, one, r, 1.005, FLAGS.chunk_size),
      FLAGS.extract_repeats,
  )
  add(f"  of which decoding {r + 1}^3 points", t, (r + 1) ** 3, "points/s")
  if FLAGS.fine_resolution:
    fr = FLAGS.fine_resolution
    t, _ = _time(
        lambda: extract.extract_meshes(
            sdf_fn, one, resolution=r, fine_resolution=fr, chunk_size=FLAGS.chunk_size
        ),
        FLAGS.extract_repeats,
    )
    coarse = extract.decode_dense_grid(sdf_fn, one, r, 1.005, FLAGS.chunk_size)[0]
    cells = extract.near_surface_cells(coarse, r, 1.005)
    band_pts = int(extract._fine_point_mask(cells, fr // r).sum())
    mesh = extract.extract_meshes(
        sdf_fn, one, resolution=r, fine_resolution=fr, chunk_size=FLAGS.chunk_size
    )[0]
    add(
        f"extract {r}^3 + band {fr}^3",
        t,
        1,
        "components/s",
        f"{len(mesh.faces)} faces, {band_pts} band points "
        f"({100 * band_pts / (fr + 1) ** 3:.1f}% of {fr + 1}^3)",
    )
  return res


def write_results(res: dict, stem: str):
  stem = Path(stem)
  stem.parent.mkdir(parents=True, exist_ok=True)
  key = f"{res['machine']['backend']}:{res['size']}"
  old = {}
  if stem.with_suffix(".json").exists():
    old = json.loads(stem.with_suffix(".json").read_text())
  old[key] = res  # one entry per (backend, size): CPU and GPU runs share the files
  mio.atomic_write_text(stem.with_suffix(".json"), json.dumps(old, indent=2) + "\n")
  lines = [
      "# VAE benchmark",
      "",
      "Written by `experiments/benchmark_vae.py`; medians after a warm-up (compilation",
      "excluded); random parameters. Extraction field: |x| - 0.5 + 0.01 * decoder output",
      "(full decoder cost, sphere-like surface). One section per machine and size.",
      "",
  ]
  for k, r in old.items():
    m = r["machine"]
    load = (
        f", load average {m['load_average_1min']:.1f} at the start"
        if "load_average_1min" in m
        else ""
    )
    lines += [
        f"## {m['device']} ({m['backend']}), size {r['size']}",
        "",
        f"dtype {r['dtype']}, attention {r['attention']}, L = {r['num_latents']} tokens, "
        f"batch {r['batch']}, {r['num_points']} surface points, "
        f"{r['params_millions']:.1f}M parameters; host {m['host']} ({m['cpu_count']} CPUs"
        f"{load}), jax {m['jax']}",
        "",
        "| what | time per call | throughput | note |",
        "| --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
      lines.append(
          f"| {row['name']} | {row['seconds'] * 1e3:.2f} ms | "
          f"{row['throughput']:.4g} {row['unit']} | {row['note']} |"
      )
    lines.append("")
  mio.atomic_write_text(stem.with_suffix(".md"), "\n".join(lines))


def main(argv):
  del argv
  res = run_benchmark()
  write_results(res, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
