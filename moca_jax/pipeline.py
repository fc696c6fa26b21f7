"""Image -> compositional 3D: the inference pipeline of a trained DiT and its VAE.

  from moca_jax.pipeline import Pipeline
  pipe = Pipeline.from_checkpoint("outputs/dit")       # a train_dit workdir
  out = pipe("chair.png", num_components=4)            # or uint8 [H, W, 3], [B, H, W, 3], a list
  out.meshes[0][i]      # trimesh.Trimesh of part i of image 0
  out.latents           # [B, N, L, C] float32
  out.routing           # {'importances': [B, G, H, N, N], 'selections': [B, G, H, N, k]}
  pipe(room, num_components=5, masks=room_ids)         # scene model: instance ids 1..N

The DiT checkpoint's stored config names its image encoder (config.model.encoder, whose
weights are in the DiT checkpoint) and its VAE (config.vae.workdir, a train_vae workdir), so
one directory builds the whole pipeline. A model bundle (moca_jax.bundle: both models' EMA
weights in one folder) loads the same way; `Pipeline.from_bundle()` with no folder loads the
model that ships in the repository (DEFAULT_BUNDLE, assets/moca-small). Steps inside `__call__`:
  1. `preprocess`: each image (and scene mask) to the encoder's square size; scenes become
     MIDI's per-instance 7-channel conditions (`scene_conditions`)
  2. `sample_latents`: image encoder + rectified-flow ODE with classifier-free guidance, the
     whole loop one jitted `lax.scan` (moca_jax.flow.sample), routing maps of the last step;
     the N components are padded to the next of `component_buckets` (masked out of the DiT,
     the real components' noise unchanged), so one compiled sampler serves several N
  3. `decode`: VAE decoder + marching cubes (moca_jax.extract; the 64^3 grid decoded level
     by level from 16^3, `default_extract_kwargs`), one mesh per component, the batch
     padded to a bucket as well
Sampling defaults (steps, cfg_scale, method, time_shift) are the checkpoint's config.sample;
arguments of `__call__` override them. config.sample.scene_cfg_scale, when set, is the default
scale for scene inputs (`kind='scene'`; the bundled model's value was chosen on the `val`
scenes, experiments/results/cfg_sweep_val_scenes.md). `write_outputs` writes one result as files (GLB with
one node per part, preview, router maps, latents). experiments/generate.py, evaluate.py,
demo.py and ablations.py are front-ends of this module.

Errors: FileNotFoundError (missing checkpoint, VAE or image) and ValueError (corrupt or
mismatched checkpoints, bad inputs), each naming the path or the input.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import trimesh

from moca_jax import bundle, checkpointing, dit_task, flow, latent_norm
from moca_jax import io as mio
from moca_jax.dit import DiTSpec

Array = jax.Array
PyTree = Any
ImageInput = Union[str, os.PathLike, np.ndarray, Sequence[Any]]

# The model bundle that ships in the repository (moca_jax.bundle): what generate, evaluate
# and `make demo` load when no checkpoint is named.
DEFAULT_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "assets", "moca-small")

# Sampling settings used when neither the call nor the checkpoint's config.sample gives one.
SAMPLE_DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "method": "euler", "time_shift": 1.0,
                   "cfg_interval": None}


# ----------------------------------------------------------------------------------------
# Sampling: the one function that runs the flow ODE
# ----------------------------------------------------------------------------------------


def inference_ids(spec: DiTSpec, batch: int, num_components: int) -> Optional[Array]:
  """The component ids [B, N] given to the DiT at inference: 0..N-1 per sample, or None where
  the model numbers them itself (PartCrafter's 'batch_rows': every row of the, possibly
  CFG-doubled, batch; `moca_jax.dit.default_ids`) or has no ID embedding (TripoSG)."""
  if spec.id_assignment == "batch_rows" or not spec.id_codebook:
    return None
  return jnp.broadcast_to(jnp.arange(num_components, dtype=jnp.int32), (batch, num_components))


def component_limit(spec: DiTSpec, batch: int, guided: bool) -> Optional[int]:
  """The most components per sample the DiT can represent, or None (no ID embedding, no
  limit from the model): the ID codebook; with PartCrafter's 'batch_rows' ids every row of
  the batch, CFG's doubled one included, takes N ids from its table."""
  if not spec.id_codebook:
    return None
  if spec.id_assignment == "batch_rows":
    return spec.id_codebook // (batch * (2 if guided else 1))
  return spec.id_codebook


def _count(n: int) -> str:
  return f"{n} component" + ("" if n == 1 else "s")


def check_sample_settings(settings: dict) -> dict:
  """Validates resolved sampling settings before any work; returns them typed.

  steps: integer >= 1; cfg_scale: finite and >= 0 (1 = conditional only, 0 = unconditional);
  method: 'euler' or 'heun'; time_shift: finite and > 0; cfg_interval: None or (lo, hi)
  with 0 <= lo <= hi <= 1 (`flow.check_cfg_interval`; guidance only at those flow times).
  Raises ValueError naming the field.
  """
  steps, cfg, method, shift = (
      settings["steps"],
      settings["cfg_scale"],
      settings["method"],
      settings["time_shift"],
  )
  if isinstance(steps, bool) or not float(steps).is_integer() or int(steps) < 1:
    raise ValueError(f"steps={steps!r}: must be an integer >= 1")
  if not np.isfinite(float(cfg)) or float(cfg) < 0:
    raise ValueError(f"cfg_scale={cfg!r}: must be a finite number >= 0 (1 = no guidance)")
  if method not in ("euler", "heun"):
    raise ValueError(f"method={method!r}: must be 'euler' or 'heun'")
  if not np.isfinite(float(shift)) or float(shift) <= 0:
    raise ValueError(f"time_shift={shift!r}: must be a finite number > 0")
  interval = flow.check_cfg_interval(settings.get("cfg_interval"))
  return {"steps": int(steps), "cfg_scale": float(cfg), "method": method,
          "time_shift": float(shift), "cfg_interval": interval}


