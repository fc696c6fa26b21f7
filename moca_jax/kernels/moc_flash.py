"""Fused Mixture-of-Components attention: a Pallas (Triton) flash kernel over routed components.

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
equal the reference's too.

What is fused: the kernel never materialises the routed context
[own L | k x L | (N - 1 - k) x m] of `moc.routed_context`. Every program (one query block of
one (b, i, h)) walks its slots in order, reads the key/value blocks of each selected component
IN PLACE from kh/vh [B, N, L, H, d] by (component, head) index (the index is an int32 input,
loaded as a scalar and used as a dynamic ref index), then the m compressed tokens of each
unselected component from kc/vc, scales the fp32 logits by the gate, and accumulates with an
online (flash) softmax in fp32 (FlashAttention, Dao et al. 2022, algorithm 1; the exp2 form of
the Triton tutorial / jax.experimental.pallas.ops.gpu.attention). Padding slots are skipped by
the loop bounds (no work), not masked. bf16 inputs: bf16 matmul operands, fp32 accumulation;
fp32 inputs: fp32 (IEEE) matmuls.
What is not fused: the routing itself (`moc.route`: the sort), gathering the gates
s[b, h, i, idx] into a small [B, H, N, S] table, and the backward pass (below).

Backward (`jax.custom_vjp`): the RECOMPUTE strategy. The backward pass re-runs the reference
path (`moc.moc_attention` with the gather, `gather='hybrid'`, the caller's attention
implementation and component chunk) under `jax.vjp`, so gradients w.r.t. q, kh, vh, kc, vc and
importance equal the reference's exactly (up to floating point), and the backward materialises
the routed context like the gather path does. No Pallas backward kernel is written yet (a
query-parallel dq kernel and dk/dv accumulated in the routed layout and scattered back like
`moc._gather_hybrid_bwd` would be the next step). So only the forward pass is fused: a training
step runs the fused forward, then the whole gather path forward and backward, i.e. one more
attention forward than the gather path alone. Until a Pallas backward exists the kernel can
only pay off in forward-only use (sampling, evaluation).

Status: values and gradients tested on CPU in Pallas interpret mode only; on the CPU the
Pallas -> Triton IR lowering for a GPU also builds (tests/test_moc_flash.py, cross-platform
lowering). Triton's compilation to PTX, running on a GPU, and any performance are UNVERIFIED
(no GPU in the session that wrote it): no speed is claimed; block sizes, num_warps and
num_stages are untuned guesses.
GPU constraints (checked when compiled): the head size d, the query/key blocks and the number m
of compressed tokens must be powers of two >= 16 (Triton's dot), block sizes must divide L.
Not SPMD-aware: inside a sharded jit the Pallas call is not partitioned by XLA (wrap it in
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


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) parameters of one fused call."""

  gate_on: str
  block_q: int
  block_k: int
  interpret: bool
  num_warps: Optional[int]
  num_stages: int
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
# The kernel
# ----------------------------------------------------------------------------------------


def _kernel(
    counts_ref,  # [2] int32: number of full-resolution slots (own + selected), of compressed
    idx_ref,  # [S] int32: slot -> component (slot 0 is the query component itself)
    gate_ref,  # [S] fp32: slot -> gate (1 for slot 0)
    q_ref,  # [block_q, d]
    kh_ref,  # [N, L, d] vecset keys of every component (this batch row and head)
    vh_ref,  # [N, L, d]
    *refs,  # kc_ref, vc_ref [N, m, d] when compressed tokens are used; then o_ref [block_q, d]
    seq_len: int,
    block_k: int,
    num_full_slots: int,
    use_compressed: bool,
    gated: bool,
    gate_on: str,
    sm_scale: float,
    precision,
):
  if use_compressed:
    kc_ref, vc_ref, o_ref = refs
  else:
    (o_ref,) = refs
  q = q_ref[...]
  block_q, head_dim = q.shape
  f32 = jnp.float32
  logit_scale = sm_scale * _LOG2E  # softmax in base 2: e^x = 2^(x log2 e)

  def step(carry, k, v, gate):
    """One online-softmax update with a [T, d] block of keys/values under one gate."""
    acc, m_prev, l_prev = carry
    s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32, precision=precision
    )  # [block_q, T]
    scale = logit_scale * gate if gated and gate_on == "keys" else logit_scale
    s = s * scale
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    if gated and gate_on == "values":
      p = p * gate  # the normaliser l stays ungated: softmax(logits) @ (s V)
    pv = lax.dot_general(
        p.astype(v.dtype),
        v,
        (((1,), (0,)), ((), ())),
        preferred_element_type=f32,
        precision=precision,
    )
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
  acc, _, l_i = carry
  o_ref[...] = (acc / l_i[:, None]).astype(o_ref.dtype)


