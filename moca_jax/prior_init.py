"""MoCA from a pretrained shape prior (TripoSG / PartCrafter): the paper's fine-tuning recipe.

MoCA is fine-tuned from a pretrained vecset DiT, and the paper keeps the vecset tokens blind
to the tokens it adds "to preserve the original shape modeling capacity of the pretrained
prior" (section 3.2.2). The prior here is any train_dit workdir, typically the output of
`experiments.import_weights` (TripoSG or PartCrafter). Run config fields (`finetune_config`,
`experiments/configs/dit_finetune.py`):

  init.from_checkpoint   the prior: a train_dit workdir or its checkpoints/ folder
  init.params            'ema' (default: what generation uses) or 'params' (the raw weights)
  init.router_bias       starting value of the routers' learned per-head logit bias

`moc_dit_config` puts the MoC layout on the prior's DiT: widths, heads, depth, latent size,
the time token, q/k RMS norms, LayerNorm eps / fp32, GELU form, U-ViT skips and the global
blocks' condition are kept; packing queries, compressed and anchor tokens, MoC global
attention (PartCrafter's global blocks, or the even blocks for TripoSG, which has none),
routers and the ID codebook (random distinct ids, 50 entries as in the paper) are added. The
time token stays a token: the component layout is [h | tau | c | a] (`moca_jax.dit`).

`initial_params` starts the new model (the pretrained path is disturbed as little as
possible):
  every tensor of the prior     copied unchanged; a block that is global in the new model but
                                was local in the prior (all of TripoSG's) gets the block's
                                self-attention weights as its global attention, as
                                PartCrafter's global blocks start from TripoSG's
  ID codebook [K, D]            zeros, with the prior's part-embedding rows (PartCrafter's
                                `part_embedding`) in the first rows: a zero row adds nothing
  encoder patch kernel          for the 7-channel scene input from an RGB prior: both RGB
                                triples start as the RGB weights, the mask channel at zero
                                (MIDI's recipe, `image_encoder.expand_patch_kernel`)
  router query                  the module's init
  router key                    zeros: every logit starts at the bias, so every component is
                                equally important and every gate is sigmoid(init.router_bias)
                                (0.982 at the default 4; >= 20 gives exactly 1 in fp32); the
                                key still learns (its gradient goes through the query; both
                                at zero would be a saddle point)
  packing queries / attention,  the module's init; they only feed the compressed and anchor
  pack_norm                     tokens, to which the prior tokens are blind in local blocks
  encoder LoRA (lora_rank > 0)  A random, B zero: the encoder starts as the prior's

What that guarantees at the start (tests/test_prior_init.py):
  - one component: the model computes exactly the prior (TripoSG; PartCrafter's one-part path);
  - N <= top_k + 1 components and gates of 1: PartCrafter's dense global attention over all
    tokens of the parts, to float summation order (every other component is routed in full);
  - N > top_k + 1: the unselected components are seen through their compressed tokens, a
    deliberate change of the attention pattern that fine-tuning learns. A curriculum (a first
    run with top_k = N_max - 1, then a new workdir with the target k started from it) works
    because init.from_checkpoint takes any train_dit workdir.

Errors (one `PriorInitError` naming init.from_checkpoint and the reason): a missing folder, a
folder without a checkpoint, a checkpoint that is not a DiT's (a train_vae workdir), prior
tensors that do not fit the new model (other shapes, no place in it: listed), new tensors
that are neither in the prior nor MoC additions, params that cannot be read.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Callable, Optional

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moca_jax import checkpointing, image_encoder
from moca_jax.dit import DiTSpec, dit_config

PyTree = Any

ID_TABLE = "dit/id_embed/embedding"
PATCH_KERNEL = "encoder/patch_embed/kernel"
PAPER_ID_CODEBOOK = 50  # "random ID embeddings", codebook size 50 (paper 3.2.1)
DEFAULT_ROUTER_BIAS = 4.0
# Fields of the prior's DiT config that the new model keeps (they set its tensors' shapes or
# what it computes on the prior tokens).
ARCHITECTURE_FIELDS = ("num_blocks", "width", "num_heads", "latent_tokens", "latent_channels",
                       "cond_dim", "mlp_ratio", "long_skips", "time_embedding",
                       "global_condition", "norm_eps", "norm_fp32", "gelu")
# New-model tensors that need not come from the prior (everything else must).
_ADDITIONS = re.compile(r"^dit/(packing|pack_norm)/|^dit/id_embed/embedding$"
                        r"|^dit/block_\d+/global_attn/router/|^encoder/.*/lora_[ab]$")
_ROUTER_KEY = re.compile(r"^dit/block_\d+/global_attn/router/key/kernel$")
_ROUTER_BIAS = re.compile(r"^dit/block_\d+/global_attn/router/bias$")
_BLOCK_ATTENTION = re.compile(r"^dit/block_(\d+)/(local_attn|global_attn)/")
_LISTED = 8  # tensors named per error category


class PriorInitError(ValueError):
  """init.from_checkpoint cannot start the configured model (the message says why)."""


# ----------------------------------------------------------------------------------------
# The prior's checkpoint and config
# ----------------------------------------------------------------------------------------

def _label(path: str) -> str:
  return f"init.from_checkpoint={path}"


def checkpoint_dir(path: str) -> str:
  """A train_dit workdir or its checkpoints/ folder -> the orbax checkpoints folder."""
  path = os.path.abspath(os.fspath(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def read_prior_config(path: str) -> tuple[dict, str, int]:
  """The prior's stored run config.

  Args:
    path: an `experiments.import_weights --out` folder or any train_dit workdir (or its
      checkpoints/ folder).
  Returns:
    (config dict, orbax checkpoints folder, latest step).
  Raises:
    PriorInitError: empty path, no such folder, no checkpoint in it, an unreadable config, or
      a config without model.dit and model.encoder (not a DiT checkpoint).
  """
  if not path:
    raise PriorInitError("init.from_checkpoint is empty: name the prior (an "
                         "experiments.import_weights --out folder or a train_dit workdir)")
  label = _label(path)
  if not os.path.isdir(path):
    raise PriorInitError(f"{label}: no such folder")
  ckpt = checkpoint_dir(path)
  try:
    cfg, step = checkpointing.read_checkpoint_config(ckpt)
  except FileNotFoundError as e:
    raise PriorInitError(f"{label}: holds no checkpoint (expected an experiments.import_weights "
                         "--out folder or a train_dit workdir)") from e
  except ValueError as e:
    raise PriorInitError(f"{label}: {e}") from e
  model = cfg.get("model")
  if not (isinstance(model, dict) and isinstance(model.get("dit"), dict)
          and isinstance(model.get("encoder"), dict)):
    raise PriorInitError(f"{label}: not a DiT checkpoint (its config has no model.dit and "
                         "model.encoder; a train_vae workdir?)")
  return cfg, ckpt, step


# ----------------------------------------------------------------------------------------
# The MoC layout on the prior's DiT
# ----------------------------------------------------------------------------------------

def moc_dit_config(prior_dit: dict) -> ml_collections.ConfigDict:
  """The MoC DiT config on top of a prior's DiT config (module docstring).

  A prior that already has the MoC layout (packing=True: a MoCA run) is kept as it is.
  Otherwise the `dit_config('paper')` MoC settings (top_k 4, 32 compressed tokens, router head
  size 64, sigmoid router, Gumbel routing in training) go on the prior's
  `ARCHITECTURE_FIELDS`, with the prior's global blocks (or the even blocks when it has none),
  random ids from a codebook of max(50, the prior's part-embedding rows) and a router bias.
  Compute dtype and attention backend are the paper config's (bf16, cuDNN); set them to
  'float32' / 'xla' on a CPU.
  """
  prior_spec = DiTSpec.from_config(prior_dit)
  if prior_spec.packing:
    return ml_collections.ConfigDict(dict(prior_dit))
  cfg = dit_config("paper").to_dict()
  cfg.update({k: prior_dit[k] for k in ARCHITECTURE_FIELDS if k in prior_dit})
  prior_global = prior_spec.global_block_ids()
  cfg.update(
      packing=True, global_attention="moc", id_assignment="random", router_bias=True,
      global_blocks=tuple(prior_global) if prior_global else "even",
      id_codebook=max(PAPER_ID_CODEBOOK, prior_spec.id_codebook))
  DiTSpec.from_config(cfg)  # validates
  return ml_collections.ConfigDict(cfg)


def finetune_config(base: ml_collections.ConfigDict, prior_path: str,
                    router_bias: float = DEFAULT_ROUTER_BIAS,
                    scene: bool = False) -> ml_collections.ConfigDict:
  """A train_dit run config that fine-tunes MoCA from the prior at `prior_path`.

  Args:
    base: a run config (experiments/configs/dit.py); its optimizer, data, checkpoint and
      compute settings are kept (the model's dtype, attention backend and remat included).
    prior_path: the prior (`read_prior_config`).
    router_bias: init.router_bias.
    scene: the scene model (7-channel encoder input: instance on white, scene, mask), also
      from an RGB prior.
  Returns:
    `base` with model.dit = `moc_dit_config` of the prior's, model.encoder = the prior's
    (frozen; 7 input channels for a scene), vae / sample / preprocess / imported_from from
    the prior, mode 'scene' or 'object', and init.{from_checkpoint, params, router_bias}.
  Raises:
    PriorInitError: see `read_prior_config`.
  """
  prior, _, _ = read_prior_config(prior_path)
  c = ml_collections.ConfigDict(base.to_dict())
  compute = {k: c.model.dit.get(k) for k in ("dtype", "attention_implementation", "remat")}
  c.model.dit = moc_dit_config(prior["model"]["dit"])
  c.model.dit.update({k: v for k, v in compute.items() if v is not None})
  encoder_compute = {k: c.model.encoder.get(k)
                     for k in ("dtype", "attention_implementation", "remat")}
  c.model.encoder = ml_collections.ConfigDict(prior["model"]["encoder"])
  c.model.encoder.update({k: v for k, v in encoder_compute.items() if v is not None})
  c.model.encoder.freeze = True  # TripoSG and PartCrafter train with DINOv2 frozen
  if scene:
    c.model.encoder.in_channels = 7
  c.mode = "scene" if c.model.encoder.in_channels == 7 else "object"
  for key in ("vae", "sample", "preprocess", "imported_from"):
    if isinstance(prior.get(key), dict):
      c[key] = ml_collections.ConfigDict(prior[key])
  c.data.max_components = min(c.data.max_components, c.model.dit.id_codebook)
  c.size = "finetune"
  c.init = ml_collections.ConfigDict(dict(
      from_checkpoint=os.path.abspath(prior_path), params="ema", router_bias=float(router_bias)))
  return c


# ----------------------------------------------------------------------------------------
# Mapping the prior's tensors onto the new model
# ----------------------------------------------------------------------------------------

def flat(tree: PyTree) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested params dict."""
  return traverse_util.flatten_dict(tree, sep="/")


def abstract_params(model_config: Any) -> PyTree:
  """ShapeDtypeStructs of the {'encoder', 'dit'} params of `ImageConditionedDiT(model_config)`
  (nothing is allocated; traced once per distinct config in a process)."""
  if hasattr(model_config, "to_dict"):
    model_config = model_config.to_dict()
  return _abstract_params(json.dumps(model_config, sort_keys=True, default=list))


@functools.lru_cache(maxsize=8)
def _abstract_params(model_json: str) -> PyTree:
  from moca_jax import dit_task  # pylint: disable=import-outside-toplevel  (dit_task imports us)
  model_config = ml_collections.ConfigDict(json.loads(model_json))
  model = dit_task.ImageConditionedDiT(model_config)
  enc, dit = model_config.encoder, model_config.dit
  size, channels = enc.image_size, enc.in_channels
  images = (jnp.zeros((1, 1, size, size, channels)) if channels == 7
            else jnp.zeros((1, size, size, channels)))
  x = jnp.zeros((1, 1, dit.latent_tokens, dit.latent_channels))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, x, jnp.zeros((1,)),
                                             jnp.ones((1, 1), bool))["params"])
  return nn.meta.unbox(shapes)


