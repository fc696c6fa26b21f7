r"""End-to-end latency, image to GLB, through `moca_jax.pipeline.Pipeline` (not a test).

  python -m experiments.benchmark_e2e --size=paper        # GPU: issue 13's setting (defaults)
  python -m experiments.benchmark_e2e --size=tiny --components=3 --steps=1 --resolution=8 \
      --fine_resolution=16 --coarse_levels=4 --chunk_size=512 --image_pixels=48 \
      --out=/tmp/e2e                                                   # CPU smoke run

One object, --components parts, --steps Euler steps with classifier-free guidance (the CFG
batch in one forward), extraction on the --resolution^3 grid with the --fine_resolution^3
near-surface band, that grid itself built hierarchically from the dense --coarse_levels
(moca_jax.extract: only the first is decoded densely; empty: the dense --resolution^3 grid),
random weights (speed does not depend on training):
the DiT and image encoder of `experiments/configs/dit.py:SIZE` (bf16, cuDNN DiT attention on
GPU, as benchmark_train) and that config's VAE size, parameters normal with std 0.02
(`random_params`). Stages, each timed on its own and summed for the total:
  preprocess+encode  load the input PNG, pad / resize (`Pipeline.preprocess`), the encoder's
                     normalisation and the image encoder forward (jitted alone)
  sampling           `Pipeline.sample_latents` (preprocessing, encoder, the jitted ODE scan
                     and the routing pass) minus the stage above: the flow ODE
  decode+extraction  `Pipeline.decode`: VAE decoder self-attention, dense coarse grid of all
                     parts, batched band refinement level by level, marching cubes
                     (moca_jax.extract)
  GLB write          one node per part (`pipeline.parts_scene`), GLB export, atomic write
`write_outputs` (GLB + preview render + router maps + latents, what generate.py writes) is
timed as well, outside the image -> GLB total.

Baseline, side by side: with --coarse_levels, every run also times the two-level extraction
(dense --resolution^3 grid + band, no coarse levels) on the same latents, right after the
hierarchical one, so the speed-up is a ratio of medians from one process; both paths' meshes
are compared part by part (the same triangles, unless the decoder rounds a query's value
differently in the two paths' calls: last bits, see moca_jax.extract), and the points each
path decoded per level are counted (last run's latents; for the hierarchical path in one
more, untimed, extraction).

The extracted field: a VAE with random weights has no meaningful zero level set (it fills
the volume or is empty), so the extraction cost would be arbitrary. As in benchmark_vae, the
decoder still runs on every query at full cost, but part i's field is a sphere,
|x - c_i| - r_i + 0.01 * decoder(x), with c_i in [-0.5, 0.5]^3 and r_i in [0.15, 0.3] drawn
from its sampled latents (`SurfaceFieldVAE`): one closed surface per part, of area 0.3 to
1.1 (the parts of an object normalised to [-1, 1]^3 are mostly smaller, so the band and
marching cubes cost is on the high side). The dense coarse grid costs the same for any
field.

Warm-up excluded: the first image -> GLB run compiles; it is reported separately (first call
minus the median of --repeats timed runs = compilation and first-call overheads). Writes
<out>.json (moca_jax.io.write_json, machine named) and <out>.md.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Optional

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from moca_jax import cli
from moca_jax import io as mio

FLAGS = flags.FLAGS
TARGET_S = 10.0  # issue 13: image -> GLB, 16 parts, 50 CFG Euler steps, 256^3 + 512^3 band
ISSUE_SETTING = dict(
    size="paper", components=16, steps=50, guided=True, resolution=256, fine_resolution=512
)
STAGES = ("preprocess+encode", "sampling", "decode+extraction", "GLB write")


def define_flags() -> None:
  flags.DEFINE_string("size", "paper", "DiT config size (experiments/configs/dit.py).")
  flags.DEFINE_integer("components", 16, "Parts of the object (N).")
  flags.DEFINE_integer("steps", 50, "Euler steps.")
  flags.DEFINE_float("cfg_scale", 7.0, "Classifier-free guidance scale (1: no CFG batch).")
  flags.DEFINE_integer("resolution", 256, "Coarse extraction grid (cells per axis).")
  flags.DEFINE_integer("fine_resolution", 512, "Refined band resolution (0: coarse only).")
  flags.DEFINE_list(
      "coarse_levels",
      ["64"],
      "Hierarchical extraction: dense first level and bands below --resolution, each dividing"
      " the next (empty: the dense --resolution grid, no baseline run).",
  )
  flags.DEFINE_float(
      "coarse_band", 3.0, "|sdf| test of the coarse levels, in units of their spacing."
  )
  flags.DEFINE_integer("chunk_size", 32768, "Queries per part row of a decoder call.")
  flags.DEFINE_integer("image_pixels", 1024, "Side of the synthetic input PNG.")
  flags.DEFINE_integer("repeats", 3, "Timed image -> GLB runs after the warm-up (median).")
  flags.DEFINE_string("out", "experiments/results/e2e_latency", "Output path stem (.json, .md).")


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def _sphere_params(latents: jax.Array) -> jax.Array:
  """Latents [B, L, C] -> spheres [B, 4] (centre in [-0.5, 0.5]^3, radius in [0.15, 0.3]):
  the standardised means of the first 4 channels over the tokens, squashed."""
  x = latents.astype(jnp.float32)[..., :4]
  z = x.mean(axis=1) / (x.std(axis=1) + 1e-6) * np.sqrt(x.shape[1])
  return jnp.concatenate(
      [0.5 * jnp.tanh(z[:, :3]), 0.15 + 0.15 * jax.nn.sigmoid(z[:, 3:4])], axis=-1
  )


class SurfaceFieldVAE:
  """A VecSetVAE (same parameters, same decoder cost) whose field has a surface per part.

  Stands in for the VAE in `Pipeline(..., vae_model, ...)`: moca_jax.extract calls
  `apply(params, latents, method=VecSetVAE.decode_features)` (here -> (features [B, L, D],
  spheres [B, 4])) and `apply(params, inputs, queries, method=VecSetVAE.query_sdf)` (here ->
  |q - c| - r + 0.01 * decoder(q), [B, Q] float32). Other methods are refused.
  """

  def __init__(self, vae):
    self.vae = vae
    self.config = vae.config

  def apply(self, params, *args, method=None):
    from moca_jax.vae import VecSetVAE  # pylint: disable=g-import-not-at-top

    if method is VecSetVAE.decode_features:
      (latents,) = args
      return self.vae.apply(params, latents, method=method), _sphere_params(latents)
    if method is VecSetVAE.query_sdf:
      (features, spheres), queries = args
      out = self.vae.apply(params, features, queries, method=method).astype(jnp.float32)
      dist = jnp.linalg.norm(queries - spheres[:, None, :3], axis=-1)
      return dist - spheres[:, None, 3] + 0.01 * out
    raise ValueError(f"SurfaceFieldVAE: method {method!r} is not part of the benchmark")


def random_params(init_fn, seed: int) -> Any:
  """Parameters shaped like init_fn(key)'s, each entry normal with std 0.02 (float32).

  Only the shapes are traced (`jax.eval_shape`): the initialisers' forward pass is never
  compiled, which would cost more than the whole timed run at a small size; speed does not
  depend on the values.
  """
  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(seed))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef,
      [jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32), s.dtype) for s in leaves],
  )


def build_pipeline(
    size: str,
    components: int,
    resolution: int,
    fine_resolution: int,
    chunk_size: int,
    coarse_levels: tuple[int, ...] = (),
    coarse_band: float = 3.0,
):
  """`Pipeline` of random-weight models of `size` (bf16 + cuDNN DiT attention on GPU), with
  the extraction settings; the config allows `components` parts."""
  from flax.linen import meta  # pylint: disable=g-import-not-at-top

  from experiments.configs import dit as dit_configs  # pylint: disable=g-import-not-at-top
  from moca_jax import dit_task, pipeline  # pylint: disable=g-import-not-at-top
  from moca_jax.vae import VecSetVAE, init_vae, vae_config  # pylint: disable=g-import-not-at-top

  cfg = dit_configs.get_config(size)
  cfg.data.max_components = max(cfg.data.max_components, components)
  gpu = jax.default_backend() == "gpu"
  if gpu:
    cfg.model.dit.dtype = cfg.model.encoder.dtype = "bfloat16"
    cfg.model.dit.attention_implementation = "cudnn"
  model = dit_task.ImageConditionedDiT(cfg.model)
  enc, dit = cfg.model.encoder, cfg.model.dit
  images = jnp.zeros((1, enc.image_size, enc.image_size, 3), jnp.float32)
  x = jnp.zeros((1, components, dit.latent_tokens, dit.latent_channels), jnp.float32)
  params = random_params(
      lambda r: meta.unbox(
          model.init(r, images, x, jnp.zeros((1,)), jnp.ones((1, components), bool))["params"]
      ),
      seed=0,
  )
  vae_cfg = vae_config(cfg.vae.size)
  vae_cfg.dtype = "bfloat16" if gpu else "float32"
  vae = VecSetVAE(vae_cfg)
  vae_params = random_params(lambda r: meta.unbox(init_vae(vae, r)), seed=1)
  extract_kwargs = dict(
      resolution=resolution,
      fine_resolution=fine_resolution or None,
      chunk_size=chunk_size,
      coarse_levels=tuple(coarse_levels),
      coarse_band=coarse_band,
  )
  # component_buckets=(): the benchmark times exactly the requested N (no padding to a bucket)
  return pipeline.Pipeline(cfg, params, SurfaceFieldVAE(vae), vae_params, extract_kwargs,
                           component_buckets=())


def synthetic_image(pixels: int) -> np.ndarray:
  """uint8 [pixels, pixels, 3]: coloured discs on white (a foreground to crop)."""
  yy, xx = np.mgrid[:pixels, :pixels] / pixels
  img = np.full((pixels, pixels, 3), 255, np.uint8)
  for i, (cy, cx, r) in enumerate([(0.4, 0.4, 0.2), (0.6, 0.55, 0.18), (0.35, 0.65, 0.1)]):
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [(60 + 70 * i) % 256, 90, 200 - 50 * i]
  return img


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def image_to_glb(pipe, image_path: str, out_dir: str, args: dict, seed: int) -> dict:
  """One image -> GLB run, each stage timed (seconds); also times `write_outputs`, whose
  folder is out_dir/result (written whole, so not out_dir itself, which holds the input)."""
  from moca_jax import dit_task, pipeline  # pylint: disable=g-import-not-at-top

  n, steps, cfg_scale = args["components"], args["steps"], args["cfg_scale"]
  t0 = time.perf_counter()
  prepared = dit_task.prepare_images(
      jnp.asarray(pipe.preprocess(image_path, n)), pipe.config.model.encoder
  )
  _encode(pipe)(pipe.params, prepared).block_until_ready()
  t1 = time.perf_counter()
  z, routing = pipe.sample_latents(image_path, n, steps=steps, cfg_scale=cfg_scale, seed=seed)
  t2 = time.perf_counter()
  meshes = pipe.decode(z)[0]
  t3 = time.perf_counter()
  scene, empty = pipeline.parts_scene(meshes)
  mio.atomic_write_bytes(os.path.join(out_dir, "parts.glb"), scene.export(file_type="glb"))
  t4 = time.perf_counter()
  routing0 = {k: v[0] for k, v in routing.items()}
  pipeline.write_outputs(os.path.join(out_dir, "result"), meshes, z[0], routing0,
                         global_blocks=pipe.global_blocks)
  t5 = time.perf_counter()
  baseline = None
  if pipe.extract_kwargs.get("coarse_levels"):
    t = time.perf_counter()
    two_level, stats = decode_with_stats(pipe, z, coarse_levels=())
    baseline = {
        "decode_s": time.perf_counter() - t,
        "parts_identical": sum(map(same_mesh, meshes, two_level)),
        "faces": [len(m.faces) for m in two_level],
        "decoded_points": stats,
    }
  stages = {
      "preprocess+encode": t1 - t0,
      "sampling": (t2 - t1) - (t1 - t0),
      "decode+extraction": t3 - t2,
      "GLB write": t4 - t3,
  }
  return {
      "stages": stages,
      "image_to_glb_s": sum(stages.values()),
      "sample_latents_s": t2 - t1,
      "write_outputs_s": t5 - t4,
      "faces": [len(m.faces) for m in meshes],
      "empty_parts": empty,
      "two_level": baseline,
      "latents": z,
  }


def decode_with_stats(pipe, latents: np.ndarray, **overrides) -> tuple[list, dict]:
  """`Pipeline.decode`'s work for one object's latents [1, N, L, C] (the same
  `extract_vae_meshes` call) with extraction settings overridden (coarse_levels=(): the
  two-level baseline) -> (N meshes, the decoded points per level: `extract_meshes` stats)."""
  from moca_jax import extract  # pylint: disable=g-import-not-at-top

  flat = jnp.asarray(latents.reshape(-1, *latents.shape[2:]))
  kwargs = {**pipe.extract_kwargs, **overrides, "return_stats": True}
  return extract.extract_vae_meshes(pipe.vae_model, pipe.vae_params, flat, **kwargs)


def same_mesh(a, b, atol: float = 1e-5) -> bool:
  """The same triangles (faces equal) with vertices within atol (world units)."""
  return (
      a.faces.shape == b.faces.shape
      and np.array_equal(a.faces, b.faces)
      and np.allclose(a.vertices, b.vertices, rtol=0, atol=atol)
  )


_ENCODERS: dict[int, Any] = {}


def _encode(pipe):
  """The pipeline's image encoder alone, jitted (once per pipeline)."""
  from moca_jax import dit_task  # pylint: disable=g-import-not-at-top

  if id(pipe) not in _ENCODERS:
    _ENCODERS[id(pipe)] = jax.jit(
        lambda p, im: pipe.model.apply(
            {"params": p}, im, method=dit_task.ImageConditionedDiT.encode
        )
    )
  return _ENCODERS[id(pipe)]


