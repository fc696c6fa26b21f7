"""io.load_image: every mode, bit depth, alpha form, orientation and size reaches the model as
meant (issue 12 §1). Each test writes its own small input."""
import io as pyio
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from moca_jax import io


def _save(tmp_path, name, image, **kw):
  path = tmp_path / name
  image.save(path, **kw)
  return str(path)


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
  """Mode I;16, object 23130 on 65535: the object must not vanish (it used to load all white)."""
  a = np.full((20, 30), 65535, np.uint16)
  a[5:15, 10:20] = 23130
  path = _save(tmp_path, "grey16.png", Image.fromarray(a))
  assert Image.open(path).mode == "I;16"
  img = io.load_image(path)
  assert img.shape == (20, 30, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[8, 12], [90, 90, 90])
  np.testing.assert_array_equal(img[0, 0], [255, 255, 255])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(
      ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _huge_bilevel_png(path, side=15000):
  """A valid side x side 1-bit PNG, all black, a few tens of KB on disk."""
  row = b"\x00" + bytes((side + 7) // 8)
  comp = zlib.compressobj(9)
  data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
  ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def test_decompression_bomb_is_one_clear_error(tmp_path):
  path = tmp_path / "bomb.png"
  _huge_bilevel_png(path)
  assert path.stat().st_size < 100_000
  with pytest.raises(io.ImageTooLargeError,
                     match=r"bomb\.png: image too large \(225 Mpx > 100 Mpx limit"):
    io.load_image(str(path))
  assert issubclass(io.ImageTooLargeError, ValueError)  # the CLIs catch ValueError
  small = _save(tmp_path, "ok.png", Image.new("RGB", (40, 30), (10, 20, 30)))
  with pytest.raises(io.ImageTooLargeError, match=r"\(0 Mpx > 0 Mpx limit; 40 x 30\)"):
    io.load_image(small, max_pixels=1000)
  np.testing.assert_array_equal(io.load_image(small)[0, 0], [10, 20, 30])


def test_palette_with_transparency_and_grey_alpha_composite_on_white(tmp_path):
  pal = Image.new("P", (4, 4), 0)
  pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  pal.putpixel((1, 1), 1)
  path = _save(tmp_path, "pal.png", pal, transparency=0)
  img = io.load_image(path)
  np.testing.assert_array_equal(img[0, 0], [255, 255, 255])  # transparent index -> white
  np.testing.assert_array_equal(img[1, 1], [0, 0, 255])
  la = Image.fromarray(np.dstack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 51, np.uint8)]),
                       "LA")
  img = io.load_image(_save(tmp_path, "la.png", la))
  np.testing.assert_array_equal(img[0, 0], [204, 204, 204])  # black at 20% on white
  rgba = io.load_image(_save(tmp_path, "la2.png", la), keep_alpha=True)
  np.testing.assert_array_equal(rgba[0, 0], [0, 0, 0, 51])


def test_premultiplied_alpha_is_unmultiplied_before_compositing(tmp_path):
  """A TIFF with associated (premultiplied) alpha: stored (100, 50, 25) at alpha 128 means the
  colour (199, 99, 49); composited on white that is (227, 177, 152), not (177, 152, 140)."""
  buf = pyio.BytesIO()
  Image.new("RGBA", (4, 4), (100, 50, 25, 128)).save(buf, "TIFF")
  unassociated = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # ExtraSamples = 2
  data = buf.getvalue()
  assert data.count(unassociated) == 1
  path = tmp_path / "premul.tif"
  path.write_bytes(data.replace(unassociated, unassociated[:-2] + b"\x01\x00"))
  np.testing.assert_array_equal(io.load_image(str(path))[0, 0], [227, 177, 152])


def test_cmyk_and_one_bit(tmp_path):
  cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))
  np.testing.assert_array_equal(io.load_image(_save(tmp_path, "c.tif", cmyk))[1, 1],
                                [255, 0, 0])
  bits = Image.new("1", (5, 5), 0)
  bits.putpixel((2, 2), 1)
  img = io.load_image(_save(tmp_path, "b.png", bits))
  assert img[2, 2].tolist() == [255] * 3 and img[0, 0].tolist() == [0] * 3


def test_exif_orientation_is_applied(tmp_path):
  """A 3 x 2 (w x h) image tagged 'rotate 90 CW' (orientation 6) is displayed 2 x 3; its
  top-left pixel ends up top-right."""
  im = Image.new("RGB", (3, 2), (255, 0, 0))
  im.putpixel((0, 0), (0, 0, 255))
  exif = Image.Exif()
  exif[0x0112] = 6
  img = io.load_image(_save(tmp_path, "rot.png", im, exif=exif))
  assert img.shape == (3, 2, 3)
  np.testing.assert_array_equal(img[0, 1], [0, 0, 255])
  np.testing.assert_array_equal(img[0, 0], [255, 0, 0])


def test_animation_gives_its_first_frame(tmp_path):
  frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
  path = _save(tmp_path, "anim.gif", frames[0], save_all=True, append_images=frames[1:],
               duration=100, loop=0)
  assert Image.open(path).n_frames == 2
  np.testing.assert_array_equal(io.load_image(path)[3, 3], [255, 0, 0])


def test_bad_files_name_the_path(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  with pytest.raises(ValueError, match=r"notes\.png: not an image"):
    io.load_image(str(text))
  with pytest.raises(FileNotFoundError, match=r"missing\.png: no such image file"):
    io.load_image(str(tmp_path / "missing.png"))
  truncated = tmp_path / "cut.png"
  full = pyio.BytesIO()
  Image.new("RGB", (64, 64), (1, 2, 3)).save(full, "PNG")
  truncated.write_bytes(full.getvalue()[:60])
  with pytest.raises(ValueError, match=r"cut\.png: not an image"):
    io.load_image(str(truncated))


def test_32_bit_and_float_grey(tmp_path):
  wide = np.full((4, 4), 65535, np.int32)
  wide[0, 0] = 23130
  img = io.load_image(_save(tmp_path, "i32.tif", Image.fromarray(wide, "I")))
  assert img[0, 0].tolist() == [90] * 3 and img[1, 1].tolist() == [255] * 3
  narrow = np.full((4, 4), 200, np.int32)
  img = io.load_image(_save(tmp_path, "i8.tif", Image.fromarray(narrow, "I")))
  assert img[0, 0].tolist() == [200] * 3
  unit = np.full((4, 4), 0.5, np.float32)
  img = io.load_image(_save(tmp_path, "f.tif", Image.fromarray(unit, "F")))
  assert img[0, 0].tolist() == [127] * 3