def _destination(path: str, global_ids: set) -> str:
  """The new model's path of a prior tensor: a block's attention is 'global_attn' in the new
  model's global blocks and 'local_attn' elsewhere, whatever it was in the prior."""
  match = _BLOCK_ATTENTION.match(path)
  if not match:
    return path
  kind = "global_attn" if int(match.group(1)) in global_ids else "local_attn"
  return f"dit/block_{match.group(1)}/{kind}/" + path[match.end():]


def _listed(items: list) -> str:
  more = f" (and {len(items) - _LISTED} more)" if len(items) > _LISTED else ""
  return ", ".join(items[:_LISTED]) + more


def plan_mapping(prior_shapes: dict[str, tuple], new_shapes: dict[str, tuple],
                 new_dit: Any, path: str) -> dict[str, str]:
  """Where every prior tensor goes in the new model.

  Args:
    prior_shapes / new_shapes: {'encoder/...' or 'dit/...': shape} of the two models.
    new_dit: the new DiT config (its global blocks decide local_attn vs global_attn).
    path: init.from_checkpoint (named in errors).
  Returns:
    {new path: prior path} for every prior tensor.
  Raises:
    PriorInitError: prior tensors with no place in the new model or with another shape (the
      ID table may grow: more rows, same width), or new tensors that are neither in the
      prior nor MoC additions (all listed, up to 8 per kind).
  """
  global_ids = set(DiTSpec.from_config(new_dit).global_block_ids())
  mapping, no_place, misfit = {}, [], []
  for src, shape in prior_shapes.items():
    dst = _destination(src, global_ids)
    if dst not in new_shapes:
      no_place.append(src)
      continue
    new = tuple(new_shapes[dst])
    if dst == ID_TABLE:  # more rows (a larger codebook), same width
      fits = len(shape) == 2 and new[1] == shape[1] and new[0] >= shape[0]
    elif dst == PATCH_KERNEL:  # an RGB encoder for the 7-channel scene input (MIDI)
      fits = new == tuple(shape) or (len(shape) == 4 and shape[2] == 3 and new[2] == 7
                                     and new[:2] + new[3:] == tuple(shape[:2]) + tuple(shape[3:]))
    else:
      fits = new == tuple(shape)
    if not fits:
      misfit.append(f"{src} {list(shape)} vs {list(new)}")
    mapping[dst] = src
  unknown = [p for p in new_shapes if p not in mapping and not _ADDITIONS.search(p)]
  problems = []
  if misfit:
    problems.append(f"{len(misfit)} tensor(s) with another shape (prior vs new model): "
                    f"{_listed(misfit)}")
  if no_place:
    problems.append(f"{len(no_place)} prior tensor(s) with no place in the new model: "
                    f"{_listed(no_place)}")
  if unknown:
    problems.append(f"{len(unknown)} new-model tensor(s) neither in the prior nor MoC "
                    f"additions: {_listed(unknown)}")
  if problems:
    raise PriorInitError(f"{_label(path)}: the prior does not fit the configured model: "
                         + "; ".join(problems))
  return mapping