def check_settings(args: dict) -> None:
  """ValueError naming the first setting the run could not use (before any model is built;
  the pipeline checks components, steps and cfg_scale itself before sampling)."""
  for name, least in (("resolution", 2), ("chunk_size", 1), ("image_pixels", 16), ("repeats", 1)):
    if args[name] < least:
      raise ValueError(f"{name}={args[name]}: must be >= {least}")
  fine = args["fine_resolution"]
  if fine < 0 or fine % args["resolution"]:
    raise ValueError(
        f"fine_resolution={fine}: must be 0 (no band) or a multiple of "
        f"resolution={args['resolution']}"
    )
  from moca_jax import extract  # pylint: disable=g-import-not-at-top

  extract.check_levels(
      args["coarse_levels"], args["resolution"], fine or None, 1.0, args["coarse_band"]
  )


def run_benchmark(
    size: str = "paper",
    components: int = 16,
    steps: int = 50,
    cfg_scale: float = 7.0,
    resolution: int = 256,
    fine_resolution: int = 512,
    chunk_size: int = 32768,
    image_pixels: int = 1024,
    repeats: int = 3,
    coarse_levels: tuple[int, ...] = (64,),
    coarse_band: float = 3.0,
) -> dict:
  """Builds the pipeline, runs image -> GLB once to compile, then `repeats` timed runs.

  Returns the result dict (settings, per-stage first-call and median seconds, total, the
  target verdict when the settings are issue 13's). Raises ValueError for settings the
  pipeline refuses (its message names the field).
  """
  args = dict(
      size=size,
      components=components,
      steps=steps,
      cfg_scale=cfg_scale,
      resolution=resolution,
      fine_resolution=fine_resolution,
      chunk_size=chunk_size,
      image_pixels=image_pixels,
      repeats=repeats,
      coarse_levels=tuple(int(r) for r in coarse_levels),
      coarse_band=coarse_band,
  )
  check_settings(args)
  t = time.perf_counter()
  pipe = build_pipeline(
      size, components, resolution, fine_resolution, chunk_size, coarse_levels, coarse_band
  )
  build_s = time.perf_counter() - t
  with tempfile.TemporaryDirectory() as tmp:
    image_path = mio.write_png(os.path.join(tmp, "input.png"), synthetic_image(image_pixels))
    first = image_to_glb(pipe, image_path, tmp, args, seed=0)
    runs = [image_to_glb(pipe, image_path, tmp, args, seed=1 + i) for i in range(repeats)]
  median = {s: statistics.median(r["stages"][s] for r in runs) for s in STAGES}
  total = statistics.median(r["image_to_glb_s"] for r in runs)
  dev = jax.devices()[0]
  res = {
      "settings": args,
      "device": f"{dev.platform}: {dev.device_kind}",
      "jax": jax.__version__,
      "dtype": "bfloat16" if jax.default_backend() == "gpu" else "float32",
      "build_s": build_s,
      "stages_median_s": median,
      "stages_first_call_s": first["stages"],
      "image_to_glb_median_s": total,
      "image_to_glb_runs_s": [r["image_to_glb_s"] for r in runs],
      "image_to_glb_first_call_s": first["image_to_glb_s"],
      "compile_and_first_call_overhead_s": first["image_to_glb_s"] - total,
      "sample_latents_median_s": statistics.median(r["sample_latents_s"] for r in runs),
      "write_outputs_median_s": statistics.median(r["write_outputs_s"] for r in runs),
      "faces_per_part": runs[-1]["faces"],
      "empty_parts": runs[-1]["empty_parts"],
      "decoded_points": decode_with_stats(pipe, runs[-1]["latents"])[1],
      "two_level": None,
  }
  if args["coarse_levels"]:
    base = [r["two_level"] for r in runs]
    decode_s = statistics.median(b["decode_s"] for b in base)
    res["two_level"] = {
        "decode_median_s": decode_s,
        "decode_first_call_s": first["two_level"]["decode_s"],
        "decode_speedup": decode_s / median["decode+extraction"],
        "image_to_glb_median_s": total - median["decode+extraction"] + decode_s,
        "parts_identical": min(b["parts_identical"] for b in base),
        "faces_per_part": base[-1]["faces"],
        "decoded_points": base[-1]["decoded_points"],
    }
  setting = dict(
      size=size,
      components=components,
      steps=steps,
      guided=cfg_scale != 1.0,
      resolution=resolution,
      fine_resolution=fine_resolution,
  )
  res["target"] = (
      {"limit_s": TARGET_S, "met": total <= TARGET_S} if setting == ISSUE_SETTING else None
  )
  return res


