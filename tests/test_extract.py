"""Mesh extraction: analytic spheres, coarse-to-fine against the dense fine grid, bad fields."""

import jax.numpy as jnp
import numpy as np
import pytest

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
  sign_change = (extract._cell_corner_reduce(fine_d, np.minimum) <= 0) & (
      extract._cell_corner_reduce(fine_d, np.maximum) >= 0
  )
  corners_in_band = extract._cell_corner_reduce(mask, np.logical_and)
  assert sign_change.sum() > 1000 and np.all(corners_in_band[sign_change])
  assert mask.mean() < 0.5  # the point of the scheme: most of the fine grid is not decoded
  # so the meshes are the same triangles
  assert len(mesh_cf.faces) == len(mesh_d.faces)
  np.testing.assert_allclose(
      np.sort(mesh_cf.vertices, axis=0), np.sort(mesh_d.vertices, axis=0), atol=1e-6
  )
  np.testing.assert_allclose(mesh_cf.area, mesh_d.area, rtol=1e-9)


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