def _slot_tables(q, kc, importance, selected, unselected, component_mask, dtype):
  """Per (b, h, i) slot tables and per-sample slot counts for the kernel.

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
  slots = idx.shape[-1]
  padded = pl.next_power_of_2(slots)
  if padded != slots:
    pad = [(0, 0)] * 3 + [(0, padded - slots)]
    idx, gates = jnp.pad(idx, pad), jnp.pad(gates, pad)
  # Valid slots form a prefix (moc.routed_lengths): R real components -> R - 1 others.
  if component_mask is None:
    others = jnp.full((b,), n - 1, jnp.int32)
  else:
    others = jnp.maximum(jnp.sum(component_mask, axis=1).astype(jnp.int32) - 1, 0)
  n_full = 1 + jnp.minimum(others, k)
  n_compressed = jnp.maximum(others - k, 0) if use_compressed else jnp.zeros_like(others)
  counts = jnp.stack([n_full, n_compressed], axis=-1).astype(jnp.int32)
  return idx, gates, counts, use_compressed


def _forward(cfg: _Config, q, kh, vh, kc, vc, importance, selected, unselected, component_mask):
  b, n, seq_len, nh, hd = q.shape
  idx, gates, counts, use_compressed = _slot_tables(
      q, kc, importance, selected, unselected, component_mask, kh.dtype
  )
  slots = idx.shape[-1]
  block_q, block_k = cfg.block_q, cfg.block_k
  sq = _SQUEEZED
  # grid (query block, component i, head h, batch b); query blocks fastest, so programs
  # running together share the key/value blocks of one (b, h).
  grid = (seq_len // block_q, n, nh, b)
  in_specs = [
      pl.BlockSpec((sq, 2), lambda qi, i, h, bb: (bb, 0)),
      pl.BlockSpec((sq, sq, sq, slots), lambda qi, i, h, bb: (bb, h, i, 0)),
      pl.BlockSpec((sq, sq, sq, slots), lambda qi, i, h, bb: (bb, h, i, 0)),
      pl.BlockSpec((sq, sq, block_q, sq, hd), lambda qi, i, h, bb: (bb, i, qi, h, 0)),
      pl.BlockSpec((sq, n, seq_len, sq, hd), lambda qi, i, h, bb: (bb, 0, 0, h, 0)),
      pl.BlockSpec((sq, n, seq_len, sq, hd), lambda qi, i, h, bb: (bb, 0, 0, h, 0)),
  ]
  args = [counts, idx, gates, q, kh, vh]
  if use_compressed:
    m = kc.shape[2]
    in_specs += [pl.BlockSpec((sq, n, m, sq, hd), lambda qi, i, h, bb: (bb, 0, 0, h, 0))] * 2
    args += [kc, vc]
  out_spec = pl.BlockSpec((sq, sq, block_q, sq, hd), lambda qi, i, h, bb: (bb, i, qi, h, 0))
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = _bind(
      _kernel,
      seq_len=seq_len,
      block_k=block_k,
      num_full_slots=1 + selected.shape[-1],
      use_compressed=use_compressed,
      gated=importance is not None,
      gate_on=cfg.gate_on,
      sm_scale=1.0 / math.sqrt(hd),
      precision=precision,
  )
  compiler_params = None
  if not cfg.interpret:
    from jax.experimental.pallas import triton as plgpu  # GPU only

    params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    num_warps = cfg.num_warps or (4 if hd <= 64 else 8)
    compiler_params = params_cls(num_warps=num_warps, num_stages=cfg.num_stages)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=compiler_params,
      interpret=cfg.interpret,
      name="moc_flash_fwd",
  )(*args)


def _bind(fn, **kwargs):
  """functools.partial with a readable name (Pallas names kernels after their function)."""
  bound = functools.partial(fn, **kwargs)
  bound.__name__ = fn.__name__  # type: ignore[attr-defined]
  return bound


# ----------------------------------------------------------------------------------------
# Gradients: recompute through the reference
# ----------------------------------------------------------------------------------------


def _fused(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask):
  return _forward(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask)


_fused = jax.custom_vjp(_fused, nondiff_argnums=(0,))


def _fused_fwd(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask):
  out = _forward(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask)
  return out, (q, kh, vh, kc, vc, importance, selected, unselected, component_mask)


def _fused_bwd(cfg, res, g):
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
    bwd_implementation: Optional[str] = "xla",
    bwd_component_chunk: int = 0,
) -> Array:
  """MoC attention in one fused Pallas kernel (forward); see the module docstring.

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
    bwd_implementation, bwd_component_chunk: `implementation` / `component_chunk` of the
      reference `moc.moc_attention` recomputed in the backward pass.
  Returns:
    [B, N, L, H, d] in the dtype of q.
  """
  if gate_on not in ("keys", "values"):
    raise ValueError(f"gate_on must be 'keys' or 'values', got {gate_on!r}")
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
      bwd_implementation=bwd_implementation,
      bwd_component_chunk=bwd_component_chunk,
  )
  return _fused(cfg, q, kh, vh, kc, vc, importance, selected, unselected, component_mask)
