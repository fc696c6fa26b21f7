"""Procedural part-composed objects and scenes, reproducible by seed (the built-in dataset).

Frame: +y is up (as in glTF), units are metres before normalisation. Every object is
normalised as a whole by its bounding box: centred at the origin and uniformly scaled so the
longest side spans [-EXTENT, EXTENT] (EXTENT = 0.95, inside [-1, 1]^3, leaving room for the
near-surface SDF band); parts keep their relative placement.

Objects (`make_object(category, rng)`): 13 categories built from primitives (see CATEGORIES),
2..32 parts each; every part is a `primitives.Part` (a union of primitives, exact SDF).

Scenes (`make_scene(rng, min_instances, max_instances)`): a room with 4..32 furniture
instances placed on the floor with random yaw; instances never intersect (their footprints,
the xz bounding rectangles of the rotated instances, are disjoint with a gap). Each instance is
one component (the union of all its object's parts). The floor and two walls are returned as
render-only meshes (`Sample.background`), not components: they are not objects a user asks
for, would dominate the component budget, and MIDI-style scene models generate furniture only.

Splits (`split_items(name)`): named, with disjoint seeds. The seed of item k of kind
('object' | 'scene') in split s is `SeedSequence([base_seed, crc32(s), kind_id, k])`, so two
splits never share a stream. `tiny` builds in seconds (tests, `make demo`); `small` is the
bundled-model set; `test` and `test_tiny` are held out; `val` is held out too, for choosing
settings (the sampler's CFG scale) so that `test` stays untouched by such choices.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Dict, List, Sequence

import numpy as np
import trimesh

from data_pipeline import primitives as P

EXTENT = 0.95
MAX_PARTS = 32
MIN_PARTS = 2

SPLITS: Dict[str, dict] = {
    # name: number of objects, number of scenes, instances per scene (inclusive range)
    "tiny": dict(objects=13, scenes=2, scene_instances=(4, 6)),
    "test_tiny": dict(objects=13, scenes=2, scene_instances=(4, 6)),
    # the bundled model's training set: scenes up to its 16 components
    "small": dict(objects=10000, scenes=600, scene_instances=(4, 16)),
    "test": dict(objects=260, scenes=50, scene_instances=(4, 32)),
    # held out like `test`, for choosing settings (sampler, CFG scale) without touching test
    "val": dict(objects=130, scenes=25, scene_instances=(4, 32)),
}


@dataclasses.dataclass
class Sample:
  """A generated object or scene.

  parts: components (N of them), each a primitives.Part in the normalised frame.
  colors: [N,3] uint8 render colour per component.
  kind: 'object' | 'scene'; category: object category or 'scene'.
  background: render-only (mesh, [3] uint8 colour) pairs (scene floor/walls), not components.
  meta: JSON-friendly extra info (instance categories for scenes, ...).
  """
  parts: List[P.Part]
  colors: np.ndarray
  kind: str
  category: str
  background: list = dataclasses.field(default_factory=list)
  meta: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# geometry helpers (y up)
# ----------------------------------------------------------------------------------------
def rot_z_to(d) -> np.ndarray:
  """Rotation matrix [3,3] taking the local +z axis onto the direction d."""
  d = np.asarray(d, dtype=np.float64)
  d = d / np.linalg.norm(d)
  z = np.array([0.0, 0.0, 1.0])
  v = np.cross(z, d)
  c = float(np.dot(z, d))
  if np.linalg.norm(v) < 1e-9:
    return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
  k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
  return np.eye(3) + k + k @ k * (1.0 / (1.0 + c))


def rot_y(angle: float) -> np.ndarray:
  """Rotation about the up axis (+y) by `angle` radians."""
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def box(center, half, rotation=None) -> P.Box:
  return P.Box(half_extents=tuple(float(h) for h in half),
               rotation=np.eye(3) if rotation is None else rotation,
               translation=np.asarray(center, dtype=np.float64))


def cyl(a, b, r) -> P.Cylinder:
  a, b = np.asarray(a, float), np.asarray(b, float)
  return P.Cylinder(radius=float(r), half_height=float(np.linalg.norm(b - a) / 2),
                    rotation=rot_z_to(b - a), translation=(a + b) / 2)


def cap(a, b, r) -> P.Capsule:
  a, b = np.asarray(a, float), np.asarray(b, float)
  return P.Capsule(radius=float(r), half_height=max(float(np.linalg.norm(b - a) / 2), 1e-4),
                   rotation=rot_z_to(b - a), translation=(a + b) / 2)


def cone(a, b, r_a, r_b) -> P.Cone:
  """Cone/frustum from point a (radius r_a) to point b (radius r_b)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  return P.Cone(radius_bottom=float(r_a), radius_top=float(r_b),
                half_height=float(np.linalg.norm(b - a) / 2), rotation=rot_z_to(b - a),
                translation=(a + b) / 2)


