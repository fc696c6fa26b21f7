"""Farthest point sampling (FPS) with static shapes, jit- and vmap-friendly.

FPS picks `num_samples` indices one at a time: each new index is the point whose squared
distance to the nearest already picked point is largest (ties: the lowest index, as
`argmax` does). The loop is a `lax.fori_loop` with a fixed trip count, so it compiles once per
(N, num_samples) and runs on CPU or GPU. Cost: O(num_samples * N) distance evaluations.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _fps_single(points: Array, num_samples: int, start: Array) -> Array:
  """points [N, 3], start [] int -> indices [num_samples] int32."""
  points = points.astype(jnp.float32)
  n = points.shape[0]
  indices = jnp.zeros((num_samples,), jnp.int32).at[0].set(start.astype(jnp.int32))
  min_d2 = jnp.full((n,), jnp.inf, jnp.float32)

  def body(i, carry):
    indices, min_d2 = carry
    last = points[indices[i - 1]]
    d2 = jnp.sum(jnp.square(points - last), axis=-1)
    min_d2 = jnp.minimum(min_d2, d2)
    return indices.at[i].set(jnp.argmax(min_d2).astype(jnp.int32)), min_d2

  indices, _ = jax.lax.fori_loop(1, num_samples, body, (indices, min_d2))
  return indices


@functools.partial(jax.jit, static_argnames=("num_samples",))
def farthest_point_sampling(points: Array, num_samples: int, start_index: Array) -> Array:
  """Farthest point sampling of a batch of point clouds.

  Args:
    points: [B, N, 3] point clouds.
    num_samples: S <= N, static.
    start_index: [B] int, the first index picked in each cloud.
  Returns:
    [B, S] int32 indices into the N points, in the order they were picked.
  """
  if points.ndim != 3 or points.shape[-1] != 3:
    raise ValueError(f"points must have shape [B, N, 3], got {points.shape}")
  if not 1 <= num_samples <= points.shape[1]:
    raise ValueError(f"num_samples must be in [1, N={points.shape[1]}], got {num_samples}")
  start_index = jnp.broadcast_to(jnp.asarray(start_index, jnp.int32), points.shape[:1])
  return jax.vmap(_fps_single, in_axes=(0, None, 0))(points, num_samples, start_index)


def farthest_from_centroid(points: Array) -> Array:
  """[B, N, 3] -> [B] index of the point farthest from its cloud's centroid.

  A start for FPS that does not depend on the order of the points (up to exact ties).
  """
  centroid = jnp.mean(points.astype(jnp.float32), axis=1, keepdims=True)
  return jnp.argmax(jnp.sum(jnp.square(points - centroid), axis=-1), axis=1).astype(jnp.int32)


def triposg_query_index(points: Array, num_tokens: int, seed: Optional[int] = None) -> Array:
  """The encoder query points TripoSG's VAE picks in eval mode, as indices.

  TripoSGVAEModel._sample_features: `np.random.default_rng(seed).choice(N, 4 * num_tokens,
  replace=4 * num_tokens > N)` (one subset for the whole batch), then FPS with ratio 1/4 over
  that subset starting at its first point (torch_cluster's `random_start=False`). Feed the
  result to `VecSetVAE.encode(..., query_index=...)` to reproduce upstream's encoding.

  Args:
    points: [B, N, 3] surface points.
    num_tokens: L, the number of latent tokens.
    seed: numpy seed (None: fresh entropy, as upstream with seed=None).
  Returns:
    [B, L] int32 indices into the N points.
  """
  b, n = points.shape[0], points.shape[1]
  subset = np.random.default_rng(seed).choice(n, 4 * num_tokens, replace=4 * num_tokens > n)
  subset = jnp.asarray(subset, jnp.int32)
  cand = jnp.take(jnp.asarray(points), subset, axis=1)
  picked = farthest_point_sampling(cand, num_tokens, jnp.zeros((b,), jnp.int32))
  return subset[picked]