def markdown(res: dict) -> str:
  s = res["settings"]
  band = f" with the {s['fine_resolution']}^3 band" if s["fine_resolution"] else ""
  levels = s.get("coarse_levels", ())
  if levels:
    band += (
        f", the {s['resolution']}^3 grid built from the dense "
        f"{'^3 -> '.join(map(str, levels))}^3 level{'s' if len(levels) > 1 else ''}"
        f" (coarse band {s['coarse_band']:g} spacings)"
    )
  cfg = f"CFG {s['cfg_scale']:g}" if s["cfg_scale"] != 1.0 else "no CFG"
  lines = [
      "# End-to-end latency, image to GLB",
      "",
      f"Written by `experiments/benchmark_e2e.py` on {res['device']} (jax {res['jax']}, "
      f"{res['dtype']}); host: {res['machine']}.",
      "",
      f"Size {s['size']} (random weights), one {s['image_pixels']}x{s['image_pixels']} PNG, "
      f"{s['components']} parts, {s['steps']} Euler steps, {cfg}, extraction at "
      f"{s['resolution']}^3{band}, {s['chunk_size']} queries per part row of a decoder call; "
      f"part fields are spheres + 0.01 x the decoder (see the script's docstring). Median of "
      f"{s['repeats']} runs after a warm-up run.",
      "",
      "| stage | median s | first call s |",
      "| --- | --- | --- |",
  ]
  for stage in STAGES:
    lines.append(
        f"| {stage} | {res['stages_median_s'][stage]:.3f} | "
        f"{res['stages_first_call_s'][stage]:.3f} |"
    )
  two = res.get("two_level")
  if two:
    lines.append(
        f"| decode+extraction, two-level baseline | {two['decode_median_s']:.3f} | "
        f"{two['decode_first_call_s']:.3f} |"
    )
  lines += [
      f"| **image to GLB** | **{res['image_to_glb_median_s']:.3f}** | "
      f"{res['image_to_glb_first_call_s']:.3f} |",
      "",
      f"Compilation and first-call overhead: {res['compile_and_first_call_overhead_s']:.1f} s "
      f"(first run minus the median); building the models: {res['build_s']:.1f} s. "
      f"`write_outputs` (GLB, preview render, router maps, latents): "
      f"{res['write_outputs_median_s']:.3f} s, not in the total. Faces per part: "
      f"{res['faces_per_part']}; empty parts: {res['empty_parts'] or 'none'}.",
      "",
  ]
  if two:
    lines += [
        f"Two-level baseline (dense {s['resolution']}^3 grid + band; timed in the same runs on "
        f"the same latents, not in the total): decode+extraction {two['decode_median_s']:.3f} s,"
        f" so the hierarchical extraction is **{two['decode_speedup']:.1f}x** faster and image"
        f" to GLB would take {two['image_to_glb_median_s']:.2f} s with the baseline. Parts with"
        f" the same meshes both ways: {two['parts_identical']} of {s['components']}"
        f" (fewest over the runs); baseline faces per part: {two['faces_per_part']}.",
        "",
    ]
  lines += [_points_table(res), ""]
  target = res["target"]
  if target is None:
    lines.append("Not issue 13's setting, so no target verdict.")
  else:
    verdict = "met" if target["met"] else "missed"
    lines.append(
        f"Target (issue 13): image to GLB <= {target['limit_s']:g} s: **{verdict}** "
        f"({res['image_to_glb_median_s']:.2f} s)."
    )
  return "\n".join(lines) + "\n"