def sph(c, r) -> P.Sphere:
  return P.Sphere(radius=float(r), translation=np.asarray(c, dtype=np.float64))


def tor(c, axis, big, small) -> P.Torus:
  return P.Torus(major_radius=float(big), minor_radius=float(small), rotation=rot_z_to(axis),
                 translation=np.asarray(c, dtype=np.float64))


def part(name, *prims) -> P.Part:
  return P.Part(tuple(prims), name=name)


def U(rng, a, b) -> float:
  return float(rng.uniform(a, b))


# ----------------------------------------------------------------------------------------
# object categories: each returns a list of Parts in metres, y up, roughly centred
# ----------------------------------------------------------------------------------------
def _legs(rng, hx, hz, height, thick, round_legs, inset=0.0):
  parts = []
  for i, (sx, sz) in enumerate([(-1, -1), (1, -1), (1, 1), (-1, 1)]):
    x, z = sx * (hx - thick - inset), sz * (hz - thick - inset)
    if round_legs:
      parts.append(part(f"leg{i}", cyl([x, 0, z], [x, height, z], thick)))
    else:
      parts.append(part(f"leg{i}", box([x, height / 2, z], [thick, height / 2, thick])))
  return parts


def chair(rng) -> List[P.Part]:
  hx, hz = U(rng, 0.2, 0.28), U(rng, 0.2, 0.26)
  seat_h, seat_t = U(rng, 0.4, 0.48), U(rng, 0.02, 0.05)
  leg_t = U(rng, 0.015, 0.03)
  parts = [part("seat", box([0, seat_h, 0], [hx, seat_t, hz]))]
  parts += _legs(rng, hx, hz, seat_h - seat_t, leg_t, rng.random() < 0.5)
  if rng.random() < 0.6:  # stretchers between the legs
    y = U(rng, 0.1, 0.2)
    x, z = hx - leg_t, hz - leg_t
    parts.append(part("stretcher_l", box([-x, y, 0], [leg_t * 0.6, leg_t * 0.6, z])))
    parts.append(part("stretcher_r", box([x, y, 0], [leg_t * 0.6, leg_t * 0.6, z])))
    if rng.random() < 0.5:
      parts.append(part("stretcher_f", box([0, y, z], [x, leg_t * 0.6, leg_t * 0.6])))
      parts.append(part("stretcher_b", box([0, y, -z], [x, leg_t * 0.6, leg_t * 0.6])))
  back_h = U(rng, 0.35, 0.55)
  top = seat_h + seat_t + back_h
  zb = -hz + 0.02
  post_w = U(rng, 0.015, 0.03)
  parts.append(part("back_post_l", box([-hx + post_w, (seat_h + top) / 2, zb],
                                       [post_w, (top - seat_h) / 2, 0.02])))
  parts.append(part("back_post_r", box([hx - post_w, (seat_h + top) / 2, zb],
                                       [post_w, (top - seat_h) / 2, 0.02])))
  n_slats = int(rng.integers(1, 6))
  if rng.random() < 0.5:  # horizontal slats
    for i in range(n_slats):
      y = top - 0.04 - i * (back_h - 0.08) / max(n_slats, 1)
      parts.append(part(f"slat{i}", box([0, y, zb], [hx - 2 * post_w, 0.025, 0.012])))
  else:  # vertical slats under a top rail
    parts.append(part("top_rail", box([0, top - 0.03, zb], [hx - 2 * post_w, 0.03, 0.015])))
    for i in range(n_slats):
      x = -hx + 2 * post_w + (i + 0.5) * (2 * hx - 4 * post_w) / n_slats
      parts.append(part(f"slat{i}", box([x, seat_h + seat_t + (back_h - 0.06) / 2, zb],
                                        [0.012, (back_h - 0.06) / 2, 0.01])))
  if rng.random() < 0.4:  # arms
    ah = U(rng, 0.18, 0.25)
    for s, nm in ((-1, "l"), (1, "r")):
      parts.append(part(f"arm_{nm}", box([s * (hx + 0.02), seat_h + ah, 0], [0.025, 0.02, hz])))
      parts.append(part(f"arm_support_{nm}",
                        cyl([s * (hx + 0.02), seat_h, hz - 0.04],
                            [s * (hx + 0.02), seat_h + ah, hz - 0.04], 0.015)))
  return parts


