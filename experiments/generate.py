r"""Image -> compositional 3D: flow sampling, VAE decoding, mesh extraction, GLB + pictures.

  python -m experiments.generate --checkpoint=outputs/dit --image=chair.png \
      --num_components=4 --steps=50 --cfg=7 --seed=0 --out=outputs/gen
  python -m experiments.generate --checkpoint=outputs/dit --image=renders/ --num_components=4
  python -m experiments.generate --checkpoint=outputs/dit_scene --image=room.png \
      --masks=room_ids.png --num_components=5          # scene model: instance-id mask image

--checkpoint is a train_dit workdir (or its checkpoints/ folder); the VAE that decodes the
latents is the one named in the checkpoint's config (vae.workdir) unless --vae is given.
Per image, under --out/<image stem>/:
  parts.glb      one node per component, named part_00.., each with its own colour
  preview.png    ray-cast render of the coloured parts
  router.png     router importances (per head) of the last MoC block, selections outlined
  router.json    importances [G, H, N, N] and selections [G, H, N, k] of all MoC blocks
  latents.npy    the sampled latents [N, L, C]
A folder given as --image is processed in batches; files that fail are skipped and listed in
--out/summary.json.

Python API (used by the evaluation):
  gen = load_generator(checkpoint_dir)
  result = gen.generate(images_uint8 [B, H, W, C], num_components=N, masks=None, steps=50,
                        cfg=7.0, seed=0)
  result.meshes[b][i] is a trimesh.Trimesh; result.latents [B, N, L, C];
  result.routing {'importances': [B, G, H, N, N], 'selections': [B, G, H, N, k]}.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import trimesh

from moca_jax import train_lib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------

def load_image(path: str) -> np.ndarray:
  """An image file -> uint8 [H, W, 3] (alpha composited on white).

  Raises FileNotFoundError (missing) or ValueError (not a readable image), naming the path.
  """
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such image file")
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), np.float32)
        alpha = rgba[..., 3:] / 255.0
        return np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
      return np.asarray(im.convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"{path}: not an image ({type(e).__name__}: {e})") from e


def load_mask(path: str) -> np.ndarray:
  """An instance-id image (0 background, i = instance i) -> uint8 [H, W]."""
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such mask file")
  try:
    with Image.open(path) as im:
      arr = np.asarray(im)
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"{path}: not a mask image ({type(e).__name__}: {e})") from e
  if arr.ndim == 3:
    arr = arr[..., 0]
  return arr.astype(np.uint8)


def check_mask(mask: np.ndarray, num_components: int, image_shape, name: str = "masks") -> None:
  """A scene mask must hold exactly the ids 1..N (0 = background) at the image's size."""
  if mask.shape != tuple(image_shape[:2]):
    raise ValueError(f"{name}: mask shape {mask.shape} does not match the image "
                     f"{tuple(image_shape[:2])}")
  ids = sorted(int(i) for i in np.unique(mask) if i != 0)
  if ids != list(range(1, num_components + 1)):
    raise ValueError(f"{name}: instance ids {ids} do not match num_components="
                     f"{num_components} (expected 1..{num_components})")


def scene_conditions(images: np.ndarray, masks: np.ndarray, num_components: int) -> np.ndarray:
  """[B, H, W, 3] + instance ids [B, H, W] -> [B, N, H, W, 7] (MIDI layout: instance on
  white, whole image, binary mask * 255), the data loader's per-instance condition."""
  from data_pipeline.loader import instance_conditions
  return np.stack([instance_conditions(im, m, num_components) for im, m in zip(images, masks)])


# ----------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerationResult:
  meshes: list            # [B][N] trimesh.Trimesh (possibly empty meshes)
  latents: np.ndarray     # [B, N, L, C]
  routing: dict           # importances [B, G, H, N, N], selections [B, G, H, N, k]


