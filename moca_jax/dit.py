"""The compositional DiT: packing, local blocks, global (MoC or dense) blocks.

Paper section 3.2 as restored in shared/paper/NOTES.md, on the TripoSG / PartCrafter layout
(timestep as an extra token, RMS norm on q and k, cross-attention to the condition in every
block, MLP ratio 4 with GELU, optional U-ViT long skips).

Tokens of component i, in this order (T_c = L + m + 1 per component):
  [ h_i (L vecset tokens) | c_i (m compressed tokens) | a_i (anchor) ] + e_{pi(i)} + tau(t)
The timestep embedding tau(t) is added to every token (TripoSG prepends it as a token
instead; the additive form keeps every cuDNN attention call at even lengths, which cuDNN
needs in training, and keeps the vecset self-attention unmasked).
Local block mask (rows query, columns key): vecset tokens see vecset tokens; compressed
tokens see vecset and compressed tokens; the anchor sees all.
Global block: only the vecset tokens are queries and only they are updated (attention,
cross-attention and MLP); the compressed and anchor tokens pass through unchanged and are
refreshed in the local blocks (the paper is silent; this is the documented default).

MoC on a pretrained TripoSG / PartCrafter layout (packing=True with time_embedding='token',
`moca_jax.prior_init`): the time token stays a token and belongs to the pretrained part,
  [ h_i (L) | tau_i (time token) | c_i (m) | a_i ] + e_{pi(i)}   (T_c = L + m + 2)
and the "prior tokens" P_i = [h_i | tau_i] (L + 1) take the vecset tokens' place everywhere
above: in a local block they attend to P_i only (blind to c_i, a_i, as the paper keeps the
vecset tokens "to preserve the pretrained prior"; the upstream self-attention over its L + 1
tokens exactly), c_i sees P_i and c_i, a_i sees all; in a global block P_i are the queries and
the routed full-resolution context of component j is P_j (with top_k >= N - 1 and gates of 1
this is PartCrafter's dense global attention over every token of the object's parts). Keeping
P_i a prefix keeps the local vecset attention unmasked; odd lengths are padded under cuDNN.

cuDNN (jax 0.11) needs even query and key lengths when differentiated: odd lengths are
padded here with a dummy query (dropped) or a masked dummy key (`attention_even`).

Upstream layouts (config switches; `moca_jax.convert.triposg_dit` builds these configs from
a published `transformer/config.json`):
  TripoSG (`TripoSGDiTModel`, VAST-AI-Research/TripoSG): packing=False, id_codebook=0,
    global_blocks='none', time_embedding='token' (the timestep is one extra token
    [sin | cos] -> Linear(D, 4D) -> GELU -> Linear(4D, D), kept after the vecset tokens here
    ([h | tau]; TripoSG prepends it: attention does not depend on token order), the output
    read from the L vecset tokens after the final norm), norm_eps=1e-5 with fp32 LayerNorms,
    exact erf GELU, U-ViT long skips, cross-attention of every token in every block.
  PartCrafter (`PartCrafterDiTModel`, wgsxm/PartCrafter): the same plus the part-embedding
    table (id_codebook = max_num_parts, id_assignment='batch_rows') and dense global blocks
    (global_attention='dense', global_condition='first_component') in which every token of
    every part (time tokens included) attends to all tokens of its object's parts, and the
    cross-attention reads the condition of the object's first part.
  Without packing a local block is plain self-attention over the T_c = L + 1 tokens of a
  component and a global block updates every token.

Shapes: B batch, N components (padded to N_max; component_mask marks the real ones),
L vecset tokens, C latent channels, D width, Tc condition tokens, Dc condition width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moca_jax import layers
from moca_jax import moc as moc_lib
from moca_jax.moc import MOC_GATHERS, GlobalAttention

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

_SIZES = {
    "tiny": dict(num_blocks=4, width=64, num_heads=4, latent_tokens=16, latent_channels=8,
                 num_compressed=4, top_k=2, cond_dim=32, router_head_dim=8),
    "small": dict(num_blocks=12, width=384, num_heads=6, latent_tokens=256, latent_channels=64,
                  num_compressed=32, top_k=4, cond_dim=384, router_head_dim=32),
    # the bundled model (assets/moca-small): under 24 MiB with its encoder and VAE in bf16
    "bundle": dict(num_blocks=6, width=256, num_heads=4, latent_tokens=64, latent_channels=32,
                   num_compressed=16, top_k=4, cond_dim=192, router_head_dim=32),
    "paper": dict(num_blocks=21, width=2048, num_heads=16, latent_tokens=1024,
                  latent_channels=64, num_compressed=32, top_k=4, cond_dim=1024,
                  router_head_dim=64),
}


def _defaults(size: str) -> dict:
  if size not in _SIZES:
    raise ValueError(f"size must be one of {sorted(_SIZES)}, got {size!r}")
  cfg = dict(
      mlp_ratio=4.0,
      id_codebook=50,
      global_blocks="even",          # 'even' | 'odd' | 'all' | 'none' | list of block indices
      long_skips=True,               # U-ViT skips (TripoSG): blocks n//2+1.. take blocks ..n//2-1
      global_attention="moc",        # 'moc' | 'dense' (PartCrafter baseline)
      routing="topk",                # 'topk' | 'none'            ablation A
      compressed_tokens=True,        # False: top-k full only     ablation B
      gate_on="keys",                # 'keys' | 'values'          ablation C
      router_activation="sigmoid",   # 'sigmoid' | 'softmax'      ablation D
      train_routing="gumbel",        # 'gumbel' | 'deterministic' ablation E
      shared_routing_across_heads=False,  #                       ablation F
      gather="hybrid",               # 'onehot' | 'take' | 'hybrid' | 'fused' (Pallas, GPU)
      moc_component_chunk=0,         # >0: MoC attention over chunks of query components
                                     # (bounds its memory at large N; must divide N)
      attention_implementation="xla",  # 'xla' | 'cudnn' | None
      dtype="float32",               # compute dtype; params stay fp32
      remat="none",                  # 'none' | 'full' | 'dots'
      # Layout switches (module docstring); the defaults are the MoCA model.
      packing=True,                  # packing queries, compressed tokens, anchor (MoC needs them)
      time_embedding="additive",     # 'additive' (added to every token) | 'token' (TripoSG)
      id_assignment="random",        # 'random' (distinct random ids in training, 0..N-1 at
                                     # eval) | 'batch_rows' (PartCrafter: eval ids number the
                                     # rows of the whole batch, 0..B*N-1; 0..N-1 in training)
      global_condition="per_component",  # 'per_component' | 'first_component' (PartCrafter)
      router_bias=False,             # a learned per-head bias on the router logits (a model
                                     # started from a prior: moca_jax.prior_init)
      norm_eps=1e-6,                 # LayerNorm epsilon (TripoSG: 1e-5)
      norm_fp32=False,               # LayerNorms computed in fp32 (TripoSG's FP32LayerNorm)
      gelu="tanh",                   # 'tanh' | 'erf' (exact; TripoSG)
  )
  cfg.update(_SIZES[size])
  if size == "paper":
    cfg.update(attention_implementation="cudnn", dtype="bfloat16")
  return cfg


def dit_config(size: str = "tiny"):
  """ml_collections.ConfigDict for a DiT size: 'tiny' (tests), 'small', 'bundle' (the model
  that ships in assets/), 'paper'."""
  return ml_collections.ConfigDict(_defaults(size))


@dataclasses.dataclass(frozen=True)
class DiTSpec:
  """Hashable, validated copy of a DiT config (see `dit_config` for the fields)."""
  num_blocks: int
  width: int
  num_heads: int
  latent_tokens: int
  latent_channels: int
  num_compressed: int
  top_k: int
  cond_dim: int
  router_head_dim: int
  mlp_ratio: float
  id_codebook: int
  global_blocks: Union[str, tuple]
  long_skips: bool
  global_attention: str
  routing: str
  compressed_tokens: bool
  gate_on: str
  router_activation: str
  train_routing: str
  shared_routing_across_heads: bool
  gather: str
  attention_implementation: Optional[str]
  dtype: str
  remat: str
  moc_component_chunk: int = 0  # optional: configs saved before it existed still load
  # Layout switches (defaults: the MoCA model; configs saved before them still load).
  packing: bool = True
  time_embedding: str = "additive"
  id_assignment: str = "random"
  global_condition: str = "per_component"
  norm_eps: float = 1e-6
  norm_fp32: bool = False
  gelu: str = "tanh"
  router_bias: bool = False

  @classmethod
  def from_config(cls, config: Any) -> "DiTSpec":
    if isinstance(config, DiTSpec):
      return config
    d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
    missing = names - set(d) - optional
    if missing:
      raise ValueError(f"DiT config is missing fields {sorted(missing)}")
    d = {key: d[key] for key in names if key in d}
    if isinstance(d["global_blocks"], (list, tuple)):
      d["global_blocks"] = tuple(int(i) for i in d["global_blocks"])
    spec = cls(**d)
    spec.validate()
    return spec

  def validate(self) -> None:
    checks = [
        ("global_attention", self.global_attention, ("moc", "dense")),
        ("routing", self.routing, ("topk", "none")),
        ("gate_on", self.gate_on, ("keys", "values")),
        ("router_activation", self.router_activation, ("sigmoid", "softmax")),
        ("train_routing", self.train_routing, ("gumbel", "deterministic")),
        ("gather", self.gather, MOC_GATHERS),
        ("attention_implementation", self.attention_implementation, ("xla", "cudnn", None)),
        ("dtype", self.dtype, tuple(_DTYPES)),
        ("remat", self.remat, ("none", "full", "dots")),
        ("time_embedding", self.time_embedding, ("additive", "token")),
        ("id_assignment", self.id_assignment, ("random", "batch_rows")),
        ("global_condition", self.global_condition, ("per_component", "first_component")),
        ("gelu", self.gelu, ("tanh", "erf")),
    ]
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"DiT config field {name}={value!r} is not one of {allowed}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.moc_component_chunk < 0:
      raise ValueError(f"moc_component_chunk must be >= 0, got {self.moc_component_chunk}")
    if self.routing == "none" and not self.compressed_tokens:
      raise ValueError("routing='none' with compressed_tokens=False leaves no global context")
    if not self.packing and self.global_attention == "moc" and self.global_block_ids():
      raise ValueError("global_attention='moc' needs packing=True (compressed and anchor tokens)")
    if not self.packing and self.time_embedding != "token":
      raise ValueError("packing=False (the TripoSG / PartCrafter layout) needs "
                       f"time_embedding='token', got {self.time_embedding!r}")
    if self.id_codebook < 0:
      raise ValueError(f"id_codebook must be >= 0 (0: no ID embedding), got {self.id_codebook}")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def norm(self, name: str) -> layers.LayerNorm:
    """A LayerNorm with this config's epsilon and precision."""
    return layers.layer_norm(self.compute_dtype, name, epsilon=self.norm_eps, fp32=self.norm_fp32)

  def mlp(self, name: str = "mlp") -> layers.Mlp:
    """The block MLP (ratio `mlp_ratio`, GELU form `gelu`)."""
    return layers.Mlp(self.mlp_ratio, approximate_gelu=self.gelu == "tanh",
                      dtype=self.compute_dtype, name=name)

  @property
  def time_tokens(self) -> int:
    """1 when the timestep is a token (TripoSG layout), else 0 (additive)."""
    return int(self.time_embedding == "token")

  @property
  def extra_tokens(self) -> int:
    """Tokens per component after the L vecset tokens: the time token (if any), then the
    m compressed tokens and the anchor (packing)."""
    return self.time_tokens + (self.num_compressed + 1 if self.packing else 0)

  def global_block_ids(self) -> tuple:
    """Indices of the global blocks."""
    g, n = self.global_blocks, self.num_blocks
    if isinstance(g, str):
      table = {"even": range(0, n, 2), "odd": range(1, n, 2), "all": range(n), "none": ()}
      if g not in table:
        raise ValueError(f"global_blocks must be 'even', 'odd', 'all', 'none' or a list, got {g!r}")
      return tuple(table[g])
    if any(i < 0 or i >= n for i in g):
      raise ValueError(f"global_blocks {g} out of range for {n} blocks")
    return tuple(sorted(set(g)))


