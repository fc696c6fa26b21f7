"""Checkpoints of the training loop (orbax) and the config stored with them.

Layout: one orbax `CheckpointManager` per run (`<workdir>/checkpoints`), one Composite per
saved step with the items
  'state'   {step, params, opt_state} (params fp32, sharded as trained)
  'ema'     the EMA params (what generation and `load_vae` use)
  'data'    the data iterator's state (JSON), so a resumed run sees the same batches
  'config'  the run's config (JSON), which later stages read (generation names its VAE
            through it)
Saves are asynchronous, every `checkpoint.every` steps (plus a forced last one), keeping
`checkpoint.keep`. Restores go onto abstract targets (ShapeDtypeStructs with shardings), so a
checkpoint restores on another mesh. `restore_params` reads the params alone (inference).

Resume rule (`prepare_workdir`, called by `train_lib.run_training` before anything is
written): the new config is compared with the one stored with the latest checkpoint, and any
difference outside `RESUMABLE_FIELDS` is a `ConfigMismatchError`, one line naming every
differing field; `workdir/config.json` is written only after the check passed. Fields that
may change on resume:
  num_steps, optim.total_steps   train longer (the schedule follows total_steps)
  time_limit_s                   the length of a training chunk (train_lib.run_training)
  stop_at_unix                   a chunk's wall-clock deadline (train_lib.run_training)
  init.from_bundle, init.bundle_parts
                                 a fresh run's warm start (only read when there is no checkpoint)
  log_every, checkpoint.*        logging and checkpoint cadence
  eval.*                         evaluation after training
  data.num_workers, data.in_memory, data.read_threads, mesh.*, distributed
                                 how the same computation is spread (restores are
                                 sharding-agnostic; the batches do not change)
  batch_size                     allowed with a warning: the data order and the loss scale
                                 change, so the run no longer equals an uninterrupted one
Everything else (model shapes, optimizer, data source and folders, seeds, the VAE a DiT
names) must match: use a new workdir to train another model.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from moca_jax import io as mio

PyTree = Any

log = logging.getLogger(__name__)

ITEMS = ("state", "ema", "data", "config")


def _encode_data_state(state: Any) -> dict:
  if state is None:
    return {"kind": "none"}
  if isinstance(state, bytes):
    return {"kind": "bytes", "value": state.decode("utf-8")}
  return {"kind": "json", "value": state}


def _decode_data_state(payload: dict) -> Any:
  kind = payload.get("kind")
  if kind == "bytes":
    return payload["value"].encode("utf-8")
  if kind == "json":
    return payload["value"]
  return None


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-safe dict of the config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def latest_checkpoint_step(directory: str) -> Optional[int]:
  """The newest finished checkpoint step in an orbax checkpoint folder (its subfolders named
  by step; orbax's temporary ones are not), or None when there is none or no folder."""
  if not os.path.isdir(directory):
    return None
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  return max(steps, default=None)


class Checkpointer:
  """Orbax CheckpointManager with the Composite items 'state', 'ema', 'data', 'config'.

  Saves every `save_every` steps (plus forced saves), keeps the last `keep`, asynchronously.
  Call `wait()` (or `close()`) before exiting.
  """

  def __init__(
      self, directory: str, save_every: int = 1000, keep: int = 3, async_save: bool = True
  ):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=max(save_every, 1),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
      self,
      step: int,
      state: Any,
      data_state: Any,
      config: ml_collections.ConfigDict,
      force: bool = False,
  ) -> bool:
    """Saves a `train_lib.TrainState` (step, params, opt_state, ema_params), the data
    iterator's state (JSON or bytes, None for none) and the config; returns whether orbax
    saved (False between `save_every` steps unless forced)."""
    core = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(core),
            ema=ocp.args.StandardSave(state.ema_params),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
            config=ocp.args.JsonSave(config_to_json(config)),
        ),
        force=force,
    )

  def restore(self, step: Optional[int], abstract_state: Any) -> tuple[Any, Any, dict]:
    """Restores onto `abstract_state` (a `train_lib.TrainState` of ShapeDtypeStructs with
    shardings), latest step when `step` is None.

    Returns (state like abstract_state, data iterator state, config dict).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    a = abstract_state
    core_abs = {"step": a.step, "params": a.params, "opt_state": a.opt_state}
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(core_abs),
            ema=ocp.args.StandardRestore(a.ema_params),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ),
    )
    core = out["state"]
    state = abstract_state.replace(
        step=core["step"], params=core["params"], opt_state=core["opt_state"], ema_params=out["ema"]
    )
    return state, _decode_data_state(out["data"]), out["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_checkpoint_config(directory: str, step: Optional[int] = None) -> tuple[dict, int]:
  """The config dict stored with a checkpoint (latest step by default).

  Raises FileNotFoundError (missing dir / no checkpoint) or ValueError (unreadable).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory does not exist: {directory}")
  manager = ocp.CheckpointManager(
      directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(create=False)
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint steps in {directory}")
  try:
    cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except Exception as e:
    raise ValueError(
        f"corrupt or unreadable checkpoint config in {directory} step {step}: "
        f"{type(e).__name__}: {e}"
    ) from e
  finally:
    manager.close()
  return cfg, step


def restore_params(
    directory: str, abstract_params: PyTree, step: Optional[int] = None, item: str = "ema"
) -> PyTree:
  """Restores only the params ('ema' or the raw 'state' params) onto `abstract_params`.

  Raises FileNotFoundError / ValueError with the path on a missing or corrupt checkpoint.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory does not exist: {directory}")
  manager = ocp.CheckpointManager(
      directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(create=False)
  )
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint steps in {directory}")
    if item == "ema":
      args = ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_params))
      return manager.restore(step, args=args)["ema"]
    # Restore the 'state' item partially: params only.
    path = os.path.join(directory, str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    restored = ckptr.restore(
        path,
        args=ocp.args.PyTreeRestore(
            {"params": abstract_params},
            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract_params}),
            partial_restore=True,
        ),
    )
    return restored["params"]
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(
        f"corrupt or incompatible checkpoint in {directory} step {step}: "
        f"{type(e).__name__}: {e}"
    ) from e
  finally:
    manager.close()


# ----------------------------------------------------------------------------------------
# The stored config, compared on resume
# ----------------------------------------------------------------------------------------

# Dotted config keys (a key or a prefix of keys) that may differ from the stored config.
RESUMABLE_FIELDS = (
    "num_steps",
    "optim.total_steps",
    "time_limit_s",
    "stop_at_unix",
    "log_every",
    "checkpoint",
    "eval",
    "data.num_workers",
    "data.in_memory",
    "data.read_threads",
    "mesh",
    "distributed",
    "init.from_bundle",
    "init.bundle_parts",
)
# May differ, with a warning.
WARN_FIELDS = ("batch_size",)

# Config fields added after checkpoints were already written, with the value that reproduces
# what those runs did: a stored config without the field resumes when the new config holds
# that value (any other value is a difference like any other).
FIELDS_ADDED_LATER = {
    "data.analytic_fraction": 0.5,  # 2026-12-02, read only by data.source='mixed'
}


class ConfigMismatchError(ValueError):
  """The config of a resumed run differs from the stored one in a field that must not."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(stored: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(dotted key, stored value, new value) for every leaf that differs, sorted by key; a
  leaf missing on one side has the value None there, except a FIELDS_ADDED_LATER field
  missing from the stored config, which counts as its listed value."""
  a, b = _flatten(stored), _flatten(new)
  for key, value in FIELDS_ADDED_LATER.items():
    if key not in a and b.get(key) == value:
      a[key] = value
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _matches(key: str, fields: tuple[str, ...]) -> bool:
  return any(key == f or key.startswith(f + ".") for f in fields)


def check_resume_config(directory: str, config: ml_collections.ConfigDict) -> Optional[int]:
  """Compares `config` with the config stored with the latest checkpoint in `directory`.

  Returns the latest step (None when there is no checkpoint, so nothing to compare).
  Raises ConfigMismatchError naming every field outside RESUMABLE_FIELDS / WARN_FIELDS that
  differs (one line: field, stored value -> new value); logs a warning for WARN_FIELDS.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory) or not _has_steps(directory):
    return None
  stored, step = read_checkpoint_config(directory)
  diffs = config_differences(stored, config_to_json(config))
  bad = [d for d in diffs if not _matches(d[0], RESUMABLE_FIELDS + WARN_FIELDS)]
  if bad:
    fields = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in bad)
    raise ConfigMismatchError(
        f"{directory}: cannot resume from step {step}: the config differs from the stored "
        f"one in {fields}; only {', '.join(RESUMABLE_FIELDS + WARN_FIELDS)} may change on "
        "resume (use a new workdir to train another model)"
    )
  for k, old, new in diffs:
    if _matches(k, WARN_FIELDS):
      log.warning(
          "%s: resuming from step %d with %s %r (was %r): the data order and the "
          "loss scale change",
          directory,
          step,
          k,
          new,
          old,
      )
  return step


def _has_steps(directory: str) -> bool:
  return any(name.isdigit() for name in os.listdir(directory))


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> Optional[int]:
  """Checks a resume (`check_resume_config` on workdir/checkpoints), then writes
  workdir/config.json (process 0). Nothing is written when the check fails.

  Returns the step the run will resume from (None for a fresh run).
  """
  step = check_resume_config(os.path.join(workdir, "checkpoints"), config)
  if jax.process_index() == 0:
    mio.write_json(os.path.join(workdir, "config.json"), config_to_json(config))
  return step
