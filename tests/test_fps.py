"""Farthest point sampling against a brute-force numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moca_jax.fps import farthest_from_centroid, farthest_point_sampling


def _numpy_fps(points, num_samples, start):
  """Brute force: recompute every point's distance to the whole picked set each step."""
  picked = [int(start)]
  for _ in range(num_samples - 1):
    d2 = np.sum((points[:, None, :] - points[picked][None, :, :]) ** 2, axis=-1)  # [N, S]
    picked.append(int(np.argmax(d2.min(axis=1))))
  return np.array(picked)


@pytest.mark.parametrize("n,s", [(50, 10), (300, 64), (17, 17)])
def test_fps_matches_bruteforce_numpy(n, s):
  rng = np.random.default_rng(n)
  pts = rng.normal(size=(3, n, 3)).astype(np.float32)
  start = rng.integers(0, n, size=3)
  got = np.asarray(farthest_point_sampling(jnp.asarray(pts), s, jnp.asarray(start)))
  assert got.shape == (3, s) and got.dtype == np.int32
  for b in range(3):
    np.testing.assert_array_equal(got[b], _numpy_fps(pts[b], s, start[b]))
    assert len(set(got[b].tolist())) == s  # distinct points while s <= n


def test_fps_is_order_invariant_with_centroid_start():
  rng = np.random.default_rng(1)
  pts = rng.uniform(-1, 1, size=(2, 200, 3)).astype(np.float32)
  perm = rng.permutation(200)
  a = np.asarray(farthest_point_sampling(pts, 20, farthest_from_centroid(jnp.asarray(pts))))
  b = np.asarray(farthest_point_sampling(pts[:, perm], 20,
                                         farthest_from_centroid(jnp.asarray(pts[:, perm]))))
  np.testing.assert_array_equal(np.take_along_axis(pts, a[..., None], 1),
                                np.take_along_axis(pts[:, perm], b[..., None], 1))


def test_fps_rejects_bad_shapes():
  with pytest.raises(ValueError, match="num_samples"):
    farthest_point_sampling(jnp.zeros((1, 4, 3)), 5, jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="points"):
    farthest_point_sampling(jnp.zeros((4, 3)), 2, jnp.zeros((1,), jnp.int32))


def test_triposg_query_index_reproduces_upstream_selection():
  """A 4L random subset from numpy's default_rng(seed).choice, then FPS from its first point."""
  from moca_jax.fps import triposg_query_index
  rng = np.random.default_rng(0)
  pts = rng.normal(size=(2, 100, 3)).astype(np.float32)
  idx = np.asarray(triposg_query_index(jnp.asarray(pts), 8, seed=7))
  subset = np.random.default_rng(7).choice(100, 32, replace=False)
  assert idx.shape == (2, 8)
  for b in range(2):
    np.testing.assert_array_equal(idx[b], subset[_numpy_fps(pts[b, subset], 8, 0)])
  # fewer points than 4L: the subset is drawn with replacement, as upstream
  few = np.asarray(triposg_query_index(jnp.asarray(pts[:, :20]), 8, seed=1))
  assert few.shape == (2, 8) and few.max() < 20