# ----------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------

def _pad_tokens(x: Array, extra: int) -> Array:
  return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) if extra else x


def attention_even(q: Array, k: Array, v: Array, mask: Optional[Array] = None,
                   implementation: Optional[str] = "xla") -> Array:
  """`layers.attention` with odd query/key lengths padded to even under cuDNN.

  q: [B, Tq, H, d]; k, v: [B, Tk, H, d]; mask: None or broadcastable to [B, 1, Tq, Tk].
  A padded query row is dropped; a padded key is masked out. Returns [B, Tq, H, d].
  """
  tq, tk = q.shape[1], k.shape[1]
  pq, pk = (tq % 2, tk % 2) if implementation == "cudnn" else (0, 0)
  if not (pq or pk):
    return layers.attention(q, k, v, mask=mask, implementation=implementation)
  if mask is None:  # key padding only: cuDNN's padding mask where the entry point has one
    return moc_lib.attend_prefix(q, k, v, None, implementation)
  mask = jnp.asarray(mask, bool)
  while mask.ndim < 4:
    mask = mask[None]
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (tq, tk))
  mask = jnp.pad(mask, [(0, 0), (0, 0), (0, pq), (0, pk)], constant_values=False)
  mask = mask.at[:, :, tq:, 0].set(True)  # the dummy query keeps one key
  mask = jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:])
  out = layers.attention(_pad_tokens(q, pq), _pad_tokens(k, pk), _pad_tokens(v, pk),
                         mask=mask, implementation=implementation)
  return out[:, :tq]