def table(rng) -> List[P.Part]:
  h = U(rng, 0.55, 0.8)
  t = U(rng, 0.02, 0.05)
  round_top = rng.random() < 0.35
  if round_top:
    r = U(rng, 0.35, 0.6)
    parts = [part("top", cyl([0, h - 2 * t, 0], [0, h, 0], r))]
    if rng.random() < 0.5:
      parts.append(part("column", cyl([0, 0.04, 0], [0, h - 2 * t, 0], U(rng, 0.03, 0.07))))
      parts.append(part("foot", cone([0, 0, 0], [0, 0.06, 0], r * 0.6, r * 0.3)))
      return parts
    hx = hz = r / np.sqrt(2)
  else:
    hx, hz = U(rng, 0.4, 0.9), U(rng, 0.3, 0.5)
    parts = [part("top", box([0, h - t, 0], [hx, t, hz]))]
  leg_t = U(rng, 0.02, 0.045)
  parts += _legs(rng, hx, hz, h - 2 * t, leg_t, rng.random() < 0.5, inset=0.02)
  if rng.random() < 0.5 and not round_top:  # apron
    ay = h - 2 * t - 0.05
    parts.append(part("apron_f", box([0, ay, hz - 0.04], [hx - 0.06, 0.05, 0.01])))
    parts.append(part("apron_b", box([0, ay, -hz + 0.04], [hx - 0.06, 0.05, 0.01])))
    parts.append(part("apron_l", box([-hx + 0.04, ay, 0], [0.01, 0.05, hz - 0.06])))
    parts.append(part("apron_r", box([hx - 0.04, ay, 0], [0.01, 0.05, hz - 0.06])))
  if rng.random() < 0.3:
    parts.append(part("lower_shelf", box([0, U(rng, 0.1, 0.2), 0],
                                         [hx - 2 * leg_t - 0.03, 0.012, hz - 2 * leg_t - 0.03])))
  return parts


def shelf(rng) -> List[P.Part]:
  w, d, h = U(rng, 0.3, 0.6), U(rng, 0.12, 0.22), U(rng, 0.6, 1.2)
  t = U(rng, 0.01, 0.025)
  parts = [part("side_l", box([-w, h / 2, 0], [t, h / 2, d])),
           part("side_r", box([w, h / 2, 0], [t, h / 2, d])),
           part("top", box([0, h - t, 0], [w - t, t, d])),
           part("bottom", box([0, t + 0.03, 0], [w - t, t, d]))]
  n = int(rng.integers(1, 9))
  for i in range(n):
    y = 0.03 + (i + 1) * (h - 0.06) / (n + 1)
    parts.append(part(f"board{i}", box([0, y, 0], [w - t, t, d - 0.01])))
  if rng.random() < 0.5:
    parts.append(part("back", box([0, h / 2, -d - 0.005], [w + t, h / 2, 0.005])))
  if rng.random() < 0.4:
    k = int(rng.integers(1, 4))
    for i in range(k):
      x = -w + (i + 1) * 2 * w / (k + 1)
      parts.append(part(f"divider{i}", box([x, h / 2, 0], [t * 0.7, h / 2 - 2 * t - 0.03, d - 0.01])))
  return parts


def lamp(rng) -> List[P.Part]:
  base_r = U(rng, 0.08, 0.15)
  parts = [part("base", cyl([0, 0, 0], [0, U(rng, 0.015, 0.04), 0], base_r))]
  segs = int(rng.integers(1, 4))
  p = np.array([0.0, 0.02, 0.0])
  for i in range(segs):
    d = np.array([U(rng, -0.25, 0.25), 1.0, U(rng, -0.25, 0.25)])
    d = d / np.linalg.norm(d) * U(rng, 0.2, 0.45)
    q = p + d
    parts.append(part(f"arm{i}", cap(p, q, U(rng, 0.008, 0.015))))
    if i + 1 < segs:
      parts.append(part(f"joint{i}", sph(q, 0.025)))
    p = q
  r_top, r_bot = U(rng, 0.04, 0.1), U(rng, 0.1, 0.2)
  parts.append(part("shade", cone(p + [0, -0.12, 0], p + [0, 0.06, 0], r_bot, r_top)))
  if rng.random() < 0.6:
    parts.append(part("bulb", sph(p + [0, -0.1, 0], 0.04)))
  return parts


