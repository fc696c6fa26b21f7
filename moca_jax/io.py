"""File I/O shared by the library, the data pipeline and the entry points.

- Atomic writes: every file this project writes goes through `atomic_path` (or the helpers
  built on it), so a reader never sees a half-written file and a killed job leaves at most a
  hidden temporary file, which `remove_stale_temps` deletes on the next run.
- JSON reports: `write_json` serialises numpy scalars and arrays and can stamp the report
  with the one-line host description of `moca_jax.machine`.
- Images: `load_image` is the one function every image file passes through (generation,
  evaluation, data renders); `load_mask` reads instance-id masks.
"""
from __future__ import annotations

import contextlib
import io as _io
import json
import os
import re
import threading
import uuid
from typing import Any, Iterator, Optional

import numpy as np

from moca_jax.machine import describe_host

# Temporary files are hidden, in the destination's folder (so os.replace is atomic), and
# carry the writer's pid so that a later run can tell a dead writer's leftovers.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def temp_path_for(path: str) -> str:
  """The hidden temporary name `atomic_path` writes before renaming onto `path`."""
  d, base = os.path.split(os.path.abspath(os.fspath(path)))
  return os.path.join(d, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str, *, fsync: bool = True) -> Iterator[str]:
  """Yields a temporary path to write `path`'s contents to; renames it onto `path` when the
  block ends without an exception, deletes it otherwise. Creates parent folders.

  The temporary file lives in the same folder, so the final `os.replace` is atomic on POSIX
  file systems: readers see the old file or the new one, never a part of it.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temp_path_for(path)
  try:
    yield tmp
    if fsync and os.path.isfile(tmp):
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path` atomically; returns `path`."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
  return os.fspath(path)


def replace_folder(folder: str, write) -> None:
  """Rewrites a folder as a whole: write(staging) on a copy of `folder` beside it, then the
  copy renamed over it. An interrupted update leaves the old folder (or, renamed to
  FOLDER.old, the old and the finished new one), never a folder with some files new and
  some old; a failing `write` removes the copy and re-raises."""
  _write_beside(folder, write, ".updating", start_from_old=True)


def write_folder(folder: str, write) -> bool:
  """Writes a folder whole: write(staging) into an empty FOLDER.writing beside it, then that
  renamed to `folder`, replacing an earlier one. So a folder written before never keeps a
  file the new write did not make (an earlier result's parts.glb beside a new preview), and
  an interrupted write leaves the earlier folder (or, renamed to FOLDER.old, the earlier and
  the finished new one). A failing `write` removes the staging folder and re-raises.
  Returns True when an earlier folder was replaced."""
  return _write_beside(folder, write, ".writing", start_from_old=False)


def _write_beside(folder: str, write, suffix: str, start_from_old: bool) -> bool:
  """write(FOLDER + suffix), started as a copy of `folder` or empty, then renamed over
  `folder` (through FOLDER.old); True when `folder` existed."""
  import shutil  # pylint: disable=g-import-not-at-top

  folder = os.path.abspath(folder)
  staging, old = folder + suffix, folder + ".old"
  for leftover in (staging, old):
    shutil.rmtree(leftover, ignore_errors=True)
  if start_from_old:
    shutil.copytree(folder, staging)
  else:
    os.makedirs(staging)
  try:
    write(staging)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  existed = os.path.exists(folder)
  if existed:
    os.replace(folder, old)
  os.replace(staging, folder)
  if existed:
    shutil.rmtree(old)
  return existed


def atomic_write_text(path: str, text: str) -> str:
  """Writes UTF-8 `text` to `path` atomically; returns `path`."""
  return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(o: Any) -> Any:
  """`json.dumps(default=...)` for numpy scalars and arrays; TypeError for anything else."""
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any, *, indent: Optional[int] = 2) -> str:
  """Deterministic JSON text (sorted keys, numpy-aware, trailing newline)."""
  return json.dumps(obj, indent=indent, sort_keys=True, default=json_default) + "\n"


def write_json(path: str, obj: Any, *, machine: bool = False, indent: Optional[int] = 2) -> str:
  """Writes `obj` as JSON atomically. With `machine=True` and a dict, adds a "machine" field
  holding `describe_host()` unless one is already there. Returns `path`."""
  if machine and isinstance(obj, dict) and "machine" not in obj:
    obj = {**obj, "machine": describe_host()}
  return atomic_write_text(path, to_json(obj, indent=indent))


def read_json(path: str) -> Any:
  """Reads a JSON file; a missing file is FileNotFoundError and broken JSON a ValueError,
  each naming the path."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temps(directory: str, recursive: bool = False) -> list[str]:
  """Deletes the temporary files `atomic_path` left in `directory` when their writer died
  (killed mid-write); files of live writers are kept. Returns the paths removed."""
  removed = []
  if not os.path.isdir(directory):
    return removed
  walker = os.walk(directory) if recursive else [(directory, [], os.listdir(directory))]
  for root, _, files in walker:
    for name in files:
      m = _TEMP_RE.match(name)
      if m and not _pid_alive(int(m.group("pid"))):
        p = os.path.join(root, name)
        with contextlib.suppress(FileNotFoundError):
          os.remove(p)
          removed.append(p)
  return removed


def write_npy(path: str, array: Any) -> str:
  """Writes one array as a `.npy` file (numpy's format, no pickle) atomically; returns `path`."""
  buf = _io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  return atomic_write_bytes(path, buf.getvalue())


def write_png(path: str, image: Any, *, palette: bool = False) -> str:
  """Writes a uint8 image [H, W], [H, W, 3] or [H, W, 4] as PNG atomically; returns `path`.

  palette: store an RGB image as 256 colours (median cut), about half the bytes of a
  rendered figure's RGB PNG; for pictures shipped under a size budget.
  Raises ValueError naming `path` for another dtype or shape.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and
                                                          arr.shape[-1] not in (1, 3, 4)):
    raise ValueError(f"{path}: expected a uint8 image [H, W(, 1|3|4)], got {arr.dtype} "
                     f"{arr.shape}")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  im = Image.fromarray(arr)
  if palette:
    im = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
  buf = _io.BytesIO()
  im.save(buf, format="PNG", optimize=palette)
  return atomic_write_bytes(path, buf.getvalue())


def save_figure(fig: Any, path: str, **savefig_kwargs: Any) -> str:
  """Writes a matplotlib figure atomically (format from the suffix of `path`, e.g. PNG) and
  closes it, also when saving fails; returns `path`."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fmt = savefig_kwargs.pop("format", None) or os.path.splitext(os.fspath(path))[1][1:] or "png"
  try:
    with atomic_path(path) as tmp:
      fig.savefig(tmp, format=fmt, **savefig_kwargs)
  finally:
    plt.close(fig)
  return os.fspath(path)


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------

# Largest image `load_image` decodes, in pixels (a 15000 x 15000 PNG of 45 KB is 225 Mpx).
MAX_IMAGE_PIXELS = 100_000_000
_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(ValueError):
  """An image file whose pixel count exceeds the decoding limit (a decompression bomb)."""


def _open_image(path: str, max_pixels: int):
  """PIL.Image.open with this module's size limit in place of PIL's bomb check."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with _PIL_LIMIT_LOCK:  # PIL's limit is a module global: lift it for the header read only
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
      im = Image.open(path)
    finally:
      Image.MAX_IMAGE_PIXELS = saved
  w, h = im.size
  if w * h > max_pixels:
    im.close()
    raise ImageTooLargeError(f"{path}: image too large ({w * h / 1e6:.0f} Mpx > "
                             f"{max_pixels / 1e6:.0f} Mpx limit; {w} x {h})")
  return im


def _to_uint8_rgba(im) -> np.ndarray:
  """A decoded PIL image of any mode -> uint8 [H, W, 4], straight (not premultiplied) alpha.

  16-bit grey levels (modes I;16*) are scaled to 8 bits (x / 257, rounded: 65535 -> 255);
  32-bit integer grey (mode I) likewise when it exceeds 255, else taken as 8-bit levels;
  float ('F') images are taken as [0, 1] when their maximum is <= 1, else [0, 255].
  """
  mode = im.mode
  if mode.startswith("I;16") or mode == "I":
    grey = np.asarray(im, dtype=np.float64)
    if mode.startswith("I;16") or (grey.size and grey.max() > 255):
      grey = np.round(np.clip(grey, 0, 65535) / 257.0)
  elif mode == "F":
    grey = np.asarray(im, dtype=np.float64)
    grey = np.nan_to_num(grey)
    grey = grey * 255.0 if grey.size and grey.max() <= 1.0 else grey
  else:
    grey = None
  if grey is not None:
    g = np.clip(grey, 0, 255).astype(np.uint8)
    return np.dstack([g, g, g, np.full_like(g, 255)])
  # PIL converts palette (with its transparency), LA / La / RGBa (premultiplied: un-multiplied
  # here), CMYK, YCbCr, LAB, HSV and 1-bit images to straight RGBA.
  return np.asarray(im.convert("RGBA"), np.uint8)


def load_image(path: str, *, keep_alpha: bool = False,
               max_pixels: Optional[int] = None) -> np.ndarray:
  """An image file -> uint8 [H, W, 3] (alpha composited on white) or, with `keep_alpha`,
  uint8 [H, W, 4] with straight alpha (255 where the file has none).

  The one function every image file passes through (generation, evaluation, data renders):
  every PIL mode (1-bit, grey, 16-bit grey, palette with transparency, grey+alpha, RGB(A),
  premultiplied alpha, CMYK, YCbCr, ...), the EXIF orientation tag applied (phone photos),
  the first frame of an animation (GIF, APNG, WebP).

  Args:
    path: image file.
    keep_alpha: return RGBA instead of compositing on white (the TripoSG preprocessing crops
      to the alpha; see `moca_jax.preprocess`).
    max_pixels: decoding limit (default MAX_IMAGE_PIXELS), checked from the header before any
      pixel is decoded.
  Raises:
    FileNotFoundError: missing file.
    ImageTooLargeError (a ValueError): more than `max_pixels` pixels, "image too large
      (N Mpx > limit)".
    ValueError: not a readable image; all name the path.
  """
  from PIL import ImageOps, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such image file")
  limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
  try:
    with _open_image(path, limit) as im:
      if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
      im.load()
      oriented = ImageOps.exif_transpose(im)
      rgba = _to_uint8_rgba(oriented)
  except ImageTooLargeError:
    raise
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
    detail = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    raise ValueError(f"{path}: not an image ({type(e).__name__}"
                     f"{': ' + detail if detail else ''})") from e
  if keep_alpha:
    return rgba
  alpha = rgba[..., 3:].astype(np.float32) / 255.0
  rgb = rgba[..., :3].astype(np.float32)
  return np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def load_mask(path: str) -> np.ndarray:
  """An instance-id image (0 background, i = instance i) -> uint8 [H, W].

  Raises FileNotFoundError (missing) or ValueError (not a readable image), naming the path.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such mask file")
  try:
    with Image.open(path) as im:
      arr = np.asarray(im)
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"{path}: not a mask image ({type(e).__name__}: {e})") from e
  if arr.ndim == 3:
    arr = arr[..., 0]
  return arr.astype(np.uint8)
