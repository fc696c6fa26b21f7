"""CPU ray-cast renders (trimesh + embreex): shaded per-component colours on white + id masks.

  render_views(sample_meshes, colors, cameras, size=224, background=()) ->
      rgb [V,H,W,3] uint8, ids [V,H,W] uint8 (0 = nothing / background geometry,
      i + 1 = component i: a part of an object, an instance of a scene)
  material_colors(kind, part_colors, rng) -> [N,3] uint8: the colours condition renders use
                                              (one material per object)
  object_cameras(rng, n, radius) -> [Camera]  random views on a sphere around the object
  scene_cameras(rng, n) -> [Camera]           isometric orthographic views (random corners)
  save_png(path, rgb), preview(rgb, ids) -> [H, 2W, 3] uint8 (render | colourised ids)

Conventions: +y up; a Camera is a 4x4 camera-to-world matrix (OpenGL: the camera looks down its
-z axis, +y up in the image) plus either a vertical field of view (perspective) or an
orthographic half-height. Shading: Lambert with a key light from the upper left of the camera
plus ambient, two-sided. Background geometry (scene floor and walls) is drawn but gets id 0;
for scene views only the walls on the far side of the room (seen from the camera) are kept so
they never hide furniture.
"""
from __future__ import annotations

import dataclasses
import io
from typing import List, Optional, Sequence

import numpy as np
import trimesh
from PIL import Image

from moca_jax import io as mio

ISO_ELEVATION = float(np.degrees(np.arctan(1.0 / np.sqrt(2.0))))  # 35.26 deg


@dataclasses.dataclass(frozen=True)
class Camera:
  cam_to_world: np.ndarray  # [4,4]
  fov_deg: float = 40.0  # perspective when ortho_half_height is None
  ortho_half_height: Optional[float] = None

  def as_array(self) -> np.ndarray:
    """[18] float32: 16 matrix entries, fov_deg, ortho_half_height (0 = perspective)."""
    return np.concatenate([self.cam_to_world.reshape(-1),
                           [self.fov_deg, self.ortho_half_height or 0.0]]).astype(np.float32)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
  """4x4 camera-to-world matrix for a camera at `eye` looking at `target`."""
  eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
  f = target - eye
  f /= np.linalg.norm(f)
  if abs(np.dot(f, up)) > 0.999:
    up = np.array([0.0, 0.0, 1.0])
  r = np.cross(f, up)
  r /= np.linalg.norm(r)
  u = np.cross(r, f)
  m = np.eye(4)
  m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = r, u, -f, eye
  return m


def _direction(azimuth_deg, elevation_deg):
  a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
  return np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])


def object_cameras(rng: np.random.Generator, n: int, radius: float = 1.0,
                   fov_deg: float = 40.0, elevation=(5.0, 40.0)) -> List[Camera]:
  """n perspective cameras at random azimuth / elevation, framing a ball of `radius`."""
  dist = radius * 1.08 / np.sin(np.radians(fov_deg) / 2)
  cams = []
  for _ in range(n):
    d = _direction(rng.uniform(0, 360), rng.uniform(*elevation))
    cams.append(Camera(look_at(d * dist), fov_deg=fov_deg))
  return cams


def scene_cameras(rng: np.random.Generator, n: int, half_height: float = 1.25) -> List[Camera]:
  """n isometric orthographic cameras from random room corners (distinct while n <= 4)."""
  corners = rng.permutation(4)
  cams = []
  for i in range(n):
    az = 45.0 + 90.0 * corners[i % 4]
    d = _direction(az, ISO_ELEVATION)
    cams.append(Camera(look_at(d * 4.0), ortho_half_height=half_height))
  return cams


def _rays(cam: Camera, size: int):
  """Ray origins and unit directions [size*size, 3], row-major from the image top."""
  c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
  x, y = np.meshgrid(c, -c)  # image y points down
  m = cam.cam_to_world
  rot, eye = m[:3, :3], m[:3, 3]
  if cam.ortho_half_height is None:
    t = np.tan(np.radians(cam.fov_deg) / 2)
    d = np.stack([x * t, y * t, -np.ones_like(x)], -1).reshape(-1, 3) @ rot.T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(eye, d.shape).copy()
  else:
    h = cam.ortho_half_height
    local = np.stack([x * h, y * h, np.zeros_like(x)], -1).reshape(-1, 3)
    o = local @ rot.T + eye
    d = np.broadcast_to(-rot[:, 2], o.shape).copy()
  return o, d