def merge_params(fresh: PyTree, prior: PyTree, mapping: dict[str, str],
                 router_bias: float) -> PyTree:
  """The new model's starting params (module docstring), a pure function (jit-able).

  Args:
    fresh: the new model's freshly initialised params.
    prior: the prior's params.
    mapping: `plan_mapping`'s {new path: prior path}.
    router_bias: the routers' starting logit bias.
  """
  prior_flat = flat(prior)
  out = {}
  for path, leaf in flat(fresh).items():
    if path in mapping:
      src = prior_flat[mapping[path]].astype(leaf.dtype)
      if src.shape == leaf.shape:
        out[path] = src
      elif path == PATCH_KERNEL:  # both RGB triples copy the RGB weights, the mask starts at 0
        out[path] = image_encoder.expand_patch_kernel(src, leaf.shape[2])
      else:  # the ID table: the prior's rows first, zeros after
        out[path] = jnp.zeros_like(leaf).at[:src.shape[0]].set(src)
    elif path == ID_TABLE or _ROUTER_KEY.match(path):
      out[path] = jnp.zeros_like(leaf)
    elif _ROUTER_BIAS.match(path):
      out[path] = jnp.full_like(leaf, router_bias)
    else:
      out[path] = leaf
  return traverse_util.unflatten_dict(out, sep="/")


