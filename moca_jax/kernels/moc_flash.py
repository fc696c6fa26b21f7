"""Fused Mixture-of-Components attention: Pallas (Triton) flash kernels over routed components.

Same semantics and shapes as `moca_jax.moc.moc_attention` (the reference), formula of paper
section 3.2.3 as restored in shared/paper/NOTES.md. For batch b, query component i, head h and
its routing (selected S = S^h_i, k components; unselected U, the other N - 1 - k):

  out_i = softmax([q K_own^T ; s_ij q K_j^T (j in S) ; s_ij q C_j^T (j in U)] / sqrt(d))
          @ [V_own ; V_j (j in S) ; Vc_j (j in U)]

with gate_on='keys' (paper: the keys are scaled by s_ij, i.e. the logits q.k are). With
gate_on='values' (ablation C) the logits are ungated and every probability of a key of
component j is multiplied by s_ij after the softmax normalisation (the value is scaled). Without
importance (ablation A) every gate is 1; without compressed tokens (ablation B, kc None) the
unselected components are absent. Padding: valid keys form the same prefix as in the reference
(`moc.routed_lengths`): with R real components in sample b, only the first min(R - 1, k)
selected and the first max(R - 1 - k, 0) unselected slots are attended (the routing puts real
components first); this holds for the queries of padding components as well, so their outputs
(and their contributions to the gradients of the keys/values they read) equal the reference's.

Forward (kernel `moc_flash_fwd`): the routed context [own L | k x L | (N - 1 - k) x m] of
`moc.routed_context` is never materialised. Every program (one query block of one (b, i, h))
walks its slots in order, reads the key/value blocks of each selected component IN PLACE from
kh/vh [B, N, L, H, d] by (component, head) index (the index is an int32 input, loaded as a
scalar and used as a dynamic ref index), then the m compressed tokens of each unselected
component from kc/vc, scales the fp32 logits by the gate, and accumulates with an online
(flash) softmax in fp32 (FlashAttention, Dao et al. 2022, algorithm 1; the exp2 form of the
Triton tutorial / jax.experimental.pallas.ops.gpu.attention). Padding slots are skipped by the
loop bounds (no work), not masked. bf16 inputs: bf16 matmul operands, fp32 accumulation; fp32
inputs: fp32 (IEEE) matmuls. When differentiated with bwd='pallas' the forward also writes the
per-query log-sum-exp in BASE 2 of the natural logits z (lse2 = log2 sum_keys 2^(z log2 e) =
lse_natural * log2 e), a residual [B, H, N, L] fp32, so p = 2^(z log2 e - lse2).

Backward, bwd='pallas' (default; FlashAttention-2 style, Dao 2023: recompute P from q, k and
lse2, never materialise the routed context nor P):
  * preprocess (jnp): delta = rowsum(dO * O) [B, H, N, L] fp32 (= sum_keys P dP, also with
    gate_on='values' where O = sum P s V).
  * `moc_flash_bwd_dq` (query-parallel, the forward's grid and slot walk): dZ = P (dP - delta)
    with dP = dO V^T ('keys') or s_ij dO V^T ('values'); dq += dZ (sm_scale s_ij | sm_scale) K.
    It also accumulates the gate gradient per slot in a register vector [S]:
    'keys' sum_{rows, slot keys} dZ sm_scale q.k, 'values' sum P (dO . v); written per
    (b, h, i, query block) [B, H, N, L / block_q, S] fp32, summed and put back into the
    [B, H, N, N] importance gradient with jnp (a take through the slot positions).
  * `moc_flash_bwd_dkv` / `moc_flash_bwd_dkv_compressed` (key-parallel: one program per key
    block of one (b, j, h); the compressed one takes all m tokens of kc/vc of j as one block):
    loop over the query components that read the block and all their L queries in blocks of
    block_q, recompute P, accumulate dv += g P^T dO (g = s_ij with gate_on='values', else 1)
    and dk += (coef dZ)^T q in fp32.
    Who reads a block comes from INVERSE ROUTING TABLES built on the host (jnp, from the slot
    position pos[b, h, i, j] = argsort of [i, selected, unselected]): for full-resolution keys
    of j, j itself (gate 1) then every i whose VALID selected prefix holds j; for compressed
    tokens of j, every i whose valid unselected prefix holds j (queries of padding components
    included, as in the reference). Static bounds: N and N - 1 entries per (b, h, j), padded to
    powers of two, with a count; cost O(B H N^2) int32/fp32 on the host side (argsorts over N),
    negligible next to the attention; the kernels loop only over the valid count.
  Work: the dq kernel and the dk/dv kernels each visit every (query block, key block) pair of
  the forward once; q K^T and dO V^T are recomputed in both, so 7 block matmuls against the
  forward's 2 (FlashAttention-2's single kernel with atomic dq adds needs 5; no atomics here,
  every output block has one writer). The gather path's backward instead materialises the
  routed keys/values and their gradients (N (L + kL + (N-1-k)m) tokens per head). The dk/dv
  programs are not balanced: a component selected by many query components loops over all of
  their queries. No speed is claimed.
  Requires, as `moc.route` guarantees, that each row [i, selected, unselected] is a
  permutation of the N components (the inverse tables assume each j is read at most once per
  query component).
Backward, bwd='recompute' (the previous strategy, kept for comparison): re-runs the reference
path (`moc.moc_attention` with the gather, `gather='hybrid'`, the caller's attention
implementation and component chunk) under `jax.vjp`; materialises the routed context.
What is not fused: the routing itself (`moc.route`: the sort), gathering the gates
s[b, h, i, idx] into a small [B, H, N, S] table, the inverse routing tables, delta, and the
reduction of the gate gradients into [B, H, N, N].

Status: values and gradients tested on CPU in Pallas interpret mode (tests/test_moc_flash.py,
with the cross-platform Triton IR lowering of all four kernels). On one NVIDIA H200
(2026-12-01, paper size, bf16, L = 1024, N = 4..64; experiments/results/peer_comparison.md)
it compiles and runs, its output is within a relative 2.4e-3 to 3.0e-3 of the gather path,
and it is SLOWER than the gather path with cuDNN attention: core forward 1.05x (N = 4) to
1.58x (N = 64), forward + backward 1.36x to 1.65x. Pallas' Triton lowering uses no wgmma or
TMA on Hopper; block sizes, num_warps and num_stages are untuned (the backward uses the
forward's block_q / block_k and launch parameters). Hence opt-in; a Mosaic GPU version is
what could beat the gather path.
GPU constraints (checked when compiled): the head size d, the query/key blocks and the number m
of compressed tokens must be powers of two >= 16 (Triton's dot), block sizes must divide L.
The slot and reader tables are padded to powers of two (Triton block shapes). No
data-dependent shapes: loop trip counts are data-dependent (fori_loop with traced bounds),
indices are scalars loaded from int32 refs.
Not SPMD-aware: inside a sharded jit the Pallas calls are not partitioned by XLA (wrap them in
shard_map for multi-device use).

Shapes: B batch, N components, L vecset tokens, m compressed tokens, H heads, d head size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array

_LOG2E = math.log2(math.e)
_SQUEEZED = getattr(pl, "squeezed", None)  # a squeezed block dimension (None in older JAX)
BWD_METHODS = ("pallas", "recompute")


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) parameters of one fused call."""

  gate_on: str
  block_q: int
  block_k: int
  interpret: bool
  num_warps: Optional[int]
  num_stages: int
  bwd: str
  bwd_implementation: Optional[str]
  bwd_component_chunk: int


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _pick_block(length: int, requested: Optional[int], default: int, name: str) -> int:
  """A block size dividing `length`: the requested one, or the largest power of two <= default."""
  if requested is not None:
    if requested <= 0 or length % requested:
      raise ValueError(f"{name}={requested} must be positive and divide L={length}")
    return requested
  block = 1
  while block * 2 <= min(default, length) and length % (block * 2) == 0:
    block *= 2
  return block