class Generator:
  """A loaded DiT (EMA params) + its VAE; `generate` runs the whole pipeline."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, vae_model: Any,
               vae_params: Any, extract_kwargs: Optional[dict] = None):
    self.config = config
    self.params = params
    self.model = train_lib.ImageConditionedDiT(config.model)
    self.vae_model = vae_model
    self.vae_params = vae_params
    self.extract_kwargs = dict(resolution=64, fine_resolution=None, chunk_size=32768)
    self.extract_kwargs.update(extract_kwargs or {})
    self.scene = config.model.encoder.in_channels == 7
    self._sample = jax.jit(
        functools.partial(train_lib.dit_sample, self.model),
        static_argnames=("num_components", "steps", "method", "time_shift", "return_routing"))

  def sample_latents(self, images: np.ndarray, num_components: int, masks=None, steps: int = 50,
                     cfg: float = 7.0, seed: int = 0, method: str = "euler"):
    """uint8 images [B, H, W, 3] (+ scene masks [B, H, W]) -> (latents, routing) numpy."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images: expected uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if num_components < 1 or num_components > self.config.model.dit.id_codebook:
      raise ValueError(f"num_components={num_components} must be in 1.."
                       f"{self.config.model.dit.id_codebook}")
    if self.scene:
      if masks is None:
        raise ValueError("this is a scene model: give instance masks (ids 1..N) per image")
      masks = np.asarray(masks)
      if masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks: {masks.shape[0]} masks for {images.shape[0]} images")
      for i, m in enumerate(masks):
        check_mask(m, num_components, images[i].shape, name=f"masks[{i}]")
      cond_images = scene_conditions(images, masks, num_components)
    else:
      if masks is not None:
        raise ValueError("masks are only for scene models (7-channel encoder); this "
                         "checkpoint is an object model")
      cond_images = images
    prepared = train_lib.prepare_images(jnp.asarray(cond_images), self.config.model.encoder)
    z, routing = self._sample(self.params, prepared, jax.random.PRNGKey(seed),
                              num_components=num_components, steps=steps,
                              cfg_scale=jnp.float32(cfg), method=method,
                              time_shift=float(self.config.sample.get("time_shift", 1.0)),
                              return_routing=True)
    return np.asarray(z), jax.tree.map(np.asarray, routing)

  def decode(self, latents: np.ndarray) -> list:
    """Latents [B, N, L, C] -> [B][N] meshes (VAE decode + coarse-to-fine marching cubes)."""
    from moca_jax.extract import extract_vae_meshes
    b, n = latents.shape[:2]
    flat = jnp.asarray(latents.reshape(b * n, *latents.shape[2:]))
    meshes = extract_vae_meshes(self.vae_model, self.vae_params, flat, **self.extract_kwargs)
    return [meshes[i * n:(i + 1) * n] for i in range(b)]

  def generate(self, images: np.ndarray, num_components: int, masks=None, steps: int = 50,
               cfg: float = 7.0, seed: int = 0, method: str = "euler") -> GenerationResult:
    """uint8 images [B, H, W, 3] -> GenerationResult (meshes [B][N], latents, routing)."""
    z, routing = self.sample_latents(images, num_components, masks, steps, cfg, seed, method)
    return GenerationResult(meshes=self.decode(z), latents=z, routing=routing)


def _resolve_checkpoint_dir(path: str) -> str:
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


_CACHE: dict = {}


def load_generator(checkpoint_dir: str, step: Optional[int] = None,
                   vae_workdir: Optional[str] = None,
                   extract_kwargs: Optional[dict] = None, cache: bool = True) -> Generator:
  """Loads a train_dit checkpoint (EMA params) and the VAE its config names.

  With cache=True a generator already loaded for the same (checkpoint dir, step, VAE,
  extraction settings) is returned again, compiled sampler included.
  Raises FileNotFoundError (missing checkpoint / VAE) or ValueError (corrupt, mismatched).
  """
  ckpt = _resolve_checkpoint_dir(checkpoint_dir)
  cfg_dict, step = train_lib.read_checkpoint_config(ckpt, step)
  key = (ckpt, step, vae_workdir, json.dumps(extract_kwargs or {}, sort_keys=True))
  if cache and key in _CACHE:
    return _CACHE[key]
  gen = _load_generator(ckpt, cfg_dict, step, vae_workdir, extract_kwargs)
  if cache:
    _CACHE[key] = gen
  return gen