class LocalAttention(layers.MultiHeadAttention):
  """Self-attention inside each component under the local mask (module docstring).

  x: [B', T_c, D] tokens of one component per row, laid out [h (L) | c (m) | a], or
  [P (L + 1: vecset and time token) | c | a] on a pretrained layout; `seq_len` is the prior
  length (L or L + 1).
  Two attention calls: the prior queries over the prior keys (no mask), and the
  m + 1 compressed/anchor queries over all keys with a small [m + 1, T_c] mask.
  """
  seq_len: int = 16
  num_compressed: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    seq_len, m, t_c = self.seq_len, self.num_compressed, x.shape[1]
    q, k, v = self.project_qkv(x, x)
    out_v = attention_even(q[:, :seq_len], k[:, :seq_len], v[:, :seq_len],
                           implementation=self.implementation)
    rows_see = jnp.concatenate([jnp.full((m,), seq_len + m), jnp.array([t_c])])
    mask = jnp.arange(t_c)[None, :] < rows_see[:, None]  # [m + 1, T_c]
    mask = jnp.broadcast_to(mask, (x.shape[0], 1) + mask.shape)  # explicit batch for cuDNN
    out_rest = attention_even(q[:, seq_len:], k, v, mask=mask, implementation=self.implementation)
    return self.project_out(jnp.concatenate([out_v, out_rest], axis=1), x.shape[-1])