def _points_table(res: dict) -> str:
  """Decoded points per level, both paths (the last run's latents, all parts)."""
  rows = [("this run", res["decoded_points"])]
  if res.get("two_level"):
    rows.append(("two-level baseline", res["two_level"]["decoded_points"]))
  lines = [
      "Decoded points (all parts, last run's latents):",
      "",
      "| extraction | points per level | total | decoder queries (padded) |",
      "| --- | --- | --- | --- |",
  ]
  for name, st in rows:
    per_level = "; ".join(f"{r}^3: {p:,}" for r, p in zip(st["levels"], st["decoded_points"]))
    lines.append(
        f"| {name} | {per_level} | {sum(st['decoded_points']):,} | "
        f"{sum(st['decoder_queries']):,} |"
    )
  return "\n".join(lines)


def write_results(res: dict, stem: str) -> str:
  """<stem>.json (with the machine) and <stem>.md, each written atomically; returns the
  markdown."""
  from moca_jax.machine import describe_host  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  mio.write_json(stem + ".json", res, machine=True)
  text = markdown({**res, "machine": describe_host()})
  mio.atomic_write_text(stem + ".md", text)
  return text


def parse_levels(values: list[str]) -> tuple[int, ...]:
  """--coarse_levels strings -> resolutions; ValueError naming the flag if one is not an
  integer."""
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"coarse_levels={','.join(values)}: must be integers") from None


def main(argv: list[str]) -> Optional[int]:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    res = run_benchmark(
        size=FLAGS.size,
        components=FLAGS.components,
        steps=FLAGS.steps,
        cfg_scale=FLAGS.cfg_scale,
        resolution=FLAGS.resolution,
        fine_resolution=FLAGS.fine_resolution,
        chunk_size=FLAGS.chunk_size,
        image_pixels=FLAGS.image_pixels,
        repeats=FLAGS.repeats,
        coarse_levels=parse_levels(FLAGS.coarse_levels),
        coarse_band=FLAGS.coarse_band,
    )
  except ValueError as e:
    print(f"benchmark_e2e: {e}", flush=True)
    return 2
  print(write_results(res, FLAGS.out), flush=True)
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