# ----------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------


def _dot(a, b, precision):
  """a [M, K] @ b [K, T] with fp32 accumulation."""
  return lax.dot_general(
      a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
  )


def _dot_t(a, b, precision):
  """a [M, K] @ b [T, K]^T with fp32 accumulation."""
  return lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
  )


def _kernel(
    counts_ref,  # [2] int32: number of full-resolution slots (own + selected), of compressed
    idx_ref,  # [S] int32: slot -> component (slot 0 is the query component itself)
    gate_ref,  # [S] fp32: slot -> gate (1 for slot 0)
    q_ref,  # [block_q, d]
    kh_ref,  # [N, L, d] vecset keys of every component (this batch row and head)
    vh_ref,  # [N, L, d]
    *refs,  # kc_ref, vc_ref [N, m, d] with compressed tokens; o_ref [block_q, d]; lse_ref
    seq_len: int,
    block_k: int,
    num_full_slots: int,
    use_compressed: bool,
    gated: bool,
    gate_on: str,
    sm_scale: float,
    precision,
    with_lse: bool,
):
  refs = list(refs)
  kc_ref, vc_ref = (refs.pop(0), refs.pop(0)) if use_compressed else (None, None)
  o_ref = refs.pop(0)
  lse_ref = refs.pop(0) if with_lse else None
  q = q_ref[...]
  block_q, head_dim = q.shape
  f32 = jnp.float32
  logit_scale = sm_scale * _LOG2E  # softmax in base 2: e^x = 2^(x log2 e)

  def step(carry, k, v, gate):
    """One online-softmax update with a [T, d] block of keys/values under one gate."""
    acc, m_prev, l_prev = carry
    s = _dot_t(q, k, precision)  # [block_q, T]
    scale = logit_scale * gate if gated and gate_on == "keys" else logit_scale
    s = s * scale
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    if gated and gate_on == "values":
      p = p * gate  # the normaliser l stays ungated: softmax(logits) @ (s V)
    pv = _dot(p.astype(v.dtype), v, precision)
    return acc * correction[:, None] + pv, m_next, l_next

  carry = (
      jnp.zeros((block_q, head_dim), f32),
      jnp.full((block_q,), jnp.finfo(f32).min, f32),
      jnp.zeros((block_q,), f32),
  )
  n_full, n_compressed = counts_ref[0], counts_ref[1]
  blocks_per_component = seq_len // block_k

  def full_body(t, carry):
    slot = lax.div(t, jnp.int32(blocks_per_component))
    start = lax.rem(t, jnp.int32(blocks_per_component)) * block_k
    j = idx_ref[slot]
    keys = pl.ds(pl.multiple_of(start, block_k), block_k)
    gate = gate_ref[slot] if gated else None
    return step(carry, kh_ref[j, keys, :], vh_ref[j, keys, :], gate)

  carry = lax.fori_loop(0, n_full * blocks_per_component, full_body, carry)
  if use_compressed:

    def compressed_body(u, carry):
      slot = num_full_slots + u
      j = idx_ref[slot]
      gate = gate_ref[slot] if gated else None
      return step(carry, kc_ref[j, :, :], vc_ref[j, :, :], gate)

    carry = lax.fori_loop(0, n_compressed, compressed_body, carry)
  acc, m_i, l_i = carry
  o_ref[...] = (acc / l_i[:, None]).astype(o_ref.dtype)
  if with_lse:  # l_i >= 1: the own block is always attended
    lse_ref[...] = m_i + jnp.log2(l_i)


