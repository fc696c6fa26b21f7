"""TripoSG / PartCrafter DiT -> `moca_jax.dit.CompositionalDiT` (upstream layout switches).

Upstream (read from the code, confirmed by tests/golden/{triposg_dit,partcrafter_dit}):
  `TripoSGDiTModel` (VAST-AI-Research/TripoSG fc5c409, triposg_transformer.py) and
  `PartCrafterDiTModel` (wgsxm/PartCrafter 269bd41, partcrafter_transformer.py):
  time_proj.linear_1/2          TimestepEmbedding on the [sin | cos] sinusoid (D), 4D hidden
  part_embedding                Embedding(max_num_parts, D) (PartCrafter)
  proj_in                       Linear(C, D)
  blocks.i.skip_linear/norm     Linear(concat[skip, x]) then LayerNorm (blocks > n // 2)
  blocks.i.norm1, attn1         self-attention (q/k RMS norm per head, no q/k/v bias)
  blocks.i.norm2, attn2         cross-attention to the image tokens
  blocks.i.norm3, ff.net.0/2    GELU MLP
  norm_out, proj_out            LayerNorm, Linear(D, C)

Layout conversions done here (the model itself has no upstream-specific weight layout):
  - q/k/v head split: TripoSGAttnProcessor2_0 concatenates the projections and views them as
    [heads, 3, head_dim] (self-attention; [heads, 2, head_dim] for cross-attention keys and
    values), so head h of `to_k` is not rows h*head_dim.. of `to_k`. The rows are regrouped.
  - skip_linear: upstream concatenates [skip, x], this model [x, skip]: the two input halves
    of the kernel are swapped.
  - proj_out is negated: TripoSG predicts z - eps (its scheduler steps x + (sigma_i -
    sigma_{i+1}) v), this project's flow convention is v = eps - z (`moca_jax.flow`); after
    the sign flip the imported model is a drop-in velocity model for the project's samplers
    and loss, and the `parity_*` functions flip it back to compare with upstream outputs.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moca_jax import dit as dit_lib
from moca_jax import flow, layers
from moca_jax.convert.common import ConversionError, TensorMap, nest, read_component

TRIPOSG_CLASSES = ("TripoSGDiTModel",)
PARTCRAFTER_CLASSES = ("PartCrafterDiTModel",)
# Published pipelines' default vecset length (TripoSGPipeline / PartCrafterPipeline
# `num_tokens`); the model runs at any length, this only sets the config's sampling shape.
DEFAULT_LATENT_TOKENS = {"triposg": 2048, "partcrafter": 1024}


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

def dit_config_from_upstream(upstream: dict, latent_tokens: Optional[int] = None
                             ) -> ml_collections.ConfigDict:
  """Our DiT config for an upstream `transformer/config.json` (TripoSG or PartCrafter).

  Args:
    upstream: the config dict (`_class_name` TripoSGDiTModel or PartCrafterDiTModel).
    latent_tokens: vecset length used for sampling (default: the upstream pipeline's).
  Returns:
    a `dit.dit_config` ConfigDict with the TripoSG / PartCrafter layout switches, fp32 and
    XLA attention (set `dtype='bfloat16'`, `attention_implementation='cudnn'` on a GPU).
  Raises:
    ValueError: an upstream option this model does not express (named).
  """
  name = upstream.get("_class_name")
  if name not in TRIPOSG_CLASSES + PARTCRAFTER_CLASSES:
    raise ValueError(f"class {name!r} is not one of "
                     f"{', '.join(TRIPOSG_CLASSES + PARTCRAFTER_CLASSES)}")
  partcrafter = name in PARTCRAFTER_CLASSES
  def get(key, default):
    value = upstream.get(key)
    return default if value is None else value
  heads, width = int(get("num_attention_heads", 16)), int(get("width", 2048))
  layers_n = int(get("num_layers", 21))
  if layers_n % 2 == 0:
    raise ValueError(f"num_layers={layers_n}: the U-ViT skip layout needs an odd block count")
  if width % heads:
    raise ValueError(f"width {width} is not divisible by num_attention_heads {heads}")
  if upstream.get("use_cross_attention_2"):
    raise ValueError("use_cross_attention_2=true (a second condition stream) is not supported")
  cfg = dit_lib.dit_config("tiny").to_dict()
  cfg.update(
      num_blocks=layers_n, width=width, num_heads=heads,
      latent_channels=int(get("in_channels", 64)), cond_dim=int(get("cross_attention_dim", 1024)),
      latent_tokens=int(latent_tokens or DEFAULT_LATENT_TOKENS[
          "partcrafter" if partcrafter else "triposg"]),
      num_compressed=0, top_k=0, mlp_ratio=4.0, long_skips=True, global_blocks="none",
      global_attention="dense", id_codebook=0, packing=False, time_embedding="token",
      id_assignment="batch_rows", global_condition="first_component", norm_eps=1e-5,
      norm_fp32=True, gelu="erf", attention_implementation="xla", dtype="float32")
  if partcrafter:
    if get("enable_part_embedding", True):
      cfg["id_codebook"] = int(get("max_num_parts", 32))
    for key in ("enable_local_cross_attn", "enable_global_cross_attn"):
      if not get(key, True):
        raise ValueError(f"{key}=false (blocks without the image condition) is not supported")
    ids = upstream.get("global_attn_block_ids")
    if ids is None and upstream.get("global_attn_block_id_range") is not None:
      lo, hi = upstream["global_attn_block_id_range"]
      ids = list(range(int(lo), int(hi) + 1))
    ids = [int(i) for i in (ids or [])]
    if any(i < 0 or i >= layers_n for i in ids):
      raise ValueError(f"global_attn_block_ids {ids} out of range for {layers_n} blocks")
    cfg["global_blocks"] = tuple(sorted(set(ids))) if ids else "none"
  dit_lib.DiTSpec.from_config(cfg)  # validates
  return ml_collections.ConfigDict(cfg)


# ----------------------------------------------------------------------------------------
# Tensor mapping
# ----------------------------------------------------------------------------------------

def _is_constant_view(a: np.ndarray) -> bool:
  """A zero-stride array (np.broadcast_to of a scalar): shape-only conversion."""
  return a.size > 0 and all(stride == 0 for stride in a.strides)


def _head_first_split(weights: list[np.ndarray], heads: int) -> list[np.ndarray]:
  """Effective per-projection weights of TripoSG's head-first split.

  Args:
    weights: j torch Linear weights [D, Din] (to_q, to_k, to_v or to_k, to_v) whose outputs
      upstream concatenates and views as [heads, j, D / heads].
  Returns:
    j weights [D, Din]; rows h*d..(h+1)*d of the i-th one are what upstream uses as head h of
    projection i. Constant (zero-stride) inputs are returned as they are (no copy).
  """
  d, din = weights[0].shape
  if all(_is_constant_view(w) for w in weights) and len({float(w.flat[0]) for w in weights}) == 1:
    return list(weights)
  fused = np.concatenate(weights, axis=0).reshape(heads, len(weights), d // heads, din)
  return [np.ascontiguousarray(fused[:, i].reshape(d, din)) for i in range(len(weights))]


class _Mapper:
  """Collects our flat params ("a/b/kernel") from an upstream TensorMap."""

  def __init__(self, tm: TensorMap):
    self.tm = tm
    self.out: dict[str, np.ndarray] = {}

  def linear(self, src: str, dst: str, shape: tuple[int, int], bias: bool = True) -> None:
    self.out[f"{dst}/kernel"] = self.tm.take(f"{src}.weight", shape).T
    if bias:
      self.out[f"{dst}/bias"] = self.tm.take(f"{src}.bias", shape[:1])

  def norm(self, src: str, dst: str, width: int, bias: bool = True) -> None:
    self.out[f"{dst}/scale"] = self.tm.take(f"{src}.weight", (width,))
    if bias:
      self.out[f"{dst}/bias"] = self.tm.take(f"{src}.bias", (width,))

  def attention(self, src: str, dst: str, width: int, ctx_width: int, heads: int,
                cross: bool) -> None:
    take = lambda n, din: self.tm.take(f"{src}.to_{n}.weight", (width, din))
    if cross:
      q = take("q", width)
      k, v = _head_first_split([take("k", ctx_width), take("v", ctx_width)], heads)
    else:
      q, k, v = _head_first_split([take(n, width) for n in ("q", "k", "v")], heads)
    for name, w in (("query", q), ("key", k), ("value", v)):
      self.out[f"{dst}/{name}/kernel"] = w.T
    self.norm(f"{src}.norm_q", f"{dst}/query_norm", width // heads, bias=False)
    self.norm(f"{src}.norm_k", f"{dst}/key_norm", width // heads, bias=False)
    self.linear(f"{src}.to_out.0", f"{dst}/out", (width, width))


def convert(tensors: dict[str, np.ndarray], config: Any, source: str = "DiT") -> dict:
  """Upstream TripoSG / PartCrafter DiT state dict -> CompositionalDiT params (no 'params' key).

  Args:
    tensors: upstream names -> float32 arrays (zero-stride arrays for a shape-only run).
    config: `dit_config_from_upstream(...)` (or its DiTSpec).
    source: named in error messages (the folder).
  Returns:
    nested dict of numpy arrays.
  Raises:
    ConversionError: missing or unmapped tensors (all listed) or a shape mismatch (named).
  """
  s = dit_lib.DiTSpec.from_config(config)
  d, heads, c = s.width, s.num_heads, s.latent_channels
  mlp = int(d * s.mlp_ratio)
  tm = TensorMap(tensors, source)
  m = _Mapper(tm)
  m.linear("time_proj.linear_1", "time_embed/fc1", (4 * d, d))
  m.linear("time_proj.linear_2", "time_embed/fc2", (d, 4 * d))
  if s.id_codebook:
    m.out["id_embed/embedding"] = tm.take("part_embedding.weight", (s.id_codebook, d))
  m.linear("proj_in", "proj_in", (d, c))
  global_ids = set(s.global_block_ids())
  n_skip = s.num_blocks // 2
  for i in range(s.num_blocks):
    src, dst = f"blocks.{i}", f"block_{i}"
    if i >= s.num_blocks - n_skip:
      w = tm.take(f"{src}.skip_linear.weight", (d, 2 * d))
      m.out[f"{dst}/skip_linear/kernel"] = (
          w.T if _is_constant_view(w) else np.concatenate([w[:, d:].T, w[:, :d].T], axis=0))
      m.out[f"{dst}/skip_linear/bias"] = tm.take(f"{src}.skip_linear.bias", (d,))
      m.norm(f"{src}.skip_norm", f"{dst}/skip_norm", d)
    m.norm(f"{src}.norm1", f"{dst}/norm1", d)
    self_name = "global_attn" if i in global_ids else "local_attn"
    m.attention(f"{src}.attn1", f"{dst}/{self_name}", d, d, heads, cross=False)
    m.norm(f"{src}.norm2", f"{dst}/norm2", d)
    m.attention(f"{src}.attn2", f"{dst}/cross_attn", d, s.cond_dim, heads, cross=True)
    m.norm(f"{src}.norm3", f"{dst}/norm3", d)
    m.linear(f"{src}.ff.net.0.proj", f"{dst}/mlp/fc1", (mlp, d))
    m.linear(f"{src}.ff.net.2", f"{dst}/mlp/fc2", (d, mlp))
  m.norm("norm_out", "norm_out", d)
  m.linear("proj_out", "proj_out", (c, d))
  m.out["proj_out/kernel"] = -m.out["proj_out/kernel"]  # z - eps -> eps - z (module docstring)
  m.out["proj_out/bias"] = -m.out["proj_out/bias"]
  tm.finish()
  return nest(m.out)


def load(folder: str, latent_tokens: Optional[int] = None,
         expected_classes: tuple[str, ...] = TRIPOSG_CLASSES + PARTCRAFTER_CLASSES
         ) -> tuple[ml_collections.ConfigDict, dict]:
  """A `transformer/` folder -> (our DiT config, {'params': jnp arrays}).

  Raises:
    ConversionError: unreadable folder, unknown class, unsupported option, tensor problems.
  """
  upstream, tensors = read_component(folder, expected_classes)
  try:
    config = dit_config_from_upstream(upstream, latent_tokens)
  except ValueError as e:
    raise ConversionError(f"{os.path.join(folder, 'config.json')}: {e}") from e
  params = convert(tensors, config, source=folder)
  return config, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


# ----------------------------------------------------------------------------------------
# Parity with the golden fixtures
# ----------------------------------------------------------------------------------------

def flow_time(timestep: np.ndarray) -> np.ndarray:
  """Upstream timesteps (0..1000 scale) -> flow time t in [0, 1], float32, divided on the host
  (XLA turns a division by a constant into a multiplication by its reciprocal, which is not
  exact: t * 1000 inside the model then misses the timestep by an ulp)."""
  return np.asarray(timestep, np.float32) / np.float32(1000.0)


class UpstreamRunner:
  """Runs an imported DiT like upstream, compiled once per input shape.

  `__call__(x, timestep, cond, component_mask=None)` ->
  (output in upstream's sign [B, N, L, C], per-block activations in upstream's token order
  [B, N, 1 + L, D] (time token first)), with x [B, N, L, C], timestep [B] on the 0..1000
  scale, cond [B, Tc, Dc] or [B, N, Tc, Dc], component_mask [B, N] or None.
  """

  def __init__(self, model: dit_lib.CompositionalDiT, variables: dict, train: bool = False):
    self.variables = variables
    self._apply = jax.jit(lambda p, x, t, c, mk: model.apply(
        p, x, t, c, mk, train=train, mutable=["intermediates"]))

  def __call__(self, x: np.ndarray, timestep: np.ndarray, cond: np.ndarray,
               component_mask: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    v, state = self._apply(self.variables, jnp.asarray(x), flow_time(timestep),
                           jnp.asarray(cond),
                           None if component_mask is None else jnp.asarray(component_mask))
    inter = state["intermediates"]
    blocks = [np.asarray(inter[f"block_{i}_out"][0]) for i in range(len(inter))]
    blocks = [np.concatenate([a[:, :, -1:], a[:, :, :-1]], axis=2) for a in blocks]
    return -np.asarray(v), blocks


def _time_token(model_cfg: Any, params: dict, timestep: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """(sinusoid [B, D], time token [B, D]) of the imported time embedding."""
  s = dit_lib.DiTSpec.from_config(model_cfg)
  t = flow_time(timestep)
  emb = layers.TimestepEmbedding(s.width, frequency_dim=s.width, hidden_dim=4 * s.width,
                                 activation="gelu", order="sin_cos")
  token = emb.apply({"params": params["params"]["time_embed"]}, t)
  return np.asarray(layers.sinusoidal_embedding(t, s.width, order="sin_cos")), np.asarray(token)


def _guided(v: np.ndarray, scale: float) -> np.ndarray:
  """CFG of an upstream-sign batch [uncond; cond] -> [B/2, ...] (`flow.guided`)."""
  uncond, cond = np.split(v, 2, axis=0)
  return np.asarray(flow.guided(jnp.asarray(cond), jnp.asarray(uncond), scale))


def parity_triposg(fixture_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Imported `triposg_dit` fixture vs its stored outputs (tests/golden/triposg_dit).

  Returns:
    {output name: (ours, reference)} for every stored output array: `output`, `cfg_output`,
    `cfg_guided_7` and the debug arrays (sinusoid, time token, every block's output).
  """
  config, params = load(fixture_dir, expected_classes=TRIPOSG_CLASSES)
  io = np.load(os.path.join(fixture_dir, "io.npz"))
  run = UpstreamRunner(dit_lib.CompositionalDiT(config), params)
  out = {}
  v, blocks = run(io["hidden_states"][:, None], io["timestep"], io["encoder_hidden_states"])
  out["output"] = (v[:, 0], io["output"])
  sinusoid, token = _time_token(config, params, io["timestep"])
  out["dbg_time_sinusoid"] = (sinusoid, io["dbg_time_sinusoid"])
  out["dbg_time_token"] = (token, io["dbg_time_token"])
  for i, block in enumerate(blocks):
    out[f"dbg_block{i}_out"] = (block[:, 0], io[f"dbg_block{i}_out"])
  v_cfg, _ = run(io["cfg_hidden_states"][:, None], io["cfg_timestep"],
                 io["cfg_encoder_hidden_states"])
  out["cfg_output"] = (v_cfg[:, 0], io["cfg_output"])
  out["cfg_guided_7"] = (_guided(v_cfg[:, 0], 7.0), io["cfg_guided_7"])
  return out


def parity_partcrafter(fixture_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Imported `partcrafter_dit` fixture vs its stored outputs (tests/golden/partcrafter_dit).

  Upstream puts the N parts of an object on the batch axis; here they are the component axis
  ([B objects, N parts, L, C]): call a is B=1, N=4; the CFG call b is B=2 ([uncond; cond]);
  call c gives each part its own condition ([1, N, Tc, Dc], scene mode); the training call d
  pads objects of 3 and 2 parts to N=3 with a component mask. Part ids come from the model's
  own assignment (`dit.default_ids`) and are compared with the ids upstream fed its table.

  Returns:
    {output name: (ours, reference)} for every stored output array.
  """
  config, params = load(fixture_dir, expected_classes=PARTCRAFTER_CLASSES)
  spec = dit_lib.DiTSpec.from_config(config)
  io = np.load(os.path.join(fixture_dir, "io.npz"))
  run = UpstreamRunner(dit_lib.CompositionalDiT(config), params)
  n = io["a_hidden_states"].shape[0]
  out = {}
  ids = lambda b, k, train: np.asarray(dit_lib.default_ids(spec, b, k, train))

  # a: one object, N parts (each row's own copy of the image tokens, as the pipeline sends).
  v, blocks = run(io["a_hidden_states"][None], io["a_timestep"][:1],
                  io["a_encoder_hidden_states"][None])
  out["a_output"] = (v[0], io["a_output"])
  out["a_part_ids"] = (ids(1, n, False).reshape(-1), io["a_part_ids"])
  out["a_dbg_time_token"] = (np.repeat(_time_token(config, params, io["a_timestep"][:1])[1], n, 0),
                             io["a_dbg_time_token"])
  for i, block in enumerate(blocks):
    out[f"a_dbg_block{i}_out"] = (block[0], io[f"a_dbg_block{i}_out"])

  # b: the CFG batch [uncond; cond] -> 2 objects; ids number the rows of the whole batch.
  shape = lambda a: a.reshape(2, n, *a.shape[1:])
  v, blocks = run(shape(io["b_hidden_states"]), io["b_timestep"][::n],
                  shape(io["b_encoder_hidden_states"]))
  out["b_output"] = (v.reshape(2 * n, *v.shape[2:]), io["b_output"])
  out["b_part_ids"] = (ids(2, n, False).reshape(-1), io["b_part_ids"])
  out["b_guided_7"] = (_guided(v, 7.0)[0], io["b_guided_7"])
  for i, block in enumerate(blocks):
    out[f"b_dbg_block{i}_out"] = (block.reshape(2 * n, *block.shape[2:]), io[f"b_dbg_block{i}_out"])

  # c: a different condition per part: global blocks read the first part's.
  v, _ = run(io["a_hidden_states"][None], io["a_timestep"][:1],
             io["c_encoder_hidden_states"][None])
  out["c_output"] = (v[0], io["c_output"])

  # d: training layout, objects of d_num_parts parts, padded to the largest.
  counts = [int(k) for k in io["d_num_parts"]]
  n_max, starts = max(counts), np.cumsum([0] + counts[:-1])
  x = np.zeros((len(counts), n_max) + io["d_hidden_states"].shape[1:], np.float32)
  mask = np.zeros((len(counts), n_max), bool)
  for o, (start, k) in enumerate(zip(starts, counts)):
    x[o, :k] = io["d_hidden_states"][start:start + k]
    mask[o, :k] = True
  run_train = UpstreamRunner(dit_lib.CompositionalDiT(config), params, train=True)
  v, _ = run_train(x, io["d_timestep"][starts], io["d_encoder_hidden_states"][starts], mask)
  out["d_output"] = (v[mask], io["d_output"])
  out["d_part_ids"] = (ids(len(counts), n_max, True)[mask], io["d_part_ids"])
  return out
