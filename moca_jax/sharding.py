"""Device mesh and the one logical-axis rules table.

Mesh axes: ('data', 'fsdp'). The batch is split over both axes (every device holds a
different slice of the batch); parameters, optimizer moments and EMA are split over 'fsdp'
along their 'embed' dimension (ZeRO-3 / FSDP style: XLA all-gathers them for the matmuls and
reduce-scatters the gradients). With fsdp = 1 this is plain data parallelism.

Logical names used by the layers (see `moca_jax.layers`): 'embed', 'heads', 'mlp', 'vocab',
'in'; plus 'batch' for data. A parameter dimension is sharded only if its logical name maps
to a mesh axis, that mesh axis is not already used by another dimension of the same array,
and the dimension divides evenly; otherwise it is replicated. Unannotated parameters are
replicated. So the same code runs on 1 CPU, 8 simulated CPUs, one GPU or many.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")

# The one rules table: logical axis name -> mesh axis (or a tuple of them, or None).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", None),
    ("mlp", None),
    ("vocab", None),
    ("in", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all). data = -1 takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"make_mesh: fsdp={fsdp} must divide the device count {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} != {n} devices")
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


def _rules_dict(rules) -> dict[str, Any]:
  return {name: axis for name, axis in rules}


def _mesh_axes_size(mesh: Mesh, axis) -> int:
  axes = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for one array of `shape` whose dimensions carry logical `names`."""
  if names is None:
    return P()
  table = _rules_dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axis = table.get(name) if name is not None else None
    if axis is not None:
      axes = axis if isinstance(axis, tuple) else (axis,)
      size = _mesh_axes_size(mesh, axis)
      if used.intersection(axes) or dim % size or size == 1:
        axis = None
      else:
        used.update(axes)
    out.append(axis)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def logical_names(boxed_tree: Any) -> Any:
  """Tree of logical-name tuples (None where unannotated), same structure as the unboxed tree."""
  return jax.tree.map(lambda x: tuple(x.names) if _is_box(x) else None, boxed_tree,
                      is_leaf=_is_box)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (possibly abstract) tree of `nn.LogicallyPartitioned` boxes /
  arrays, structured like `nn.meta.unbox(boxed_tree)`."""
  def one(x):
    if _is_box(x):
      return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a batch array: leading axis over the 'batch' rule, the rest replicated."""
  return NamedSharding(mesh, P(_rules_dict(rules)["batch"]))


def batch_shardings(batch: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """A `batch_sharding` for every leaf of `batch` (leaves of rank 0 are replicated)."""
  spec = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: spec if np.ndim(x) else replicated(mesh), batch)


def shard_batch(batch: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Places a host batch (numpy) on the mesh, split along the leading axis.

  Single process: `jax.device_put`. Multi-process: each process passes its local slice and
  the global array is assembled with `jax.make_array_from_process_local_data`.
  """
  shardings = batch_shardings(batch, mesh, rules)
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)
  return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                      batch, shardings)


def check_batch_divisible(batch_size: int, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> None:
  """Raises if the global batch cannot be split evenly over the batch mesh axes."""
  n = _mesh_axes_size(mesh, _rules_dict(rules)["batch"])
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} must be divisible by the {n} devices of the "
                     f"batch axes {_rules_dict(rules)['batch']} (mesh {dict(mesh.shape)})")


def to_host(tree: Any) -> Any:
  """Numpy copy of a pytree of (possibly sharded) arrays, on every process.

  Arrays whose shards all live in this process, or that are fully replicated, are fetched
  with `jax.device_get`; arrays split over several processes (FSDP across hosts) are
  gathered with `multihost_utils.process_allgather`, a collective: every process must call
  this with the same tree.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def global_batch_spec(local_batch: Any) -> Any:
  """ShapeDtypeStructs of the global batch assembled from every process's `local_batch`.

  Each process feeds the same number of rows (the leading axis), so the global leading
  size is the local one times `jax.process_count()`; rank-0 leaves are replicated values.
  """
  count = jax.process_count()

  def one(x):
    shape = np.shape(x)
    if shape:
      shape = (shape[0] * count,) + tuple(shape[1:])
    return jax.ShapeDtypeStruct(shape, np.asarray(x).dtype)
  return jax.tree.map(one, local_batch)
