r"""Why a DiT generates what it does: three measurements on latents of its own VAE.

  # held-out latents for the bundled model: the procedural tiny split, encoded by its VAE
  python -m data_pipeline.build --source=procedural:tiny --out=/tmp/tiny --image_size=112 \
      --n_surface=2048
  python -m data_pipeline.encode_latents --vae_checkpoint=assets/moca-small \
      --input=/tmp/tiny --output=/tmp/tiny_latents
  python -m experiments.diagnose_dit --checkpoint=assets/moca-small \
      --data_dir=/tmp/tiny_latents --batches=1 --batch_size=8 --grid=32 --out=outputs/diag

--checkpoint: a model bundle folder or a train_dit workdir; --data_dir: latent shards made
by data_pipeline.encode_latents with the checkpoint's VAE (the DiT's training data or a
held-out split encoded the same way). Cost: about 10 minutes per batch of 8 items on 2 CPU
cores for the bundled model (the 200 denoising forward passes dominate); with only 8 items
the image-use gains vary by a few percent from one item set to another.

1. Latent statistics (VAE space): the share of the latent variance carried by each part's
   token mean (the rest is the tokens' deviations from it, where the shape lives), and the
   decoded IoU of a part when its deviations are replaced by their mean, halved, or given
   noise of std --noise_probe (how precisely the DiT must generate them).
2. Flow loss by time t (the DiT's own space, `moca_jax.latent_norm`), conditioned on each
   item's own image, on another item's image (the batch rolled by one) and on the null
   condition: a model that reads its image has own < wrong, most at large t (t = 1 noise).
3. Partial denoising: ground-truth latents noised to t0, integrated back to 0 with Euler
   steps (own image, CFG 1 and --cfg), decoded; IoU against the ground truth's decode on a
   --grid^3 grid in [-1, 1]^3. t0 = 1 is generation from pure noise (with the component
   order the data gives).
Writes OUT.json (machine line included) and OUT.md; OUT_loss_by_t.png plots part 2.
Exit codes: 0 written; 2 bad arguments or unreadable inputs (one line on stderr).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moca_jax import cli, dit_task, flow, latent_norm
from moca_jax import io as mio

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (idempotent)."""
  if "data_dir" in FLAGS:
    return
  flags.DEFINE_string("checkpoint", "assets/moca-small", "Bundle folder or train_dit workdir.")
  flags.DEFINE_string("data_dir", None, "Latent shards (encode_latents) of the checkpoint's VAE.")
  flags.DEFINE_string("out", "outputs/dit_diagnostics", "Output stem (.json, .md, _loss_by_t.png).")
  flags.DEFINE_integer("batches", 4, "Batches of --batch_size items for parts 2 and 3.")
  flags.DEFINE_integer("batch_size", 8, "Items per batch.")
  flags.DEFINE_integer("max_components", 16, "Components per item (more are cut).")
  flags.DEFINE_list("times", ["0.1", "0.3", "0.5", "0.7", "0.9", "0.97"], "Part 2: flow times.")
  flags.DEFINE_list("denoise_from", ["0.3", "0.6", "0.9", "1.0"], "Part 3: start times t0.")
  flags.DEFINE_integer("denoise_steps", 25, "Part 3: Euler steps from t0 to 0.")
  flags.DEFINE_float("cfg", 7.0, "Part 3: the guided scale (CFG 1 is always measured too).")
  flags.DEFINE_integer("grid", 40, "Decode grid size per axis for the IoUs.")
  flags.DEFINE_float("noise_probe", 0.05, "Part 1: std of the noise added to the deviations.")


# ----------------------------------------------------------------------------------------
# Pure measurements
# ----------------------------------------------------------------------------------------


def occupancy_iou(a: np.ndarray, b: np.ndarray) -> float:
  """Mean IoU over parts of boolean occupancies a, b [P, Q] (a part empty in both counts 1)."""
  inter = np.logical_and(a, b).sum(axis=1)
  union = np.logical_or(a, b).sum(axis=1)
  return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def mean_variance_share(parts: np.ndarray) -> float:
  """Share of the total variance of part latents [P, L, C] carried by the token means."""
  parts = np.asarray(parts, np.float64)
  centred = parts - parts.mean(axis=(0, 1))
  means = parts.mean(axis=1, keepdims=True)
  within = np.square(parts - means).sum()
  return float(1.0 - within / max(np.square(centred).sum(), 1e-30))


def deviation_probes(parts: np.ndarray, noise_std: float, seed: int = 0) -> dict:
  """Variants of part latents [P, L, C] that keep the token means and change the
  deviations: {'mean only', 'deviations x0.5', 'deviations + noise'}."""
  means = parts.mean(axis=1, keepdims=True)
  rng = np.random.default_rng(seed)
  return {
      "mean only": np.broadcast_to(means, parts.shape).astype(np.float32),
      "deviations x0.5": (means + 0.5 * (parts - means)).astype(np.float32),
      f"deviations + noise {noise_std:g}": (
          parts + noise_std * rng.normal(size=parts.shape)
      ).astype(np.float32),
  }


