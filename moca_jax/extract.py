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
cubes runs on the band only, in the box of fine points around it (`Band`: the whole fine
grid is never built). fine_resolution must be a multiple of resolution. `extract_meshes`
decodes the bands of all components of a batch together (see there).

Hierarchical levels (`coarse_levels`, e.g. (64,) for 64^3 -> 256^3 -> 512^3): the dense
`resolution` grid is the largest cost (16 parts x 257^3 decoder queries), so it is built
level by level instead. Only the first coarse level is decoded densely; at each level the
cells near the surface by a wider test (a sign change, or a corner with |sdf| < coarse_band
x that level's spacing h), dilated by `dilate`, are refined to the next level as the band
above is (decoded there, the trilinear upsampling of the level below elsewhere, on the
device), up to the `resolution` grid, which then goes through the step above with `band`.
Marching cubes only ever sees decoded values near the surface.

Why the meshes are the two-level ones: a `resolution` point that is not decoded lies in a
coarse cell that was not refined, whose corners all have one sign and |sdf| >= coarse_band h;
so has their trilinear upsampling (a convex combination), and as coarse_band >= band, it
never flags a cell by itself. If the field is L-Lipschitz (|grad sdf| <= L), every point of
that cell lies within sqrt(3)/2 h of a corner, so its true value has that sign too and
|sdf| >= (coarse_band - L sqrt(3)/2) h, which is >= band x the next level's spacing when
coarse_band >= L sqrt(3)/2 + band / factor: the dense grid would not refine there either.
The refined `resolution` cells are then the dense grid's, and every value marching cubes
and the band's upsampling read is a decoded one, so the triangles are the same: bit for bit
on the host path (`extract_mesh_from_fn`); a JAX decoder may round a query's value in a
band call differently from the dense call in the last bits (as batching does), which moves
vertices by as much and could flip a cell whose |sdf| equals the band threshold to the last
bit. A thin part cannot hide between coarse points: the |sdf| test needs no sign change,
and any coarse cell its surface crosses has a corner within sqrt(3)/2 h of it. When a
level's band (with the ring of cells marching cubes and the upsampling read) reaches past
the points decoded from the level below, the Lipschitz bound failed there: a
`BandEscapeWarning` names the component.

Margin: an exact SDF (L = 1) needs coarse_band >= 0.87 + 1/4 at 64 -> 256 (factor 4,
band 1). The VAE's field is trained towards a distance (L1 on SDF samples and an eikonal
term, moca_jax.vae), but a learned field is only roughly one, so the default coarse_band = 3
holds up to L ~ 3.2, a field three times steeper than a distance. The price is a wider
band at the intermediate level; on 16 analytic parts (spheres, tori, thin plates) at
64 -> 256 -> 512 the decoded points drop from 277.7 M (two levels: 271.6 M dense) to
16.6 M, the same 6.1 M final band included.

Entry points:
  extract_meshes(sdf_fn, inputs, ...)       a batch of components (JAX field) -> list of meshes
                                             (and, with return_stats, the decoded points)
  extract_vae_meshes(model, params, latents) the VecSetVAE convenience wrapper
  extract_mesh_from_fn(fn, ...)              a plain numpy/JAX callable points [N,3] -> [N]
An empty or degenerate field (no sign change, non-finite values) gives an empty
`trimesh.Trimesh` and a warning, never an exception.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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
  return _index_coordinates(xp.stack([i, j, k], axis=-1), resolution, bounds, xp)


def _index_coordinates(ijk, resolution: int, bounds: float, xp=np):
  """Grid indices [N, 3] -> coordinates [N, 3] (float32): (2 * ijk - R) * (bounds / R), one
  rounding (an exact integer times a float32), so the host and any device give the same bits
  (XLA may fuse ijk * spacing - bounds into one multiply-add, numpy rounds twice)."""
  return (2 * ijk.astype(xp.int32) - resolution).astype(xp.float32) * xp.float32(
      bounds / resolution
  )


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


def _dense_grid_on_device(sdf_fn, inputs, resolution: int, bounds: float, chunk_size: int):
  """[B, R+1, R+1, R+1] float32 device array: the fields on the dense grid."""
  fn = _as_partial(sdf_fn)
  total = (resolution + 1) ** 3
  chunk = int(min(chunk_size, total))
  outs = [
      _dense_chunk(
          fn, inputs, jnp.int32(s), chunk=chunk, resolution=resolution, bounds=float(bounds)
      )
      for s in range(0, total, chunk)
  ]
  n = resolution + 1
  return jnp.concatenate(outs, axis=1)[:, :total].reshape(-1, n, n, n)


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
  return np.array(_dense_grid_on_device(sdf_fn, inputs, resolution, bounds, chunk_size))