def car(rng) -> List[P.Part]:
  L, W = U(rng, 0.9, 1.2), U(rng, 0.4, 0.5)
  wheel_r = U(rng, 0.14, 0.2)
  body_h = U(rng, 0.12, 0.2)
  y0 = wheel_r
  parts = [part("body", box([0, y0 + body_h / 2, 0], [L, body_h, W]))]
  cab_l = U(rng, 0.35, 0.6)
  parts.append(part("cabin", box([U(rng, -0.2, 0.1), y0 + 1.5 * body_h + 0.11, 0],
                                 [cab_l, 0.12, W * 0.85])))
  wx = L - wheel_r - 0.08
  for i, (sx, sz) in enumerate([(-1, -1), (1, -1), (1, 1), (-1, 1)]):
    c = np.array([sx * wx, wheel_r, sz * (W + 0.01)])
    parts.append(part(f"tyre{i}", tor(c, [0, 0, 1], wheel_r * 0.72, wheel_r * 0.28)))
    parts.append(part(f"hub{i}", cyl(c - [0, 0, 0.03], c + [0, 0, 0.03], wheel_r * 0.45)))
  if rng.random() < 0.7:
    for i, sz in enumerate((-1, 1)):
      parts.append(part(f"headlight{i}", sph([L, y0 + body_h * 0.8, sz * W * 0.7], 0.05)))
  if rng.random() < 0.3:
    parts.append(part("spoiler", box([-L + 0.05, y0 + 2 * body_h + 0.06, 0], [0.06, 0.01, W * 0.9])))
    parts.append(part("spoiler_mount", box([-L + 0.05, y0 + 1.5 * body_h + 0.03, 0], [0.02, 0.04, 0.02])))
  return parts


def airplane(rng) -> List[P.Part]:
  L, r = U(rng, 1.2, 1.8), U(rng, 0.07, 0.12)
  parts = [part("fuselage", cap([-L / 2, 0, 0], [L / 2, 0, 0], r)),
           part("nose", cone([L / 2 + r * 0.5, 0, 0], [L / 2 + r * 2.2, 0, 0], r * 0.8, 0.0))]
  span, chord = U(rng, 0.6, 1.0), U(rng, 0.12, 0.22)
  wx = U(rng, -0.1, 0.15)
  sweep = rng.uniform(0, 0.5)
  for s, nm in ((-1, "l"), (1, "r")):
    rot = rot_y(s * sweep)
    parts.append(part(f"wing_{nm}", box([wx - sweep * span / 2, 0, s * (span / 2 + r * 0.5)],
                                        [chord, 0.012, span / 2], rot)))
    parts.append(part(f"stab_{nm}", box([-L / 2 - 0.02, 0.02, s * (span * 0.18 + r * 0.5)],
                                        [chord * 0.5, 0.008, span * 0.18])))
  parts.append(part("fin", box([-L / 2 - 0.02, r + 0.12, 0], [chord * 0.5, 0.12, 0.008])))
  n_eng = int(rng.choice([0, 2, 4]))
  for i in range(n_eng):
    s = -1 if i % 2 == 0 else 1
    z = s * (span * (0.25 if i < 2 else 0.55) + r)
    parts.append(part(f"engine{i}", cyl([wx + 0.05, -0.06, z], [wx + 0.3, -0.06, z], 0.045)))
  return parts


