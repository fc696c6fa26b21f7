r"""Image -> compositional 3D from the command line: a front-end of `moca_jax.pipeline`.

  python -m experiments.generate --checkpoint=outputs/dit --image=chair.png \
      --num_components=4 --steps=50 --cfg=7 --seed=0 --out=outputs/gen
  python -m experiments.generate --checkpoint=outputs/dit --image=renders/ --num_components=4
  python -m experiments.generate --checkpoint=outputs/dit_scene --image=room.png \
      --masks=room_ids.png --num_components=5          # scene model: instance-id mask image

--checkpoint is a train_dit workdir (or its checkpoints/ folder); the VAE that decodes the
latents is the one named in the checkpoint's config (vae.workdir) unless --vae is given.
--steps, --cfg and --method default to the checkpoint's config.sample.
Per image, under --out/<image stem>/ (`pipeline.write_outputs`): parts.glb (one node per
part), preview.png, router.png, router.json, latents.npy. A folder given as --image is
processed in batches; files that fail are skipped and listed in --out/summary.json.
Bad input (missing or unreadable file, wrong mask, bad checkpoint): one line on stderr,
exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from absl import app, flags

from moca_jax import io as mio
from moca_jax import pipeline


def _mask_for(masks: Optional[str], image_path: str) -> Optional[str]:
  """The mask file of an image: --masks itself, or <masks>/<image stem>.png (.bmp, .tif)."""
  if masks is None or not os.path.isdir(masks):
    return masks
  stem = os.path.splitext(os.path.basename(image_path))[0]
  for ext in (".png", ".bmp", ".tif", ".tiff"):
    if os.path.isfile(os.path.join(masks, stem + ext)):
      return os.path.join(masks, stem + ext)
  raise FileNotFoundError(f"{masks}: no mask named {stem}.png for image {image_path}")


def run(
    checkpoint: str,
    image: str,
    num_components: int,
    out: str,
    masks: Optional[str] = None,
    steps: Optional[int] = None,
    cfg: Optional[float] = None,
    seed: int = 0,
    method: Optional[str] = None,
    vae: Optional[str] = None,
    resolution: int = 64,
    batch_size: int = 4,
) -> dict:
  """The CLI as a function: one image file or a folder of images. Returns the summary."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  batch_mode = os.path.isdir(image)
  if batch_mode:
    files = sorted(
        os.path.join(image, f) for f in os.listdir(image) if f.lower().endswith(mio.IMAGE_SUFFIXES)
    )
    if not files:
      raise FileNotFoundError(
          f"{image}: folder holds no image files ({', '.join(mio.IMAGE_SUFFIXES)})"
      )
  else:
    files = [image]
  pipe = pipeline.load_pipeline(
      checkpoint, vae_workdir=vae, extract_kwargs={"resolution": resolution}
  )
  settings = pipe.sample_settings(steps=steps, cfg_scale=cfg, method=method)
  summary = {
      "checkpoint": os.path.abspath(checkpoint),
      "num_components": num_components,
      "steps": settings["steps"],
      "cfg": settings["cfg_scale"],
      "method": settings["method"],
      "seed": seed,
      "outputs": {},
      "skipped": {},
  }
  loaded = []
  for f in files:
    try:
      img, mask_path = mio.load_image(f), _mask_for(masks, f)
      mask = None if mask_path is None else mio.load_mask(mask_path)
      try:  # the pipeline's checks, before any sampling
        pipe.preprocess([img], num_components, None if mask is None else [mask])
      except ValueError as e:
        raise ValueError(f"{f}: {e}") from e
      loaded.append((f, img, mask))
    except (ValueError, FileNotFoundError) as e:
      if not batch_mode:
        raise
      summary["skipped"][f] = str(e)
      print(f"skipping {e}", file=sys.stderr)
  for start in tqdm(range(0, len(loaded), batch_size), desc="generate", disable=len(loaded) < 2):
    chunk = loaded[start : start + batch_size]
    result = pipe(
        [c[1] for c in chunk],
        num_components,
        [c[2] for c in chunk] if pipe.scene else None,
        steps=settings["steps"],
        cfg_scale=settings["cfg_scale"],
        method=settings["method"],
        seed=seed + start,
    )
    for b, (f, img, _) in enumerate(chunk):
      out_dir = os.path.join(out, os.path.splitext(os.path.basename(f))[0])
      routing = {k: v[b] for k, v in result.routing.items()}
      summary["outputs"][f] = pipeline.write_outputs(
          out_dir, result.meshes[b], result.latents[b], routing, img, pipe.global_blocks
      )
      summary["outputs"][f]["dir"] = out_dir
  mio.write_json(os.path.join(out, "summary.json"), summary)
  return summary


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "train_dit workdir (or its checkpoints/ folder).")
  flags.DEFINE_string("image", None, "An image file, or a folder of images (batch mode).")
  flags.DEFINE_string(
      "masks",
      None,
      "Scene models: instance-id mask image (or a folder with "
      "one mask per image, same file stem).",
  )
  flags.DEFINE_integer("num_components", 4, "Number of parts / instances to generate.")
  flags.DEFINE_integer("steps", None, "Flow ODE steps (default: the checkpoint's config).")
  flags.DEFINE_float(
      "cfg",
      None,
      "Classifier-free guidance scale, 1 = no guidance (default: the checkpoint's config).",
  )
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_enum(
      "method", None, ["euler", "heun"], "ODE solver (default: the checkpoint's config)."
  )
  flags.DEFINE_string("vae", None, "VAE workdir (default: the one in the checkpoint config).")
  flags.DEFINE_integer("resolution", 128, "Marching-cubes grid resolution per axis.")
  flags.DEFINE_integer("batch_size", 4, "Images per sampling batch in folder mode.")
  flags.DEFINE_string("out", "outputs/generate", "Output folder.")
  flags.mark_flags_as_required(["checkpoint", "image"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  try:
    summary = run(
        f.checkpoint,
        f.image,
        f.num_components,
        f.out,
        masks=f.masks,
        steps=f.steps,
        cfg=f.cfg,
        seed=f.seed,
        method=f.method,
        vae=f.vae,
        resolution=f.resolution,
        batch_size=f.batch_size,
    )
  except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
    print(f"generate: error: {e}", file=sys.stderr)
    sys.exit(2)
  n_ok, n_skip = len(summary["outputs"]), len(summary["skipped"])
  print(
      f"generated {n_ok} input(s) into {os.path.abspath(f.out)}"
      + (f"; skipped {n_skip} (see summary.json)" if n_skip else "")
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