# ----------------------------------------------------------------------------------------
# Backward kernels (FlashAttention-2 style: recompute P from q, k and the saved LSE)
# ----------------------------------------------------------------------------------------


def _grad_block(q, k, v, do, lse, delta, gate, *, gated, gate_on, sm_scale, precision):
  """Recomputed probabilities and logit gradients of one [bq, T] block under one gate.

  Natural-unit logits z = sm_scale * g * q.k (gate_on='keys') or sm_scale * q.k ('values'),
  P = 2^(z log2 e - lse2) = softmax(z) over the whole routed row. With O = sum P g_v V
  (g_v = g for 'values', else 1): dV = g_v P^T dO, dP = g_v dO V^T, dZ = P (dP - delta) with
  delta = rowsum(dO * O) (= sum_keys P dP), dq/dk = dZ dz/d(q|k).
  Returns (qk [bq, T] raw fp32 dots, p, pv = g_v p, dp_raw = dO V^T, ds = dZ, coef) with
  coef the factor of dZ in dq = (coef dZ) k and dk = (coef dZ)^T q.
  """
  qk = _dot_t(q, k, precision)
  keys_gated = gated and gate_on == "keys"
  values_gated = gated and gate_on == "values"
  logit_scale = sm_scale * _LOG2E
  z = qk * (logit_scale * gate if keys_gated else logit_scale)
  p = jnp.exp2(z - lse[:, None])
  dp_raw = _dot_t(do, v, precision)
  dp = dp_raw * gate if values_gated else dp_raw
  pv = p * gate if values_gated else p
  ds = p * (dp - delta[:, None])
  coef = sm_scale * gate if keys_gated else sm_scale
  return qk, p, pv, dp_raw, ds, coef