def _shapes(tree: PyTree) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in flat(tree).items()}


def _prior_abstract(config: ml_collections.ConfigDict) -> tuple[str, int, dict[str, Any]]:
  """(orbax folder, step, flat ShapeDtypeStructs of the prior's params) for config.init."""
  path = config.init.from_checkpoint
  prior_cfg, ckpt, step = read_prior_config(path)
  if config.init.get("params", "ema") not in ("ema", "params"):
    raise PriorInitError(f"init.params must be 'ema' or 'params', got {config.init.params!r}")
  try:
    return ckpt, step, flat(abstract_params(prior_cfg["model"]))
  except Exception as e:  # pylint: disable=broad-except  (a malformed stored config)
    raise PriorInitError(f"{_label(path)}: its model config does not build "
                         f"({type(e).__name__}: {e})") from e


def check_prior(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Checks that init.from_checkpoint can start `config`'s model, from shapes only (nothing
  is read but the prior's config). Returns `plan_mapping`'s mapping; raises PriorInitError."""
  _, _, prior = _prior_abstract(config)
  return plan_mapping({k: v.shape for k, v in prior.items()},
                      _shapes(abstract_params(config.model)), config.model.dit,
                      config.init.from_checkpoint)


def _placement(sharding: Any, same_shape: bool) -> Any:
  """Where to restore a prior tensor: like its destination, replicated when the shapes
  differ (the ID table)."""
  if same_shape or sharding is None:
    return sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def initial_params(config: ml_collections.ConfigDict, fresh: PyTree,
                   copies: int = 1) -> Any:
  """The params a fine-tuning run starts from (module docstring).

  Args:
    config: the run config (model, init.{from_checkpoint, params, router_bias}).
    fresh: the new model's freshly initialised params ({'encoder', 'dit'}, jax arrays; their
      shardings are kept: each prior tensor is restored straight onto its destination's).
    copies: 1 returns the params; n > 1 a tuple of n trees in distinct buffers (params and
      EMA params of a train state).
  Returns:
    params like `fresh` (or a tuple of `copies` of them).
  Raises:
    PriorInitError: see the module docstring.
  """
  path = config.init.from_checkpoint
  ckpt, step, prior_abstract = _prior_abstract(config)
  mapping = plan_mapping({k: v.shape for k, v in prior_abstract.items()}, _shapes(fresh),
                         config.model.dit, path)
  destination = {src: dst for dst, src in mapping.items()}
  fresh_flat = flat(fresh)
  target = {}
  for key, spec in prior_abstract.items():
    dst = fresh_flat[destination[key]]
    sharding = _placement(getattr(dst, "sharding", None), tuple(dst.shape) == spec.shape)
    target[key] = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
  try:
    prior = checkpointing.restore_params(ckpt, traverse_util.unflatten_dict(target, sep="/"), step,
                                         item=config.init.get("params", "ema"))
  except (FileNotFoundError, ValueError) as e:
    raise PriorInitError(f"{_label(path)}: cannot read its params ({e})") from e
  bias = float(config.init.get("router_bias", DEFAULT_ROUTER_BIAS))
  out_shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), fresh)
  merge = jax.jit(lambda f, p: (merge_params(f, p, mapping, bias),) * copies,
                  out_shardings=(out_shardings,) * copies)
  out = merge(fresh, prior)
  return out[0] if copies == 1 else out


def start_state_fn(config: ml_collections.ConfigDict) -> Optional[Callable]:
  """`train_lib.run_training`'s start_state_fn for config.init (None when there is no prior):
  params and EMA params from `initial_params`, the optimizer state as initialised."""
  init = config.get("init")
  if not init or not init.get("from_checkpoint"):
    return None

  def fn(state, setup):
    del setup  # the params keep the fresh state's shardings
    params, ema = initial_params(config, state.params, copies=2)
    return state.replace(params=params, ema_params=ema)

  return fn
