"""Mixture-of-Components (MoC) attention: router, routing, routed context, dense baseline.

Paper section 3.2.3 as restored in shared/paper/NOTES.md. For component i and head h:

  s^h_ij = sigmoid(<W_q a_i, W_k a_j>_h / sqrt(d_r))          (router on the anchor tokens)
  S^h_i  = top-k_j s^h_ij  (eval)  |  Gumbel-top-k of p^h_ij = s^h_ij / sum_j s^h_ij  (train)
  K = [h_i W_K ; s^h_ij * (R^h_ij W_K) for j != i],  V = [h_i W_V ; R^h_ij W_V for j != i]
  R^h_ij = h_j (L vecset tokens) if j in S^h_i else c_j (m compressed tokens)

Static shapes: per (component, head) the routed context is laid out as
  [own L | k selected components x L | (N - 1 - k) unselected components x m]
with the selected and unselected components each sorted by (perturbed) importance, so the
valid keys of a sample with padding always form a prefix. One attention call covers all
components (attention batch B * N). Padding components are never selected, never attended
and their queries are ignored.

Shapes: B batch, N components, L vecset tokens, m compressed tokens, H heads, d head size.
Only the vecset tokens are queries in a global block (the paper is silent; see NOTES.md).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moca_jax import layers

Array = jax.Array

_PAD_SCORE = -1e30  # padding components: below every real score, above -inf (self)
GATHER_METHODS = ("onehot", "take", "hybrid")  # ways to build the routed context
# `moc_attention(gather=...)` also takes 'fused': the Pallas kernel of
# moca_jax.kernels.moc_flash (no routed context; the gather path is its reference).
MOC_GATHERS = GATHER_METHODS + ("fused",)


# ----------------------------------------------------------------------------------------
# Attention call with a valid-key prefix
# ----------------------------------------------------------------------------------------

def _attention_has_lengths() -> bool:
  return "key_value_seq_lengths" in inspect.signature(layers.attention).parameters


def attend_prefix(q: Array, k: Array, v: Array, kv_lengths: Optional[Array],
                  implementation: Optional[str]) -> Array:
  """Attention where only the first kv_lengths[b] keys of batch row b are valid.

  q: [B, Tq, H, d]; k, v: [B, Tk, H, d]; kv_lengths: [B] int32 or None (all keys valid).
  Goes through `layers.attention`: with `key_value_seq_lengths` when that entry point
  accepts it (cuDNN padding mask, no bias tensor), else with a boolean mask broadcast to
  [B, 1, Tq, Tk] (cuDNN needs the full query length in a mask).
  Returns [B, Tq, H, d].
  """
  tq, tk = q.shape[1], k.shape[1]
  if implementation == "cudnn" and (tq % 2 or tk % 2):
    # cuDNN needs even lengths when differentiated: pad one query (dropped) and/or one key
    # (beyond every valid prefix).
    pad = lambda t, e: jnp.pad(t, [(0, 0), (0, e), (0, 0), (0, 0)]) if e else t
    if kv_lengths is None:
      kv_lengths = jnp.full((q.shape[0],), tk, jnp.int32)
    out = attend_prefix(pad(q, tq % 2), pad(k, tk % 2), pad(v, tk % 2), kv_lengths,
                        implementation)
    return out[:, :tq]
  if kv_lengths is None:
    return layers.attention(q, k, v, implementation=implementation)
  kv_lengths = kv_lengths.astype(jnp.int32)
  if _attention_has_lengths():
    return layers.attention(q, k, v, implementation=implementation,
                            key_value_seq_lengths=kv_lengths)
  valid = jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None]  # [B, Tk]
  mask = jnp.broadcast_to(valid[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
  return layers.attention(q, k, v, mask=mask, implementation=implementation)


# ----------------------------------------------------------------------------------------
# Router and routing
# ----------------------------------------------------------------------------------------

def router_importance(logits: Array, component_mask: Optional[Array],
                      activation: str = "sigmoid") -> Array:
  """Importances s [B, H, N, N] from router logits [B, H, N, N] (query i, key j).

  'sigmoid' (paper): s = sigmoid(logits). 'softmax' (ablation D): a softmax over the real
  j != i. The diagonal and padding columns are set to 0.
  """
  n = logits.shape[-1]
  valid = ~jnp.eye(n, dtype=bool)
  if component_mask is not None:
    valid = valid & component_mask[:, None, None, :]
  logits = logits.astype(jnp.float32)
  if activation == "sigmoid":
    s = jax.nn.sigmoid(logits)
  elif activation == "softmax":
    s = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
  else:
    raise ValueError(f"router_activation must be 'sigmoid' or 'softmax', got {activation!r}")
  return jnp.where(valid, s, 0.0)


def route(importance: Array, component_mask: Optional[Array], k: int,
          rng: Optional[Array] = None) -> tuple[Array, Array]:
  """Orders the other components of each (batch, head, component) by importance.

  Args:
    importance: s [B, H, N, N] (>= 0, zero on the diagonal and padding).
    component_mask: [B, N] bool (True = real) or None (all real).
    k: number of components routed at full resolution (static; clamped to N - 1).
    rng: None for deterministic top-k; a key for Gumbel-top-k sampling without replacement
      from p_ij = s_ij / sum_j s_ij (keys sampled proportionally to the normalised
      importance; the normalisation does not change the order so log s is perturbed).
  Returns:
    selected [B, H, N, k] and unselected [B, H, N, N - 1 - k] int32 component indices, each
    in descending (perturbed) importance, real components before padding, self excluded.
  """
  n = importance.shape[-1]
  k = min(k, n - 1)
  score = jnp.log(jnp.maximum(importance, 1e-30))
  if rng is not None:
    score = score + jax.random.gumbel(rng, score.shape, jnp.float32)
  if component_mask is not None:
    score = jnp.where(component_mask[:, None, None, :], score, _PAD_SCORE)
  score = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, score)
  if n == 1:
    empty = jnp.zeros(score.shape[:-1] + (0,), jnp.int32)
    return empty, empty
  # A stable descending sort, not lax.top_k: XLA's SPMD partitioner replicates TopK (it
  # all-gathers a batch-sharded score), while a sort stays sharded along the batch. Same
  # order as top_k (ties: lower index first); the last slot is the diagonal's -inf.
  iota = jax.lax.broadcasted_iota(jnp.int32, score.shape, score.ndim - 1)
  _, order = jax.lax.sort((-score, iota), dimension=score.ndim - 1, num_keys=1, is_stable=True)
  order = order[..., :n - 1]
  return order[..., :k], order[..., k:]


class Router(nn.Module):
  """Per-head router on the anchor tokens: a [B, N, D] -> logits [B, Hr, N, N] (eq. 4).

  Hr = num_heads, or 1 when the routing is shared by all heads (ablation F).
  With `use_bias`, a learned bias [Hr] (initialised to 0) is added to every logit of its head:
  a model started from a pretrained prior sets it high so that the sigmoid gates start near 1
  (`moca_jax.prior_init`); the paper's router has none (the default).
  """
  num_heads: int
  head_dim: int = 64
  dtype: Any = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, anchor: Array) -> Array:
    inner = self.num_heads * self.head_dim
    qr = layers.dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="query")(anchor)
    kr = layers.dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="key")(anchor)
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)
    qr, kr = split(qr).astype(jnp.float32), split(kr).astype(jnp.float32)
    logits = jnp.einsum("bihr,bjhr->bhij", qr, kr) / math.sqrt(self.head_dim)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("in",)),
                        (self.num_heads,), jnp.float32)
      logits = logits + bias[None, :, None, None]
    return logits


# ----------------------------------------------------------------------------------------
# Gathering routed components
# ----------------------------------------------------------------------------------------

def _gather_take(x: Array, idx: Array) -> Array:
  """x [B, N, T, H, d], idx [B, N, S, H] -> x[b, idx[b,i,s,h], :, h, :] as [B, N, S, T, H, d].

  One XLA gather whose output already has the attention layout (no transpose). B and H are
  gather batching dimensions, so XLA's SPMD partitioner keeps a batch-sharded operand
  sharded (an explicit batch index would make it all-gather x onto every device).
  """
  _, _, t, _, d = x.shape
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(3, 5), collapsed_slice_dims=(1,),
                                         start_index_map=(1,), operand_batching_dims=(0, 3),
                                         start_indices_batching_dims=(0, 3))
  return jax.lax.gather(x, idx.astype(jnp.int32)[..., None], dnums, slice_sizes=(1, 1, t, 1, d),
                        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _one_hot_weights(idx: Array, gate: Array, n: int, dtype) -> Array:
  """[B, N, S, H] indices and gates -> [B, H, N, S, n] gated one-hot over components."""
  oh = (idx[..., None] == jnp.arange(n, dtype=idx.dtype)).astype(dtype) * gate[..., None].astype(dtype)
  return jnp.transpose(oh, (0, 3, 1, 2, 4))


def _gather_onehot(x: Array, idx: Array, gate: Array) -> Array:
  """Gated gather as a one-hot einsum over the component axis (a matmul both ways)."""
  oh = _one_hot_weights(idx, gate, x.shape[1], x.dtype)
  return jnp.einsum("bhisj,bjthd->bisthd", oh, x)


@jax.custom_vjp
def _gather_hybrid(x: Array, idx: Array, gate: Array) -> Array:
  """Gated gather: XLA gather forward, one-hot matmul backward (no scatter-add)."""
  return _gather_take(x, idx) * gate[:, :, :, None, :, None].astype(x.dtype)


def _gather_hybrid_fwd(x, idx, gate):
  return _gather_hybrid(x, idx, gate), (x, idx, gate)


def _gather_hybrid_bwd(res, g):
  x, idx, gate = res
  oh = _one_hot_weights(idx, gate, x.shape[1], g.dtype)
  dx = jnp.einsum("bhisj,bisthd->bjthd", oh, g)
  dgate = jnp.einsum("bisthd,bisthd->bish", g, _gather_take(x, idx),
                     preferred_element_type=jnp.float32).astype(gate.dtype)
  return dx, None, dgate


_gather_hybrid.defvjp(_gather_hybrid_fwd, _gather_hybrid_bwd)


def gather_components(x: Array, idx: Array, gate: Optional[Array] = None,
                      method: str = "hybrid") -> Array:
  """Routed tokens of the indexed components, optionally gated.

  Args:
    x: [B, N, T, H, d] per-component tokens (keys or values).
    idx: [B, N, S, H] int component index for every (component i, slot s, head h).
    gate: [B, N, S, H] multiplier per slot and head, or None (1).
    method: 'onehot' (einsum over the component axis), 'take' (XLA gather; its gradient
      is a scatter-add) or 'hybrid' (gather forward, one-hot einsum backward).
  Returns:
    [B, N, S, T, H, d].
  """
  if gate is None:
    gate = jnp.ones(idx.shape, x.dtype)
  if method == "onehot":
    return _gather_onehot(x, idx, gate)
  if method == "take":
    return _gather_take(x, idx) * gate[:, :, :, None, :, None].astype(x.dtype)
  if method == "hybrid":
    return _gather_hybrid(x, idx, gate)
  raise ValueError(f"gather must be one of {GATHER_METHODS}, got {method!r}")


# ----------------------------------------------------------------------------------------
# MoC attention (pure function) and the dense baseline
# ----------------------------------------------------------------------------------------

def _take_heads(s: Array, idx: Array) -> Array:
  """s [B, H, N, N], idx [B, H, N, S] -> s[b, h, i, idx] as [B, N, S, H]."""
  return jnp.transpose(jnp.take_along_axis(s, idx, axis=-1), (0, 2, 3, 1))


def routed_lengths(component_mask: Array, seq_len: int, k: int, m: int,
                   use_compressed: bool) -> Array:
  """Valid routed-context length per (batch, component): [B, N] int32 (own tokens included)."""
  n = component_mask.shape[1]
  k = min(k, n - 1)
  others = jnp.sum(component_mask, axis=1).astype(jnp.int32) - 1  # [B]
  others = jnp.maximum(others, 0)
  length = seq_len + jnp.minimum(others, k) * seq_len
  if use_compressed:
    length = length + jnp.maximum(others - k, 0) * m
  return jnp.broadcast_to(length[:, None], component_mask.shape).astype(jnp.int32)


def routed_context(kh: Array, vh: Array, kc: Optional[Array], vc: Optional[Array],
                   importance: Optional[Array], selected: Array, unselected: Array,
                   component_mask: Optional[Array], *, gate_on: str = "keys",
                   gather: str = "hybrid",
                   own: Optional[tuple[Array, Array]] = None) -> tuple[Array, Array, Optional[Array]]:
  """Builds the routed keys and values of the query components at a static length.

  Args: as `moc_attention`, plus
    own: (keys, values) [B, Nq, L, H, d] of the query components when they are a subset
      (a chunk) of the N components; `importance` is then [B, H, Nq, N] and `selected` /
      `unselected` have Nq rows. None: every component is a query (Nq = N).
  Returns:
    keys, values [B * Nq, L + k L + (N - 1 - k) m, H, d] (the compressed part only when kc
    is given) and valid lengths [B * Nq] int32 (None when component_mask is None).
  """
  b, _, seq_len, nh, hd = kh.shape
  if gate_on not in ("keys", "values"):
    raise ValueError(f"gate_on must be 'keys' or 'values', got {gate_on!r}")
  if gather == "fused":
    raise ValueError("gather='fused' builds no routed context: call moc_attention")
  use_compressed = kc is not None
  own_k, own_v = own if own is not None else (kh, vh)
  n = own_k.shape[1]
  k_parts, v_parts = [own_k[:, :, None]], [own_v[:, :, None]]

  def add(idx_bhns, xk, xv):
    idx = jnp.transpose(idx_bhns, (0, 2, 3, 1))  # [B, N, S, H]
    gate = None if importance is None else _take_heads(importance, idx_bhns).astype(xk.dtype)
    gk, gv = (gate, None) if gate_on == "keys" else (None, gate)
    k_parts.append(gather_components(xk, idx, gk, gather))
    v_parts.append(gather_components(xv, idx, gv, gather))

  if selected.shape[-1]:
    add(selected, kh, vh)
  if use_compressed and unselected.shape[-1]:
    add(unselected, kc, vc)
  flat = lambda parts: jnp.concatenate(
      [p.reshape(b * n, -1, nh, hd) for p in parts], axis=1)
  lengths = None
  if component_mask is not None:
    m = kc.shape[2] if use_compressed else 0
    lengths = routed_lengths(component_mask, seq_len, selected.shape[-1], m,
                             use_compressed)[:, :n].reshape(b * n)  # equal for all rows
  return flat(k_parts), flat(v_parts), lengths


def moc_attention(q: Array, kh: Array, vh: Array, kc: Optional[Array], vc: Optional[Array],
                  importance: Optional[Array], selected: Array, unselected: Array,
                  component_mask: Optional[Array], *, gate_on: str = "keys",
                  implementation: Optional[str] = "xla", gather: str = "hybrid",
                  component_chunk: int = 0) -> Array:
  """Mixture-of-Components attention for all components at once (one attention call).

  With `component_chunk` = c (0 < c < N, dividing N) the query components are processed
  c at a time (`lax.map`, each chunk rematerialised in the backward pass), so the routed
  context held in memory is c x (L + kL + (N-1-k)m) tokens instead of N x that: O(N) rather
  than O(N^2) memory for large N, at the price of N / c sequential attention calls.

  Args:
    q: [B, N, L, H, d] queries of the vecset tokens.
    kh, vh: [B, N, L, H, d] keys/values of the vecset tokens.
    kc, vc: [B, N, m, H, d] keys/values of the compressed tokens, or None (ablation B).
    importance: s [B, H, N, N] gates, or None (all gates 1; ablation A uses this).
    selected: [B, H, N, k] components routed at full resolution.
    unselected: [B, H, N, N - 1 - k] the others (used through their compressed tokens).
    component_mask: [B, N] bool or None (all real).
    gate_on: 'keys' (paper) or 'values' (ablation C).
    implementation: attention backend ('xla' | 'cudnn' | None).
    gather: see `gather_components`, or 'fused' (MOC_GATHERS): the fused Pallas kernel
      `moca_jax.kernels.moc_flash.moc_attention_fused` (forward fused, never materialising
      the routed context; interpret mode on CPU; on an H200 it agrees with the gather path
      to 3e-3 in bf16 but is 1.05-1.58x slower, experiments/results/peer_comparison.md). Its backward
      is fused too (dq and dk/dv Pallas kernels with inverse routing tables; the kernel's
      bwd='recompute' re-runs this gather path instead).
    component_chunk: query components per chunk (0: all at once).
  Returns:
    [B, N, L, H, d].
  """
  b, n, seq_len, nh, hd = q.shape
  if gather == "fused":
    from moca_jax.kernels import moc_flash  # imported on use: Pallas only when asked for

    return moc_flash.moc_attention_fused(q, kh, vh, kc, vc, importance, selected, unselected,
                                         component_mask, gate_on=gate_on,
                                         bwd_implementation=implementation,
                                         bwd_component_chunk=component_chunk)
  if component_chunk and component_chunk < n:
    return _moc_attention_chunked(q, kh, vh, kc, vc, importance, selected, unselected,
                                  component_mask, gate_on=gate_on,
                                  implementation=implementation, gather=gather,
                                  chunk=component_chunk)
  keys, values, lengths = routed_context(kh, vh, kc, vc, importance, selected, unselected,
                                         component_mask, gate_on=gate_on, gather=gather)
  out = attend_prefix(q.reshape(b * n, seq_len, nh, hd), keys, values, lengths, implementation)
  return out.reshape(b, n, seq_len, nh, hd)


def _moc_attention_chunked(q, kh, vh, kc, vc, importance, selected, unselected,
                           component_mask, *, gate_on, implementation, gather, chunk):
  """`moc_attention` over chunks of `chunk` query components (see its docstring)."""
  b, n, seq_len, nh, hd = q.shape
  if n % chunk:
    raise ValueError(f"component_chunk={chunk} must divide the number of components {n}")
  num_chunks = n // chunk

  def split(x, axis):  # [..., N, ...] -> [num_chunks, ..., chunk, ...]
    if x is None:
      return None
    x = x.reshape(x.shape[:axis] + (num_chunks, chunk) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  @jax.checkpoint
  def one_chunk(args):
    q_c, own_k, own_v, imp_c, sel_c, unsel_c = args
    keys, values, lengths = routed_context(kh, vh, kc, vc, imp_c, sel_c, unsel_c,
                                           component_mask, gate_on=gate_on, gather=gather,
                                           own=(own_k, own_v))
    out = attend_prefix(q_c.reshape(b * chunk, seq_len, nh, hd), keys, values, lengths,
                        implementation)
    return out.reshape(b, chunk, seq_len, nh, hd)

  out = jax.lax.map(one_chunk, (split(q, 1), split(kh, 1), split(vh, 1),
                                split(importance, 2), split(selected, 2), split(unselected, 2)))
  return jnp.moveaxis(out, 0, 1).reshape(b, n, seq_len, nh, hd)


def dense_global_attention(q: Array, k: Array, v: Array, component_mask: Optional[Array],
                           implementation: Optional[str] = "xla") -> Array:
  """Dense global attention (PartCrafter): all N*T tokens of a sample attend to each other.

  q, k, v: [B, N, T, H, d] (T tokens per component: the L vecset tokens, or all of a
  component's tokens in the PartCrafter layout); component_mask: [B, N] bool or None.
  Padding components are moved behind the real ones (a stable sort) so their keys form a
  masked suffix; odd lengths are padded under cuDNN (`attend_prefix`).
  Returns [B, N, T, H, d].
  """
  b, n, seq_len, nh, hd = q.shape
  if component_mask is None:
    flat = lambda t: t.reshape(b, n * seq_len, nh, hd)
    out = attend_prefix(flat(q), flat(k), flat(v), None, implementation)
    return out.reshape(q.shape)
  order = jnp.argsort(~component_mask, axis=1, stable=True)  # real first
  inverse = jnp.argsort(order, axis=1)
  sort = lambda t: jnp.take_along_axis(t, order[:, :, None, None, None], axis=1).reshape(
      b, n * seq_len, nh, hd)
  lengths = jnp.sum(component_mask, axis=1).astype(jnp.int32) * seq_len
  out = attend_prefix(sort(q), sort(k), sort(v), lengths, implementation)
  out = out.reshape(q.shape)
  return jnp.take_along_axis(out, inverse[:, :, None, None, None], axis=1)


# ----------------------------------------------------------------------------------------
# The global attention layer
# ----------------------------------------------------------------------------------------

class GlobalAttention(layers.MultiHeadAttention):
  """Global attention over components: MoC (paper) or dense (baseline).

  Reuses `MultiHeadAttention.project_qkv` / `project_out` (params query, key, value, out,
  query_norm, key_norm) and adds a `router` for MoC.

  Attributes (beyond MultiHeadAttention's):
    mode: 'moc' or 'dense'.
    top_k: k components at full resolution.
    routing: 'topk' (paper) or 'none' (ablation A: compressed tokens only, gates 1).
    compressed_tokens: use c_j of unselected components (ablation B turns off).
    gate_on: 'keys' | 'values' (ablation C).
    router_activation: 'sigmoid' | 'softmax' (ablation D).
    train_routing: 'gumbel' | 'deterministic' (ablation E).
    shared_routing: one routing for all heads (ablation F).
    router_head_dim: d_r.
    gather: 'onehot' | 'take' | 'hybrid' | 'fused' (MOC_GATHERS; see `moc_attention`).
    component_chunk: query components per chunk of the MoC attention (0: all at once).
    router_bias: a learned per-head bias on the router logits (`Router.use_bias`).
  """
  mode: str = "moc"
  top_k: int = 4
  routing: str = "topk"
  compressed_tokens: bool = True
  gate_on: str = "keys"
  router_activation: str = "sigmoid"
  train_routing: str = "gumbel"
  shared_routing: bool = False
  router_head_dim: int = 64
  gather: str = "hybrid"
  component_chunk: int = 0
  router_bias: bool = False

  @nn.compact
  def __call__(self, h: Array, c: Array, a: Array, component_mask: Optional[Array], *,
               train: bool) -> tuple[Array, dict]:
    """h: [B, N, L, D] vecset tokens (normed), c: [B, N, m, D] compressed, a: [B, N, D] anchor.

    Returns (update for h [B, N, L, D], aux) with aux {'importance': [B, H, N, N],
    'selected': [B, H, N, k]} for MoC ({} for dense).
    """
    b, n, seq_len, width = h.shape
    nh = self.num_heads
    if self.mode == "dense":
      q, k, v = self.project_qkv(h.reshape(b, n * seq_len, width), h.reshape(b, n * seq_len, width))
      split = lambda t: t.reshape(b, n, seq_len, nh, -1)
      out = dense_global_attention(split(q), split(k), split(v), component_mask,
                                   self.implementation)
      return self.project_out(out.reshape(b, n * seq_len, nh, -1), width).reshape(h.shape), {}
    if self.mode != "moc":
      raise ValueError(f"global_attention must be 'moc' or 'dense', got {self.mode!r}")

    use_c = self.compressed_tokens
    context = jnp.concatenate([h, c], axis=2) if use_c else h
    q, k, v = self.project_qkv(h.reshape(b, n * seq_len, width),
                               context.reshape(b, -1, width))
    q = q.reshape(b, n, seq_len, nh, -1)
    k = k.reshape(b, n, context.shape[2], nh, -1)
    v = v.reshape(b, n, context.shape[2], nh, -1)
    kh, vh = k[:, :, :seq_len], v[:, :, :seq_len]
    kc, vc = (k[:, :, seq_len:], v[:, :, seq_len:]) if use_c else (None, None)

    if self.train_routing not in ("gumbel", "deterministic"):
      raise ValueError(f"train_routing must be 'gumbel' or 'deterministic', got {self.train_routing!r}")
    if self.routing == "none":
      importance = None
      selected, unselected = route(jnp.ones((b, 1, n, n)), component_mask, 0)
    elif self.routing == "topk":
      n_router_heads = 1 if self.shared_routing else nh
      logits = Router(n_router_heads, self.router_head_dim, self.dtype,
                      use_bias=self.router_bias, name="router")(a)
      importance = router_importance(logits, component_mask, self.router_activation)
      rng = self.make_rng("routing") if train and self.train_routing == "gumbel" else None
      selected, unselected = route(importance, component_mask, self.top_k, rng)
    else:
      raise ValueError(f"routing must be 'topk' or 'none', got {self.routing!r}")
    # Ablation F: one routing (Hr = 1) broadcast to every head.
    heads = lambda t: jnp.broadcast_to(t, (b, nh) + t.shape[2:])
    selected, unselected = heads(selected), heads(unselected)
    if importance is not None:
      importance = heads(importance)
    out = moc_attention(q, kh, vh, kc, vc, importance, selected, unselected, component_mask,
                        gate_on=self.gate_on, implementation=self.implementation,
                        gather=self.gather, component_chunk=self.component_chunk)
    out = self.project_out(out.reshape(b, n * seq_len, nh, -1), width).reshape(h.shape)
    if importance is None:
      importance = jnp.zeros((b, nh, n, n), jnp.float32)
    aux = {"importance": importance, "selected": selected}
    return out, aux