def figure(rng) -> List[P.Part]:
  """Articulated figure; limbs have 2..4 segments, so up to ~30 parts."""
  torso_h = U(rng, 0.45, 0.6)
  hip_y = U(rng, 0.75, 0.95)
  parts = [part("torso", cap([0, hip_y, 0], [0, hip_y + torso_h, 0], U(rng, 0.12, 0.18))),
           part("neck", cyl([0, hip_y + torso_h + 0.1, 0], [0, hip_y + torso_h + 0.18, 0], 0.04)),
           part("head", sph([0, hip_y + torso_h + 0.3, 0], U(rng, 0.1, 0.14)))]
  n_arm = int(rng.integers(2, 5))
  n_leg = int(rng.integers(2, 4))
  for s, nm in ((-1, "l"), (1, "r")):
    p = np.array([s * 0.2, hip_y + torso_h, 0.0])
    for i in range(n_arm):
      d = np.array([s * U(rng, 0.1, 0.6), -1.0, U(rng, -0.4, 0.4)])
      q = p + d / np.linalg.norm(d) * (0.6 / n_arm + 0.05)
      parts.append(part(f"arm_{nm}{i}", cap(p, q, 0.04 - 0.004 * i)))
      p = q
    parts.append(part(f"hand_{nm}", sph(p, 0.05)))
    if rng.random() < 0.5:  # fingers
      for f in range(3):
        d = np.array([s * 0.3, -1.0, (f - 1) * 0.4])
        parts.append(part(f"finger_{nm}{f}", cap(p, p + d / np.linalg.norm(d) * 0.08, 0.012)))
    p = np.array([s * 0.1, hip_y, 0.0])
    for i in range(n_leg):
      q = p + np.array([s * U(rng, 0.0, 0.05), -(hip_y - 0.06) / n_leg, U(rng, -0.08, 0.08)])
      parts.append(part(f"leg_{nm}{i}", cap(p, q, 0.06 - 0.01 * i)))
      p = q
    parts.append(part(f"foot_{nm}", box([p[0], 0.03, p[2] + 0.05], [0.05, 0.03, 0.1])))
  return parts


def bed(rng) -> List[P.Part]:
  hx, hz = U(rng, 0.45, 0.9), U(rng, 0.95, 1.1)
  fh = U(rng, 0.15, 0.3)
  parts = [part("frame", box([0, fh, 0], [hx, 0.08, hz]))]
  parts.append(part("mattress", box([0, fh + 0.08 + 0.1, 0.02], [hx - 0.03, 0.1, hz - 0.05])))
  parts.append(part("headboard", box([0, fh + 0.35, -hz - 0.03], [hx, 0.45, 0.03])))
  if rng.random() < 0.5:
    parts.append(part("footboard", box([0, fh + 0.1, hz + 0.03], [hx, 0.2, 0.03])))
  parts += _legs(rng, hx, hz, fh - 0.08, 0.04, rng.random() < 0.5)
  n_p = int(rng.integers(1, 3)) if hx < 0.6 else int(rng.integers(1, 4))
  for i in range(n_p):
    x = -hx + (i + 0.5) * 2 * hx / n_p
    y = fh + 0.08 + 0.2 + 0.05
    parts.append(part(f"pillow{i}", cap([x - hx / n_p * 0.6, y, -hz + 0.2],
                                        [x + hx / n_p * 0.6, y, -hz + 0.2], 0.06)))
  if rng.random() < 0.3:
    parts.append(part("blanket", box([0, fh + 0.08 + 0.21, hz * 0.3], [hx, 0.015, hz * 0.65])))
  return parts


def sofa(rng) -> List[P.Part]:
  n = int(rng.integers(1, 4))
  seat_w = U(rng, 0.25, 0.35)
  hx, hz = n * seat_w, U(rng, 0.35, 0.45)
  base_h = U(rng, 0.15, 0.25)
  parts = [part("base", box([0, 0.08 + base_h / 2, 0], [hx, base_h / 2, hz]))]
  for i in range(n):
    x = -hx + (2 * i + 1) * seat_w
    parts.append(part(f"seat_cushion{i}", box([x, 0.08 + base_h + 0.06, 0.04],
                                              [seat_w - 0.01, 0.06, hz - 0.06])))
    parts.append(part(f"back_cushion{i}", box([x, 0.08 + base_h + 0.3, -hz + 0.08],
                                              [seat_w - 0.01, 0.22, 0.07])))
  parts.append(part("back", box([0, 0.08 + base_h + 0.25, -hz - 0.04], [hx + 0.1, 0.33, 0.05])))
  ah = U(rng, 0.15, 0.3)
  for s, nm in ((-1, "l"), (1, "r")):
    parts.append(part(f"arm_{nm}", box([s * (hx + 0.05), 0.08 + (base_h + ah) / 2, 0],
                                       [0.05, (base_h + ah) / 2, hz])))
  parts += _legs(rng, hx + 0.1, hz, 0.08, 0.03, rng.random() < 0.5)
  return parts