def _dq_kernel(
    counts_ref,  # [2] int32 (as the forward)
    idx_ref,  # [S] int32
    gate_ref,  # [S] fp32
    q_ref,  # [block_q, d]
    kh_ref,  # [N, L, d]
    vh_ref,  # [N, L, d]
    *refs,  # kc_ref, vc_ref; do_ref [block_q, d]; lse_ref, delta_ref [block_q]; dq_ref; dg_ref [S]
    seq_len: int,
    block_k: int,
    num_full_slots: int,
    use_compressed: bool,
    gated: bool,
    gate_on: str,
    sm_scale: float,
    precision,
):
  refs = list(refs)
  kc_ref, vc_ref = (refs.pop(0), refs.pop(0)) if use_compressed else (None, None)
  do_ref, lse_ref, delta_ref, dq_ref = refs[:4]
  dg_ref = refs[4] if gated else None
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  block_q, head_dim = q.shape
  f32 = jnp.float32
  num_slots = gate_ref.shape[0]
  slot_ids = lax.broadcasted_iota(jnp.int32, (num_slots,), 0)

  def step(carry, slot, k, v, gate):
    dq, dg = carry
    qk, p, _, dp_raw, ds, coef = _grad_block(
        q,
        k,
        v,
        do,
        lse,
        delta,
        gate,
        gated=gated,
        gate_on=gate_on,
        sm_scale=sm_scale,
        precision=precision,
    )
    dq = dq + _dot((ds * coef).astype(k.dtype), k, precision)
    if gated:
      # d gate: 'keys' z = sm_scale g q.k -> sum dZ sm_scale q.k; 'values' -> sum P (dO . v)
      term = ds * qk if gate_on == "keys" else p * dp_raw
      dgate = jnp.sum(jnp.sum(term, axis=1), axis=0)
      if gate_on == "keys":
        dgate = dgate * sm_scale
      dg = dg + jnp.where(slot_ids == slot, dgate, 0.0)  # a register vector, no dynamic store
    return dq, dg

  carry = (jnp.zeros((block_q, head_dim), f32), jnp.zeros((num_slots,), f32))
  n_full, n_compressed = counts_ref[0], counts_ref[1]
  blocks_per_component = seq_len // block_k

  def full_body(t, carry):
    slot = lax.div(t, jnp.int32(blocks_per_component))
    start = lax.rem(t, jnp.int32(blocks_per_component)) * block_k
    j = idx_ref[slot]
    keys = pl.ds(pl.multiple_of(start, block_k), block_k)
    gate = gate_ref[slot] if gated else None
    return step(carry, slot, kh_ref[j, keys, :], vh_ref[j, keys, :], gate)

  carry = lax.fori_loop(0, n_full * blocks_per_component, full_body, carry)
  if use_compressed:

    def compressed_body(u, carry):
      slot = num_full_slots + u
      j = idx_ref[slot]
      gate = gate_ref[slot] if gated else None
      return step(carry, slot, kc_ref[j, :, :], vc_ref[j, :, :], gate)

    carry = lax.fori_loop(0, n_compressed, compressed_body, carry)
  dq, dg = carry
  dq_ref[...] = dq.astype(dq_ref.dtype)
  if gated:
    dg_ref[...] = dg


def _dkv_kernel(
    counts_ref,  # [2] int32: readers of this component's full-resolution / compressed keys
    reader_ref,  # [R] int32: reader -> query component i
    rgate_ref,  # [R] fp32: reader -> gate s[b, h, i, j] (1 for the own component)
    q_ref,  # [N, L, d] queries of every component (this batch row and head)
    do_ref,  # [N, L, d]
    lse_ref,  # [N, L] fp32
    delta_ref,  # [N, L] fp32
    k_ref,  # [T, d] this program's key block (T = block_k of kh, or the m tokens of kc)
    v_ref,  # [T, d]
    dk_ref,  # [T, d]
    dv_ref,  # [T, d]
    *,
    which: int,
    seq_len: int,
    block_q: int,
    gated: bool,
    gate_on: str,
    sm_scale: float,
    precision,
):
  k, v = k_ref[...], v_ref[...]
  f32 = jnp.float32
  blocks_per_component = seq_len // block_q

  def body(t, carry):
    dk, dv = carry
    r = lax.div(t, jnp.int32(blocks_per_component))
    start = lax.rem(t, jnp.int32(blocks_per_component)) * block_q
    i = reader_ref[r]
    rows = pl.ds(pl.multiple_of(start, block_q), block_q)
    q, do = q_ref[i, rows, :], do_ref[i, rows, :]
    gate = rgate_ref[r] if gated else None
    _, _, pv, _, ds, coef = _grad_block(
        q,
        k,
        v,
        do,
        lse_ref[i, rows],
        delta_ref[i, rows],
        gate,
        gated=gated,
        gate_on=gate_on,
        sm_scale=sm_scale,
        precision=precision,
    )
    dv = dv + _dot(pv.astype(do.dtype).T, do, precision)
    dk = dk + _dot((ds * coef).astype(q.dtype).T, q, precision)
    return dk, dv

  zeros = jnp.zeros(k.shape, f32)
  dk, dv = lax.fori_loop(0, counts_ref[which] * blocks_per_component, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------
# Host-side tables (jnp, small)
# ----------------------------------------------------------------------------------------


def _pad_last_pow2(*tables):
  """Pads the last axis of every table to a power of two (Triton block shapes); zeros."""
  size = tables[0].shape[-1]
  padded = pl.next_power_of_2(max(size, 1))
  if padded == size:
    return tables
  pad = [(0, 0)] * (tables[0].ndim - 1) + [(0, padded - size)]
  return tuple(jnp.pad(t, pad) for t in tables)


def _slot_tables(q, kc, importance, selected, unselected, component_mask, dtype):
  """Per (b, h, i) slot tables and per-sample slot counts for the query-parallel kernels.

  Returns idx [B, H, N, S] int32 (slot 0: the component itself, then the selected, then, with
  compressed tokens, the unselected components), gates [B, H, N, S] fp32 (1 for slot 0; the
  importances rounded to the input dtype like the reference's gated gather), counts [B, 2]
  int32 (valid full-resolution slots, valid compressed slots) and whether compressed slots
  exist. S is padded to a power of two (padding slots are never read).
  """
  b, n, _, nh, _ = q.shape
  k = selected.shape[-1]
  use_compressed = kc is not None and unselected.shape[-1] > 0
  own = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, None, :, None], (b, nh, n, 1))
  parts = [own, selected.astype(jnp.int32)]
  if use_compressed:
    parts.append(unselected.astype(jnp.int32))
  idx = jnp.concatenate(parts, axis=-1)
  if importance is None:
    gates = jnp.ones(idx.shape, jnp.float32)
  else:
    other = jnp.take_along_axis(importance, idx[..., 1:], axis=-1)
    other = other.astype(dtype).astype(jnp.float32)
    gates = jnp.concatenate([jnp.ones(own.shape, jnp.float32), other], axis=-1)
  idx, gates = _pad_last_pow2(idx, gates)
  # Valid slots form a prefix (moc.routed_lengths): R real components -> R - 1 others.
  if component_mask is None:
    others = jnp.full((b,), n - 1, jnp.int32)
  else:
    others = jnp.maximum(jnp.sum(component_mask, axis=1).astype(jnp.int32) - 1, 0)
  n_full = 1 + jnp.minimum(others, k)
  n_compressed = jnp.maximum(others - k, 0) if use_compressed else jnp.zeros_like(others)
  counts = jnp.stack([n_full, n_compressed], axis=-1).astype(jnp.int32)
  return idx, gates, counts, use_compressed