def _eval_points_numpy(fn, pts: np.ndarray, chunk_size: int) -> np.ndarray:
  out = [
      np.asarray(fn(pts[s : s + chunk_size]), dtype=np.float32).reshape(-1)
      for s in range(0, len(pts), chunk_size)
  ]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


@jax.jit
def _rows_chunk(sdf_fn, inputs, components, pts):
  """SDF at pts [K, chunk, 3], row r a query chunk of component components[r] -> [K, chunk]."""
  rows = jax.tree_util.tree_map(lambda x: x[components], inputs)
  return sdf_fn(rows, pts).astype(jnp.float32)


class _BandQueries:
  """The band points of all components, decoded together on the device.

  Each component's points are cut into rows of `chunk` queries (the last one zero-padded);
  rows of any components are packed `rows` at a time into one [rows, chunk] decoder call
  (`_rows_chunk`, the inputs gathered per row on the device), so a single compiled shape
  serves every component and call. Calls are dispatched as soon as `rows` rows are pending
  (JAX runs them asynchronously while the host plans the next component); `values` waits
  only for the calls that hold its component, and drops the padding. Points added with their
  flat grid indices can instead be written into a device grid without leaving the device
  (`scatter_into`, for the intermediate levels of a hierarchical extraction).
  """

  def __init__(self, sdf_fn, inputs, rows: int, chunk: int, grid_points: int = 0):
    self._fn, self._inputs, self._rows, self._chunk = _as_partial(sdf_fn), inputs, rows, chunk
    self._grid_points = grid_points  # flat index of padding queries in scatter_into (dropped)
    self._pending: list[tuple[int, np.ndarray, Optional[np.ndarray]]] = []
    self._calls: list[Any] = []  # device [rows, chunk] results, then host arrays once read
    self._targets: list[tuple[np.ndarray, np.ndarray]] = []  # per call: components, flat
    self._where: dict[int, list[tuple[int, int, int]]] = {}  # component -> (call, row, count)
    self.points = 0  # points added (without padding)

  @property
  def padded_queries(self) -> int:
    """Queries the decoder ran, padding included (calls x rows x chunk)."""
    return (len(self._calls) + (1 if self._pending else 0)) * self._rows * self._chunk

  def add(self, component: int, points: np.ndarray, flat: Optional[np.ndarray] = None):
    """Queues points [n, 3] of `component` (with their flat grid indices [n] for
    `scatter_into`)."""
    self._where[component] = []
    self.points += len(points)
    for s in range(0, len(points), self._chunk):
      part = None if flat is None else flat[s : s + self._chunk]
      self._pending.append((component, points[s : s + self._chunk], part))
      if len(self._pending) == self._rows:
        self._dispatch()

  def flush(self) -> None:
    if self._pending:
      self._dispatch()

  def _dispatch(self) -> None:
    pts = np.zeros((self._rows, self._chunk, 3), np.float32)
    components = np.zeros((self._rows,), np.int32)  # padding rows: component 0, dropped
    flat = np.full((self._rows, self._chunk), self._grid_points, np.int32)
    for r, (component, chunk_pts, chunk_flat) in enumerate(self._pending):
      pts[r, : len(chunk_pts)] = chunk_pts
      components[r] = component
      if chunk_flat is not None:
        flat[r, : len(chunk_flat)] = chunk_flat
      self._where[component].append((len(self._calls), r, len(chunk_pts)))
    self._calls.append(
        _rows_chunk(self._fn, self._inputs, jnp.asarray(components), jnp.asarray(pts))
    )
    self._targets.append((components, flat))
    self._pending = []

  def values(self, component: int) -> np.ndarray:
    """The decoded values [n] of the points `add`ed for `component`, in their order."""
    out = []
    for call, row, count in self._where[component]:
      if not isinstance(self._calls[call], np.ndarray):
        self._calls[call] = np.asarray(self._calls[call])
      out.append(self._calls[call][row, :count])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def scatter_into(self, grid: Array) -> Array:
    """Device grid [rows, grid_points] with every decoded value written at its component's
    flat index (all points must have been added with `flat`); call `flush` first."""
    for result, (components, flat) in zip(self._calls, self._targets, strict=True):
      grid = _scatter_rows(grid, jnp.asarray(components), jnp.asarray(flat), result)
    return grid


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_rows(grid, components, flat, values):
  """grid [B, M] with values [K, chunk] written at (components[r], flat[r, c]); flat indices
  >= M (padding) are dropped."""
  return grid.at[components[:, None], flat].set(values.astype(grid.dtype), mode="drop")