def sample_latents(
    model: dit_task.ImageConditionedDiT,
    params: PyTree,
    images: Array,
    rng: Array,
    *,
    num_components: int,
    component_mask: Optional[Array] = None,
    steps: int = 50,
    cfg_scale: Optional[float] = 7.0,
    method: str = "euler",
    time_shift: float = 1.0,
    return_routing: bool = True,
    noise: Optional[Array] = None,
    cfg_interval: Optional[tuple] = None,
) -> tuple[Array, dict]:
  """Generates component latents for preprocessed images.

  Jit the whole function with `num_components`, `steps`, `method`, `time_shift` and
  `return_routing` static: the ODE loop is one `lax.scan` (moca_jax.flow.sample), with CFG
  as one batched pass over [conditional; null condition].

  Args:
    images: preprocessed float32 [B, S, S, C] (objects) or [B, N, S, S, C] (scenes).
    rng: key of the starting noise (unused when `noise` is given).
    component_mask: [B, N] bool (default all True).
    cfg_scale: guidance scale (None: no guidance, one pass per step).
    noise: the starting noise x1 [B, N, L, C] float32, or None to draw it from `rng`
      (`flow.sample`: jax.random.normal(rng, [B, N, L, C])). `Pipeline` passes it to pad
      the components (`pad_components`) without changing the real components' noise.
  Returns:
    (latents [B, N, L, C] in the VAE's space (`latent_norm.denormalize` of the sampled
    ones under the config's model.latent_norm), routing) where routing is the DiT aux {'importances'
    [B, G, H, N, N], 'selections' [B, G, H, N, k]} of the conditional model on the final
    sample at the last step's time 1 / steps (empty dict when return_routing is False).
  """
  spec = DiTSpec.from_config(model.config.dit)  # defaults for fields older configs lack
  variables = {"params": params}
  b = images.shape[0]
  mask = (
      jnp.ones((b, num_components), bool) if component_mask is None else component_mask.astype(bool)
  )
  ids = inference_ids(spec, b, num_components)
  cond = model.apply(variables, images, method=dit_task.ImageConditionedDiT.encode)

  def velocity_fn(x, t, c):
    reps = x.shape[0] // b
    return model.apply(
        variables,
        x,
        t,
        c,
        jnp.tile(mask, (reps, 1)),
        None if ids is None else jnp.tile(ids, (reps, 1)),
        train=False,
        method=dit_task.ImageConditionedDiT.velocity,
    )

  shape = (b, num_components, spec.latent_tokens, spec.latent_channels)
  if noise is None:
    noise = jax.random.normal(rng, shape, jnp.float32)  # = flow.sample's draw
  elif noise.shape != shape:
    raise ValueError(f"noise: expected shape {shape}, got {noise.shape}")
  z = flow.sample_ode(
      velocity_fn,
      noise,
      cond,
      steps=steps,
      method=method,
      cfg_scale=cfg_scale,
      time_shift=time_shift,
      cfg_interval=cfg_interval,
  )
  routing = {}
  if return_routing:
    _, routing = model.apply(
        variables,
        z,
        jnp.full((b,), 1.0 / steps),
        cond,
        mask,
        ids,
        train=False,
        return_routing=True,
        method=dit_task.ImageConditionedDiT.velocity,
    )
  # The DiT samples normalised latents (model.latent_norm); the VAE decodes raw ones.
  return latent_norm.denormalize(z, latent_norm.stats_from_config(model.config)), routing


# ----------------------------------------------------------------------------------------
# Component padding: one compiled sampler / decoder per bucket, not per component count
# ----------------------------------------------------------------------------------------

# Component counts are padded up to the next of these (DiT sampling and VAE decoding), so
# an evaluation over items of 2..16 parts compiles 4 shapes instead of 15. Padding
# components are masked out of the DiT (`component_mask`: they never influence the real
# ones, tests/test_dit.py, tests/test_generate.py) and are not meshed.
DEFAULT_COMPONENT_BUCKETS = (4, 8, 12, 16, 24, 32, 48)


def padded_count(n: int, buckets: Sequence[int], limit: Optional[int] = None) -> int:
  """The smallest bucket >= n that is <= limit (None: no limit); n itself when there is
  none (or no buckets)."""
  fits = [int(k) for k in buckets if int(k) >= n and (limit is None or int(k) <= limit)]
  return min(fits) if fits else int(n)


def pad_components(x, size: int, axis: int = 1) -> np.ndarray:
  """Zero-pads x [..., N (at `axis`), ...] to `size` along `axis` (size >= N), on the host
  (numpy: no compilation per shape)."""
  x = np.asarray(x)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad) if size > x.shape[axis] else x