def fence(rng) -> List[P.Part]:
  n_posts = int(rng.integers(2, 9))
  n_rails = int(rng.integers(1, 4))
  gap, h = U(rng, 0.3, 0.6), U(rng, 0.6, 1.0)
  width = gap * (n_posts - 1)
  parts = []
  for i in range(n_posts):
    x = -width / 2 + i * gap
    if rng.random() < 0.5:
      parts.append(part(f"post{i}", box([x, h / 2, 0], [0.03, h / 2, 0.03])))
    else:
      parts.append(part(f"post{i}", cyl([x, 0, 0], [x, h, 0], 0.03), cone([x, h, 0], [x, h + 0.06, 0], 0.035, 0.0)))
  for j in range(n_rails):
    y = h * (j + 1) / (n_rails + 1)
    parts.append(part(f"rail{j}", box([0, y, 0.045], [width / 2 + 0.03, 0.02, 0.015])))
  budget = MAX_PARTS - len(parts)
  n_pick = min(int(rng.integers(0, 3 * (n_posts - 1) + 1)), budget)
  for k in range(n_pick):
    x = -width / 2 + (k + 0.5) * width / max(n_pick, 1)
    parts.append(part(f"picket{k}", box([x, h * 0.45, 0.075], [0.02, h * 0.45, 0.012])))
  return parts


def mug(rng) -> List[P.Part]:
  r, h = U(rng, 0.04, 0.06), U(rng, 0.08, 0.12)
  parts = [part("body", cyl([0, 0, 0], [0, h, 0], r)),
           part("handle", tor([r + 0.02, h / 2, 0], [0, 0, 1], h * 0.28, 0.008))]
  if rng.random() < 0.4:
    parts.append(part("saucer", cyl([0, -0.008, 0], [0, 0, 0], r * 1.8)))
  if rng.random() < 0.3:
    parts.append(part("lid", cyl([0, h, 0], [0, h + 0.01, 0], r * 1.05), sph([0, h + 0.02, 0], 0.01)))
  return parts


def tree(rng) -> List[P.Part]:
  th = U(rng, 0.4, 0.8)
  parts = [part("trunk", cyl([0, 0, 0], [0, th, 0], U(rng, 0.04, 0.08)))]
  n = int(rng.integers(1, 6))
  conifer = rng.random() < 0.5
  y = th * 0.7
  for i in range(n):
    if conifer:
      rb = U(rng, 0.25, 0.45) * (1 - 0.12 * i)
      hh = U(rng, 0.3, 0.45)
      parts.append(part(f"foliage{i}", cone([0, y, 0], [0, y + hh, 0], rb, 0.0)))
      y += hh * 0.55
    else:
      c = np.array([U(rng, -0.2, 0.2), th + U(rng, 0.0, 0.3), U(rng, -0.2, 0.2)])
      parts.append(part(f"foliage{i}", sph(c, U(rng, 0.15, 0.3))))
  if rng.random() < 0.4:
    parts.append(part("pot", cone([0, -0.2, 0], [0, 0.0, 0], 0.15, 0.2)))
  return parts


def rocket(rng) -> List[P.Part]:
  r, h = U(rng, 0.1, 0.16), U(rng, 0.8, 1.3)
  parts = [part("body", cyl([0, 0, 0], [0, h, 0], r)),
           part("nose", cone([0, h, 0], [0, h + U(rng, 0.2, 0.4), 0], r, 0.0)),
           part("nozzle", cone([0, -0.12, 0], [0, 0, 0], r * 0.8, r * 0.5))]
  n_fins = int(rng.integers(3, 5))
  for i in range(n_fins):
    a = 2 * np.pi * i / n_fins
    d = np.array([np.cos(a), 0, np.sin(a)])
    parts.append(part(f"fin{i}", box(d * (r + 0.08) + [0, 0.12, 0], [0.08, 0.12, 0.01],
                                      rot_y(-a))))
  if rng.random() < 0.5:
    parts.append(part("window", sph([r * 0.9, h * 0.7, 0], r * 0.3)))
  if rng.random() < 0.4:
    parts.append(part("band", tor([0, h * 0.4, 0], [0, 1, 0], r, 0.015)))
  return parts


