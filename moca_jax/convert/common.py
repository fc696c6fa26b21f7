"""Shared pieces of the upstream-weight importers (TripoSG, PartCrafter, DINOv2).

A published component is a folder with a `config.json` and one or more `*.safetensors` files
(diffusers / transformers layout). `read_component` reads both without torch; `TensorMap`
tracks which upstream tensors a converter consumed, so a conversion fails loudly when a
tensor is missing, has the wrong shape, or is left unmapped; `nest` turns the converter's
flat "a/b/kernel" names into a Flax params tree; `fullsize_shapes` reads the shape manifests
of the full-size checkpoints (tests/golden/fullsize/*.json) so converters can be checked at
full size on zero-stride arrays, without the weights.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np


class ConversionError(ValueError):
  """An upstream checkpoint that cannot be converted; the message names the file and reason."""


def read_component(folder: str, expected_classes: tuple[str, ...] | None = None
                   ) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a diffusers/transformers component folder.

  Args:
    folder: folder holding `config.json` and `*.safetensors`.
    expected_classes: allowed values of the config's `_class_name` (or `architectures[0]` for
      transformers configs); None accepts any.

  Returns:
    (config dict, {tensor name: float32 array}).

  Raises:
    ConversionError: missing folder, missing/invalid config.json, no weights file, unexpected
      class name, or a non-float tensor (named).
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise ConversionError(f"{folder}: no such folder")
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise ConversionError(f"{folder}: no config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{config_path}: not a readable JSON file ({e})") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{config_path}: not a JSON object")
  if expected_classes is not None:
    name = config.get("_class_name")
    if name is None and config.get("architectures"):
      name = config["architectures"][0]
    if name not in expected_classes:
      raise ConversionError(
          f"{config_path}: class {name!r} is not one of {', '.join(expected_classes)}")
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise ConversionError(f"{folder}: no *.safetensors weights file")
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    try:
      loaded = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files.
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    for name, array in loaded.items():
      if not np.issubdtype(array.dtype, np.floating):
        raise ConversionError(f"{path}: tensor {name} has non-float dtype {array.dtype}")
      tensors[name] = np.asarray(array, dtype=np.float32)
  return config, tensors


class TensorMap:
  """Consumption tracker over an upstream state dict.

  `take` returns a tensor and marks it used; missing names and shape mismatches are recorded
  (shape mismatches raise at once); `finish` raises one error listing every missing tensor and
  every tensor no converter took.
  """

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self._tensors = dict(tensors)
    self._source = source
    self._used: set[str] = set()
    self._missing: list[str] = []

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The tensor `name` (float32); records it as missing (returns zeros when `shape` is given,
    else an empty array) so `finish` reports all missing tensors at once.

    Raises:
      ConversionError: the tensor exists with a shape other than `shape`.
    """
    if name not in self._tensors:
      self._missing.append(name)
      return np.zeros(shape if shape is not None else (0,), np.float32)
    array = self._tensors[name]
    if shape is not None and tuple(array.shape) != tuple(shape):
      raise ConversionError(f"{self._source}: tensor {name} has shape {tuple(array.shape)}, "
                            f"expected {tuple(shape)}")
    self._used.add(name)
    return array

  def finish(self) -> None:
    """Raises ConversionError naming every missing and every unconsumed tensor, if any."""
    unused = sorted(set(self._tensors) - self._used)
    if not self._missing and not unused:
      return
    parts = []
    if self._missing:
      parts.append(f"missing tensors: {', '.join(self._missing)}")
    if unused:
      parts.append(f"unmapped tensors: {', '.join(unused)}")
    raise ConversionError(f"{self._source}: " + "; ".join(parts))


def nest(flat: dict[str, Any]) -> dict:
  """{"a/b/kernel": x} -> {"a": {"b": {"kernel": x}}}.

  Raises:
    ValueError: a name is both a leaf and a prefix of another name.
  """
  tree: dict = {}
  for name, value in flat.items():
    parts = name.split("/")
    node = tree
    for part in parts[:-1]:
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ValueError(f"param name {name}: {part} is already a leaf")
      node = child
    if parts[-1] in node:
      raise ValueError(f"param name {name} given twice or is a prefix of another name")
    node[parts[-1]] = value
  return tree


def fullsize_shapes(json_path: str) -> dict[str, tuple[int, ...]]:
  """{tensor name: shape} from a full-size manifest (golden/fullsize/*.json, key "tensors").

  Raises:
    ConversionError: missing or malformed manifest.
  """
  try:
    with open(json_path, encoding="utf-8") as f:
      manifest = json.load(f)
    return {name: tuple(int(d) for d in shape) for name, shape in manifest["tensors"].items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{json_path}: not a readable shape manifest ({e})") from e


def fullsize_config(json_path: str) -> dict:
  """The upstream `config` dict stored in a full-size manifest."""
  try:
    with open(json_path, encoding="utf-8") as f:
      return dict(json.load(f)["config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{json_path}: not a readable shape manifest ({e})") from e


def zero_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Zero-stride float32 arrays of the given shapes (no memory), for shape-only conversion."""
  return {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}


def read_fixture_io(fixture_dir: str) -> dict[str, np.ndarray]:
  """The arrays of a golden fixture's io.npz; ConversionError when missing or unreadable."""
  path = os.path.join(os.fspath(fixture_dir), "io.npz")
  if not os.path.isfile(path):
    raise ConversionError(f"{fixture_dir}: no io.npz")
  try:
    with np.load(path) as data:
      return {name: data[name] for name in data.files}
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: not a readable npz file ({e})") from e