def unpad_routing(routing: dict, n: int) -> dict:
  """Routing maps of a padded sample -> those of its n real components: importances
  [..., Np, Np] -> [..., n, n], selections [..., Np, kp] -> [..., n, min(kp, n - 1)] (the
  real components are routed before any padding one, so the first n - 1 slots hold only
  real ones); other entries unchanged."""
  out = dict(routing)
  if "importances" in out:
    out["importances"] = out["importances"][..., :n, :n]
  if "selections" in out:
    sel = out["selections"]
    out["selections"] = sel[..., :n, : min(sel.shape[-1], max(n - 1, 0))]
  return out


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


def check_mask(
    mask: np.ndarray, num_components: int, image_shape: Sequence[int], name: str = "masks"
) -> None:
  """A scene mask must hold exactly the ids 1..N (0 = background) at the image's size.

  Raises ValueError naming `name`.
  """
  if mask.shape != tuple(image_shape[:2]):
    raise ValueError(
        f"{name}: mask shape {mask.shape} does not match the image {tuple(image_shape[:2])}"
    )
  ids = sorted(int(i) for i in np.unique(mask) if i != 0)
  if ids != list(range(1, num_components + 1)):
    raise ValueError(
        f"{name}: instance ids {ids} do not match num_components="
        f"{num_components} (expected 1..{num_components})"
    )


def scene_conditions(images: np.ndarray, masks: np.ndarray, num_components: int) -> np.ndarray:
  """[B, H, W, 3] + instance ids [B, H, W] -> [B, N, H, W, 7] (MIDI layout: instance on
  white, whole image, binary mask * 255), the data loader's per-instance condition."""
  from data_pipeline.loader import instance_conditions  # pylint: disable=g-import-not-at-top

  return np.stack([instance_conditions(im, m, num_components) for im, m in zip(images, masks)])


def masks_to_ids(masks: np.ndarray) -> np.ndarray:
  """Instance masks bool [N, H, W] -> instance-id image uint8 [H, W] (0 = none, i + 1 =
  instance i; where masks overlap the later instance wins), the form the pipeline takes."""
  masks = np.asarray(masks, bool)
  if masks.ndim != 3:
    raise ValueError(f"masks: expected [N, H, W], got shape {masks.shape}")
  ids = np.zeros(masks.shape[1:], np.uint8)
  for i, m in enumerate(masks):
    ids[m] = i + 1
  return ids


def _as_image_list(images: ImageInput, keep_alpha: bool = False) -> list[np.ndarray]:
  """A path, uint8 [H, W, 3|4], [B, H, W, 3|4] or a sequence of paths / [H, W, 3|4] -> list
  of uint8 [H, W, 3] (alpha composited on white), or [H, W, 3|4] with `keep_alpha`. Files go
  through `moca_jax.io.load_image` (every mode, bit depth, orientation; size limit)."""
  if isinstance(images, (str, os.PathLike)):
    return [mio.load_image(images, keep_alpha=keep_alpha)]
  if not isinstance(images, (list, tuple)):
    arr = np.asarray(images)
    if arr.ndim == 3:
      arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
      raise ValueError(
          f"images: expected uint8 [H, W, 3|4] or [B, H, W, 3|4], got {arr.dtype} {arr.shape}"
      )
    images = list(arr)
  out = []
  for i, im in enumerate(images):
    if isinstance(im, (str, os.PathLike)):
      out.append(mio.load_image(im, keep_alpha=keep_alpha))
      continue
    arr = np.asarray(im)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
      raise ValueError(f"images[{i}]: expected uint8 [H, W, 3|4], got {arr.dtype} {arr.shape}")
    out.append(arr if keep_alpha else rgb_on_white(arr))
  if not out:
    raise ValueError("images: no image given")
  return out