CATEGORIES: Dict[str, Callable[[np.random.Generator], List[P.Part]]] = {
    "chair": chair, "table": table, "shelf": shelf, "lamp": lamp, "car": car,
    "airplane": airplane, "figure": figure, "bed": bed, "sofa": sofa, "fence": fence,
    "mug": mug, "tree": tree, "rocket": rocket,
}
FURNITURE = ("chair", "table", "shelf", "lamp", "bed", "sofa", "tree")
# rough real heights (m) used to size furniture in scenes
_HEIGHT = {"chair": 0.9, "table": 0.75, "shelf": 1.6, "lamp": 1.5, "bed": 0.9, "sofa": 0.85,
           "tree": 1.4}


# ----------------------------------------------------------------------------------------
# normalisation, colours
# ----------------------------------------------------------------------------------------
def parts_bounds(parts: Sequence[P.Part]) -> np.ndarray:
  """[2,3] bounding box of a list of parts (mesh-based, tight to ~1e-3)."""
  b = np.stack([p.to_mesh(32).bounds for p in parts])
  return np.stack([b[:, 0].min(0), b[:, 1].max(0)])


def normalize_parts(parts: Sequence[P.Part], extent: float = EXTENT, bounds=None):
  """Centres the bbox of `parts` at 0 and scales its longest side to [-extent, extent].

  Returns (parts, center [3], scale) with new = (old - center) * scale.
  """
  b = parts_bounds(parts) if bounds is None else np.asarray(bounds)
  center = (b[0] + b[1]) / 2
  scale = extent / max(float(np.max(b[1] - b[0])) / 2, 1e-9)
  return [p.transformed(None, -center).scaled(scale) for p in parts], center, scale