class CrossAttention(layers.MultiHeadAttention):
  """Cross-attention to condition tokens, odd lengths padded under cuDNN (attention_even).

  x: [B', Tq, D]; context: [B', Tc, Dc]. Returns [B', Tq, D].
  """

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    q, k, v = self.project_qkv(x, context)
    return self.project_out(attention_even(q, k, v, implementation=self.implementation),
                            x.shape[-1])


def _cross(spec: DiTSpec, name: str):
  return CrossAttention(spec.num_heads, implementation=spec.attention_implementation,
                        dtype=spec.compute_dtype, name=name)


def _cross_attend(module, x: Array, cond: Array) -> Array:
  """x [B, N, T, D]; cond [B, Tc, Dc] (shared) or [B, N, Tc, Dc] (per component)."""
  b, n, t, d = x.shape
  if cond.ndim == 3:
    return module(x.reshape(b, n * t, d), cond).reshape(x.shape)
  return module(x.reshape(b * n, t, d), cond.reshape(b * n, *cond.shape[2:])).reshape(x.shape)


class SelfAttention(layers.MultiHeadAttention):
  """Unmasked self-attention, odd lengths padded under cuDNN: x [B', T, D] -> [B', T, D]."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    q, k, v = self.project_qkv(x, x)
    return self.project_out(attention_even(q, k, v, implementation=self.implementation),
                            x.shape[-1])


class DiTBlock(nn.Module):
  """One DiT block over all components: x [B, N, T_c, D] -> ([B, N, T_c, D], aux)."""
  spec: DiTSpec
  is_global: bool
  has_skip: bool
  train: bool = False

  @nn.compact
  def __call__(self, x: Array, cond: Array, component_mask: Optional[Array],
               skip: Optional[Array] = None):
    s = self.spec
    dt = s.compute_dtype
    b, n, t, d = x.shape
    if self.has_skip:
      # U-ViT long skip: Linear(concat[x, skip]) then LayerNorm (TripoSG's [skip, x] order is
      # reordered at import, moca_jax.convert.triposg_dit).
      x = layers.dense(d, ("mlp", "embed"), dtype=dt, name="skip_linear")(
          jnp.concatenate([x, skip], axis=-1))
      x = s.norm("skip_norm")(x)
    if not s.packing:
      return self._plain(x, cond, component_mask), {}
    m = s.num_compressed
    seq_len = t - m - 1  # prior tokens: the L vecset tokens (and the time token, if any)
    aux = {}
    if self.is_global:
      h, rest = x[:, :, :seq_len], x[:, :, seq_len:]
      xn = s.norm("norm1")(x)
      attn = GlobalAttention(
          s.num_heads, implementation=s.attention_implementation, dtype=dt,
          mode=s.global_attention, top_k=s.top_k, routing=s.routing,
          compressed_tokens=s.compressed_tokens, gate_on=s.gate_on,
          router_activation=s.router_activation, train_routing=s.train_routing,
          shared_routing=s.shared_routing_across_heads, router_head_dim=s.router_head_dim,
          gather=s.gather, component_chunk=s.moc_component_chunk, router_bias=s.router_bias,
          name="global_attn")
      update, aux = attn(xn[:, :, :seq_len], xn[:, :, seq_len:seq_len + m],
                         xn[:, :, -1], component_mask, train=self.train)
      h = h + update
      h = h + _cross_attend(_cross(s, "cross_attn"), s.norm("norm2")(h),
                            _global_condition(s, cond))
      h = h + s.mlp()(s.norm("norm3")(h))
      return jnp.concatenate([h, rest.astype(h.dtype)], axis=2), aux
    local = LocalAttention(s.num_heads, implementation=s.attention_implementation, dtype=dt,
                           seq_len=seq_len, num_compressed=m, name="local_attn")
    x = x + local(s.norm("norm1")(x).reshape(b * n, t, d)).reshape(x.shape)
    x = x + _cross_attend(_cross(s, "cross_attn"), s.norm("norm2")(x), cond)
    x = x + s.mlp()(s.norm("norm3")(x))
    return x, aux

  def _plain(self, x: Array, cond: Array, component_mask: Optional[Array]) -> Array:
    """TripoSG / PartCrafter block (no packing): every token is a query everywhere.

    Local: self-attention within each component, cross-attention to its condition.
    Global (dense): self-attention over all tokens of all real components of a sample,
    cross-attention per `global_condition`.
    """
    s = self.spec
    dt = s.compute_dtype
    b, n, t, d = x.shape
    xn = s.norm("norm1")(x)
    if self.is_global:
      attn = GlobalAttention(s.num_heads, implementation=s.attention_implementation, dtype=dt,
                             mode="dense", name="global_attn")
      update, _ = attn(xn, None, None, component_mask, train=self.train)
      x = x + update
      cond = _global_condition(s, cond)
    else:
      local = SelfAttention(s.num_heads, implementation=s.attention_implementation, dtype=dt,
                            name="local_attn")
      x = x + local(xn.reshape(b * n, t, d)).reshape(x.shape)
    x = x + _cross_attend(_cross(s, "cross_attn"), s.norm("norm2")(x), cond)
    return x + s.mlp()(s.norm("norm3")(x))


def _global_condition(spec: DiTSpec, cond: Array) -> Array:
  """The condition of a global block: per component, or (PartCrafter, 'first_component')
  the first component's condition for all of a sample's components ([B, Tc, Dc])."""
  if spec.global_condition == "first_component" and cond.ndim == 4:
    return cond[:, 0]
  return cond


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class PackingAttention(layers.MultiHeadAttention):
  """[c_i ; a_i] = CrossAttn(Q = [Q_c ; q_a], K = V = h_i) (eq. 3), queries shared.

  h: [B', L, D] -> [B', m + 1, D] (the learnable queries are added back as a residual).
  """
  num_queries: int = 5

  @nn.compact
  def __call__(self, h: Array) -> Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
    queries = self.param("queries", init, (self.num_queries, h.shape[-1]), jnp.float32)
    queries = jnp.broadcast_to(queries.astype(h.dtype), (h.shape[0],) + queries.shape)
    q, k, v = self.project_qkv(queries, h)
    out = attention_even(q, k, v, implementation=self.implementation)
    return queries + self.project_out(out, h.shape[-1])


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

def draw_ids(rng: Array, batch: int, num_components: int, codebook: int) -> Array:
  """Distinct random IDs per sample: [batch, num_components] int32 from range(codebook)."""
  keys = jax.random.split(rng, batch)
  perm = jax.vmap(lambda key: jax.random.permutation(key, codebook))(keys)
  return perm[:, :num_components].astype(jnp.int32)


def default_ids(spec: DiTSpec, batch: int, n: int, train: bool,
                rng: Optional[Array] = None) -> Array:
  """The ID-codebook entries [batch, n] int32 used when none are given (see
  `CompositionalDiT.__call__`, `id_assignment`).

  Raises:
    ValueError: the ids needed exceed the codebook (for 'batch_rows' at evaluation, batch * n
      must fit: PartCrafter's CFG batch of N parts needs max_num_parts >= 2N).
  """
  if spec.id_assignment == "batch_rows" and not train:
    if batch * n > spec.id_codebook:
      raise ValueError(f"{batch} x {n} = {batch * n} batch rows exceed the part-embedding table "
                       f"of {spec.id_codebook} (id_assignment='batch_rows' numbers every row)")
    return jnp.arange(batch * n, dtype=jnp.int32).reshape(batch, n)
  if n > spec.id_codebook:
    raise ValueError(f"{n} components exceed the ID codebook of {spec.id_codebook}")
  if train and spec.id_assignment == "random":
    return draw_ids(rng, batch, n, spec.id_codebook)
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))


class CompositionalDiT(nn.Module):
  """Compositional DiT with Mixture-of-Components (or dense) global attention.

  Attributes:
    config: a `dit_config(...)` ConfigDict (or FrozenConfigDict, dict, DiTSpec); read
      through `DiTSpec.from_config`, so hashing the module is not required.
  """
  config: Any

  @nn.compact
  def __call__(self, x_t: Array, t: Array, cond: Array, component_mask: Optional[Array],
               ids: Optional[Array] = None, *, train: bool, return_routing: bool = False):
    """Velocity prediction.

    Args:
      x_t: [B, N, L, C] noisy latents.
      t: [B] flow time in [0, 1] (shared by the components of a sample).
      cond: [B, Tc, Dc] (object mode, shared) or [B, N, Tc, Dc] (scene mode).
      component_mask: [B, N] bool, True = real component; None = all real (static).
      ids: [B, N] int32 ID-codebook entries, distinct per sample; None -> per
        `id_assignment`: 'random' draws them from rng stream 'ids' in training and uses
        0..N-1 at evaluation; 'batch_rows' (PartCrafter) uses 0..N-1 in training and numbers
        the rows of the whole batch at evaluation, row-major (0..B*N-1: in a CFG batch
        [uncond; cond] of one object the conditional half gets N..2N-1, as upstream does).
        Ignored when id_codebook = 0 (no ID embedding).
      train: Gumbel routing (rng stream 'routing') and random ids when True.
      return_routing: also return aux.
    Returns:
      velocity [B, N, L, C] (float32), or (velocity, aux) with aux
      {'importances': [B, G, H, N, N], 'selections': [B, G, H, N, k]} over the G MoC
      global blocks (G = 0 for dense global attention).
    """
    s = DiTSpec.from_config(self.config)
    dt = s.compute_dtype
    b, n, seq_len, channels = x_t.shape
    if channels != s.latent_channels:
      raise ValueError(f"x_t has {channels} channels, config latent_channels={s.latent_channels}")
    if t.shape != (b,):
      raise ValueError(f"t must have shape [B]={(b,)}, got {t.shape}")
    if cond.ndim not in (3, 4) or cond.shape[-1] != s.cond_dim or (cond.ndim == 4 and cond.shape[1] != n):
      raise ValueError(f"cond must be [B, Tc, {s.cond_dim}] or [B, {n}, Tc, {s.cond_dim}], got {cond.shape}")
    if component_mask is not None and component_mask.shape != (b, n):
      raise ValueError(f"component_mask must have shape {(b, n)}, got {component_mask.shape}")
    if ids is not None and ids.shape != (b, n):
      raise ValueError(f"ids must have shape {(b, n)}, got {ids.shape}")
    if s.id_codebook and n > s.id_codebook:
      raise ValueError(f"{n} components exceed the ID codebook of {s.id_codebook}")
    if s.id_codebook and ids is None:
      draw = train and s.id_assignment == "random"
      ids = default_ids(s, b, n, train, self.make_rng("ids") if draw else None)

    d, m = s.width, s.num_compressed
    h = layers.dense(d, ("in", "embed"), dtype=dt, name="proj_in")(x_t.astype(dt))
    tokens = [h]
    if s.time_embedding == "token":  # TripoSG: [sin | cos] -> Linear(D, 4D) -> GELU -> Linear
      temb = layers.TimestepEmbedding(d, frequency_dim=d, hidden_dim=4 * d, activation="gelu",
                                      order="sin_cos", dtype=dt, name="time_embed")(t)
      tokens.append(jnp.broadcast_to(temb.astype(dt)[:, None, None, :], (b, n, 1, d)))
      add = 0.0
    else:
      temb = layers.TimestepEmbedding(d, dtype=dt, name="time_embed")(t).astype(dt)  # [B, D]
      add = temb[:, None, :]
    if s.packing:  # packing reads the vecset tokens h_i only (eq. 3)
      packed = PackingAttention(s.num_heads, implementation=s.attention_implementation,
                                dtype=dt, num_queries=m + 1, name="packing")(
          s.norm("pack_norm")(h).reshape(b * n, seq_len, d)).reshape(b, n, m + 1, d)
      tokens.append(packed.astype(dt))
    x = jnp.concatenate(tokens, axis=2)  # [B, N, L + extra_tokens, D]
    if s.id_codebook:
      id_table = nn.Embed(s.id_codebook, d, embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("vocab", "embed")), name="id_embed")
      add = id_table(ids).astype(dt) + add
    if s.id_codebook or s.time_embedding == "additive":
      x = x + jnp.broadcast_to(add, (b, n, d))[:, :, None, :]
    cond = cond.astype(dt)

    block_cls = DiTBlock
    if s.remat != "none":
      block_cls = nn.remat(DiTBlock, policy=_REMAT_POLICIES[s.remat], prevent_cse=True)
    global_ids = set(s.global_block_ids())
    n_skip = s.num_blocks // 2 if s.long_skips else 0
    skips, importances, selections = [], [], []
    for i in range(s.num_blocks):
      has_skip = n_skip > 0 and i >= s.num_blocks - n_skip
      block = block_cls(s, is_global=i in global_ids, has_skip=has_skip, train=train,
                        name=f"block_{i}")
      x, aux = block(x, cond, component_mask, skips.pop() if has_skip else None)
      # Per-block activations for parity debugging: apply(..., mutable=["intermediates"]).
      self.sow("intermediates", f"block_{i}_out", x)
      if i < n_skip:
        skips.append(x)
      if aux:
        importances.append(aux["importance"])
        selections.append(aux["selected"])

    out = s.norm("norm_out")(x[:, :, :seq_len])
    velocity = layers.dense(channels, ("embed", "in"), dtype=dt, name="proj_out")(out)
    velocity = velocity.astype(jnp.float32)
    if not return_routing:
      return velocity
    nh, k = s.num_heads, min(s.top_k, n - 1) if s.routing == "topk" else 0
    aux = {
        "importances": (jnp.stack(importances, 1) if importances
                        else jnp.zeros((b, 0, nh, n, n), jnp.float32)),
        "selections": (jnp.stack(selections, 1) if selections
                       else jnp.zeros((b, 0, nh, n, k), jnp.int32)),
    }
    return velocity, aux