def _load_generator(ckpt, cfg_dict, step, vae_workdir, extract_kwargs) -> Generator:
  try:
    config = ml_collections.ConfigDict(cfg_dict)
    model = train_lib.ImageConditionedDiT(config.model)
    enc, dit = config.model.encoder, config.model.dit
  except Exception as e:
    raise ValueError(f"{ckpt}: checkpoint config is not a DiT config ({e})") from e
  s = enc.image_size
  images = (jnp.zeros((1, 2, s, s, enc.in_channels)) if enc.in_channels == 7
            else jnp.zeros((1, s, s, enc.in_channels)))
  x = jnp.zeros((1, 2, dit.latent_tokens, dit.latent_channels))
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, x, jnp.zeros((1,)),
                         jnp.ones((1, 2), bool))["params"])
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                          __import__("flax").linen.meta.unbox(abstract))
  params = train_lib.restore_params(ckpt, abstract, step, item="ema")

  vae_dir = vae_workdir or config.get("vae", {}).get("workdir", "")
  if not vae_dir:
    raise FileNotFoundError(f"{ckpt}: its config names no VAE (vae.workdir is empty); pass "
                            "the VAE workdir explicitly (--vae)")
  from experiments.train_vae import load_vae
  try:
    vae_model, vae_params, vae_cfg = load_vae(vae_dir)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(f"{vae_dir}: cannot load the VAE checkpoint ({type(e).__name__}: {e})") from e
  if vae_cfg.model.latent_channels != dit.latent_channels:
    raise ValueError(f"VAE {vae_dir} has {vae_cfg.model.latent_channels} latent channels, the "
                     f"DiT {dit.latent_channels}")
  return Generator(config, params, vae_model, vae_params, extract_kwargs)


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------

def _atomic_write(path: str, data: bytes) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def parts_scene(meshes: Sequence[trimesh.Trimesh]) -> tuple[trimesh.Scene, list[int]]:
  """A scene with one node per non-empty part (named part_XX, coloured); returns also the
  indices of the empty parts that were left out."""
  from moca_jax.viz import part_colour
  scene = trimesh.Scene()
  empty = []
  for i, m in enumerate(meshes):
    if m is None or len(m.faces) == 0:
      empty.append(i)
      continue
    part = trimesh.Trimesh(vertices=np.asarray(m.vertices), faces=np.asarray(m.faces),
                           process=False)
    rgba = np.append(np.round(part_colour(i)[:3] * 255), 255).astype(np.uint8)
    part.visual = trimesh.visual.ColorVisuals(part, face_colors=np.tile(rgba, (len(part.faces), 1)))
    scene.add_geometry(part, node_name=f"part_{i:02d}", geom_name=f"part_{i:02d}")
  return scene, empty


def write_outputs(out_dir: str, meshes: Sequence[trimesh.Trimesh], latents: np.ndarray,
                  routing: dict, image: Optional[np.ndarray] = None,
                  global_blocks: Optional[Sequence[int]] = None) -> dict:
  """Writes parts.glb, preview.png, router.png, router.json, latents.npy; returns a summary."""
  from moca_jax import viz
  from PIL import Image
  import io
  os.makedirs(out_dir, exist_ok=True)
  scene, empty = parts_scene(meshes)
  summary = {"num_components": len(meshes), "empty_parts": empty, "files": []}
  if len(scene.geometry):
    _atomic_write(os.path.join(out_dir, "parts.glb"), scene.export(file_type="glb"))
    summary["files"].append("parts.glb")
  preview = viz.render_parts(list(meshes), size=256)
  if image is not None:
    im = Image.fromarray(np.asarray(image)[..., :3]).resize((256, 256))
    preview = np.concatenate([np.asarray(im), preview], axis=1)
  buf = io.BytesIO()
  Image.fromarray(preview).save(buf, format="PNG")
  _atomic_write(os.path.join(out_dir, "preview.png"), buf.getvalue())
  summary["files"].append("preview.png")
  imp, sel = routing.get("importances"), routing.get("selections")
  if imp is not None and imp.shape[0] > 0:
    viz.router_heatmap_png(imp[-1], sel[-1], os.path.join(out_dir, "router.png"),
                           title="router importance, last MoC block (red: selected)")
    summary["files"].append("router.png")
  router = {"importances": None if imp is None else np.round(imp, 5).tolist(),
            "selections": None if sel is None else sel.tolist(),
            "global_blocks": list(global_blocks or []),
            "layout": "importances [G, H, N, N] (query i, key j); selections [G, H, N, k]"}
  _atomic_write(os.path.join(out_dir, "router.json"), json.dumps(router).encode())
  buf = io.BytesIO()
  np.save(buf, latents)
  _atomic_write(os.path.join(out_dir, "latents.npy"), buf.getvalue())
  summary["files"] += ["router.json", "latents.npy"]
  return summary


def _moc_block_ids(config) -> list[int]:
  from moca_jax.dit import DiTSpec
  spec = DiTSpec.from_config(config.model.dit)
  return list(spec.global_block_ids()) if spec.global_attention == "moc" else []


