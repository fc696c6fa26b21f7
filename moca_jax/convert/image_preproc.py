"""Parity of `moca_jax.preprocess` with the upstream image preprocessing fixture
(TripoSG / PartCrafter `prepare_image` + transformers 4.x `BitImageProcessor`)."""
from __future__ import annotations

import json
import os

import numpy as np

from moca_jax import preprocess as pp
from moca_jax.convert.common import ConversionError, read_fixture_io


def parity(fixture_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Runs both recorded paths on `image_preproc/io.npz:input_rgba`.

  The processor settings are read from the fixture's `preprocessor_config.json`, the
  prepare_image arguments from its `config.json`.

  Returns:
    {array name: (ours, reference)} for every stored output (uint8 arrays as float32).
  """
  io = read_fixture_io(fixture_dir)
  processor = pp.ProcessorConfig.from_file(os.path.join(fixture_dir, "preprocessor_config.json"))
  with open(os.path.join(fixture_dir, "config.json"), encoding="utf-8") as f:
    call = json.load(f)["prepare_image"]
  if call.get("rmbg_net") is not None:
    raise ConversionError(f"{fixture_dir}: fixtures made with a background-removal net are "
                          "not reproducible here")
  image = io["input_rgba"]
  bg = tuple(call["bg_color"])
  ratio = float(call["padding_ratio"])
  prepared = pp.prepare_image(image, bg_color=bg, padding_ratio=ratio)
  got = {
      "a_prepared_uint8": prepared,
      "a_padded_float": pp.prepare_image_float(image, bg, ratio).transpose(2, 0, 1),
      "a_pixel_values": pp.bit_image_processor(prepared, processor).transpose(2, 0, 1)[None],
      "b_pixel_values": pp.preprocess(image, processor, "raw").transpose(2, 0, 1)[None],
  }
  missing = sorted(set(io) - {"input_rgba"} - set(got))
  if missing:
    raise ConversionError(f"{fixture_dir}: no comparison for stored arrays {missing}")
  return {k: (np.asarray(v, np.float32), io[k].astype(np.float32)) for k, v in got.items()}