def rgb_on_white(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3|4] (straight alpha) -> uint8 [H, W, 3], alpha composited on white."""
  from moca_jax.preprocess import composite  # pylint: disable=g-import-not-at-top

  if image.shape[-1] == 3:
    return image
  return np.round(composite(image) * 255.0).astype(np.uint8)


def pad_to_square(image: np.ndarray, fill: int = 255) -> np.ndarray:
  """uint8 [H, W, C] -> [S, S, C], S = max(H, W): the image centred on `fill` (white), so a
  later resize keeps its aspect ratio."""
  h, w = image.shape[:2]
  side = max(h, w)
  if h == w:
    return image
  out = np.full((side, side) + image.shape[2:], fill, image.dtype)
  top, left = (side - h) // 2, (side - w) // 2
  out[top : top + h, left : left + w] = image
  return out


def _resize(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if arr.shape[:2] == (size, size):
    return arr
  method = Image.NEAREST if nearest else Image.BILINEAR
  return np.asarray(Image.fromarray(arr).resize((size, size), method))


# ----------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1,))
def _normal(key: Array, shape: tuple[int, ...]) -> Array:
  """jax.random.normal(key, shape) float32, jitted alone (its values do not depend on what
  else a jit holds)."""
  return jax.random.normal(key, shape, jnp.float32)


def coarse_levels_for(resolution: int, smallest: int = 16) -> tuple[int, ...]:
  """Hierarchical levels below `resolution` for `moca_jax.extract.extract_meshes`: halvings
  of it down to `smallest` (64 -> (16, 32), 128 -> (16, 32, 64); () below 2 * smallest or
  for an odd resolution). The meshes are the dense grid's (extract's module docstring:
  same refined cells, same decoded values, warned otherwise); only the points decoded far
  from the surface are saved."""
  levels, r = [], int(resolution)
  while r % 2 == 0 and r // 2 >= smallest:
    r //= 2
    levels.insert(0, r)
  return tuple(levels)


def default_extract_kwargs(overrides: Optional[dict] = None) -> dict:
  """The pipeline's extraction settings (`extract_vae_meshes` kwargs): 64^3 marching cubes
  (no fine band), decoded level by level from 16^3 (`coarse_levels_for`, unless
  `coarse_levels` is given), then `overrides`."""
  out = dict(resolution=64, fine_resolution=None, chunk_size=8192)
  out.update(overrides or {})
  if "coarse_levels" not in out:
    out["coarse_levels"] = coarse_levels_for(out["resolution"])
  return out


class NonFiniteLatentsError(ValueError):
  """Sampling produced NaN or inf latents (a diverging sampler or a broken checkpoint)."""


@dataclasses.dataclass
class PipelineOutput:
  latents: np.ndarray  # [B, N, L, C] float32
  meshes: list  # [B][N] trimesh.Trimesh (possibly empty meshes; [] for a failed image)
  routing: dict  # importances [B, G, H, N, N], selections [B, G, H, N, k]
  errors: dict = dataclasses.field(default_factory=dict)  # image index -> reason


class Pipeline:
  """A trained DiT (EMA params, image encoder included) + its VAE: image(s) -> parts.

  Build it with `Pipeline.from_checkpoint` (or `load_pipeline`, cached); the constructor
  takes already loaded models, so weights from elsewhere (e.g. converted published
  checkpoints) plug in the same way: `config` is a DiT config (model.encoder, model.dit,
  sample), `params` the ImageConditionedDiT params, `vae_model` / `vae_params` a VecSetVAE
  and its {'params': ...} tree.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      params: PyTree,
      vae_model: Any,
      vae_params: PyTree,
      extract_kwargs: Optional[dict] = None,
      component_buckets: Sequence[int] = DEFAULT_COMPONENT_BUCKETS,
  ):
    self.config = config
    self.params = params
    self.model = dit_task.ImageConditionedDiT(config.model)
    self.vae_model = vae_model
    self.vae_params = vae_params
    self.extract_kwargs = default_extract_kwargs(extract_kwargs)
    # Component counts are padded to these for sampling and decoding (`padded_count`);
    # () pads nothing (one compilation per count, no padded work).
    self.component_buckets = tuple(component_buckets)
    self._sample = jax.jit(
        functools.partial(sample_latents, self.model),
        static_argnames=("num_components", "steps", "method", "time_shift", "return_routing",
                         "cfg_interval"),
    )

  # --- properties of the checkpoint ---------------------------------------------------

  @property
  def scene(self) -> bool:
    """True for a scene model (7-channel encoder input; needs instance masks)."""
    return self.config.model.encoder.in_channels == 7

  @property
  def image_size(self) -> int:
    return int(self.config.model.encoder.image_size)

  @property
  def max_components(self) -> int:
    """The most components the model was trained with (config.data.max_components; for a
    checkpoint without it, the ID codebook). More are refused unless forced."""
    trained = self.config.get("data", {}).get("max_components", 0)
    return int(trained or self.config.model.dit.id_codebook or 1)

  @property
  def spec(self) -> DiTSpec:
    return DiTSpec.from_config(self.config.model.dit)

  @property
  def processor(self):
    """The published pipelines' image preprocessing (`moca_jax.preprocess.ProcessorConfig`)
    of an imported checkpoint (config.preprocess), or None for this project's own models."""
    from moca_jax import preprocess as pre  # pylint: disable=g-import-not-at-top

    stored = self.config.get("preprocess", None)
    if not stored:
      return None
    names = {f.name for f in dataclasses.fields(pre.ProcessorConfig)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.to_dict().items()}
    unknown = sorted(set(fields) - names - {"path"})
    if unknown:
      raise ValueError(f"checkpoint config.preprocess: unknown fields {unknown}")
    return pre.ProcessorConfig(**{k: v for k, v in fields.items() if k in names})

  def check_num_components(
      self, num_components: int, cfg_scale: Optional[float] = None, force: bool = False
  ) -> None:
    """Refuses a component count outside 1..max_components (the trained maximum; `force`
    lifts it) or above what the model can represent at all (`component_limit`, per image,
    with CFG's doubled batch when cfg_scale is given). ValueError names the limit."""
    n = num_components
    if isinstance(n, bool) or not float(n).is_integer() or n < 1:
      raise ValueError(f"num_components={n!r}: must be an integer >= 1")
    hard = component_limit(self.spec, 1, cfg_scale is not None)
    if hard is not None and n > hard:
      why = " (PartCrafter's part ids number every row of the CFG batch)" if (
          self.spec.id_assignment == "batch_rows" and cfg_scale is not None) else ""
      raise ValueError(
          f"num_components={n}: this model can represent at most {_count(hard)}{why}"
      )
    if n > self.max_components and not force:
      raise ValueError(
          f"num_components={n}: the model was trained with at most "
          f"{_count(self.max_components)} (force=True, --force_components in generate, "
          "to try more)"
      )

  @property
  def global_blocks(self) -> list[int]:
    """Indices of the DiT blocks with MoC global attention (the routing maps' G axis)."""
    spec = DiTSpec.from_config(self.config.model.dit)
    return list(spec.global_block_ids()) if spec.global_attention == "moc" else []

  def sample_settings(self, kind: Optional[str] = None, **overrides: Any) -> dict:
    """steps, cfg_scale, method, time_shift: overrides (those not None), else the
    checkpoint's config.sample, else SAMPLE_DEFAULTS. kind 'scene': the default CFG scale is
    config.sample.scene_cfg_scale where the checkpoint has one; None or 'object': the
    object default. ValueError for another kind."""
    if kind not in (None, "object", "scene"):
      raise ValueError(f"kind={kind!r}: expected 'object' or 'scene'")
    stored = self.config.get("sample", None) or {}
    out = {k: stored.get(k, v) for k, v in SAMPLE_DEFAULTS.items()}
    if kind == "scene" and stored.get("scene_cfg_scale") is not None:
      out["cfg_scale"] = stored["scene_cfg_scale"]
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out

  # --- the steps ----------------------------------------------------------------------

  def preprocess(
      self,
      images: ImageInput,
      num_components: int,
      masks: Optional[Any] = None,
      *,
      allow_empty: bool = False,
  ) -> np.ndarray:
    """Images (+ scene masks) -> the encoder's input.

    Objects, this project's models: uint8 [B, S, S, 3], each image padded to a square
    (white) and resized, nothing stretched. Imported checkpoints: float32 [B, h, w, 3], the
    published pipeline's preprocessing (`moca_jax.preprocess`, config.preprocess: TripoSG's
    crop to the foreground, or PartCrafter's raw path). Scenes: uint8 [B, N, S, S, 7] (see
    `scene_conditions`).

    Raises ValueError for a mask on an object model, a missing mask on a scene model or a
    mask whose ids are not 1..N; `moca_jax.preprocess.NoForegroundError` (a ValueError)
    for an object image with no foreground (blank, one flat colour, fully transparent)
    unless `allow_empty`. Messages name the image by its index.
    """
    from moca_jax import preprocess as pre  # pylint: disable=g-import-not-at-top

    ims = _as_image_list(images, keep_alpha=self.processor is not None)
    size = self.image_size
    if not self.scene:
      if masks is not None:
        raise ValueError(
            "masks are only for scene models (7-channel encoder); this "
            "checkpoint is an object model"
        )
      processor = self.processor
      if processor is not None:
        path = self.config.preprocess.get("path", "triposg")
        out = []
        for i, im in enumerate(ims):
          try:
            out.append(pre.preprocess(im, processor, path, allow_empty=allow_empty))
          except ValueError as e:
            raise type(e)(f"images[{i}]: {e}") from e
        return np.stack(out)
      for i, im in enumerate(ims):
        if not allow_empty and not pre.foreground_mask(im).any():
          raise pre.NoForegroundError(
              f"images[{i}]: no foreground in the image (blank, one flat colour or fully "
              "transparent); allow_empty=True (--allow_empty) to generate anyway"
          )
      return np.stack([_resize(pad_to_square(im), size) for im in ims])
    if masks is None:
      raise ValueError("this is a scene model: give instance masks (ids 1..N) per image")
    ms = [
        mio.load_mask(m) if isinstance(m, (str, os.PathLike)) else np.asarray(m, np.uint8)
        for m in (masks if isinstance(masks, (list, tuple)) or np.ndim(masks) == 3 else [masks])
    ]
    if len(ms) != len(ims):
      raise ValueError(f"masks: {len(ms)} masks for {len(ims)} images")
    small_ims, small_ms = [], []
    for i, (im, m) in enumerate(zip(ims, ms)):
      check_mask(m, num_components, im.shape, name=f"masks[{i}]")
      small_ims.append(_resize(pad_to_square(im), size))
      small_ms.append(_resize(pad_to_square(m, fill=0), size, nearest=True))
      check_mask(
          small_ms[-1],
          num_components,
          (size, size),
          name=f"masks[{i}] at the encoder's {size}x{size}",
      )
    return scene_conditions(np.stack(small_ims), np.stack(small_ms), num_components)

  def sample_latents(
      self,
      images: ImageInput,
      num_components: int,
      masks: Optional[Any] = None,
      *,
      steps: Optional[int] = None,
      cfg_scale: Optional[float] = None,
      method: Optional[str] = None,
      seed: int = 0,
      allow_empty: bool = False,
      force: bool = False,
      kind: Optional[str] = None,
      cfg_interval: Optional[tuple] = None,
      time_shift: Optional[float] = None,
  ) -> tuple[np.ndarray, dict]:
    """Images -> (latents [B, N, L, C], routing) as numpy (see `sample_latents`).

    Every argument is checked before any sampling (`check_sample_settings`,
    `check_num_components`, `preprocess`); ValueError names the field or the image. A CFG
    scale of exactly 1 runs the conditional pass only (the guided velocity equals it). A DiT
    that numbers its part ids by batch row (PartCrafter) samples one image at a time, as
    upstream does, so its ids do not depend on the batch size. The N components are
    sampled padded to `sampled_components(N)` (`component_buckets`): the padding is masked
    out of the DiT and the real components start from the noise an unpadded call draws, so
    the result is the unpadded one up to float rounding (bundled model, 10 steps: |dz| <
    2e-4 on latents of magnitude ~7; the meshes and metrics move in the 5th digit).
    kind ('object' / 'scene'; None: 'scene' when masks are given) picks the default CFG
    scale (`sample_settings`). time_shift (> 0; default config.sample's, else 1) warps the
    uniform Euler grid toward high noise, t' = s t / (1 + (s - 1) t) (`flow.time_grid`).
    """
    if kind is None:
      kind = "object" if masks is None else "scene"
    s = check_sample_settings(
        self.sample_settings(kind, steps=steps, cfg_scale=cfg_scale, method=method,
                             cfg_interval=cfg_interval, time_shift=time_shift)
    )
    guidance = None if s["cfg_scale"] == 1.0 else s["cfg_scale"]
    self.check_num_components(num_components, guidance, force)
    cond_images = self.preprocess(images, num_components, masks, allow_empty=allow_empty)
    if self.processor is None:
      prepared = dit_task.prepare_images(jnp.asarray(cond_images), self.config.model.encoder)
    else:
      prepared = jnp.asarray(cond_images, jnp.float32)  # already the published preprocessing
    rows = [prepared] if self.spec.id_assignment != "batch_rows" else list(prepared[:, None])
    n, n_pad = num_components, self.sampled_components(num_components, guidance is not None)
    outs = []
    for i, rows_i in enumerate(rows):
      key = jax.random.fold_in(jax.random.PRNGKey(seed), i) if i else jax.random.PRNGKey(seed)
      if self.scene:  # per-component conditions [b, N, S, S, 7]: padded with zero images
        rows_i = jnp.asarray(pad_components(rows_i, n_pad))
      b = rows_i.shape[0]
      outs.append(
          self._sample(
              self.params,
              rows_i,
              key,
              num_components=n_pad,
              component_mask=jnp.asarray(np.broadcast_to(np.arange(n_pad) < n, (b, n_pad))),
              steps=s["steps"],
              cfg_scale=None if guidance is None else jnp.float32(guidance),
              method=s["method"],
              time_shift=s["time_shift"],
              cfg_interval=s["cfg_interval"],
              return_routing=True,
              noise=jnp.asarray(pad_components(self.initial_noise(key, b, n), n_pad)),
          )
      )
    z = np.concatenate([np.asarray(o[0])[:, :n] for o in outs])
    routing = unpad_routing(
        {k: np.concatenate([np.asarray(o[1][k]) for o in outs]) for k in outs[0][1]}, n
    )
    return z, routing

  def sampled_components(self, num_components: int, guided: bool) -> int:
    """The component count the DiT samples for `num_components` real ones: the next of
    `component_buckets` the model can represent (`component_limit`), the rest masked out;
    no padding for a DiT that numbers its part ids by batch row (PartCrafter), whose ids
    would change."""
    if self.spec.id_assignment == "batch_rows":
      return num_components
    limit = component_limit(self.spec, 1, guided)
    return padded_count(num_components, self.component_buckets, limit)

  def initial_noise(self, key: Array, batch: int, num_components: int) -> Array:
    """The starting noise [batch, N, L, C] float32 of N real components: the draw
    `sample_latents` makes from `key` without padding, so padding leaves it unchanged."""
    shape = (batch, num_components, self.spec.latent_tokens, self.spec.latent_channels)
    return _normal(key, shape)

  def decode(self, latents: np.ndarray) -> list:
    """Latents [B, N, L, C] -> [B][N] meshes (VAE decode + coarse-to-fine marching cubes)."""
    from moca_jax.extract import extract_vae_meshes  # pylint: disable=g-import-not-at-top

    b, n = latents.shape[:2]
    flat = np.asarray(latents).reshape(b * n, *latents.shape[2:])
    # Padded to a bucket (zero latents, not meshed) so each bucket compiles once.
    padded = pad_components(flat, padded_count(b * n, self.component_buckets), axis=0)
    meshes = extract_vae_meshes(
        self.vae_model, self.vae_params, jnp.asarray(padded), num_valid=b * n,
        **self.extract_kwargs
    )
    return [meshes[i * n : (i + 1) * n] for i in range(b)]

  def __call__(
      self,
      images: ImageInput,
      num_components: int,
      masks: Optional[Any] = None,
      *,
      steps: Optional[int] = None,
      cfg_scale: Optional[float] = None,
      method: Optional[str] = None,
      seed: int = 0,
      allow_empty: bool = False,
      force: bool = False,
      strict: bool = True,
      kind: Optional[str] = None,
      cfg_interval: Optional[tuple] = None,
      time_shift: Optional[float] = None,
  ) -> PipelineOutput:
    """Image(s) -> PipelineOutput(latents [B, N, L, C], meshes [B][N], routing, errors).

    images: a path, uint8 [H, W, 3|4], [B, H, W, 3|4] or a sequence of paths / arrays (any
    sizes); masks (scene models): instance-id images [H, W] (0 background, 1..N), one per
    image, as arrays or paths. steps / cfg_scale / method default to the checkpoint's
    config.sample (for kind 'scene', or masks given, its scene_cfg_scale where set); `seed`
    fixes the starting noise. allow_empty: generate from an image with no foreground; force:
    more components than the model was trained with.

    Raises ValueError (bad arguments or images, see `sample_latents`). Sampled latents that
    are not finite: with `strict` a `NonFiniteLatentsError` naming the images; otherwise
    `errors` maps each such image's index to the reason and its meshes are empty.
    """
    z, routing = self.sample_latents(
        images,
        num_components,
        masks,
        steps=steps,
        cfg_scale=cfg_scale,
        method=method,
        seed=seed,
        allow_empty=allow_empty,
        force=force,
        kind=kind,
        cfg_interval=cfg_interval,
        time_shift=time_shift,
    )
    finite = np.isfinite(z).reshape(z.shape[0], -1).all(axis=1)
    errors = {
        int(i): "sampling produced non-finite latents (NaN or inf)" for i in np.flatnonzero(~finite)
    }
    if errors and strict:
      raise NonFiniteLatentsError(
          f"images{sorted(errors)}: sampling produced non-finite latents (NaN or inf)"
      )
    meshes = [[] for _ in range(z.shape[0])]
    if finite.any():
      decoded = iter(self.decode(z[finite]))
      meshes = [next(decoded) if ok else [] for ok in finite]
    return PipelineOutput(latents=z, meshes=meshes, routing=routing, errors=errors)

  # --- loading --------------------------------------------------------------------------

  @classmethod
  def from_checkpoint(
      cls,
      checkpoint_dir: str,
      step: Optional[int] = None,
      vae_workdir: Optional[str] = None,
      extract_kwargs: Optional[dict] = None,
  ) -> "Pipeline":
    """Loads a train_dit checkpoint (EMA params) and the VAE its config names (or
    `vae_workdir`). Raises FileNotFoundError / ValueError naming the path."""
    if bundle.is_bundle(checkpoint_dir):
      return cls.from_bundle(checkpoint_dir, extract_kwargs)
    ckpt = resolve_checkpoint_dir(checkpoint_dir)
    cfg_dict, step = checkpointing.read_checkpoint_config(ckpt, step)
    return _load(cls, ckpt, cfg_dict, step, vae_workdir, extract_kwargs)

  @classmethod
  def from_bundle(cls, folder: str = "", extract_kwargs: Optional[dict] = None) -> "Pipeline":
    """Loads a model bundle (moca_jax.bundle; default: the bundled model, DEFAULT_BUNDLE).
    Raises FileNotFoundError / bundle.BundleError naming the folder."""
    from moca_jax.vae import VecSetVAE  # pylint: disable=g-import-not-at-top

    b = bundle.read_bundle(folder or DEFAULT_BUNDLE)
    check_vae_pairing(b.vae_config, b.dit_config, folder or DEFAULT_BUNDLE)
    vae_model = VecSetVAE(ml_collections.FrozenConfigDict(b.vae_config.model))
    return cls(b.dit_config, b.dit_params, vae_model, {"params": b.vae_params}, extract_kwargs)


