r"""Image -> compositional 3D from the command line: a front-end of `moca_jax.pipeline`.

  python -m experiments.generate --image=my.png                    # the bundled model
  python -m experiments.generate --image=chair.png --num_components=6 --steps=50 --cfg=7 \
      --seed=0 --out=outputs/gen
  python -m experiments.generate --checkpoint=outputs/dit --image=renders/ --num_components=4
  python -m experiments.generate --checkpoint=outputs/dit_scene --image=room.png \
      --masks=room_ids.png --num_components=5          # scene model: instance-id mask image

--checkpoint defaults to the model that ships in the repository (the bundle at
assets/moca-small, `pipeline.DEFAULT_BUNDLE`): no other download is needed; when that folder
is missing, one line on stderr and exit code 2. --checkpoint may also name another model
bundle (moca_jax.bundle) or a train_dit workdir (or its checkpoints/ folder), whose VAE is
the one named in its config (vae.workdir) unless --vae is given.
--steps, --cfg and --method default to the checkpoint's config.sample. --num_components
(default 4) is the number of parts to generate: the model does not predict it, so give the
count the picture needs, up to the model's trained maximum (config.data.max_components: 16
for the bundled model).
Images: RGBA (the alpha is composited on white) or RGB on a plain background, any size.
Per image, under --out/<image stem>/ (`pipeline.write_outputs`): parts.glb (one node per
part), preview.png, router.png, router.json, latents.npy; each such folder is written whole,
so a run into the same --out replaces an image's earlier result (the last line counts them)
and never leaves a file of it beside the new ones. A folder given as --image is
processed in batches; files that fail are skipped and listed in --out/summary.json.
Arguments are checked before any work (--steps >= 1, a finite --cfg >= 0, --num_components
up to the trained maximum unless --force_components). Images go through moca_jax.io.load_image
(16-bit, palette, alpha, EXIF orientation, CMYK; over 100 Mpx refused) and are padded to a
square, never stretched; an image with no foreground is refused unless --allow_empty. Inputs
sharing a stem (chair.png, chair.jpg) get distinct folders (chair_png, chair_jpg).
--resolution (marching-cubes cells per axis, default 128) sets most of the CPU time: VAE
decoding grows with its cube.
Bad input: one line on stderr naming the input and the reason. Exit codes: 0 every input
generated; 1 some inputs skipped (listed with the reason in summary.json; the rest written);
2 nothing generated (bad arguments or checkpoint, a missing bundled model, or every input
failed).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

from absl import app, flags, logging

from moca_jax import cli
from moca_jax import io as mio
from moca_jax import extract, pipeline


def _mask_for(masks: Optional[str], image_path: str) -> Optional[str]:
  """The mask file of an image: --masks itself, or <masks>/<image stem>.png (.bmp, .tif)."""
  if masks is None or not os.path.isdir(masks):
    return masks
  stem = os.path.splitext(os.path.basename(image_path))[0]
  for ext in (".png", ".bmp", ".tif", ".tiff"):
    if os.path.isfile(os.path.join(masks, stem + ext)):
      return os.path.join(masks, stem + ext)
  raise FileNotFoundError(f"{masks}: no mask named {stem}.png for image {image_path}")


def output_names(files: list[str]) -> dict[str, str]:
  """Input file -> its output folder name: the file stem, or stem_ext when several inputs
  share a stem (chair.png, chair.jpg -> chair_png, chair_jpg), so no result overwrites
  another."""
  stems: dict[str, int] = {}
  for f in files:
    stem = os.path.splitext(os.path.basename(f))[0]
    stems[stem] = stems.get(stem, 0) + 1
  names = {}
  for f in files:
    stem, ext = os.path.splitext(os.path.basename(f))
    names[f] = stem if stems[stem] == 1 else f"{stem}_{ext.lstrip('.').lower() or 'noext'}"
  return names


def run(
    checkpoint: Optional[str],
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
    allow_empty: bool = False,
    force_components: bool = False,
    kind: Optional[str] = None,
    cfg_interval: Optional[tuple] = None,
    time_shift: Optional[float] = None,
) -> dict:
  """The CLI as a function: one image file or a folder of images. Returns the summary.

  kind: 'object' or 'scene' (None: 'scene' when masks are given): what the images show; it
  picks the default CFG scale (the checkpoint's config.sample.scene_cfg_scale for scenes,
  where set; `Pipeline.sample_settings`).

  checkpoint: a model bundle folder or a train_dit workdir; None (or '') = the bundled
  model, pipeline.DEFAULT_BUNDLE (FileNotFoundError naming it when it is missing).
  Arguments are checked before any image is read or sampled (ValueError naming the field).
  In folder mode an input that fails (unreadable, too large, no foreground, bad mask,
  non-finite latents) is skipped and listed in summary['skipped']; with one image it raises.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be >= 1")
  if resolution < 8:
    raise ValueError(f"resolution={resolution}: must be >= 8")
  given = {"steps": steps, "cfg_scale": cfg, "method": method, "cfg_interval": cfg_interval,
           "time_shift": time_shift}
  pipeline.check_sample_settings(  # the flags given, before the checkpoint is read
      {**pipeline.SAMPLE_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
  )
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
    if not os.path.isfile(image):
      raise FileNotFoundError(f"{image}: no such image file or folder")
    files = [image]
  checkpoint = pipeline.checkpoint_or_bundled(checkpoint, "--checkpoint")
  pipe = pipeline.load_pipeline(
      checkpoint, vae_workdir=vae, extract_kwargs={"resolution": resolution}
  )
  kind = kind or ("scene" if masks else "object")
  settings = pipeline.check_sample_settings(
      pipe.sample_settings(kind, steps=steps, cfg_scale=cfg, method=method,
                           cfg_interval=cfg_interval, time_shift=time_shift)
  )
  pipe.check_num_components(
      num_components,
      None if settings["cfg_scale"] == 1.0 else settings["cfg_scale"],
      force_components,
  )
  names = output_names(files)
  summary = {
      "checkpoint": os.path.abspath(checkpoint),
      "num_components": num_components,
      "steps": settings["steps"],
      "cfg": settings["cfg_scale"],
      "cfg_interval": settings["cfg_interval"],
      "time_shift": settings["time_shift"],
      "kind": kind,
      "method": settings["method"],
      "seed": seed,
      "outputs": {},
      "skipped": {},
  }

  def skip(f: str, reason: str) -> None:
    if not batch_mode:
      raise ValueError(f"{f}: {reason}")
    summary["skipped"][f] = reason
    print(f"skipping {f}: {reason}", file=sys.stderr)

  loaded = []
  for f in files:
    try:
      img, mask_path = mio.load_image(f, keep_alpha=True), _mask_for(masks, f)
      mask = None if mask_path is None else mio.load_mask(mask_path)
      # the pipeline's checks, before any sampling
      pipe.preprocess(
          [img], num_components, None if mask is None else [mask], allow_empty=allow_empty
      )
      loaded.append((f, img, mask))
    except (ValueError, FileNotFoundError) as e:
      # the reason without a leading "<path>: " (skip names the file)
      skip(f, str(e).removeprefix("images[0]: ").removeprefix(f"{f}: "))
  for start in tqdm(range(0, len(loaded), batch_size), desc="generate", disable=len(loaded) < 2):
    chunk = loaded[start : start + batch_size]
    result = pipe(
        [c[1] for c in chunk],
        num_components,
        [c[2] for c in chunk] if pipe.scene else None,
        steps=settings["steps"],
        cfg_scale=settings["cfg_scale"],
        method=settings["method"],
        cfg_interval=settings["cfg_interval"],
        time_shift=settings["time_shift"],
        seed=seed + start,
        allow_empty=allow_empty,
        force=force_components,
        strict=False,
    )
    for b, (f, img, _) in enumerate(chunk):
      if b in result.errors:
        skip(f, result.errors[b])
        continue
      out_dir = os.path.join(out, names[f])
      routing = {k: v[b] for k, v in result.routing.items()}
      summary["outputs"][f] = pipeline.write_outputs(
          out_dir,
          result.meshes[b],
          result.latents[b],
          routing,
          pipeline.rgb_on_white(img),
          pipe.global_blocks,
      )
      summary["outputs"][f]["dir"] = out_dir
  mio.write_json(os.path.join(out, "summary.json"), summary)
  return summary


def define_flags() -> None:
  flags.DEFINE_string(
      "checkpoint",
      None,
      "Model bundle folder, or train_dit workdir (or its checkpoints/ folder). Default: the "
      "bundled model, assets/moca-small (pipeline.DEFAULT_BUNDLE).",
  )
  flags.DEFINE_string("image", None, "An image file, or a folder of images (batch mode).")
  flags.DEFINE_string(
      "masks",
      None,
      "Scene models: instance-id mask image (or a folder with "
      "one mask per image, same file stem).",
  )
  flags.DEFINE_integer(
      "num_components",
      4,
      "Number of parts / instances to generate (the model does not predict it), at most the "
      "model's trained maximum (16 for the bundled model) unless --force_components.",
  )
  flags.DEFINE_integer("steps", None, "Flow ODE steps (default: the checkpoint's config).")
  flags.DEFINE_float(
      "cfg",
      None,
      "Classifier-free guidance scale, 1 = no guidance (default: the checkpoint's config, "
      "for --kind=scene its scene_cfg_scale where set).",
  )
  flags.DEFINE_enum(
      "kind",
      None,
      ["object", "scene"],
      "What the image shows (default: scene with --masks, else object); picks the default "
      "CFG scale. The bundled model generates a scene from its image alone, one component "
      "per instance.",
  )
  flags.DEFINE_integer(
      "seed",
      0,
      "Noise seed. One image: seed fixes its result. Folder mode: batch k (of --batch_size "
      "images, sorted by name) uses seed + k * batch_size and each image its row of that "
      "noise, so a result depends on the image's position; rerun one image alone to "
      "reproduce it.",
  )
  flags.DEFINE_string(
      "method", None, "ODE solver, euler or heun (default: the checkpoint's config)."
  )
  flags.DEFINE_list(
      "cfg_interval",
      None,
      "lo,hi: guidance only at flow times lo <= t <= hi (t = 1 is noise), the conditional "
      "pass alone elsewhere, which is cheaper (default: the checkpoint's config, else every "
      "step).",
  )
  flags.DEFINE_float(
      "time_shift",
      None,
      "Sampler time shift s > 0: the uniform Euler grid warped as t' = s t / (1 + (s - 1) t), "
      "s > 1 putting more steps at high noise (default: the checkpoint's config, else 1).",
  )
  flags.DEFINE_string("vae", None, "VAE workdir (default: the one in the checkpoint config).")
  flags.DEFINE_integer("resolution", 128, "Marching-cubes grid resolution per axis.")
  flags.DEFINE_integer("batch_size", 4, "Images per sampling batch in folder mode.")
  flags.DEFINE_string("out", "outputs/generate", "Output folder.")
  flags.DEFINE_bool(
      "allow_empty", False, "Generate even from an image with no foreground (blank, flat)."
  )
  flags.DEFINE_bool(
      "force_components",
      False,
      "Allow more components than the model was trained with (up to what it can represent).",
  )


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file it reads at INFO
  # parts without a surface are counted in the last line and listed in summary.json
  warnings.simplefilter("ignore", extract.EmptyFieldWarning)
  f = flags.FLAGS
  if not f.image:  # checked here, not by absl, so that bad arguments exit 2 with one line
    print(
        "generate: error: --image is required (an image file or a folder of images)",
        file=sys.stderr,
    )
    return EXIT_NOTHING
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
        allow_empty=f.allow_empty,
        force_components=f.force_components,
        kind=f.kind,
        cfg_interval=f.cfg_interval or None,
        time_shift=f.time_shift,
    )
  except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
    print(f"generate: error: {e}", file=sys.stderr)
    return EXIT_NOTHING
  n_ok, n_skip = len(summary["outputs"]), len(summary["skipped"])
  outs = summary["outputs"].values()
  n_empty = sum(len(o.get("empty_parts", [])) for o in outs)
  n_parts = sum(int(o.get("num_components", 0)) for o in outs)
  n_replaced = sum(bool(o.get("replaced")) for o in outs)
  print(
      f"generated {n_ok} input(s) into {os.path.abspath(f.out)}"
      + (f" (replacing the earlier results of {n_replaced})" if n_replaced else "")
      + (f"; {n_empty} of {n_parts} parts came out empty" if n_empty else "")
      + (f"; skipped {n_skip}" if n_skip else "")
      + (" (see summary.json)" if n_empty or n_skip else "")
  )
  print(sampling_line(summary))
  return exit_code(n_ok, n_skip)


def sampling_line(summary: dict) -> str:
  """The sampling settings a run used (its summary.json fields), as one console line."""
  interval = summary.get("cfg_interval")
  guidance = f"CFG {summary['cfg']:g}"
  if interval is not None and summary["cfg"] != 1.0:
    guidance += f" at flow times {interval[0]:g} <= t <= {interval[1]:g}"
  shift = summary.get("time_shift", 1.0)
  grid = f" (time shift {shift:g})" if shift != 1.0 else ""
  return (f"sampling: {summary['steps']} {summary['method']} steps{grid}, {guidance}, "
          f"seed {summary['seed']}")


EXIT_OK, EXIT_PARTIAL, EXIT_NOTHING = 0, 1, 2


def exit_code(generated: int, skipped: int) -> int:
  """0: every input generated; 1: some generated, some skipped (summary.json lists why);
  2: nothing generated (bad arguments, bad checkpoint, or every input failed)."""
  if generated == 0:
    return EXIT_NOTHING
  return EXIT_PARTIAL if skipped else EXIT_OK


if __name__ == "__main__":
  define_flags()
  cli.run(main)