# ----------------------------------------------------------------------------------------
# Coarse to fine
# ----------------------------------------------------------------------------------------


def _cell_any(points):
  """Point flags [..., n0, n1, n2] -> [..., n0-1, n1-1, n2-1] (numpy or JAX): whether any of
  each cell's 8 corners is flagged (separable: one OR of neighbours per axis)."""
  out = points
  for axis in range(3):
    lo, hi = [slice(None)] * 3, [slice(None)] * 3
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    out = out[(Ellipsis, *lo)] | out[(Ellipsis, *hi)]
  return out


def _dilate(cells, iterations: int, xp=np):
  """Binary dilation [..., r0, r1, r2] by the 6-neighbour cross, `iterations` times, outside
  False (scipy.ndimage.binary_dilation's default)."""
  pad = [(0, 0)] * (cells.ndim - 3) + [(1, 1)] * 3
  lead = (slice(None),) * (cells.ndim - 3)
  for _ in range(iterations):
    p = xp.pad(cells, pad)
    mid = slice(1, -1)
    cells = (
        cells
        | p[lead + (slice(None, -2), mid, mid)]
        | p[lead + (slice(2, None), mid, mid)]
        | p[lead + (mid, slice(None, -2), mid)]
        | p[lead + (mid, slice(2, None), mid)]
        | p[lead + (mid, mid, slice(None, -2))]
        | p[lead + (mid, mid, slice(2, None))]
    )
  return cells


def _near_surface(coarse, threshold: float, dilate: int, xp=np):
  """[..., R+1, R+1, R+1] grid values -> [..., R, R, R] near-surface cells (xp: np or jnp)."""
  near = _cell_any(coarse <= 0) & _cell_any(coarse >= 0)
  return _dilate(near | _cell_any(xp.abs(coarse) < threshold), max(int(dilate), 0), xp)


@functools.partial(jax.jit, static_argnames=("threshold", "dilate"))
def _near_surface_on_device(coarse: Array, *, threshold: float, dilate: int) -> Array:
  """`near_surface_cells` of every component of coarse grids [B, R+1, R+1, R+1] at once on
  the device -> [B, R, R, R] bool (the same cells: comparisons in float32, boolean ops)."""
  return _near_surface(coarse, threshold, dilate, jnp)


def near_surface_cells(
    coarse: np.ndarray, resolution: int, bounds: float, band: float = 1.0, dilate: int = 1
) -> np.ndarray:
  """Coarse cells [R, R, R] bool that the fine pass refines (see module docstring), of a
  finite coarse grid [R+1]^3."""
  return _near_surface(np.asarray(coarse), band * (2.0 * bounds / resolution), dilate)


def _upsample_linear(
    v: np.ndarray, factor: int, lo: Sequence[int] = (0, 0, 0), hi: Optional[Sequence[int]] = None
) -> np.ndarray:
  """Trilinear upsampling of grid point values [n]^3 to the fine grid [(n-1)*factor+1]^3
  (separable), or only to its box of fine points [lo, hi): bit for bit the same values as
  that box of the full result, at the cost of the box."""
  hi = [(s - 1) * factor + 1 for s in v.shape] if hi is None else hi
  for axis in range(3):
    n = v.shape[axis]
    pos = np.arange(lo[axis], hi[axis], dtype=np.float32) / factor
    left = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    first = int(left[0])  # only the coarse points the box needs
    v = np.take(v, np.arange(first, int(left[-1]) + 2), axis=axis)
    left -= first
    w = (pos - (left + first)).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w.reshape(shape)
    v = np.take(v, left, axis=axis) * (1 - w) + np.take(v, left + 1, axis=axis) * w
  return v.astype(np.float32)


def _fine_point_mask(cells: np.ndarray, factor: int) -> np.ndarray:
  """Coarse cells [r0, r1, r2] -> fine points [r*f+1] that are corners of refined cells."""
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


