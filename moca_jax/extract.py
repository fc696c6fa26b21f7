"""Mesh extraction from signed distance fields: grid decoding + marching cubes -> trimesh.

Grids: `resolution` R cells per axis over [-bounds, bounds]^3, i.e. (R + 1)^3 points with
spacing 2 * bounds / R; point (i, j, k) has coordinates -bounds + (i, j, k) * spacing (x is the
slowest axis). The field is an SDF, negative inside (see moca_jax.vae); the surface is its
zero level set, extracted with scikit-image's Lewiner marching cubes; faces wind outwards.

Coarse to fine (as TripoSG/PartCrafter do): the field is decoded on the dense coarse grid;
the coarse cells near the surface (a sign change among their corners, or a corner with
|sdf| < band * coarse spacing), dilated by `dilate` cells, are refined: only the fine-grid
points inside them are decoded, all other fine points take the trilinear upsampling of the
coarse grid (they are far from the surface, so they never create triangles), and marching
cubes runs on the band only. fine_resolution must be a multiple of resolution.

Entry points:
  extract_meshes(sdf_fn, inputs, ...)       a batch of components (JAX field) -> list of meshes
  extract_vae_meshes(model, params, latents) the VecSetVAE convenience wrapper
  extract_mesh_from_fn(fn, ...)              a plain numpy/JAX callable points [N,3] -> [N]
An empty or degenerate field (no sign change, non-finite values) gives an empty
`trimesh.Trimesh` and a warning, never an exception.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import skimage.measure
import trimesh

Array = jax.Array


class EmptyFieldWarning(UserWarning):
  """The decoded field has no usable zero level set; an empty mesh was returned."""


def empty_mesh() -> trimesh.Trimesh:
  return trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), np.int64), process=False)


def grid_coordinates(flat_index, resolution: int, bounds: float, xp=np):
  """Flat indices [N] into the (R+1)^3 grid -> coordinates [N, 3] (float32)."""
  n = resolution + 1
  i, j, k = flat_index // (n * n), (flat_index // n) % n, flat_index % n
  ijk = xp.stack([i, j, k], axis=-1).astype(xp.float32)
  return ijk * xp.float32(2.0 * bounds / resolution) - xp.float32(bounds)


# ----------------------------------------------------------------------------------------
# Grid evaluation
# ----------------------------------------------------------------------------------------


def _as_partial(sdf_fn) -> jax.tree_util.Partial:
  """Wraps `sdf_fn` so that the arrays it closes over via Partial are traced, not baked in."""
  return sdf_fn if isinstance(sdf_fn, jax.tree_util.Partial) else jax.tree_util.Partial(sdf_fn)


@functools.partial(jax.jit, static_argnames=("chunk", "resolution", "bounds"))
def _dense_chunk(sdf_fn, inputs, start, *, chunk: int, resolution: int, bounds: float):
  """SDF of every component at grid points start .. start+chunk-1 -> [B, chunk]."""
  total = (resolution + 1) ** 3
  idx = jnp.minimum(start + jnp.arange(chunk, dtype=jnp.int32), total - 1)
  pts = grid_coordinates(idx, resolution, bounds, xp=jnp)
  b = jax.tree_util.tree_leaves(inputs)[0].shape[0]
  return sdf_fn(inputs, jnp.broadcast_to(pts, (b, chunk, 3))).astype(jnp.float32)


@jax.jit
def _points_chunk(sdf_fn, inputs, pts):
  """SDF of one component (inputs with leading dim 1) at pts [chunk, 3] -> [chunk]."""
  return sdf_fn(inputs, pts[None])[0].astype(jnp.float32)


def decode_dense_grid(
    sdf_fn, inputs, resolution: int, bounds: float = 1.005, chunk_size: int = 65536
) -> np.ndarray:
  """Decodes a batch of fields on the dense grid.

  Args:
    sdf_fn: (inputs, queries [B, Q, 3]) -> [B, Q] JAX-traceable; a `jax.tree_util.Partial`
      to pass parameters as traced arguments (see `vae_sdf_fn`).
    inputs: pytree of arrays with leading dim B (latents or decoder features).
  Returns:
    [B, R+1, R+1, R+1] float32 numpy.
  """
  fn = _as_partial(sdf_fn)
  total = (resolution + 1) ** 3
  chunk = int(min(chunk_size, total))
  outs = [
      _dense_chunk(
          fn, inputs, jnp.int32(s), chunk=chunk, resolution=resolution, bounds=float(bounds)
      )
      for s in range(0, total, chunk)
  ]
  vals = np.concatenate([np.asarray(o) for o in outs], axis=1)[:, :total]
  n = resolution + 1
  return vals.reshape(-1, n, n, n)


def _eval_points_jax(sdf_fn, inputs_one, pts: np.ndarray, chunk_size: int) -> np.ndarray:
  """One component at arbitrary points [N, 3] in chunks of static size -> [N]."""
  fn = _as_partial(sdf_fn)
  n = len(pts)
  if n == 0:
    return np.zeros((0,), np.float32)
  chunk = int(min(chunk_size, n))
  pad = (-n) % chunk
  pts = np.concatenate([pts, np.zeros((pad, 3), np.float32)]) if pad else pts
  outs = [
      _points_chunk(fn, inputs_one, jnp.asarray(pts[s : s + chunk]))
      for s in range(0, len(pts), chunk)
  ]
  return np.concatenate([np.asarray(o) for o in outs])[:n]


def _eval_points_numpy(fn, pts: np.ndarray, chunk_size: int) -> np.ndarray:
  out = [
      np.asarray(fn(pts[s : s + chunk_size]), dtype=np.float32).reshape(-1)
      for s in range(0, len(pts), chunk_size)
  ]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------------------------
# Coarse to fine
# ----------------------------------------------------------------------------------------


def _cell_corner_reduce(v: np.ndarray, op) -> np.ndarray:
  """[n, n, n] point values -> [n-1]^3 reduction over each cell's 8 corners."""
  out = v[:-1, :-1, :-1]
  for di in (0, 1):
    for dj in (0, 1):
      for dk in (0, 1):
        if di or dj or dk:
          out = op(
              out, v[di : v.shape[0] - 1 + di, dj : v.shape[1] - 1 + dj, dk : v.shape[2] - 1 + dk]
          )
  return out