def _slot_positions(selected, unselected):
  """pos [B, H, N, N] int32: the slot of component j in the slot list of query component i.

  Slot 0 is i itself, 1..k the selected, k+1..N-1 the unselected components. Assumes, as
  `moc.route` guarantees, that [i, selected, unselected] is a permutation of 0..N-1.
  """
  b, nh, n, _ = selected.shape
  own = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, None, :, None], (b, nh, n, 1))
  perm = jnp.concatenate([own, selected.astype(jnp.int32), unselected.astype(jnp.int32)], -1)
  return jnp.argsort(perm, axis=-1).astype(jnp.int32)


def _reader_tables(pos, importance, counts, k, use_compressed, dtype):
  """Inverse routing tables for the key-parallel dk/dv kernels.

  For key component j of (b, h): the query components that read its full-resolution keys are
  j itself (first entry, gate 1) and every i whose valid selected prefix holds j
  (1 <= pos[i, j] < n_full[b]); those that read its compressed tokens are every i whose valid
  unselected prefix holds j (k + 1 <= pos[i, j] < k + 1 + n_compressed[b]). Queries of padding
  components count as readers exactly like in the forward/reference. Static bounds: N entries
  (own + N - 1 others) and N - 1, padded to powers of two; the number of valid entries is in
  rcounts.
  Returns rcounts [B, H, N, 2] int32 (full readers incl. own, compressed readers),
  full (readers [B, H, N, Rf] int32, gates [B, H, N, Rf] fp32) and compressed (readers, gates)
  [B, H, N, Rc] or None.
  """
  b, nh, n, _ = pos.shape
  f32 = jnp.float32
  n_full = counts[:, 0][:, None, None, None]
  n_compressed = counts[:, 1][:, None, None, None]
  if importance is None:
    gates_t = jnp.ones((b, nh, n, n), f32)
  else:  # [b, h, j, i] = s[b, h, i, j], rounded like the forward's gates
    gates_t = jnp.swapaxes(importance, -1, -2).astype(dtype).astype(f32)

  def compact(reads):  # reads [B, H, i, j] -> readers of j, ascending i, first
    reads_t = jnp.swapaxes(reads, -1, -2)
    order = jnp.argsort((~reads_t).astype(jnp.int32), axis=-1, stable=True)[..., : n - 1]
    order = order.astype(jnp.int32)
    return order, jnp.take_along_axis(gates_t, order, axis=-1), jnp.sum(reads_t, -1)

  readers, rgates, count = compact((pos >= 1) & (pos < n_full))
  own = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, None, :, None], (b, nh, n, 1))
  full = _pad_last_pow2(
      jnp.concatenate([own, readers], -1), jnp.concatenate([jnp.ones(own.shape, f32), rgates], -1)
  )
  full_count = 1 + count
  compressed, compressed_count = None, jnp.zeros_like(count)
  if use_compressed:
    readers, rgates, compressed_count = compact((pos >= k + 1) & (pos < k + 1 + n_compressed))
    compressed = _pad_last_pow2(readers, rgates)
  rcounts = jnp.stack([full_count, compressed_count], -1).astype(jnp.int32)
  return rcounts, full, compressed


# ----------------------------------------------------------------------------------------
# pallas_call wrappers
# ----------------------------------------------------------------------------------------