def checkpoint_or_bundled(checkpoint: Optional[str], flag: str = "--checkpoint") -> str:
  """`checkpoint`, or the bundled model (DEFAULT_BUNDLE) when none is given.

  Raises FileNotFoundError (one line naming the folder and `flag`) when the bundled model is
  missing."""
  if checkpoint:
    return checkpoint
  folder = DEFAULT_BUNDLE
  if not bundle.is_bundle(folder):
    why = "no bundle.json in it" if os.path.isdir(folder) else "folder missing"
    raise FileNotFoundError(
        f"no {flag} given and the bundled model is missing: {folder} ({why}); pass "
        f"{flag}=<model bundle or train_dit workdir>"
    )
  return folder


def resolve_checkpoint_dir(path: str) -> str:
  """A train_dit workdir or its checkpoints/ folder -> the orbax checkpoints folder."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def check_vae_pairing(vae_config, dit_config, vae_dir: str) -> None:
  """The VAE must decode the DiT's latents: same tokens L and channels C.

  Raises ValueError naming the VAE workdir and the differing fields.
  """
  vm, dm = vae_config.model, dit_config.model.dit
  diffs = [
      f"{name} {a} vs {b}"
      for name, a, b in (
          ("latent tokens", vm.num_latents, dm.latent_tokens),
          ("latent channels", vm.latent_channels, dm.latent_channels),
      )
      if a != b
  ]
  if diffs:
    raise ValueError(f"VAE {vae_dir} does not match the DiT: {', '.join(diffs)} (VAE vs DiT)")


def _load(
    cls,
    ckpt: str,
    cfg_dict: dict,
    step: int,
    vae_workdir: Optional[str],
    extract_kwargs: Optional[dict],
) -> Pipeline:
  from moca_jax.vae_task import load_vae  # pylint: disable=g-import-not-at-top

  try:
    config = ml_collections.ConfigDict(cfg_dict)
    abstract = dit_task.abstract_params(config)
  except Exception as e:  # pylint: disable=broad-except  (any malformed stored config)
    raise ValueError(f"{ckpt}: checkpoint config is not a DiT config ({e})") from e
  params = checkpointing.restore_params(ckpt, abstract, step, item="ema")
  vae_dir = vae_workdir or config.get("vae", {}).get("workdir", "")
  if not vae_dir:
    raise FileNotFoundError(
        f"{ckpt}: its config names no VAE (vae.workdir is empty); pass "
        "the VAE workdir explicitly (--vae)"
    )
  try:
    vae_model, vae_params, vae_cfg = load_vae(vae_dir)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{vae_dir}: cannot load the VAE checkpoint ({type(e).__name__}: {e})") from e
  check_vae_pairing(vae_cfg, config, vae_dir)
  return cls(config, params, vae_model, vae_params, extract_kwargs)


_CACHE: dict = {}


def load_pipeline(
    checkpoint_dir: str,
    step: Optional[int] = None,
    vae_workdir: Optional[str] = None,
    extract_kwargs: Optional[dict] = None,
    cache: bool = True,
) -> Pipeline:
  """`Pipeline.from_checkpoint` (a train_dit workdir or a model bundle folder), cached: a
  pipeline already loaded for the same (checkpoint dir, step, VAE, extraction settings) is
  returned again, compiled sampler included."""
  extract_key = json.dumps(extract_kwargs or {}, sort_keys=True)
  if bundle.is_bundle(checkpoint_dir):
    folder = os.path.abspath(checkpoint_dir)
    key = (folder, os.path.getmtime(os.path.join(folder, bundle.INFO_FILE)), extract_key)
    if cache and key in _CACHE:
      return _CACHE[key]
    pipe = Pipeline.from_bundle(folder, extract_kwargs)
    if cache:
      _CACHE[key] = pipe
    return pipe
  ckpt = resolve_checkpoint_dir(checkpoint_dir)
  cfg_dict, step = checkpointing.read_checkpoint_config(ckpt, step)
  key = (ckpt, step, vae_workdir, extract_key)
  if cache and key in _CACHE:
    return _CACHE[key]
  pipe = _load(Pipeline, ckpt, cfg_dict, step, vae_workdir, extract_kwargs)
  if cache:
    _CACHE[key] = pipe
  return pipe


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------


def parts_scene(meshes: Sequence[Optional[trimesh.Trimesh]]) -> tuple[trimesh.Scene, list[int]]:
  """A scene with one node per non-empty part (named part_XX, coloured); returns also the
  indices of the empty parts that were left out."""
  from moca_jax.viz import part_colour  # pylint: disable=g-import-not-at-top

  scene = trimesh.Scene()
  empty = []
  for i, m in enumerate(meshes):
    if m is None or len(m.faces) == 0:
      empty.append(i)
      continue
    part = trimesh.Trimesh(
        vertices=np.asarray(m.vertices), faces=np.asarray(m.faces), process=False
    )
    rgba = np.append(np.round(part_colour(i)[:3] * 255), 255).astype(np.uint8)
    part.visual = trimesh.visual.ColorVisuals(part, face_colors=np.tile(rgba, (len(part.faces), 1)))
    scene.add_geometry(part, node_name=f"part_{i:02d}", geom_name=f"part_{i:02d}")
  return scene, empty


def write_outputs(
    out_dir: str,
    meshes: Sequence[trimesh.Trimesh],
    latents: np.ndarray,
    routing: dict,
    image: Optional[np.ndarray] = None,
    global_blocks: Optional[Sequence[int]] = None,
) -> dict:
  """Writes one result into out_dir, the folder written whole (`moca_jax.io.write_folder`:
  an earlier result there is replaced, none of its files kept):
    parts.glb      one node per non-empty component, named part_00.., each its own colour
    preview.png    ray-cast render of the coloured parts (input image on the left if given)
    router.png     router importances (per head) of the last MoC block, selections outlined
    router.json    importances [G, H, N, N] and selections [G, H, N, k] of all MoC blocks
    latents.npy    the sampled latents [N, L, C]
  Returns a summary {'num_components', 'empty_parts', 'files', 'replaced'} ('replaced': an
  earlier result was in out_dir).
  """
  summary = {}

  def write(folder: str) -> None:
    summary.update(_write_result_files(folder, meshes, latents, routing, image, global_blocks))

  summary["replaced"] = mio.write_folder(out_dir, write)
  return summary


def _write_result_files(out_dir, meshes, latents, routing, image, global_blocks) -> dict:
  """The files of `write_outputs` into the (new, empty) folder out_dir; their summary."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from moca_jax import viz  # pylint: disable=g-import-not-at-top

  scene, empty = parts_scene(meshes)
  summary = {"num_components": len(meshes), "empty_parts": empty, "files": []}
  if len(scene.geometry):
    mio.atomic_write_bytes(os.path.join(out_dir, "parts.glb"), scene.export(file_type="glb"))
    summary["files"].append("parts.glb")
  preview = viz.render_parts(list(meshes), size=256)
  if image is not None:
    im = Image.fromarray(np.asarray(image)[..., :3]).resize((256, 256))
    preview = np.concatenate([np.asarray(im), preview], axis=1)
  mio.write_png(os.path.join(out_dir, "preview.png"), preview)
  summary["files"].append("preview.png")
  imp, sel = routing.get("importances"), routing.get("selections")
  if imp is not None and imp.shape[0] > 0:
    viz.router_heatmap_png(
        imp[-1],
        sel[-1],
        os.path.join(out_dir, "router.png"),
        title="router importance, last MoC block (red: selected)",
    )
    summary["files"].append("router.png")
  router = {
      "importances": None if imp is None else np.round(imp, 5),
      "selections": sel,
      "global_blocks": list(global_blocks or []),
      "layout": "importances [G, H, N, N] (query i, key j); selections [G, H, N, k]",
  }
  mio.write_json(os.path.join(out_dir, "router.json"), router, indent=None)
  mio.write_npy(os.path.join(out_dir, "latents.npy"), latents)
  summary["files"] += ["router.json", "latents.npy"]
  return summary