def near_surface_cells(
    coarse: np.ndarray, resolution: int, bounds: float, band: float = 1.0, dilate: int = 1
) -> np.ndarray:
  """Coarse cells [R, R, R] bool that the fine pass refines (see module docstring)."""
  spacing = 2.0 * bounds / resolution
  cmin = _cell_corner_reduce(coarse, np.minimum)
  cmax = _cell_corner_reduce(coarse, np.maximum)
  amin = _cell_corner_reduce(np.abs(coarse), np.minimum)
  cells = ((cmin <= 0) & (cmax >= 0)) | (amin < band * spacing)
  if dilate > 0:
    cells = scipy.ndimage.binary_dilation(cells, iterations=int(dilate))
  return cells


def _upsample_linear(v: np.ndarray, factor: int) -> np.ndarray:
  """Trilinear upsampling of grid point values [n]^3 -> [(n-1)*factor+1]^3 (separable)."""
  for axis in range(3):
    n = v.shape[axis]
    pos = np.arange((n - 1) * factor + 1, dtype=np.float32) / factor
    lo = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    w = (pos - lo).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w.reshape(shape)
    v = np.take(v, lo, axis=axis) * (1 - w) + np.take(v, lo + 1, axis=axis) * w
  return v.astype(np.float32)


def _fine_point_mask(cells: np.ndarray, factor: int) -> np.ndarray:
  """Coarse cells [R]^3 -> fine grid points [R*f+1]^3 that are corners of refined cells."""
  fine_cells = cells
  for axis in range(3):
    fine_cells = np.repeat(fine_cells, factor, axis=axis)
  m = np.zeros(tuple(s + 1 for s in fine_cells.shape), bool)
  for di in (0, 1):
    for dj in (0, 1):
      for dk in (0, 1):
        m[
            di : di + fine_cells.shape[0],
            dj : dj + fine_cells.shape[1],
            dk : dk + fine_cells.shape[2],
        ] |= fine_cells
  return m