def _bounding_box(a: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """[lo, hi) per axis of the True entries of a 3D bool array (a non-empty one)."""
  lo, hi = [], []
  for axis in range(3):
    nz = np.flatnonzero(a.any(axis=tuple(x for x in range(3) if x != axis)))
    lo.append(int(nz[0]))
    hi.append(int(nz[-1]) + 1)
  return tuple(lo), tuple(hi)


def _mask_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The box [lo, hi) of grid points that marching cubes reads for a non-empty point mask:
  its bounding box and one more point on the high side of each axis (a cell's far
  corners)."""
  lo, hi = _bounding_box(mask)
  return lo, tuple(min(h + 1, s) for h, s in zip(hi, mask.shape))


@dataclasses.dataclass(frozen=True)
class Band:
  """The refined band of one component on the fine grid (see the module docstring).

  lo, hi: the box [lo, hi) of fine grid points (per axis) that marching cubes reads.
  mask: [hi - lo] bool, the points of the box that are decoded (corners of refined cells).
  points: [n, 3] float32 world coordinates of the mask's points in C order (n = mask.sum()).
  ijk: [n, 3] int32 fine grid indices of the same points.
  """

  lo: tuple[int, ...]
  hi: tuple[int, ...]
  mask: np.ndarray
  points: np.ndarray
  ijk: np.ndarray


def plan_band(cells: np.ndarray, fine_resolution: int, bounds: float) -> Band:
  """The fine points to decode for the refined coarse cells [R, R, R] bool (non-empty, see
  `near_surface_cells`): only the box around them is built, never the whole fine grid."""
  factor = fine_resolution // cells.shape[0]
  clo, chi = _bounding_box(cells)
  box_mask = _fine_point_mask(cells[tuple(slice(l, h) for l, h in zip(clo, chi))], factor)
  lo = tuple(l * factor for l in clo)
  hi = tuple(min(h * factor + 2, fine_resolution + 1) for h in chi)
  mask = np.zeros(tuple(h - l for l, h in zip(lo, hi)), bool)
  mask[tuple(slice(0, s) for s in box_mask.shape)] = box_mask
  ijk = (np.argwhere(mask) + np.asarray(lo)).astype(np.int32)  # C order
  return Band(lo, hi, mask, _index_coordinates(ijk, fine_resolution, bounds), ijk)


def band_grid(coarse: np.ndarray, band: Band, values: np.ndarray, factor: int) -> np.ndarray:
  """The fine grid in the band's box [hi - lo] float32: the decoded `values` [n] at the
  band's points, the trilinear upsampling of the coarse grid elsewhere."""
  grid = _upsample_linear(coarse, factor, band.lo, band.hi)
  grid[band.mask] = values
  return grid


def _full_grid(coarse: np.ndarray, band: Band, values: np.ndarray, factor: int):
  """(fine values [Rf+1]^3 float32, mask [Rf+1]^3 bool of the decoded points): the whole
  fine grid, for inspection (extraction itself builds only the band's box)."""
  fine = _upsample_linear(coarse, factor)
  mask = np.zeros_like(fine, bool)
  box = tuple(slice(l, h) for l, h in zip(band.lo, band.hi))
  fine[box] = band_grid(coarse, band, values, factor)
  mask[box] = band.mask
  return fine, mask


def _check_resolutions(resolution: int, fine_resolution: Optional[int]) -> None:
  if fine_resolution is not None and fine_resolution % resolution:
    raise ValueError(
        f"fine_resolution={fine_resolution} must be a multiple of resolution={resolution}"
    )


def check_levels(
    coarse_levels: Sequence[int],
    resolution: int,
    fine_resolution: Optional[int],
    band: float,
    coarse_band: float,
) -> tuple[int, ...]:
  """The grids decoded up to `resolution`, (*coarse_levels, resolution), of the settings of
  `extract_meshes` (see there).

  Raises:
    ValueError naming the setting that does not fit: fine_resolution not a multiple of
    resolution, levels that are not proper divisors of the next, coarse_band < band.
  """
  _check_resolutions(resolution, fine_resolution)
  levels = tuple(int(r) for r in coarse_levels) + (int(resolution),)
  for lower, upper in zip(levels, levels[1:]):
    if lower < 1 or upper <= lower or upper % lower:
      raise ValueError(
          f"coarse_levels={tuple(coarse_levels)} with resolution={resolution}: each level must"
          f" be a positive proper divisor of the next"
      )
  if len(levels) > 1 and not coarse_band >= band:
    raise ValueError(
        f"coarse_band={coarse_band} must be >= band={band} (the coarse levels' test is the"
        f" wider one)"
    )
  return levels


# ----------------------------------------------------------------------------------------
# Hierarchical levels
# ----------------------------------------------------------------------------------------


class BandEscapeWarning(UserWarning):
  """A level's refined band reaches past the points decoded from the level below it: the
  coarse test (coarse_band) was too narrow for this field, part of the surface may be
  missing or differ from the dense grid's."""


@functools.partial(jax.jit, static_argnames=("factor",))
def _upsample_on_device(grid: Array, *, factor: int) -> Array:
  """Trilinear upsampling of grids [B, n0, n1, n2] -> [B, (n - 1) * factor + 1, ...] on the
  device (separable, the formula of `_upsample_linear`)."""
  for axis in (1, 2, 3):
    n = grid.shape[axis]
    pos = jnp.arange((n - 1) * factor + 1, dtype=jnp.float32) / factor
    left = jnp.minimum(jnp.floor(pos).astype(jnp.int32), n - 2)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    w = (pos - left.astype(jnp.float32)).reshape(shape)
    grid = jnp.take(grid, left, axis=axis) * (1 - w) + jnp.take(grid, left + 1, axis=axis) * w
  return grid


@jax.jit
def _level_summary(grid: Array, cells: Array) -> tuple[Array, Array]:
  """([B] all values finite, [B] any cell flagged) of grids [B, n, n, n] and cells."""
  return jnp.all(jnp.isfinite(grid), axis=(1, 2, 3)), jnp.any(cells, axis=(1, 2, 3))


def _dilate_cube(cells, xp=np):
  """Binary dilation [..., r0, r1, r2] by the 3x3x3 cube (separable), outside False."""
  for axis in range(cells.ndim - 3, cells.ndim):
    pad = [(0, 0)] * cells.ndim
    pad[axis] = (1, 1)
    p = xp.pad(cells, pad)
    n = cells.shape[axis]
    shifted = []
    for start in (0, 1, 2):
      window = [slice(None)] * cells.ndim
      window[axis] = slice(start, start + n)
      shifted.append(p[tuple(window)])
    cells = shifted[0] | shifted[1] | shifted[2]
  return cells


@functools.partial(jax.jit, static_argnames=("factor",))
def _escapes(cells: Array, parent_cells: Array, *, factor: int) -> Array:
  """[B] bool: whether the refined cells [B, R, R, R] of a level, with the ring of cells
  around them that the next level reads (marching cubes' far corners, the upsampling next
  to the band), reach cells outside the refined cells [B, R/f, R/f, R/f] of the level below
  (whose fine points are the decoded ones)."""
  inside = parent_cells
  for axis in (1, 2, 3):
    inside = jnp.repeat(inside, factor, axis=axis)
  return jnp.any(_dilate_cube(cells, jnp) & ~inside, axis=(1, 2, 3))


def _warn_escapes(cells, parent, resolution: int, coarse_band: float, names) -> None:
  """A `BandEscapeWarning` per component whose refined cells [B, R, R, R] at `resolution`
  escape (`_escapes`) parent = (refined cells [B, r, r, r], r) of the level below; only the
  first len(names) components are real (the rest padding, never warned about)."""
  escapes = _escapes(cells, parent[0], factor=resolution // parent[1])
  for b in np.flatnonzero(np.asarray(escapes)[: len(names)]):
    warnings.warn(
        f"{names[b]}: the band refined at {resolution}^3 reaches past the points decoded from"
        f" the {parent[1]}^3 level; part of the surface may be missing (raise coarse_band, now"
        f" {coarse_band:g})",
        BandEscapeWarning,
        stacklevel=3,
    )


def _refine_level(
    sdf_fn, inputs, grid, cells, resolution, next_resolution, bounds, chunk, pool, num_valid
):
  """One intermediate level on the device: grids [B, R+1, R+1, R+1] and their refined cells
  [B, R, R, R] -> (grids at next_resolution: the decoded band of every real component (the
  first num_valid) with a finite grid and refined cells, the trilinear upsampling
  elsewhere; its `_BandQueries`)."""
  num, n = grid.shape[0], next_resolution + 1
  finite, flagged = (np.asarray(x) for x in _level_summary(grid, cells))
  fine = _upsample_on_device(grid, factor=next_resolution // resolution).reshape(num, -1)
  queries = _BandQueries(sdf_fn, inputs, num, int(min(chunk, n**3)), grid_points=n**3)
  refined = [b for b in range(num_valid) if finite[b] and flagged[b]]
  if refined:
    cells = np.asarray(cells)
    planned = {b: pool.submit(plan_band, cells[b], next_resolution, bounds) for b in refined}
    for b in refined:
      band_b = planned.pop(b).result()
      flat = np.ravel_multi_index(tuple(band_b.ijk.T), (n, n, n)).astype(np.int32)
      queries.add(b, band_b.points, flat)
    queries.flush()
  return queries.scatter_into(fine).reshape(num, n, n, n), queries


# ----------------------------------------------------------------------------------------
# Marching cubes
# ----------------------------------------------------------------------------------------


def _marching_cubes(
    values: np.ndarray,
    mask: Optional[np.ndarray],
    origin: Sequence[int],
    resolution: int,
    bounds: float,
    name: str,
) -> trimesh.Trimesh:
  """Marching cubes at level 0 on a box of grid values whose first point is grid point
  `origin` -> mesh in world coordinates (see `mesh_from_grid`)."""
  values = np.asarray(values, dtype=np.float32)
  if not values.flags.writeable:  # a device array's host view: scikit-image needs writable
    values = values.copy()
  check = values if mask is None else values[mask]
  if not np.all(np.isfinite(check)):
    warnings.warn(
        f"{name}: the field has non-finite values; returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=3,
    )
    return empty_mesh()
  if check.size == 0 or check.min() >= 0 or check.max() <= 0:
    warnings.warn(
        f"{name}: the field has no zero crossing (min {check.min() if check.size else 'n/a'},"
        f" max {check.max() if check.size else 'n/a'}); returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=3,
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
        stacklevel=3,
    )
    return empty_mesh()
  verts = (verts.astype(np.float64) + np.asarray(origin)) * (2.0 * bounds / resolution) - bounds
  mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)
  if len(mesh.faces) == 0:
    warnings.warn(
        f"{name}: marching cubes produced no faces; returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=3,
    )
  return mesh


def mesh_from_grid(
    values: np.ndarray,
    resolution: int,
    bounds: float = 1.005,
    mask: Optional[np.ndarray] = None,
    name: str = "field",
) -> trimesh.Trimesh:
  """Marching cubes at level 0 on grid values [R+1]^3 -> mesh in world coordinates.

  With a point mask [R+1]^3 only the cells it marks are meshed, and only the box of points
  they need is passed to marching cubes (vertices are computed in that box, then shifted).
  Returns an empty mesh (with an `EmptyFieldWarning`) when the field is non-finite or has no
  sign change (within the mask).
  """
  if mask is None or not mask.any():
    return _marching_cubes(values, mask, (0, 0, 0), resolution, bounds, name)
  lo, hi = _mask_box(mask)
  box = tuple(slice(l, h) for l, h in zip(lo, hi))
  return _marching_cubes(values[box], mask[box], lo, resolution, bounds, name)


def _coarse_only(coarse: np.ndarray, resolution: int, bounds: float, name: str):
  """The mesh of a component whose band is not refined (fine pass off, non-finite values,
  no sign change: the last two give an empty mesh and a warning)."""
  if not np.all(np.isfinite(coarse)):
    warnings.warn(
        f"{name}: the field has non-finite values; returning an empty mesh",
        EmptyFieldWarning,
        stacklevel=2,
    )
    return empty_mesh()
  return mesh_from_grid(coarse, resolution, bounds, name=name)


def _refines(coarse: np.ndarray, fine_resolution: Optional[int], resolution: int) -> bool:
  """Whether a component's coarse grid [R+1]^3 gets a refined band."""
  if fine_resolution is None or fine_resolution == resolution:
    return False
  return bool(np.all(np.isfinite(coarse)) and coarse.min() < 0 < coarse.max())


def _mesh_band(coarse, band: Band, values, resolution, fine_resolution, bounds, name):
  grid = band_grid(coarse, band, values, fine_resolution // resolution)
  return _marching_cubes(grid, band.mask, band.lo, fine_resolution, bounds, name)


def extract_meshes(
    sdf_fn,
    inputs,
    resolution: int = 256,
    fine_resolution: Optional[int] = 512,
    chunk_size: int = 65536,
    bounds: float = 1.005,
    band: float = 1.0,
    dilate: int = 1,
    max_workers: Optional[int] = None,
    coarse_levels: Sequence[int] = (),
    coarse_band: float = 3.0,
    return_stats: bool = False,
    num_valid: Optional[int] = None,
):
  """One mesh per component of a batch of JAX fields.

  Two levels (coarse_levels empty): the dense coarse grid of all B components is decoded in
  [B, chunk_size] calls and their near-surface cells found on the device; the bands are
  planned on host threads (`plan_band`), and their points decoded together, packed into
  [B, chunk_size] calls of one compiled shape (`_BandQueries`) dispatched while the next
  bands are planned; each component's fine box and marching cubes run on a host thread as
  soon as its values are back, overlapping the device work of the others. The result is
  the same as extracting each component alone (bit for bit when the decoder's value at a
  query does not depend on the other rows of its call; XLA may round a batched call
  differently in the last bits). A component's last row is zero-padded, so chunk_size
  should be well below the band sizes (10^5 to 10^6 points per part at 512^3).

  Hierarchical (coarse_levels, e.g. (64,) with 256 / 512): only the first coarse level is
  decoded densely; each level's cells near the surface by the wide test (coarse_band) are
  refined to the next level (its band decoded as above, the rest upsampled, on the device),
  up to the `resolution` grid, which then goes through the two-level step. The meshes are
  the two-level ones (see the module docstring for the condition), from far fewer points.

  Args:
    sdf_fn: (inputs, queries [B, Q, 3]) -> sdf [B, Q], JAX-traceable (negative inside). Pass
      a `jax.tree_util.Partial` to give parameters as traced arguments (see `vae_sdf_fn`).
      It is also called on rows of inputs gathered by component, [K, ...] for K <= B.
    inputs: pytree with leading dim B (e.g. latents [B, L, C] or decoder features).
    resolution: cells per axis of the grid the final band is refined from (decoded densely
      unless coarse_levels are given).
    fine_resolution: cells per axis of the refined band (a multiple of resolution), or None
      to mesh the `resolution` grid.
    chunk_size: queries per component row of a decoder call (static; B * chunk_size points
      per call).
    bounds: half extent of the grid cube.
    band, dilate: refined band = cells with a sign change or |sdf| < band * spacing of the
      `resolution` grid, dilated by `dilate` cells (`dilate` also at the coarse levels).
    max_workers: host threads for band planning and marching cubes (default: min(B, CPU
      count, 8)).
    coarse_levels: increasing resolutions below `resolution`, each dividing the next and the
      last dividing `resolution`; the first is decoded densely. Empty: two levels.
    coarse_band: the |sdf| threshold of the coarse levels' test in units of that level's
      spacing (>= band; see the module docstring for the choice of 3).
    return_stats: also return the decoded point counts (below).
    num_valid: only the first num_valid components are real (default: all B); the others
      are padding that keeps the batch at a shape already compiled: they take part in the
      dense first level (each row's values depend on its own inputs only) and nothing
      after it (no band, no mesh, no warning), and no mesh is returned for them.
  Returns:
    list of B (num_valid) `trimesh.Trimesh` in world units (empty meshes, each with an
    `EmptyFieldWarning`, for empty or degenerate fields); with return_stats, (meshes,
    stats): stats["levels"] the grids decoded in turn, stats["decoded_points"] the points
    decoded at each (all components), stats["decoder_queries"] the queries the decoder ran
    at each (with the zero padding of the [B, chunk] calls).
  Warns:
    BandEscapeWarning: a component's band at some level reaches past the points decoded
      from the level below (coarse_band too narrow for the field).
  Raises:
    ValueError: fine_resolution is not a multiple of resolution, the levels do not divide
      one another, or coarse_band < band.
  """
  levels = check_levels(coarse_levels, resolution, fine_resolution, band, coarse_band)
  spacing = lambda r: 2.0 * bounds / r
  dense_chunk = int(min(chunk_size, (levels[0] + 1) ** 3))
  grid = _dense_grid_on_device(sdf_fn, inputs, levels[0], bounds, chunk_size)
  num = grid.shape[0] if num_valid is None else int(num_valid)
  if not 0 <= num <= grid.shape[0]:
    raise ValueError(f"num_valid={num_valid}: must be in 0..{grid.shape[0]} (the batch)")
  names = [f"component {b}" for b in range(num)]
  stats = {
      "levels": list(levels[:1]),
      "decoded_points": [grid.shape[0] * (levels[0] + 1) ** 3],
      "decoder_queries": [
          grid.shape[0] * dense_chunk * -(-((levels[0] + 1) ** 3) // dense_chunk)
      ],
  }
  workers = max_workers or min(num, os.cpu_count() or 1, 8)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    parent = None  # (refined cells, resolution) of the level below the current grid
    for lower, upper in zip(levels, levels[1:]):
      cells = _near_surface_on_device(
          grid, threshold=coarse_band * spacing(lower), dilate=int(dilate)
      )
      if parent is not None:
        _warn_escapes(cells, parent, lower, coarse_band, names)
      grid, queries = _refine_level(
          sdf_fn, inputs, grid, cells, lower, upper, bounds, chunk_size, pool, num
      )
      stats["levels"].append(upper)
      stats["decoded_points"].append(queries.points)
      stats["decoder_queries"].append(queries.padded_queries)
      parent = (cells, lower)
    refines = fine_resolution is not None and fine_resolution != resolution
    cells = None
    if refines or parent is not None:
      cells = _near_surface_on_device(
          grid, threshold=band * spacing(resolution), dilate=int(dilate)
      )
    if parent is not None:
      _warn_escapes(cells, parent, resolution, coarse_band, names)
    coarse = np.asarray(grid)
    futures: list[Any] = [None] * num
    refined = [b for b in range(num) if _refines(coarse[b], fine_resolution, resolution)]
    for b in set(range(num)) - set(refined):
      futures[b] = pool.submit(_coarse_only, coarse[b], resolution, bounds, names[b])
    if refines:
      fine_points = (fine_resolution + 1) ** 3
      rows = grid.shape[0]  # padding rows included: one compiled shape per batch size
      queries = _BandQueries(sdf_fn, inputs, rows, int(min(chunk_size, fine_points)))
      if refined:
        cells = np.asarray(cells)
        planned = {b: pool.submit(plan_band, cells[b], fine_resolution, bounds) for b in refined}
        bands = {}
        for b in refined:  # in order: the device decodes band b while b + 1.. are planned
          bands[b] = planned.pop(b).result()
          queries.add(b, bands[b].points)
        queries.flush()
        for b in refined:
          futures[b] = pool.submit(
              _mesh_band,
              coarse[b],
              bands.pop(b),
              queries.values(b),
              resolution,
              fine_resolution,
              bounds,
              names[b],
          )
      stats["levels"].append(fine_resolution)
      stats["decoded_points"].append(queries.points)
      stats["decoder_queries"].append(queries.padded_queries)
    meshes = [f.result() for f in futures]
  return (meshes, stats) if return_stats else meshes


def extract_mesh_from_fn(
    fn: Callable[[Any], Any],
    resolution: int = 256,
    fine_resolution: Optional[int] = 512,
    chunk_size: int = 262144,
    bounds: float = 1.005,
    band: float = 1.0,
    dilate: int = 1,
    return_grid: bool = False,
    coarse_levels: Sequence[int] = (),
    coarse_band: float = 3.0,
):
  """Mesh of a plain SDF callable: points [N, 3] float32 numpy -> values [N] (numpy or JAX).

  Same grids, coarse-to-fine and hierarchical schemes as `extract_meshes` (on the host).
  With return_grid=True also returns (values, mask) of the grid that was meshed (mask None
  for a grid meshed whole).
  Raises ValueError for levels that do not divide one another or coarse_band < band.
  """
  levels = check_levels(coarse_levels, resolution, fine_resolution, band, coarse_band)
  total = (levels[0] + 1) ** 3
  coarse = np.concatenate(
      [
          _eval_points_numpy(
              fn,
              grid_coordinates(np.arange(s, min(s + chunk_size, total)), levels[0], bounds),
              chunk_size,
          )
          for s in range(0, total, chunk_size)
      ]
  ).reshape((levels[0] + 1,) * 3)
  parent = None
  for lower, upper in zip(levels, levels[1:]):
    cells = near_surface_cells(coarse, lower, bounds, coarse_band, dilate)
    if parent is not None:
      _warn_escapes(cells[None], parent, lower, coarse_band, ["field"])
    fine = _upsample_linear(coarse, upper // lower)
    if np.all(np.isfinite(coarse)) and cells.any():
      b = plan_band(cells, upper, bounds)
      fine[tuple(b.ijk.T)] = _eval_points_numpy(fn, b.points, chunk_size)
    coarse, parent = fine, (cells[None], lower)
  if parent is not None and np.all(np.isfinite(coarse)):
    cells = near_surface_cells(coarse, resolution, bounds, band, dilate)
    _warn_escapes(cells[None], parent, resolution, coarse_band, ["field"])
  if not _refines(coarse, fine_resolution, resolution):
    mesh = _coarse_only(coarse, resolution, bounds, "field")
    return (mesh, coarse, None) if return_grid else mesh
  b = plan_band(
      near_surface_cells(coarse, resolution, bounds, band, dilate), fine_resolution, bounds
  )
  values = _eval_points_numpy(fn, b.points, chunk_size)
  mesh = _mesh_band(coarse, b, values, resolution, fine_resolution, bounds, "field")
  if not return_grid:
    return mesh
  return (mesh, *_full_grid(coarse, b, values, fine_resolution // resolution))


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


def extract_vae_meshes(model, params, latents, **kwargs):
  """Latents [B, L, C] -> B meshes: runs the decoder's self-attention once per component,
  then `extract_meshes` over the query cross-attention (kwargs and return value as there:
  with return_stats, (meshes, stats); num_valid=M meshes only the first M latents, the
  rest being padding to a batch size already compiled). Build the model with a
  FrozenConfigDict config so that repeated calls reuse the compiled functions."""
  features = _fns(model)[1](params, latents)
  return extract_meshes(vae_sdf_fn(model, params), features, **kwargs)