def _keep_far_walls(background, cam: Camera):
  """Drops background meshes named 'wall*' whose centre is on the camera's side of the room."""
  eye_dir = cam.cam_to_world[:3, 2].copy()  # camera +z points back toward the eye
  eye_dir[1] = 0.0
  keep = []
  for name, mesh, color in background:
    if name.startswith("wall"):
      c = mesh.bounds.mean(0)
      floor_c = np.array([0.0, 0.0, 0.0])
      for n2, m2, _ in background:
        if n2 == "floor":
          floor_c = m2.bounds.mean(0)
      if np.dot(c - floor_c, eye_dir) > 0:
        continue
    keep.append((name, mesh, color))
  return keep


def render_views(meshes: Sequence[trimesh.Trimesh], colors: np.ndarray,
                 cameras: Sequence[Camera], size: int = 224, background=()):
  """Renders components (and render-only background) from each camera.

  Args:
    meshes: N component meshes; colors: [N,3] uint8; cameras: V cameras.
    background: (name, mesh, [3] uint8 colour) triples, id 0 in the masks.
  Returns:
    rgb [V,size,size,3] uint8 (white where no geometry), ids [V,size,size] uint8.
  """
  colors = np.asarray(colors, dtype=np.uint8)
  rgbs, idss = [], []
  for cam in cameras:
    bg = _keep_far_walls(list(background), cam)
    all_m = list(meshes) + [m for _, m, _ in bg]
    owner = np.concatenate([np.full(len(m.faces), i + 1) for i, m in enumerate(meshes)]
                           + [np.full(len(m.faces), -(j + 1)) for j, (_, m, _) in enumerate(bg)])
    pal = np.concatenate([np.zeros((1, 3), np.uint8), colors]
                         + [c[None].astype(np.uint8) for _, _, c in bg], axis=0)
    scene = trimesh.util.concatenate(all_m)
    o, d = _rays(cam, size)
    tri, ray = scene.ray.intersects_id(o, d, multiple_hits=False, return_locations=False)
    rgb = np.full((size * size, 3), 255.0)
    ids = np.zeros(size * size, dtype=np.uint8)
    if len(tri):
      own = owner[tri]
      n = scene.face_normals[tri]
      n = np.where((np.sum(n * d[ray], -1) > 0)[:, None], -n, n)  # two-sided
      cam_rot = cam.cam_to_world[:3, :3]
      light = cam_rot @ np.array([-0.4, 0.8, 0.45])
      light /= np.linalg.norm(light)
      lam = np.clip(n @ light, 0.0, 1.0)
      fill = np.clip(-(n * d[ray]).sum(-1), 0.0, 1.0)
      shade = 0.3 + 0.5 * lam + 0.2 * fill
      col_idx = np.where(own > 0, own, len(meshes) - own)  # bg j -> N + 1 + j
      rgb[ray] = pal[col_idx] * shade[:, None]
      ids[ray] = np.where(own > 0, own, 0).astype(np.uint8)
    rgbs.append(np.clip(rgb, 0, 255).astype(np.uint8).reshape(size, size, 3))
    idss.append(ids.reshape(size, size))
  return np.stack(rgbs), np.stack(idss)


def material_colors(kind: str, part_colors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The render colour of each component in the condition images, [N,3] uint8.

  A real photo does not colour an object's parts differently, so an object ('object') is
  rendered in one random material: the same colour for all its parts, drawn from `rng`.
  A scene's components are whole objects, each its own material: their `part_colors`. The
  per-part colours stay in `part_colors` for pictures (previews, colourised masks).
  """
  part_colors = np.asarray(part_colors, np.uint8)
  if kind == "scene":
    return part_colors
  from data_pipeline import procedural  # pylint: disable=g-import-not-at-top

  one = procedural.random_colors(rng, 1)
  return np.repeat(one, len(part_colors), axis=0)


def colorize_ids(ids: np.ndarray, colors: Optional[np.ndarray] = None) -> np.ndarray:
  """[H,W] ids -> [H,W,3] uint8 (0 white; i uses colors[i-1] or a fixed palette)."""
  if colors is None:
    rng = np.random.default_rng(123)
    colors = rng.integers(40, 230, size=(256, 3)).astype(np.uint8)
  pal = np.concatenate([np.full((1, 3), 255, np.uint8), np.asarray(colors, np.uint8)])
  return pal[np.clip(ids, 0, len(pal) - 1)]


def preview(rgb: np.ndarray, ids: np.ndarray, colors=None) -> np.ndarray:
  """Side by side [H, 2W, 3]: the render and its colourised id mask."""
  return np.concatenate([rgb, colorize_ids(ids, colors)], axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def save_png(path: str, rgb: np.ndarray) -> None:
  """Writes an RGB (or grey) uint8 image atomically (moca_jax.io)."""
  mio.atomic_write_bytes(path, png_bytes(rgb))