def refine_grid(
    coarse: np.ndarray,
    eval_points: Callable[[np.ndarray], np.ndarray],
    resolution: int,
    fine_resolution: int,
    bounds: float,
    band: float = 1.0,
    dilate: int = 1,
):
  """Fine grid from a coarse one, decoding only the near-surface band.

  Args:
    coarse: [R+1]^3 values.
    eval_points: points [N, 3] float32 -> values [N].
  Returns:
    (fine values [Rf+1]^3 float32, band mask [Rf+1]^3 bool: the points actually decoded).
  """
  if fine_resolution % resolution:
    raise ValueError(
        f"fine_resolution={fine_resolution} must be a multiple of resolution={resolution}"
    )
  factor = fine_resolution // resolution
  cells = near_surface_cells(coarse, resolution, bounds, band, dilate)
  mask = _fine_point_mask(cells, factor)
  fine = _upsample_linear(coarse, factor)
  idx = np.flatnonzero(mask)
  if len(idx):
    pts = grid_coordinates(idx, fine_resolution, bounds)
    fine.reshape(-1)[idx] = eval_points(pts)
  return fine, mask


# ----------------------------------------------------------------------------------------
# Marching cubes
# ----------------------------------------------------------------------------------------


def mesh_from_grid(
    values: np.ndarray,
    resolution: int,
    bounds: float = 1.005,
    mask: Optional[np.ndarray] = None,
    name: str = "field",
) -> trimesh.Trimesh:
  """Marching cubes at level 0 on grid values [R+1]^3 -> mesh in world coordinates.

  Returns an empty mesh (with an `EmptyFieldWarning`) when the field is non-finite or has no
  sign change.
  """
  values = np.asarray(values, dtype=np.float32)
  check = values if mask is None else values[mask]
  if not np.all(np.isfinite(check)):
    warnings.warn(
        f"{name}: the field has non-finite values; returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=2,
    )
    return empty_mesh()
  if check.size == 0 or check.min() >= 0 or check.max() <= 0:
    warnings.warn(
        f"{name}: the field has no zero crossing (min {check.min() if check.size else 'n/a'},"
        f" max {check.max() if check.size else 'n/a'}); returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=2,
    )
    return empty_mesh()
  try:
    verts, faces, _, _ = skimage.measure.marching_cubes(
        values, level=0.0, gradient_direction="descent", mask=mask
    )
  except (ValueError, RuntimeError) as e:
    warnings.warn(
        f"{name}: marching cubes failed ({e}); returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=2,
    )
    return empty_mesh()
  verts = verts * (2.0 * bounds / resolution) - bounds
  mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)
  if len(mesh.faces) == 0:
    warnings.warn(
        f"{name}: marching cubes produced no faces; returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=2,
    )
  return mesh


def _mesh_from_coarse(coarse, eval_points, resolution, fine_resolution, bounds, band, dilate, name):
  if not np.all(np.isfinite(coarse)):
    warnings.warn(
        f"{name}: the field has non-finite values; returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=3,
    )
    return empty_mesh()
  if fine_resolution is None or fine_resolution == resolution:
    return mesh_from_grid(coarse, resolution, bounds, name=name)
  if coarse.min() >= 0 or coarse.max() <= 0:
    return mesh_from_grid(coarse, resolution, bounds, name=name)  # warns, empty
  fine, mask = refine_grid(coarse, eval_points, resolution, fine_resolution, bounds, band, dilate)
  return mesh_from_grid(fine, fine_resolution, bounds, mask=mask, name=name)


def extract_meshes(
    sdf_fn,
    inputs,
    resolution: int = 256,
    fine_resolution: Optional[int] = 512,
    chunk_size: int = 65536,
    bounds: float = 1.005,
    band: float = 1.0,
    dilate: int = 1,
) -> list[trimesh.Trimesh]:
  """One mesh per component of a batch of JAX fields.

  Args:
    sdf_fn: (inputs, queries [B, Q, 3]) -> sdf [B, Q], JAX-traceable (negative inside). Pass
      a `jax.tree_util.Partial` to give parameters as traced arguments (see `vae_sdf_fn`).
    inputs: pytree with leading dim B (e.g. latents [B, L, C] or decoder features).
    resolution: coarse cells per axis (dense grid of (R+1)^3 points).
    fine_resolution: cells per axis of the refined band (a multiple of resolution), or None
      to mesh the coarse grid.
    chunk_size: queries per decoder call (static; B * chunk_size points for the dense grid).
    bounds: half extent of the grid cube.
    band, dilate: refined band = cells with a sign change or |sdf| < band * coarse spacing,
      dilated by `dilate` cells.
  Returns:
    list of B `trimesh.Trimesh` (empty meshes for empty or degenerate fields).
  """
  coarse = decode_dense_grid(sdf_fn, inputs, resolution, bounds, chunk_size)
  meshes = []
  for b in range(coarse.shape[0]):
    one = jax.tree_util.tree_map(lambda x, b=b: x[b : b + 1], inputs)
    eval_points = lambda pts, one=one: _eval_points_jax(sdf_fn, one, pts, chunk_size)
    meshes.append(
        _mesh_from_coarse(
            coarse[b],
            eval_points,
            resolution,
            fine_resolution,
            bounds,
            band,
            dilate,
            name=f"component {b}",
        )
    )
  return meshes