def _compiler_params(cfg: _Config, hd: int):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # GPU only

  params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  num_warps = cfg.num_warps or (4 if hd <= 64 else 8)
  return params_cls(num_warps=num_warps, num_stages=cfg.num_stages)


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _query_parallel_specs(tables, q, kh, kc, use_compressed, block_q):
  """in_specs/args shared by the forward and the dq kernel (grid: query block, i, h, b)."""
  idx, gates, counts = tables
  b, n, seq_len, nh, hd = q.shape
  slots = idx.shape[-1]
  sq = _SQUEEZED
  in_specs = [
      pl.BlockSpec((sq, 2), lambda qi, i, h, bb: (bb, 0)),
      pl.BlockSpec((sq, sq, sq, slots), lambda qi, i, h, bb: (bb, h, i, 0)),
      pl.BlockSpec((sq, sq, sq, slots), lambda qi, i, h, bb: (bb, h, i, 0)),
      pl.BlockSpec((sq, sq, block_q, sq, hd), lambda qi, i, h, bb: (bb, i, qi, h, 0)),
      pl.BlockSpec((sq, n, seq_len, sq, hd), lambda qi, i, h, bb: (bb, 0, 0, h, 0)),
      pl.BlockSpec((sq, n, seq_len, sq, hd), lambda qi, i, h, bb: (bb, 0, 0, h, 0)),
  ]
  if use_compressed:
    m = kc.shape[2]
    in_specs += [pl.BlockSpec((sq, n, m, sq, hd), lambda qi, i, h, bb: (bb, 0, 0, h, 0))] * 2
  return in_specs