def run(checkpoint: str, image: str, num_components: int, out: str, masks: Optional[str] = None,
        steps: int = 50, cfg: float = 7.0, seed: int = 0, method: str = "euler",
        vae: Optional[str] = None, resolution: int = 64, batch_size: int = 4) -> dict:
  """The CLI as a function: one image file or a folder of images. Returns the summary."""
  from tqdm.auto import tqdm
  if os.path.isdir(image):
    files = sorted(os.path.join(image, f) for f in os.listdir(image)
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise FileNotFoundError(f"{image}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    batch_mode = True
  else:
    files, batch_mode = [image], False
  gen = load_generator(checkpoint, vae_workdir=vae, extract_kwargs={"resolution": resolution})
  blocks = _moc_block_ids(gen.config)
  summary = {"checkpoint": os.path.abspath(checkpoint), "num_components": num_components,
             "steps": steps, "cfg": cfg, "seed": seed, "outputs": {}, "skipped": {}}

  def mask_for(path):
    if masks is None:
      return None
    if os.path.isdir(masks):
      stem = os.path.splitext(os.path.basename(path))[0]
      cands = [os.path.join(masks, stem + ext) for ext in (".png", ".bmp", ".tif", ".tiff")]
      found = [c for c in cands if os.path.isfile(c)]
      if not found:
        raise FileNotFoundError(f"{masks}: no mask named {stem}.png for image {path}")
      return load_mask(found[0])
    return load_mask(masks)

  loaded = []
  for f in files:
    try:
      img = load_image(f)
      m = mask_for(f)
      if m is not None:
        check_mask(m, num_components, img.shape, name=masks)
      elif gen.scene:
        raise ValueError(f"{f}: this is a scene model; give --masks with instance ids 1..N")
      loaded.append((f, img, m))
    except (ValueError, FileNotFoundError) as e:
      if not batch_mode:
        raise
      summary["skipped"][f] = str(e)
      print(f"skipping {e}", file=sys.stderr)

  for start in tqdm(range(0, len(loaded), batch_size), desc="generate", disable=len(loaded) < 2):
    chunk = loaded[start:start + batch_size]
    size = gen.config.model.encoder.image_size
    from PIL import Image
    same = lambda a: np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
    same_mask = lambda a: np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST))
    imgs = np.stack([same(c[1]) for c in chunk])
    msk = np.stack([same_mask(c[2]) for c in chunk]) if gen.scene else None
    result = gen.generate(imgs, num_components, msk, steps=steps, cfg=cfg, seed=seed + start,
                          method=method)
    for b, (f, img, _) in enumerate(chunk):
      stem = os.path.splitext(os.path.basename(f))[0]
      routing = {k: v[b] for k, v in result.routing.items()}
      summary["outputs"][f] = write_outputs(os.path.join(out, stem), result.meshes[b],
                                            result.latents[b], routing, img, blocks)
      summary["outputs"][f]["dir"] = os.path.join(out, stem)
  _atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
  return summary


def main(argv):
  del argv
  from absl import flags
  F = flags.FLAGS
  try:
    summary = run(F.checkpoint, F.image, F.num_components, F.out, masks=F.masks, steps=F.steps,
                  cfg=F.cfg, seed=F.seed, method=F.method, vae=F.vae, resolution=F.resolution,
                  batch_size=F.batch_size)
  except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, no traceback
    print(f"generate: error: {e}", file=sys.stderr)
    sys.exit(2)
  n_ok, n_skip = len(summary["outputs"]), len(summary["skipped"])
  print(f"generated {n_ok} input(s) into {os.path.abspath(F.out)}"
        + (f"; skipped {n_skip} (see summary.json)" if n_skip else ""))


def _define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "train_dit workdir (or its checkpoints/ folder).")
  flags.DEFINE_string("image", None, "An image file, or a folder of images (batch mode).")
  flags.DEFINE_string("masks", None, "Scene models: instance-id mask image (or a folder with "
                      "one mask per image, same file stem).")
  flags.DEFINE_integer("num_components", 4, "Number of parts / instances to generate.")
  flags.DEFINE_integer("steps", 50, "Flow ODE steps.")
  flags.DEFINE_float("cfg", 7.0, "Classifier-free guidance scale (1 = no guidance).")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_enum("method", "euler", ["euler", "heun"], "ODE solver.")
  flags.DEFINE_string("vae", None, "VAE workdir (default: the one in the checkpoint config).")
  flags.DEFINE_integer("resolution", 128, "Marching-cubes grid resolution per axis.")
  flags.DEFINE_integer("batch_size", 4, "Images per sampling batch in folder mode.")
  flags.DEFINE_string("out", "outputs/generate", "Output folder.")
  flags.mark_flags_as_required(["checkpoint", "image"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