def extract_mesh_from_fn(
    fn: Callable[[Any], Any],
    resolution: int = 256,
    fine_resolution: Optional[int] = 512,
    chunk_size: int = 262144,
    bounds: float = 1.005,
    band: float = 1.0,
    dilate: int = 1,
    return_grid: bool = False,
):
  """Mesh of a plain SDF callable: points [N, 3] float32 numpy -> values [N] (numpy or JAX).

  Same grids and coarse-to-fine scheme as `extract_meshes`. With return_grid=True also
  returns (values, mask) of the grid that was meshed (mask None for a dense grid).
  """
  total = (resolution + 1) ** 3
  coarse = np.concatenate(
      [
          _eval_points_numpy(
              fn,
              grid_coordinates(np.arange(s, min(s + chunk_size, total)), resolution, bounds),
              chunk_size,
          )
          for s in range(0, total, chunk_size)
      ]
  ).reshape((resolution + 1,) * 3)
  eval_points = lambda pts: _eval_points_numpy(fn, pts, chunk_size)
  mesh = _mesh_from_coarse(
      coarse, eval_points, resolution, fine_resolution, bounds, band, dilate, name="field"
  )
  if not return_grid:
    return mesh
  if fine_resolution is None or fine_resolution == resolution:
    return mesh, coarse, None
  fine, mask = refine_grid(coarse, eval_points, resolution, fine_resolution, bounds, band, dilate)
  return mesh, fine, mask


# ----------------------------------------------------------------------------------------
# VecSetVAE helpers
# ----------------------------------------------------------------------------------------


def _vae_query(params, features, queries, *, model):
  """The decoder's field at the queries with this project's sign (negative inside): a VAE in
  TripoSG's layout (`negate_output`, imported weights) is positive inside and is flipped."""
  from moca_jax.vae import VecSetVAE  # local import: extract does not need the VAE otherwise

  value = model.apply(params, features, queries, method=VecSetVAE.query_sdf)
  return -value if model.config.get("negate_output", False) else value


def _vae_features(params, latents, *, model):
  from moca_jax.vae import VecSetVAE

  return model.apply(params, latents, method=VecSetVAE.decode_features)


@functools.lru_cache(maxsize=16)
def _cached_fns(model):
  """Per-model query function and jitted feature function, so repeated calls hit the jit
  caches (needs a hashable model, i.e. a FrozenConfigDict config)."""
  return (
      functools.partial(_vae_query, model=model),
      jax.jit(functools.partial(_vae_features, model=model)),
  )


def _fns(model):
  try:
    return _cached_fns(model)
  except TypeError:  # unhashable config (a plain ConfigDict): no caching
    return _cached_fns.__wrapped__(model)


def vae_sdf_fn(model, params) -> jax.tree_util.Partial:
  """sdf_fn(features [B, L, D], queries [B, Q, 3]) -> [B, Q] for `extract_meshes`, with the
  parameters as traced arguments (not compile-time constants)."""
  return jax.tree_util.Partial(_fns(model)[0], params)


def extract_vae_meshes(model, params, latents, **kwargs) -> list[trimesh.Trimesh]:
  """Latents [B, L, C] -> B meshes: runs the decoder's self-attention once per component,
  then `extract_meshes` over the query cross-attention (kwargs as there). Build the model
  with a FrozenConfigDict config so that repeated calls reuse the compiled functions."""
  features = _fns(model)[1](params, latents)
  return extract_meshes(vae_sdf_fn(model, params), features, **kwargs)