def _forward(
    cfg: _Config,
    q,
    kh,
    vh,
    kc,
    vc,
    importance,
    selected,
    unselected,
    component_mask,
    with_lse: bool = False,
):
  """The fused forward: out [B, N, L, H, d] (and lse2 [B, H, N, L] fp32 with `with_lse`)."""
  b, n, seq_len, nh, hd = q.shape
  idx, gates, counts, use_compressed = _slot_tables(
      q, kc, importance, selected, unselected, component_mask, kh.dtype
  )
  block_q, block_k = cfg.block_q, cfg.block_k
  sq = _SQUEEZED
  # grid (query block, component i, head h, batch b); query blocks fastest, so programs
  # running together share the key/value blocks of one (b, h).
  grid = (seq_len // block_q, n, nh, b)
  in_specs = _query_parallel_specs((idx, gates, counts), q, kh, kc, use_compressed, block_q)
  args = [counts, idx, gates, q, kh, vh] + ([kc, vc] if use_compressed else [])
  out_specs = [pl.BlockSpec((sq, sq, block_q, sq, hd), lambda qi, i, h, bb: (bb, i, qi, h, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if with_lse:
    out_specs.append(pl.BlockSpec((sq, sq, sq, block_q), lambda qi, i, h, bb: (bb, h, i, qi)))
    out_shape.append(jax.ShapeDtypeStruct((b, nh, n, seq_len), jnp.float32))
  kernel = _bind(
      _kernel,
      seq_len=seq_len,
      block_k=block_k,
      num_full_slots=1 + selected.shape[-1],
      use_compressed=use_compressed,
      gated=importance is not None,
      gate_on=cfg.gate_on,
      sm_scale=1.0 / math.sqrt(hd),
      precision=_precision(q.dtype),
      with_lse=with_lse,
  )
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(cfg, hd),
      interpret=cfg.interpret,
      name="moc_flash_fwd",
  )(*args)
  return tuple(outs) if with_lse else outs[0]


def _backward(cfg: _Config, res, g):
  """Pallas backward: dq (+ gate gradients) query-parallel, dk/dv key-parallel."""
  q, kh, vh, kc, vc, importance, selected, unselected, component_mask, out, lse = res
  b, n, seq_len, nh, hd = q.shape
  k = selected.shape[-1]
  f32 = jnp.float32
  gated = importance is not None
  sm_scale = 1.0 / math.sqrt(hd)
  precision = _precision(q.dtype)
  block_q, block_k = cfg.block_q, cfg.block_k
  compiler_params = _compiler_params(cfg, hd)
  sq = _SQUEEZED
  idx, gates, counts, use_compressed = _slot_tables(
      q, kc, importance, selected, unselected, component_mask, kh.dtype
  )
  do = g.astype(q.dtype)
  # preprocess: delta = rowsum(dO * O) per query, [B, H, N, L] fp32 (elementwise, no TF32)
  delta = jnp.sum(do.astype(f32) * out.astype(f32), axis=-1).transpose(0, 3, 1, 2)

  # dq and the per-slot gate gradients: query-parallel, the forward's slot walk.
  n_qblocks = seq_len // block_q
  slots = idx.shape[-1]
  in_specs = _query_parallel_specs((idx, gates, counts), q, kh, kc, use_compressed, block_q)
  in_specs += [
      pl.BlockSpec((sq, sq, block_q, sq, hd), lambda qi, i, h, bb: (bb, i, qi, h, 0)),
      pl.BlockSpec((sq, sq, sq, block_q), lambda qi, i, h, bb: (bb, h, i, qi)),
      pl.BlockSpec((sq, sq, sq, block_q), lambda qi, i, h, bb: (bb, h, i, qi)),
  ]
  args = [counts, idx, gates, q, kh, vh] + ([kc, vc] if use_compressed else []) + [do, lse, delta]
  out_specs = [pl.BlockSpec((sq, sq, block_q, sq, hd), lambda qi, i, h, bb: (bb, i, qi, h, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if gated:
    out_specs.append(pl.BlockSpec((sq, sq, sq, sq, slots), lambda qi, i, h, bb: (bb, h, i, qi, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, nh, n, n_qblocks, slots), f32))
  common = dict(gated=gated, gate_on=cfg.gate_on, sm_scale=sm_scale, precision=precision)
  dq_out = pl.pallas_call(
      _bind(
          _dq_kernel,
          seq_len=seq_len,
          block_k=block_k,
          num_full_slots=1 + k,
          use_compressed=use_compressed,
          **common,
      ),
      grid=(n_qblocks, n, nh, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params,
      interpret=cfg.interpret,
      name="moc_flash_bwd_dq",
  )(*args)
  dq = dq_out[0]

  # dk/dv: key-parallel over the inverse routing tables.
  pos = _slot_positions(selected, unselected)
  rcounts, full, compressed = _reader_tables(pos, importance, counts, k, use_compressed, kh.dtype)

  def dkv(which, tables, keys, values, key_block):
    readers, rgates = tables
    r = readers.shape[-1]
    tokens = keys.shape[2]
    in_specs = [
        pl.BlockSpec((sq, sq, sq, 2), lambda kb, j, h, bb: (bb, h, j, 0)),
        pl.BlockSpec((sq, sq, sq, r), lambda kb, j, h, bb: (bb, h, j, 0)),
        pl.BlockSpec((sq, sq, sq, r), lambda kb, j, h, bb: (bb, h, j, 0)),
        pl.BlockSpec((sq, n, seq_len, sq, hd), lambda kb, j, h, bb: (bb, 0, 0, h, 0)),
        pl.BlockSpec((sq, n, seq_len, sq, hd), lambda kb, j, h, bb: (bb, 0, 0, h, 0)),
        pl.BlockSpec((sq, sq, n, seq_len), lambda kb, j, h, bb: (bb, h, 0, 0)),
        pl.BlockSpec((sq, sq, n, seq_len), lambda kb, j, h, bb: (bb, h, 0, 0)),
    ]
    key_spec = pl.BlockSpec((sq, sq, key_block, sq, hd), lambda kb, j, h, bb: (bb, j, kb, h, 0))
    in_specs += [key_spec, key_spec]
    return pl.pallas_call(
        _bind(_dkv_kernel, which=which, seq_len=seq_len, block_q=block_q, **common),
        grid=(tokens // key_block, n, nh, b),
        in_specs=in_specs,
        out_specs=[key_spec, key_spec],
        out_shape=[jax.ShapeDtypeStruct(keys.shape, keys.dtype)] * 2,
        compiler_params=compiler_params,
        interpret=cfg.interpret,
        name="moc_flash_bwd_dkv" if which == 0 else "moc_flash_bwd_dkv_compressed",
    )(rcounts, readers, rgates, q, do, lse, delta, keys, values)

  dkh, dvh = dkv(0, full, kh, vh, block_k)
  dkc = dvc = None
  if kc is not None:
    if use_compressed:
      dkc, dvc = dkv(1, compressed, kc, vc, kc.shape[2])
    else:  # k = N - 1: the compressed tokens are never attended
      dkc, dvc = jnp.zeros_like(kc), jnp.zeros_like(vc)

  dimportance = None
  if gated:
    # gate gradient per (b, h, i, slot) -> importance[b, h, i, idx[b, h, i, slot]]; slot 0
    # (own, gate 1) and padding slots carry none; the unselected ones none without kc.
    dg = jnp.sum(dq_out[1], axis=3)[..., : (n if use_compressed else 1 + k)]
    dg = dg.at[..., 0].set(0.0)
    if dg.shape[-1] < n:
      dg = jnp.pad(dg, [(0, 0)] * 3 + [(0, n - dg.shape[-1])])
    dimportance = jnp.take_along_axis(dg, pos, axis=-1).astype(importance.dtype)
  return dq, dkh, dvh, dkc, dvc, dimportance


def _bind(fn, **kwargs):
  """functools.partial with a readable name (Pallas names kernels after their function)."""
  bound = functools.partial(fn, **kwargs)
  bound.__name__ = fn.__name__  # type: ignore[attr-defined]
  return bound


# ----------------------------------------------------------------------------------------
# custom_vjp: Pallas backward, or recompute through the reference
# ----------------------------------------------------------------------------------------


def _fused(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask):
  return _forward(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask)


_fused = jax.custom_vjp(_fused, nondiff_argnums=(0,))


def _fused_fwd(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask):
  inputs = (q, kh, vh, kc, vc, importance, selected, unselected, component_mask)
  if cfg.bwd == "pallas":
    out, lse = _forward(cfg, *inputs, with_lse=True)
    return out, inputs + (out, lse)
  return _forward(cfg, *inputs), inputs


def _fused_bwd(cfg, res, g):
  if cfg.bwd == "pallas":
    return _backward(cfg, res, g) + (None, None, None)
  from moca_jax import moc  # the reference (moc imports this module lazily)

  q, kh, vh, kc, vc, importance, selected, unselected, component_mask = res

  def reference(q, kh, vh, kc, vc, importance):
    return moc.moc_attention(
        q,
        kh,
        vh,
        kc,
        vc,
        importance,
        selected,
        unselected,
        component_mask,
        gate_on=cfg.gate_on,
        implementation=cfg.bwd_implementation,
        gather="hybrid",
        component_chunk=cfg.bwd_component_chunk,
    )

  _, vjp = jax.vjp(reference, q, kh, vh, kc, vc, importance)
  return tuple(vjp(g)) + (None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------


def moc_attention_fused(
    q: Array,
    kh: Array,
    vh: Array,
    kc: Optional[Array],
    vc: Optional[Array],
    importance: Optional[Array],
    selected: Array,
    unselected: Array,
    component_mask: Optional[Array],
    *,
    gate_on: str = "keys",
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    interpret: Optional[bool] = None,
    num_warps: Optional[int] = None,
    num_stages: int = 2,
    bwd: str = "pallas",
    bwd_implementation: Optional[str] = "xla",
    bwd_component_chunk: int = 0,
) -> Array:
  """MoC attention in fused Pallas kernels (forward and backward); see the module docstring.

  Args:
    q: [B, N, L, H, d] queries of the vecset tokens.
    kh, vh: [B, N, L, H, d] keys/values of the vecset tokens.
    kc, vc: [B, N, m, H, d] keys/values of the compressed tokens, or None (ablation B).
    importance: s [B, H, N, N] gates, or None (all gates 1; ablation A).
    selected: [B, H, N, k] int components at full resolution (from `moc.route`).
    unselected: [B, H, N, N - 1 - k] int, the others (through their compressed tokens).
    component_mask: [B, N] bool or None (all real).
    gate_on: 'keys' (paper: scales the logits) or 'values' (ablation C).
    block_q, block_k: query / key block sizes (dividing L; default: the largest power of two
      up to 128 / 64). A compressed block is all m tokens of one component.
    interpret: Pallas interpret mode; None: on unless the default backend is a GPU (so the
      CPU runs it interpreted, a GPU compiles it through Triton).
    num_warps, num_stages: Triton launch parameters (GPU; defaults untuned, UNVERIFIED).
    bwd: 'pallas' (the fused FlashAttention-2 style backward kernels) or 'recompute' (the
      backward re-runs the reference gather path under jax.vjp).
    bwd_implementation, bwd_component_chunk: with bwd='recompute', `implementation` /
      `component_chunk` of the reference `moc.moc_attention` recomputed in the backward pass.
  Returns:
    [B, N, L, H, d] in the dtype of q.
  """
  if gate_on not in ("keys", "values"):
    raise ValueError(f"gate_on must be 'keys' or 'values', got {gate_on!r}")
  if bwd not in BWD_METHODS:
    raise ValueError(f"bwd must be one of {BWD_METHODS}, got {bwd!r}")
  b, n, seq_len, nh, hd = q.shape
  if kh.shape != q.shape or vh.shape != q.shape:
    raise ValueError(f"kh {kh.shape} and vh {vh.shape} must have the shape of q {q.shape}")
  if (kc is None) != (vc is None):
    raise ValueError("kc and vc must both be given or both be None")
  if kc is not None and (kc.shape != vc.shape or kc.shape[:2] + kc.shape[3:] != (b, n, nh, hd)):
    raise ValueError(f"kc {kc.shape} / vc {vc.shape} must be [B, N, m, H, d] like q {q.shape}")
  k = selected.shape[-1]
  if selected.shape != (b, nh, n, k) or unselected.shape != (b, nh, n, max(n - 1 - k, 0)):
    raise ValueError(
        f"selected {selected.shape} / unselected {unselected.shape} must be [B, H, N, k] / "
        f"[B, H, N, N - 1 - k] for q {q.shape}"
    )
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  block_q = _pick_block(seq_len, block_q, 128, "block_q")
  block_k = _pick_block(seq_len, block_k, 64, "block_k")
  if not interpret:
    sizes = {"d": hd, "block_q": block_q, "block_k": block_k}
    if kc is not None and unselected.shape[-1]:
      sizes["m"] = kc.shape[2]
    bad = {name: v for name, v in sizes.items() if not (_is_pow2(v) and v >= 16)}
    if bad:
      raise ValueError(f"the compiled (Triton) kernel needs powers of two >= 16, got {bad}")
  cfg = _Config(
      gate_on=gate_on,
      block_q=block_q,
      block_k=block_k,
      interpret=bool(interpret),
      num_warps=num_warps,
      num_stages=num_stages,
      bwd=bwd,
      bwd_implementation=bwd_implementation,
      bwd_component_chunk=bwd_component_chunk,
  )
  return _fused(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask)