def loss_by_time(
    velocity: Callable,
    z: jax.Array,
    cond: jax.Array,
    mask: jax.Array,
    times: Sequence[float],
    key: jax.Array,
) -> np.ndarray:
  """[len(times), 3] masked flow MSE at each t for the conditions (own, rolled, null).

  velocity(x_t, t [B], cond) -> v; z [B, N, L, C] in the DiT's space; cond [B, ...]."""
  eps = jax.random.normal(key, z.shape)
  conds = (cond, jnp.roll(cond, 1, axis=0), jnp.zeros_like(cond))
  out = []
  for t in times:
    tt = jnp.full((z.shape[0],), t, jnp.float32)
    x = flow.interpolate(z, eps, tt)
    out.append([float(flow.masked_mse(velocity(x, tt, c), eps - z, mask)) for c in conds])
  return np.asarray(out)


def denoise_from(
    velocity: Callable, z: jax.Array, cond, t0: float, steps: int, cfg_scale: float, key: jax.Array
) -> jax.Array:
  """z [B, N, L, C] noised to t0 with N(0, I), then `steps` Euler steps of the (guided)
  velocity from t0 to 0; returns the result in z's space."""
  eps = jax.random.normal(key, z.shape)
  x = flow.interpolate(z, eps, jnp.full((z.shape[0],), t0, jnp.float32))
  fn = velocity if cfg_scale == 1.0 else flow.cfg_velocity(velocity, cfg_scale)
  ts = np.linspace(t0, 0.0, steps + 1)
  for t, t_next in zip(ts[:-1], ts[1:]):
    x = x + (t_next - t) * fn(x, jnp.full((z.shape[0],), t, jnp.float32), cond)
  return x


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def _batches(config, data_dir: str, batch_size: int, n_max: int, count: int):
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.data.source, cfg.data.dir, cfg.data.num_workers = "records", data_dir, 0
  cfg.data.max_components, cfg.batch_size = n_max, batch_size
  it = dit_task.make_iterator_fn(cfg, shuffle=False)()
  return [dit_task.model_batch(next(it)) for _ in range(count)]


def run(
    checkpoint: str,
    data_dir: str,
    *,
    batches: int = 4,
    batch_size: int = 8,
    max_components: int = 16,
    times=(0.1, 0.5, 0.9),
    denoise_t0=(0.3, 1.0),
    denoise_steps: int = 25,
    cfg: float = 7.0,
    grid: int = 40,
    noise_probe: float = 0.05,
) -> dict:
  """The three measurements (module docstring) as a JSON-ready dict."""
  from moca_jax import pipeline  # pylint: disable=g-import-not-at-top

  pipe = pipeline.load_pipeline(checkpoint)
  config = pipe.config
  stats = latent_norm.stats_from_config(config.model)
  model = pipe.model
  params = {"params": pipe.params}
  vae, vae_params = pipe.vae_model, pipe.vae_params
  axis = np.linspace(-1.0, 1.0, grid, dtype=np.float32)
  queries = jnp.asarray(
      np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
  )
  decode = jax.jit(
      lambda z: vae.apply(
          vae_params, z, jnp.repeat(queries, z.shape[0], 0), method=type(vae).decode
      )
      < 0
  )
  occupancy = lambda z: np.asarray(decode(jnp.asarray(z, jnp.float32)))

  data = _batches(config, data_dir, batch_size, max_components, batches)
  parts = np.concatenate([b["latents"][b["component_mask"]] for b in data])
  gt_occ = occupancy(parts)
  result = {
      "checkpoint": os.path.abspath(checkpoint),
      "data_dir": os.path.abspath(data_dir),
      "items": batches * batch_size,
      "parts": int(len(parts)),
      "latent_norm": config.model.get("latent_norm", {}).get("kind", "none"),
      "mean_variance_share": mean_variance_share(parts),
      "deviation_probe_iou": {
          k: occupancy_iou(occupancy(v), gt_occ)
          for k, v in deviation_probes(parts, noise_probe).items()
      },
  }

  def velocity_for(mask):
    def velocity(x, t, c):
      reps = x.shape[0] // mask.shape[0]
      return model.apply(
          params,
          x,
          t,
          c,
          jnp.tile(mask, (reps, 1)),
          train=False,
          method=dit_task.ImageConditionedDiT.velocity,
      )

    return velocity

  losses = []
  denoise = {f"{t0:g}": {"cfg 1": [], f"cfg {cfg:g}": []} for t0 in denoise_t0}
  for i, b in enumerate(data):
    mask = jnp.asarray(b["component_mask"])
    z = latent_norm.normalize(jnp.asarray(b["latents"]), stats)
    images = dit_task.prepare_images(jnp.asarray(b["images"]), config.model.encoder)
    cond = model.apply(params, images, method=dit_task.ImageConditionedDiT.encode)
    velocity = jax.jit(velocity_for(mask))
    key = jax.random.PRNGKey(i)
    losses.append(loss_by_time(velocity, z, cond, mask, times, key))
    real = np.asarray(b["component_mask"])
    gt = occupancy(b["latents"][real])
    for t0 in denoise_t0:
      for scale in (1.0, cfg):
        out = denoise_from(velocity, z, cond, t0, denoise_steps, scale, key)
        zd = np.asarray(latent_norm.denormalize(out, stats))[real]
        denoise[f"{t0:g}"][f"cfg {scale:g}"].append(occupancy_iou(occupancy(zd), gt))
  mean_losses = np.mean(losses, axis=0)
  result["loss_by_t"] = [
      {
          "t": float(t),
          "own": float(own),
          "wrong": float(wrong),
          "null": float(null),
          "relative_gain": float((wrong - own) / own),
      }
      for t, (own, wrong, null) in zip(times, mean_losses)
  ]
  result["denoise_iou"] = {
      t0: {k: float(np.mean(v)) for k, v in d.items()} for t0, d in denoise.items()
  }
  result["settings"] = dict(
      batches=batches,
      batch_size=batch_size,
      max_components=max_components,
      denoise_steps=denoise_steps,
      cfg=cfg,
      grid=grid,
      noise_probe=noise_probe,
  )
  return result


