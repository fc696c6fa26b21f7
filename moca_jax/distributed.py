"""Start-up of a training job over several devices, processes or hosts.

Two layouts run the same training code (`train_lib.run_training`, the mesh of
`moca_jax.sharding`):

  one process, all local devices   nothing to initialise; the mesh spans `jax.devices()`.
  one process per GPU / per host   `initialize(config.distributed)` calls
                                   `jax.distributed.initialize` before any other JAX call;
                                   `jax.devices()` then lists every process's devices and
                                   each process feeds its own rows of the global batch.

`distributed_config()` holds the fields (config.distributed.*). Empty fields are left to
JAX's detection: the environment variables JAX_COORDINATOR_ADDRESS and
JAX_LOCAL_DEVICE_IDS, and the cluster detectors (SLURM, Open MPI, Kubernetes, Cloud TPU,
which give the process count and index too). On a TPU pod slice `enabled=True` alone is
enough.

On 2 H200s (2026-11-30) no 2-device job got past XLA compilation within 75-120 s (the jitted
state init of the 'small' DiT alone: about 42 s of XLA passes); whether it then trains is not
yet measured (experiments/results/multi_gpu.md). `run_training` logs the start and end of both
compiles; set JAX_COMPILATION_CACHE_DIR so that a restarted job loads the executables instead.

One process driving several GPUs has a documented NCCL hazard (NVIDIA's JAX performance
guide): a process-wide synchronising CUDA call, issued while one device's collective kernel
already waits for its peer, can block the thread that would launch the peer's kernel. The
guide's remedies are NCCL_LAUNCH_MODE=GROUP in the environment or one process per GPU
(`experiments/launch_multi.sh`). Nothing here sets the former: it was not seen to matter on
the 2-H200 machine, where no run got past compilation. A data-parallel step holds no
collective but all-reduces (gradients, batch means; tests/test_multi_device.py).
"""
from __future__ import annotations

import logging
from typing import Optional

import ml_collections

log = logging.getLogger(__name__)


def distributed_config() -> ml_collections.ConfigDict:
  """config.distributed: fields of `initialize`.

  enabled: call `jax.distributed.initialize` (multi-process job).
  coordinator_address: 'host:port' of process 0's coordinator ('' = JAX_COORDINATOR_ADDRESS
    or cluster detection).
  num_processes / process_id: 0 / -1 = detect (cluster environment).
  local_device_ids: comma-separated local GPU ids this process uses ('' = JAX_LOCAL_DEVICE_IDS
    or all visible); one process per GPU on one host: process i uses 'i'.
  initialization_timeout: seconds to wait for every process to join.
  """
  return ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1,
      local_device_ids="", initialization_timeout=300))


def initialize_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """The keyword arguments for `jax.distributed.initialize` from config.distributed
  (unset fields are left out, so JAX detects them). Raises ValueError on bad fields."""
  kwargs: dict = {"initialization_timeout": int(cfg.get("initialization_timeout", 300))}
  if cfg.get("coordinator_address"):
    if ":" not in cfg.coordinator_address:
      raise ValueError(f"config.distributed.coordinator_address={cfg.coordinator_address!r}: "
                       "expected 'host:port'")
    kwargs["coordinator_address"] = cfg.coordinator_address
  num, pid = int(cfg.get("num_processes", 0)), int(cfg.get("process_id", -1))
  if num > 0:
    kwargs["num_processes"] = num
  if pid >= 0:
    if num > 0 and pid >= num:
      raise ValueError(f"config.distributed.process_id={pid} must be < num_processes={num}")
    kwargs["process_id"] = pid
  ids = str(cfg.get("local_device_ids", "") or "").strip()
  if ids:
    try:
      kwargs["local_device_ids"] = [int(x) for x in ids.split(",")]
    except ValueError:
      raise ValueError(f"config.distributed.local_device_ids={ids!r}: expected comma-separated "
                       "integers") from None
  return kwargs


def initialize(cfg: Optional[ml_collections.ConfigDict]) -> bool:
  """Calls `jax.distributed.initialize` when cfg.enabled (once per process). Call it
  before any other JAX call.

  Returns True when this call initialised the distributed runtime.
  """
  if cfg is None or not cfg.get("enabled", False):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return False
  kwargs = initialize_kwargs(cfg)
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True
