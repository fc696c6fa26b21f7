"""Model bundles: a trained DiT (its image encoder inside) and its VAE in one small folder.

A bundle is what ships in the repository (`assets/moca-small/`) and what `generate`,
`evaluate` and `make demo` load when no checkpoint is named. It holds the EMA weights only,
stored in a compact dtype (bfloat16 by default: half the bytes of float32), and the two
configs; loading restores float32 params (the compute dtype is the config's, as after
training).

Folder layout:
  bundle.json   {'format': 'moca-jax-bundle', 'version', 'storage_dtype', 'dit_config',
                 'vae_config', 'files': {name: {'sha256', 'bytes', 'params'}}, 'card': {...}}
                 dit_config / vae_config: the configs stored with the training checkpoints
                 (train_dit / train_vae), so the architecture is exactly the trained one.
  dit.npz       ImageConditionedDiT params, one array per parameter, keyed by its '/'-joined
                path; bfloat16 values are stored as their uint16 bit patterns
  vae.npz       VecSetVAE params, the same way
  (MODEL_CARD.md and pictures are written beside them by experiments/export_bundle.py)

  write_bundle(out_dir, dit_config, dit_params, vae_config, vae_params, card=None) -> bundle.json path
  read_bundle(folder) -> Bundle(dit_config, dit_params, vae_config, vae_params, info)
  params_for_training(folder, 'dit' | 'vae', abstract) -> params (a warm start, config.init.from_bundle)
  is_bundle(path) -> bool

Errors: `BundleError` (a ValueError) naming the folder and the reason (not a bundle, a
format version from the future, a file missing or not matching its checksum, parameters
missing, extra or of the wrong shape for the stored config); nothing is half-written (each
file is written atomically, bundle.json last).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from moca_jax import io as mio

PyTree = Any
FORMAT = "moca-jax-bundle"
VERSION = 1
INFO_FILE = "bundle.json"
STORAGE_DTYPES = ("bfloat16", "float16", "float32")


class BundleError(ValueError):
  """A bundle folder that cannot be loaded (the message names the folder and the reason)."""


@dataclasses.dataclass
class Bundle:
  dit_config: ml_collections.ConfigDict  # train_dit config (model.encoder, model.dit, sample)
  dit_params: PyTree  # ImageConditionedDiT params (float32)
  vae_config: ml_collections.ConfigDict  # train_vae config (model = the VAE's)
  vae_params: PyTree  # VecSetVAE params (float32), without the {'params': ...} wrapper
  info: dict  # bundle.json


def is_bundle(path: str) -> bool:
  """True when `path` is a folder holding a bundle.json."""
  return os.path.isfile(os.path.join(os.fspath(path), INFO_FILE))


# ----------------------------------------------------------------------------------------
# Params <-> compact arrays
# ----------------------------------------------------------------------------------------


def _flat(params: PyTree) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def encode_params(params: PyTree, storage_dtype: str = "bfloat16") -> bytes:
  """Params -> npz bytes, every array cast to `storage_dtype` (bfloat16 stored as uint16
  bit patterns, since npz has no bfloat16)."""
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage_dtype: expected one of {STORAGE_DTYPES}, got {storage_dtype!r}")
  arrays = {}
  for key, value in _flat(params).items():
    value = np.asarray(value, jnp.dtype(storage_dtype))
    arrays[key] = value.view(np.uint16) if storage_dtype == "bfloat16" else value
  buf = _io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_params(data: bytes, storage_dtype: str, abstract: PyTree, name: str,
                  keep=None) -> PyTree:
  """npz bytes -> params shaped like `abstract` (a pytree of arrays or ShapeDtypeStructs),
  in abstract's dtypes. keep: optional predicate on the stored '/'-joined keys (the others
  are ignored). Raises BundleError naming `name` when keys or shapes differ."""
  with np.load(_io.BytesIO(data), allow_pickle=False) as npz:
    stored = {k: npz[k] for k in npz.files if keep is None or keep(k)}
  want = traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/")
  missing = sorted(set(want) - set(stored))
  extra = sorted(set(stored) - set(want))
  wrong = sorted(k for k in set(want) & set(stored) if tuple(stored[k].shape) != tuple(want[k].shape))
  if missing or extra or wrong:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", extra)):
      if keys:
        parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if wrong:
      k = wrong[0]
      parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(stored[k].shape)} stored, "
                   f"{tuple(want[k].shape)} in the config)")
    raise BundleError(f"{name}: parameters do not match the bundle's config: {'; '.join(parts)}")
  out = {}
  for key, spec in want.items():
    value = stored[key]
    if storage_dtype == "bfloat16":
      value = value.view(jnp.bfloat16)
    out[key] = jnp.asarray(value.astype(spec.dtype))
  return traverse_util.unflatten_dict(out, sep="/")


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _count(params: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(nn.meta.unbox(params))))


# ----------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------


def _config_json(config) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def write_bundle(
    out_dir: str,
    dit_config,
    dit_params: PyTree,
    vae_config,
    vae_params: PyTree,
    card: Optional[dict] = None,
    storage_dtype: str = "bfloat16",
) -> str:
  """Writes a bundle folder (module docstring); returns the path of its bundle.json.

  dit_params: ImageConditionedDiT params; vae_params: VecSetVAE params (with or without the
  {'params': ...} wrapper). Weights files first, bundle.json (with their checksums) last.
  """
  vae_params = vae_params.get("params", vae_params) if isinstance(vae_params, dict) else vae_params
  files = {}
  for name, params in (("dit.npz", dit_params), ("vae.npz", vae_params)):
    data = encode_params(params, storage_dtype)
    mio.atomic_write_bytes(os.path.join(out_dir, name), data)
    files[name] = {"sha256": _sha256(data), "bytes": len(data), "params": _count(params)}
  info = {
      "format": FORMAT,
      "version": VERSION,
      "storage_dtype": storage_dtype,
      "dit_config": _config_json(dit_config),
      "vae_config": _config_json(vae_config),
      "files": files,
      "card": card or {},
  }
  path = os.path.join(out_dir, INFO_FILE)
  mio.write_json(path, info, indent=1)
  return path


def read_info(folder: str) -> dict:
  """The checked bundle.json of `folder`. Raises FileNotFoundError / BundleError."""
  folder = os.path.abspath(os.fspath(folder))
  path = os.path.join(folder, INFO_FILE)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: bundle folder does not exist")
  if not os.path.isfile(path):
    raise BundleError(f"{folder}: not a model bundle (no {INFO_FILE})")
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise BundleError(f"{path}: unreadable ({e})") from e
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    raise BundleError(f"{path}: not a {FORMAT} file (format {info.get('format')!r})"
                      if isinstance(info, dict) else f"{path}: not a {FORMAT} file")
  if int(info.get("version", 0)) > VERSION:
    raise BundleError(f"{path}: bundle format version {info['version']} is newer than this "
                      f"code reads ({VERSION}); update moca-jax")
  for key in ("storage_dtype", "dit_config", "vae_config", "files"):
    if key not in info:
      raise BundleError(f"{path}: field {key!r} is missing")
  if info["storage_dtype"] not in STORAGE_DTYPES:
    raise BundleError(f"{path}: unknown storage dtype {info['storage_dtype']!r}")
  return info


def _read_weights(folder: str, name: str, info: dict) -> bytes:
  path = os.path.join(folder, name)
  meta = info["files"].get(name)
  if meta is None:
    raise BundleError(f"{folder}: {INFO_FILE} lists no {name}")
  if not os.path.isfile(path):
    raise BundleError(f"{path}: weights file missing")
  with open(path, "rb") as f:
    data = f.read()
  if _sha256(data) != meta["sha256"]:
    raise BundleError(f"{path}: checksum does not match {INFO_FILE} (a truncated or replaced "
                      "file)")
  return data


def weights_sha256(folder: str) -> str:
  """One fingerprint of a bundle's weights: the sha256 over its weight files' recorded
  sha256s (name-sorted), the same for a copy of the bundle wherever it lies. Lets a report
  tell whether two runs used the same model when their paths differ. Raises like
  `read_info`."""
  return fingerprint_of_info(read_info(folder))


def fingerprint_of_info(info: dict) -> str:
  """`weights_sha256` of a bundle from its bundle.json contents (its 'files' records)."""
  files = info["files"]
  joined = "".join(f"{name}:{files[name]['sha256']};" for name in sorted(files))
  return _sha256(joined.encode())


def read_bundle(folder: str) -> Bundle:
  """Loads a bundle folder: configs and float32 params, checked against each other.

  Raises FileNotFoundError (no folder) or BundleError (module docstring).
  """
  from moca_jax import dit_task, vae_task  # pylint: disable=g-import-not-at-top

  folder = os.path.abspath(os.fspath(folder))
  info = read_info(folder)
  try:
    dit_config = ml_collections.ConfigDict(info["dit_config"])
    vae_config = ml_collections.ConfigDict(info["vae_config"])
    dit_abstract = dit_task.abstract_params(dit_config)
    _, vae_abstract = vae_task.abstract_params(vae_config)
  except BundleError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any malformed stored config)
    raise BundleError(f"{folder}: its configs do not build a model ({type(e).__name__}: {e})"
                      ) from e
  dtype = info["storage_dtype"]
  dit_params = decode_params(_read_weights(folder, "dit.npz", info), dtype, dit_abstract,
                             os.path.join(folder, "dit.npz"))
  vae_params = decode_params(_read_weights(folder, "vae.npz", info), dtype, vae_abstract,
                             os.path.join(folder, "vae.npz"))
  return Bundle(dit_config, dit_params, vae_config, vae_params, info)


def params_for_training(folder: str, which: str, abstract: PyTree,
                        parts: Optional[tuple] = None) -> PyTree:
  """A training run's warm start (config.init.from_bundle): the bundle's `which` params.

  Args:
    folder: a bundle folder.
    which: 'dit' (ImageConditionedDiT params, {'encoder', 'dit'}) or 'vae' (VecSetVAE params).
    abstract: the params of the model being trained (arrays or ShapeDtypeStructs, without
      the {'params': ...} wrapper); the bundle's weights are decoded against it, so the
      training config may differ from the bundle's in anything but the parameter shapes
      (dtype, attention backend, loss, data, optimizer).
    parts: top-level param names to take (e.g. ('dit',): the DiT without its image
      encoder); None takes all. Only those parts are compared and returned.
  Returns:
    params like `abstract` (restricted to `parts`), in its dtypes (float32 for training).
  Raises:
    FileNotFoundError: no such folder.
    BundleError: not a bundle, a bad checksum, or parameters missing, extra or of another
      shape than the training config's (the message names them).
  """
  if which not in ("dit", "vae"):
    raise ValueError(f"which: expected 'dit' or 'vae', got {which!r}")
  folder = os.path.abspath(os.fspath(folder))
  info = read_info(folder)
  name = f"{which}.npz"
  if parts is not None:
    unknown = sorted(set(parts) - set(abstract))
    if unknown:
      raise ValueError(f"parts: {unknown} are not top-level params of the model "
                       f"({sorted(abstract)})")
    abstract = {k: abstract[k] for k in parts}
  return decode_params(_read_weights(folder, name, info), info["storage_dtype"], abstract,
                       f"init.from_bundle={folder} ({name} against the training config)",
                       keep=None if parts is None else (lambda key: key.split("/")[0] in parts))