def markdown(r: dict) -> str:
  """The report as markdown."""
  lines = [
      f"# DiT diagnostics: {r['checkpoint']}",
      "",
      f"{r['items']} items ({r['parts']} parts) of {r['data_dir']}; latent_norm "
      f"{r['latent_norm']}.",
      "",
      "## 1. Latent statistics (VAE space)",
      "",
      f"Share of the latent variance in the per-part token means: "
      f"{r['mean_variance_share']:.3f}.",
      "",
      "| deviations changed | decoded IoU vs unchanged |",
      "|---|---|",
  ]
  lines += [f"| {k} | {v:.3f} |" for k, v in r["deviation_probe_iou"].items()]
  lines += [
      "",
      "## 2. Flow loss by time (own / another item's / null image)",
      "",
      "| t | own | wrong | null | (wrong - own) / own |",
      "|---|---|---|---|---|",
  ]
  lines += [
      f"| {x['t']:g} | {x['own']:.4f} | {x['wrong']:.4f} | {x['null']:.4f} | "
      f"{x['relative_gain']:+.2%} |"
      for x in r["loss_by_t"]
  ]
  keys = list(next(iter(r["denoise_iou"].values())))
  lines += [
      "",
      "## 3. Partial denoising: IoU of the decoded parts vs the ground truth's",
      "",
      "| t0 | " + " | ".join(keys) + " |",
      "|---|" + "---|" * len(keys),
  ]
  lines += [
      f"| {t0} | " + " | ".join(f"{d[k]:.3f}" for k in keys) + " |"
      for t0, d in r["denoise_iou"].items()
  ]
  return "\n".join(lines) + "\n"


def plot_loss_by_t(r: dict, path: str) -> str:
  """PNG of part 2: loss against t for the three conditions."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5, 3.5))
  t = [x["t"] for x in r["loss_by_t"]]
  for key, style in (("own", "-o"), ("wrong", "--s"), ("null", ":^")):
    ax.plot(t, [x[key] for x in r["loss_by_t"]], style, label=f"{key} image")
  ax.set_xlabel("flow time t (1 = noise)")
  ax.set_ylabel("flow loss")
  ax.set_title("DiT loss by time and condition")
  ax.legend()
  return mio.save_figure(fig, path)


def _floats(values, flag: str) -> list:
  try:
    return [float(x) for x in values]
  except ValueError:
    raise ValueError(
        f"{flag}: expected comma-separated numbers, got {','.join(values)!r}"
    ) from None


def main(argv) -> int:
  del argv
  if not FLAGS.data_dir:
    print(
        "diagnose_dit: --data_dir is required (latent shards of the checkpoint's VAE)",
        file=sys.stderr,
    )
    return 2
  try:
    times = _floats(FLAGS.times, "--times")
    t0s = _floats(FLAGS.denoise_from, "--denoise_from")
    if not all(0.0 < t <= 1.0 for t in times + t0s):
      raise ValueError("--times and --denoise_from must lie in (0, 1]")
    r = run(
        FLAGS.checkpoint,
        FLAGS.data_dir,
        batches=FLAGS.batches,
        batch_size=FLAGS.batch_size,
        max_components=FLAGS.max_components,
        times=times,
        denoise_t0=t0s,
        denoise_steps=FLAGS.denoise_steps,
        cfg=FLAGS.cfg,
        grid=FLAGS.grid,
        noise_probe=FLAGS.noise_probe,
    )
  except (OSError, ValueError) as e:
    print(f"diagnose_dit: {e}", file=sys.stderr)
    return 2
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  mio.write_json(FLAGS.out + ".json", r, machine=True)
  mio.atomic_write_text(FLAGS.out + ".md", markdown(r))
  plot_loss_by_t(r, FLAGS.out + "_loss_by_t.png")
  print(markdown(r))
  return 0


if __name__ == "__main__":
  logging.getLogger("jax").setLevel(logging.ERROR)  # no backend probing lines before errors
  define_flags()
  cli.run(lambda argv: sys.exit(main(argv)))