def random_colors(rng, n: int) -> np.ndarray:
  """[n,3] uint8 distinct-looking colours (golden-ratio hues, random start)."""
  h = (rng.random() + np.arange(n) * 0.618034) % 1.0
  s = rng.uniform(0.45, 0.8, n)
  v = rng.uniform(0.7, 0.95, n)
  i = np.floor(h * 6).astype(int) % 6
  f = h * 6 - np.floor(h * 6)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = np.choose(i[None], [np.stack(c) for c in
                            [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
  return (np.clip(rgb.T, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# objects and scenes
# ----------------------------------------------------------------------------------------
def make_object(category: str, rng: np.random.Generator, normalize: bool = True) -> Sample:
  """One procedural object of `category` (2..32 parts), normalised unless told otherwise."""
  if category not in CATEGORIES:
    raise ValueError(f"unknown category {category!r}; expected one of {sorted(CATEGORIES)}")
  parts = CATEGORIES[category](rng)
  if not MIN_PARTS <= len(parts) <= MAX_PARTS:
    raise AssertionError(f"{category}: {len(parts)} parts outside [{MIN_PARTS}, {MAX_PARTS}]")
  if normalize:
    parts, _, _ = normalize_parts(parts)
  return Sample(parts=list(parts), colors=random_colors(rng, len(parts)), kind="object",
                category=category, meta={"part_names": [p.name for p in parts]})


def make_scene(rng: np.random.Generator, min_instances: int = 4, max_instances: int = 32,
               gap: float = 0.05, max_tries: int = 200) -> Sample:
  """A room with min..max furniture instances, pairwise non-intersecting (disjoint footprints).

  Each instance: a random furniture object, sized to a real height, random yaw, placed on the
  floor (y = 0). Components are the instances (each the union of the object's parts). The room
  floor and two walls go to `Sample.background` (render only).
  """
  n_target = int(rng.integers(min_instances, max_instances + 1))
  insts, foot = [], []
  for _ in range(n_target):
    cat = FURNITURE[int(rng.integers(len(FURNITURE)))]
    parts = CATEGORIES[cat](rng)
    b = parts_bounds(parts)
    s = _HEIGHT[cat] * U(rng, 0.85, 1.15) / max(b[1, 1] - b[0, 1], 1e-6)
    c = (b[0] + b[1]) / 2
    prims = [q for p in parts for q in p.transformed(None, [-c[0], -b[0, 1], -c[2]]).primitives]
    comp = P.Part(tuple(prims), name=cat).scaled(s)
    yaw = float(rng.choice([0, 0.5, 1.0, 1.5]) * np.pi + rng.normal(scale=0.15))
    comp = comp.transformed(rot_y(yaw), None)
    fb = parts_bounds([comp])
    insts.append((cat, comp, fb))
    foot.append((fb[1, 0] - fb[0, 0] + gap) * (fb[1, 2] - fb[0, 2] + gap))
  side = float(np.sqrt(np.sum(foot) * 2.2)) + 0.5
  placed = []
  for cat, comp, fb in insts:
    w = np.array([fb[1, 0] - fb[0, 0], fb[1, 2] - fb[0, 2]])
    for _ in range(max_tries):
      lo = rng.uniform([0, 0], np.maximum([side, side] - w, 1e-3))
      rect = np.array([lo, lo + w])
      if all(np.any(rect[0] >= r[1] + gap) or np.any(r[0] >= rect[1] + gap)
             for _, _, r in placed):
        shift = np.array([lo[0] - fb[0, 0], 0.0, lo[1] - fb[0, 2]])
        placed.append((cat, comp.transformed(None, shift), rect))
        break
  if len(placed) < min_instances:
    raise RuntimeError("scene placement failed; increase room size or tries")
  comps = [p for _, p, _ in placed]
  b = parts_bounds(comps)
  center = (b[0] + b[1]) / 2
  scale = EXTENT / max(float(np.max(b[1] - b[0])) / 2, 1e-9)
  comps = [p.transformed(None, -center).scaled(scale) for p in comps]
  # render-only room: floor slab + 4 walls (the renderer keeps the two facing away from it)
  def to_norm(m):
    m.apply_translation(-center)
    m.apply_scale(scale)
    return m
  t = 0.05
  floor = to_norm(trimesh.creation.box(extents=[side + 2 * t, t, side + 2 * t],
                                       transform=trimesh.transformations.translation_matrix(
                                           [side / 2, -t / 2, side / 2])))
  wall_h = 1.2
  walls = []
  for name, ext, pos in (("wall_x0", [t, wall_h, side], [-t / 2, wall_h / 2, side / 2]),
                         ("wall_x1", [t, wall_h, side], [side + t / 2, wall_h / 2, side / 2]),
                         ("wall_z0", [side, wall_h, t], [side / 2, wall_h / 2, -t / 2]),
                         ("wall_z1", [side, wall_h, t], [side / 2, wall_h / 2, side + t / 2])):
    walls.append((name, to_norm(trimesh.creation.box(
        extents=ext, transform=trimesh.transformations.translation_matrix(pos)))))
  bg = [("floor", floor, np.array([205, 200, 190], np.uint8))]
  bg += [(n, m, np.array([232, 228, 220], np.uint8)) for n, m in walls]
  return Sample(parts=comps, colors=random_colors(rng, len(comps)), kind="scene",
                category="scene", background=bg,
                meta={"part_names": [c for c, _, _ in placed], "room_side_m": side,
                      "scale": scale})


# ----------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
  """One procedural item of a split: deterministic from (base_seed, split, kind, index)."""
  split: str
  kind: str  # 'object' | 'scene'
  index: int
  base_seed: int = 0

  @property
  def key(self) -> str:
    return f"procedural/{self.split}/{self.kind}/{self.index:06d}"

  def seed_sequence(self) -> np.random.SeedSequence:
    return np.random.SeedSequence(
        [self.base_seed, zlib.crc32(self.split.encode()), 0 if self.kind == "object" else 1,
         self.index])

  def generate(self) -> Sample:
    rng = np.random.default_rng(self.seed_sequence())
    spec = SPLITS[self.split]
    if self.kind == "object":
      cats = sorted(CATEGORIES)
      return make_object(cats[self.index % len(cats)], rng)
    lo, hi = spec["scene_instances"]
    return make_scene(rng, lo, hi)


def split_items(name: str, base_seed: int = 0, kinds=("object", "scene")) -> List[Item]:
  """All items of a named split (objects first, then scenes)."""
  if name not in SPLITS:
    raise ValueError(f"unknown split {name!r}; expected one of {sorted(SPLITS)}")
  spec = SPLITS[name]
  out = []
  if "object" in kinds:
    out += [Item(name, "object", i, base_seed) for i in range(spec["objects"])]
  if "scene" in kinds:
    out += [Item(name, "scene", i, base_seed) for i in range(spec["scenes"])]
  return out
