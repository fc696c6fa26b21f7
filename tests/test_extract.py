"""Mesh extraction: analytic spheres, coarse-to-fine against the dense fine grid, hierarchical
levels against two levels, bad fields."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage  # the reference dilation

from moca_jax import extract


def _sphere(center, radius):
  c = np.asarray(center, np.float32)
  return lambda p: np.linalg.norm(np.asarray(p) - c, axis=-1) - radius


def _torus(p, major=0.55, minor=0.2):
  p = np.asarray(p)
  q = np.stack([np.linalg.norm(p[:, [0, 2]], axis=-1) - major, p[:, 1]], axis=-1)
  return np.linalg.norm(q, axis=-1) - minor


@pytest.mark.parametrize("resolution,fine", [(96, None), (48, 96)])
def test_sphere_area_and_volume_within_one_percent(resolution, fine):
  r = 0.6
  mesh = extract.extract_mesh_from_fn(_sphere([0.1, -0.05, 0.2], r), resolution, fine)
  assert mesh.is_watertight
  np.testing.assert_allclose(mesh.area, 4 * np.pi * r**2, rtol=0.01)
  np.testing.assert_allclose(mesh.volume, 4 / 3 * np.pi * r**3, rtol=0.01)  # > 0: outward
  np.testing.assert_allclose(mesh.centroid, [0.1, -0.05, 0.2], atol=0.01)


def test_coarse_to_fine_equals_dense_fine_grid_near_surface():
  mesh_cf, fine_cf, mask = extract.extract_mesh_from_fn(_torus, 24, 96, return_grid=True)
  mesh_d, fine_d, _ = extract.extract_mesh_from_fn(_torus, 96, None, return_grid=True)
  # the band holds exactly the dense values ...
  np.testing.assert_allclose(fine_cf[mask], fine_d[mask], rtol=0, atol=1e-6)
  # ... and covers every fine cell the surface passes through
  sign_change = extract._cell_any(fine_d <= 0) & extract._cell_any(fine_d >= 0)
  corners_in_band = ~extract._cell_any(~mask)
  assert sign_change.sum() > 1000 and np.all(corners_in_band[sign_change])
  assert mask.mean() < 0.5  # the point of the scheme: most of the fine grid is not decoded
  # so the meshes are the same triangles
  assert len(mesh_cf.faces) == len(mesh_d.faces)
  np.testing.assert_allclose(
      np.sort(mesh_cf.vertices, axis=0), np.sort(mesh_d.vertices, axis=0), atol=1e-6
  )
  # (rtol: the band is meshed in its box, whose smaller indices round differently in float32)
  np.testing.assert_allclose(mesh_cf.area, mesh_d.area, rtol=1e-7)


def test_extract_meshes_batch_of_jax_fields_with_empty_component():
  def sdf_fn(spheres, queries):  # spheres [B, 4] = centre, radius
    return jnp.linalg.norm(queries - spheres[:, None, :3], axis=-1) - spheres[:, None, 3]

  spheres = jnp.array([[0.0, 0.0, 0.0, 0.5], [0.3, -0.2, 0.1, 0.25], [0.0, 0.0, 0.0, 5.0]])
  with pytest.warns(extract.EmptyFieldWarning, match="component 2"):
    meshes = extract.extract_meshes(
        sdf_fn, spheres, resolution=48, fine_resolution=96, chunk_size=5000
    )
  assert len(meshes) == 3 and len(meshes[2].faces) == 0
  for mesh, (x, y, z, r) in zip(meshes[:2], np.asarray(spheres[:2])):
    np.testing.assert_allclose(mesh.volume, 4 / 3 * np.pi * r**3, rtol=0.01)
    np.testing.assert_allclose(mesh.centroid, [x, y, z], atol=0.01)
  # the same as extracting each field alone from a numpy callable
  alone = extract.extract_mesh_from_fn(_sphere([0.3, -0.2, 0.1], 0.25), 48, 96)
  np.testing.assert_allclose(np.sort(meshes[1].vertices, 0), np.sort(alone.vertices, 0), atol=1e-5)


def test_degenerate_fields_give_empty_meshes_with_warning():
  with pytest.warns(extract.EmptyFieldWarning, match="non-finite"):
    m = extract.extract_mesh_from_fn(lambda p: np.full(len(p), np.nan), 8, 16)
  assert len(m.faces) == 0 and len(m.vertices) == 0
  with pytest.warns(extract.EmptyFieldWarning, match="no zero crossing"):
    m = extract.extract_mesh_from_fn(lambda p: np.ones(len(p)), 8, None)
  assert len(m.faces) == 0
  with pytest.raises(ValueError, match="multiple"):
    extract.extract_mesh_from_fn(_sphere([0, 0, 0], 0.5), 10, 25)
  # the same with coarse levels: nothing refined, the same warnings
  with pytest.warns(extract.EmptyFieldWarning, match="non-finite"):
    m = extract.extract_mesh_from_fn(lambda p: np.full(len(p), np.nan), 8, 16, coarse_levels=(2,))
  assert len(m.faces) == 0
  with pytest.warns(extract.EmptyFieldWarning, match="no zero crossing"):
    m = extract.extract_mesh_from_fn(lambda p: np.ones(len(p)), 8, 16, coarse_levels=(4,))
  assert len(m.faces) == 0
  nan_one = lambda q, p: jnp.where(q[:, None, 0] > 0, jnp.nan, jnp.linalg.norm(p, axis=-1) - 0.5)
  with pytest.warns(extract.EmptyFieldWarning, match="component 1: the field has non-finite"):
    meshes = extract.extract_meshes(
        nan_one, jnp.array([[0.0], [1.0]]), 16, 32, chunk_size=999, coarse_levels=(4,)
    )
  assert len(meshes[0].faces) > 100 and len(meshes[1].faces) == 0


# ---- batched band refinement == the per-component path ------------------------------------


def _old_near_surface_cells(coarse, resolution, bounds, band=1.0, dilate=1):
  """The band's definition by corner min / max over each cell's 8 corners (the reference)."""
  n = coarse.shape[0]
  corners = [
      coarse[i : n - 1 + i, j : n - 1 + j, k : n - 1 + k]
      for i in (0, 1)
      for j in (0, 1)
      for k in (0, 1)
  ]
  cmin, cmax = np.min(corners, axis=0), np.max(corners, axis=0)
  amin = np.min(np.abs(corners), axis=0)
  cells = ((cmin <= 0) & (cmax >= 0)) | (amin < band * (2.0 * bounds / resolution))
  return scipy.ndimage.binary_dilation(cells, iterations=dilate) if dilate else cells


def _per_component_meshes(sdf_fn, inputs, resolution, fine_resolution, chunk, bounds=1.005):
  """One component after another, the whole fine grid each (extraction before batching):
  the band decoded in [1, chunk] calls of that component alone."""
  one_fn = jax.jit(lambda inp, pts: sdf_fn(inp, pts[None])[0])
  coarse = extract.decode_dense_grid(sdf_fn, inputs, resolution, bounds, chunk)
  meshes, band_sizes = [], []
  for b, c in enumerate(coarse):
    if not c.min() < 0 < c.max():
      meshes.append(None)
      band_sizes.append(0)
      continue
    factor = fine_resolution // resolution
    mask = extract._fine_point_mask(_old_near_surface_cells(c, resolution, bounds), factor)
    idx = np.flatnonzero(mask)
    pts = extract.grid_coordinates(idx, fine_resolution, bounds)
    one = jax.tree_util.tree_map(lambda x, b=b: x[b : b + 1], inputs)
    size = min(chunk, len(pts))
    padded = np.concatenate([pts, np.zeros((-len(pts) % size, 3), np.float32)])
    values = np.concatenate(
        [np.asarray(one_fn(one, padded[s : s + size])) for s in range(0, len(padded), size)]
    )[: len(pts)]
    fine = extract._upsample_linear(c, factor)
    fine.reshape(-1)[idx] = values
    meshes.append(extract.mesh_from_grid(fine, fine_resolution, bounds, mask=mask))
    band_sizes.append(len(idx))
  return meshes, band_sizes


def _assert_same_meshes(batched, reference, vertex_atol=0.0):
  for got, want in zip(batched, reference, strict=True):
    if want is None:
      assert len(got.faces) == 0 and len(got.vertices) == 0
    else:
      assert len(want.faces) > 100
      np.testing.assert_array_equal(got.faces, want.faces)
      np.testing.assert_allclose(got.vertices, want.vertices, rtol=0, atol=vertex_atol)


def _spheres_fn(spheres, queries):  # spheres [B, 4] = centre, radius
  return jnp.linalg.norm(queries - spheres[:, None, :3], axis=-1) - spheres[:, None, 3]


def test_batched_band_equals_per_component_path_analytic_field():
  spheres = jnp.array(
      [
          [0.1, 0.0, -0.1, 0.6],  # large band
          [0.3, -0.2, 0.1, 0.2],  # small band
          [0.0, 0.0, 0.0, -0.5],  # empty: positive everywhere
          [0.0, 0.0, 0.0, 5.0],  # no sign change: negative everywhere
      ]
  )
  cache_before = extract._rows_chunk._cache_size()
  with pytest.warns(extract.EmptyFieldWarning) as record:
    meshes = extract.extract_meshes(
        _spheres_fn, spheres, resolution=16, fine_resolution=48, chunk_size=1531
    )
  assert sorted(str(w.message).split(":")[0] for w in record) == ["component 2", "component 3"]
  # one compiled [B, chunk] shape for every packed call (several per component here)
  assert extract._rows_chunk._cache_size() == cache_before + 1
  reference, band_sizes = _per_component_meshes(_spheres_fn, spheres, 16, 48, 1531)
  assert band_sizes[0] > 3 * band_sizes[1] > 3 * 1531 and band_sizes[2:] == [0, 0]
  _assert_same_meshes(meshes, reference)


def test_batched_band_equals_per_component_path_tiny_vae():
  from flax.linen import meta

  from moca_jax.vae import VecSetVAE, init_vae, vae_config

  model = VecSetVAE(vae_config("tiny"))
  params = meta.unbox(init_vae(model, jax.random.PRNGKey(0), num_points=64))
  shape = (3, model.config.num_latents, model.config.latent_channels)
  latents = jax.random.normal(jax.random.PRNGKey(1), shape)
  features = model.apply(params, latents, method=VecSetVAE.decode_features)

  def field(params, inputs, queries):  # a random decoder on top of spheres of given radii
    features, radius = inputs
    out = model.apply(params, features, queries, method=VecSetVAE.query_sdf)
    return jnp.linalg.norm(queries, axis=-1) - radius[:, None] + 0.02 * out

  sdf_fn = jax.tree_util.Partial(field, params)
  inputs = (features, jnp.array([0.7, 0.3, -0.3]))  # the last: no surface
  with pytest.warns(extract.EmptyFieldWarning, match="component 2"):
    meshes = extract.extract_meshes(
        sdf_fn, inputs, resolution=12, fine_resolution=36, chunk_size=700
    )
  reference, band_sizes = _per_component_meshes(sdf_fn, inputs, 12, 36, 700)
  assert band_sizes[0] > band_sizes[1] > 700 and band_sizes[2] == 0
  # XLA's decoder rounds a query's value differently in a [3, chunk] call than in a [1, chunk]
  # one (last bits, ~1e-6), which moves vertices by as much; the triangles are the same
  _assert_same_meshes(meshes, reference, vertex_atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_near_surface_cells_equals_corner_min_max(seed):
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=(9, 9, 9)).astype(np.float32) + rng.uniform(-1, 1)
  np.testing.assert_array_equal(
      extract.near_surface_cells(coarse, 8, 1.0, band=0.5, dilate=seed),
      _old_near_surface_cells(coarse, 8, 1.0, band=0.5, dilate=seed),
  )


def test_band_box_upsampling_is_the_full_upsampling_cropped():
  coarse = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
  full = extract._upsample_linear(coarse, 3)
  assert full.shape == (19, 16, 13)
  for lo, hi in [((0, 0, 0), (19, 16, 13)), ((4, 3, 6), (11, 16, 7)), ((18, 0, 12), (19, 2, 13))]:
    np.testing.assert_array_equal(
        extract._upsample_linear(coarse, 3, lo, hi), full[tuple(map(slice, lo, hi))]
    )


def test_near_surface_cells_on_device_equal_host():
  rng = np.random.default_rng(3)
  scales = np.float32([0.3, 1.0, 3.0])[:, None, None, None]  # few, some, all cells near
  coarse = rng.normal(size=(3, 11, 11, 11)).astype(np.float32) * scales
  for dilate in (0, 1, 2):
    on_device = extract._near_surface_on_device(jnp.asarray(coarse), threshold=0.4, dilate=dilate)
    for b in range(3):
      np.testing.assert_array_equal(
          np.asarray(on_device[b]), _old_near_surface_cells(coarse[b], 10, 2.0, 1.0, dilate)
      )


def test_coarse_only_batch_equals_marching_cubes_of_the_dense_grid():
  spheres = jnp.array([[0.0, 0.1, 0.0, 0.5], [0.3, -0.2, 0.1, 0.3]])
  meshes = extract.extract_meshes(_spheres_fn, spheres, resolution=20, fine_resolution=None)
  grids = extract.decode_dense_grid(_spheres_fn, spheres, 20)
  for mesh, grid in zip(meshes, grids, strict=True):
    want = extract.mesh_from_grid(grid, 20)
    assert len(want.faces) > 100
    np.testing.assert_array_equal(mesh.faces, want.faces)
    np.testing.assert_array_equal(mesh.vertices, want.vertices)


# ---- hierarchical levels == two levels at the same final resolution -----------------------
# The tests run the scheme (dense 64^3 -> band 256^3 -> band 512^3: factors 4 then 2)
# scaled down by 4: dense 16^3 -> band 64^3 -> band 128^3, so every shape below has the same
# size in units of each level's spacing as it would have at full scale.

_H0 = 2.01 / 16  # spacing of the 16^3 level (bounds 1.005)


def _plate(p, centre=(0.03, 0.5 * _H0, 0.05), half=(0.5, 0.012, 0.4)):
  """A box 0.024 thick (a fifth of the 16^3 spacing, under the 64^3 one) midway between two
  planes of 16^3 grid points: no 16^3 point is inside it."""
  q = np.abs(np.asarray(p, np.float64) - np.asarray(centre)) - np.asarray(half)
  return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)


def _tilted_plate(p, angle=0.15):
  c, s = np.cos(angle), np.sin(angle)
  return _plate(np.asarray(p, np.float64) @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]]))


class _Counting:
  """An SDF callable that counts the points it is asked for."""

  def __init__(self, fn):
    self.fn, self.points = fn, 0

  def __call__(self, p):
    self.points += len(p)
    return self.fn(p)


def _assert_identical(got, want):
  assert len(want.faces) > 1000
  np.testing.assert_array_equal(got.faces, want.faces)
  np.testing.assert_array_equal(got.vertices, want.vertices)


@pytest.mark.parametrize("coarse_levels,fine", [((16,), 128), ((8, 32), 128), ((16,), None)])
@pytest.mark.parametrize(
    "field", [_sphere([0.1, -0.05, 0.2], 0.6), _torus, _plate], ids=["sphere", "torus", "plate"]
)
def test_hierarchical_equals_two_level_on_analytic_fields(field, coarse_levels, fine):
  two, multi = _Counting(field), _Counting(field)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no BandEscapeWarning either
    want = extract.extract_mesh_from_fn(two, 64, fine, chunk_size=50000)
    got = extract.extract_mesh_from_fn(
        multi, 64, fine, chunk_size=50000, coarse_levels=coarse_levels
    )
  # the same triangles, bit for bit: the 64^3 cells the 128^3 band refines are the same, and
  # every value marching cubes reads is the same float32 (decoded, or upsampled from the same
  # decoded 64^3 values); without the band, the cells with a sign change are decoded ones
  _assert_identical(got, want)
  # fewer points, though at these sizes the coarse test's band (3 x 0.126 wide) covers much
  # of the 64^3 grid (see the batch test for counts)
  assert multi.points < two.points


def test_thin_plate_between_coarse_grid_points_is_found():
  dense16 = _plate(extract.grid_coordinates(np.arange(17**3), 16, 1.005))
  assert dense16.min() > 0.04  # the 16^3 grid alone has no point inside the plate ...
  mesh = extract.extract_mesh_from_fn(_plate, 64, 128, coarse_levels=(16,))
  # ... but its |sdf| test refines around it: both faces of the plate, 1.0 x 0.8
  # (marching cubes rounds the rims, 1.5 cells thick at 128^3, off: a few percent less)
  np.testing.assert_allclose(mesh.area, 2 * 1.0 * 0.8 + 2 * 0.024 * 1.8, rtol=0.04)
  np.testing.assert_allclose(mesh.volume, 1.0 * 0.8 * 0.024, rtol=0.04)


def test_too_narrow_coarse_band_misses_surface_and_warns():
  # 10x an SDF (|grad| = 10): the default margin (3 coarse spacings) still holds, 1 does not
  steep = lambda p: 10.0 * _tilted_plate(p)
  want = extract.extract_mesh_from_fn(steep, 64, 128)
  with pytest.warns(extract.BandEscapeWarning, match="field: the band refined at 64\\^3"):
    holed = extract.extract_mesh_from_fn(steep, 64, 128, coarse_levels=(16,), coarse_band=1.0)
  assert 0 < len(holed.faces) < 0.8 * len(want.faces)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = extract.extract_mesh_from_fn(steep, 64, 128, coarse_levels=(16,), coarse_band=8.0)
  _assert_identical(got, want)


def _shapes_fn(params, queries):
  """params [B, 8]: kind (0 sphere, 1 plate, 2 torus), centre, three sizes; queries [B, Q, 3]."""
  kind, centre, size = params[:, None, 0], params[:, None, 1:4], params[:, None, 4:7]
  p = queries - centre
  sphere = jnp.linalg.norm(p, axis=-1) - size[..., 0]
  q = jnp.abs(p) - size
  box = jnp.linalg.norm(jnp.maximum(q, 0), axis=-1) + jnp.minimum(q.max(-1), 0)
  ring = jnp.linalg.norm(p[..., ::2], axis=-1) - size[..., 0]
  torus = jnp.sqrt(ring**2 + p[..., 1] ** 2) - size[..., 1]
  return jnp.where(kind == 0, sphere, jnp.where(kind == 1, box, torus))


def test_hierarchical_batch_equals_two_level_batch_and_decodes_fewer_points():
  params = jnp.array(
      [
          [0, 0.1, 0.0, -0.1, 0.6, 0, 0, 0],  # sphere
          [1, 0.03, 0.5 * _H0, 0.05, 0.5, 0.012, 0.4, 0],  # thin plate between 16^3 points
          [2, 0.0, 0.1, 0.0, 0.55, 0.2, 0, 0],  # torus
          [0, 0.3, -0.2, 0.1, 0.2, 0, 0, 0],  # small sphere
          [0, 0.0, 0.0, 0.0, -0.5, 0, 0, 0],  # empty: positive everywhere
          [0, 0.0, 0.0, 0.0, 5.0, 0, 0, 0],  # no sign change: negative everywhere
      ],
      jnp.float32,
  )
  kwargs = dict(resolution=64, fine_resolution=128, chunk_size=4099, return_stats=True)
  with pytest.warns(extract.EmptyFieldWarning) as record:
    want, two = extract.extract_meshes(_shapes_fn, params, **kwargs)
  with pytest.warns(extract.EmptyFieldWarning) as record_h:
    got, multi = extract.extract_meshes(_shapes_fn, params, coarse_levels=(16,), **kwargs)
  for r in (record, record_h):
    assert sorted(str(w.message).split(":")[0] for w in r) == ["component 4", "component 5"]
  for g, w in zip(got, want, strict=True):
    if len(w.faces):
      _assert_identical(g, w)
    else:
      assert len(g.faces) == 0
  assert two["levels"] == [64, 128] and multi["levels"] == [16, 64, 128]
  assert two["decoded_points"][0] == 6 * 65**3 and multi["decoded_points"][0] == 6 * 17**3
  assert multi["decoded_points"][2] == two["decoded_points"][1]  # the same final band
  # (about half at these sizes; a 16-part object at 64 -> 256 -> 512: see the module docstring)
  assert sum(multi["decoded_points"]) < 0.6 * sum(two["decoded_points"])
  # the counts are the points each component's field is asked for on the host path
  hosted = 0
  for b in range(4):
    fn = _Counting(lambda p, b=b: np.asarray(_shapes_fn(params[b : b + 1], p[None]))[0])
    extract.extract_mesh_from_fn(fn, 64, 128, coarse_levels=(16,))
    hosted += fn.points - 17**3
  assert hosted == sum(multi["decoded_points"][1:])
  assert all(q >= p for q, p in zip(multi["decoder_queries"], multi["decoded_points"]))


def test_three_coarse_levels_batch_equals_two_level_batch():
  spheres = jnp.array([[0.1, 0.0, -0.1, 0.6], [0.3, -0.2, 0.1, 0.2], [0.0, 0.0, 0.0, -0.5]])
  kwargs = dict(resolution=32, fine_resolution=64, chunk_size=2000, return_stats=True)
  with pytest.warns(extract.EmptyFieldWarning, match="component 2"):
    want, two = extract.extract_meshes(_spheres_fn, spheres, **kwargs)
  with pytest.warns(extract.EmptyFieldWarning, match="component 2") as record:
    got, multi = extract.extract_meshes(_spheres_fn, spheres, coarse_levels=(2, 4, 16), **kwargs)
  assert [w.category for w in record] == [extract.EmptyFieldWarning]  # no band escapes
  assert multi["levels"] == [2, 4, 16, 32, 64] and multi["decoded_points"][0] == 3 * 3**3
  assert multi["decoded_points"][-1] == two["decoded_points"][-1]
  for g, w in zip(got[:2], want[:2], strict=True):
    np.testing.assert_array_equal(g.faces, w.faces)
    np.testing.assert_array_equal(g.vertices, w.vertices)
  assert len(want[1].faces) > 1000 and len(got[2].faces) == 0


def test_upsampling_on_device_equals_host():
  grids = np.random.default_rng(4).normal(size=(2, 5, 6, 4)).astype(np.float32)
  on_device = np.asarray(extract._upsample_on_device(jnp.asarray(grids), factor=3))
  for grid, up in zip(grids, on_device, strict=True):
    # (XLA may contract the interpolation into fused multiply-adds: last bits differ)
    np.testing.assert_allclose(up, extract._upsample_linear(grid, 3), rtol=0, atol=1e-5)


def test_cube_dilation_equals_scipy():
  cells = np.random.default_rng(5).uniform(size=(2, 7, 6, 5)) < 0.05
  for b in range(2):
    np.testing.assert_array_equal(
        extract._dilate_cube(cells, np)[b],
        scipy.ndimage.binary_dilation(cells[b], structure=np.ones((3, 3, 3), bool)),
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(coarse_levels=(24,)), "coarse_levels=(24,) with resolution=64: each level must"),
        (dict(coarse_levels=(32, 16)), "each level must be a positive proper divisor"),
        (dict(coarse_levels=(64,)), "each level must be a positive proper divisor"),
        (dict(coarse_levels=(16,), coarse_band=0.5), "coarse_band=0.5 must be >= band=1.0"),
        (dict(fine_resolution=100), "fine_resolution=100 must be a multiple of resolution=64"),
    ],
)
def test_bad_levels_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    extract.extract_mesh_from_fn(_torus, **{"resolution": 64, "fine_resolution": 128, **kwargs})
  with pytest.raises(ValueError, match=re.escape(message)):
    extract.extract_meshes(
        _spheres_fn, jnp.ones((1, 4)), **{"resolution": 64, "fine_resolution": 128, **kwargs}
    )


@pytest.mark.parametrize("coarse_levels", [(), (8,)])
def test_padding_rows_change_nothing_and_are_not_meshed(coarse_levels):
  """num_valid: rows past it are padding (a fixed batch shape, compiled once); the real
  rows' meshes are those of the unpadded batch, and padding gets no band, mesh or warning."""
  real = jnp.array([[0.1, 0.0, -0.1, 0.6], [0.3, -0.2, 0.1, 0.2]])
  # padding rows with a surface (would be refined and meshed) and without (would warn)
  padding = jnp.array([[0.0, 0.0, 0.0, 0.4], [0.0, 0.0, 0.0, 5.0]])
  kwargs = dict(resolution=16, fine_resolution=32, chunk_size=1531, coarse_levels=coarse_levels,
                return_stats=True)
  want, ws = extract.extract_meshes(_spheres_fn, real, **kwargs)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no EmptyFieldWarning / BandEscapeWarning for padding
    got, gs = extract.extract_meshes(
        _spheres_fn, jnp.concatenate([real, padding]), num_valid=2, **kwargs
    )
  assert len(got) == 2 and all(len(w.faces) > 100 for w in want)
  _assert_same_meshes(got, want)
  # only the dense first level decodes the padding rows
  assert gs["decoded_points"][0] == 2 * ws["decoded_points"][0]
  assert gs["decoded_points"][1:] == ws["decoded_points"][1:]
  with pytest.raises(ValueError, match="num_valid"):
    extract.extract_meshes(_spheres_fn, real, num_valid=3, resolution=8, fine_resolution=None)
