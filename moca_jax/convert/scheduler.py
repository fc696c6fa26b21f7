"""TripoSG / PartCrafter `RectifiedFlowScheduler` settings -> this project's sampler settings.

The published `scheduler/` folder holds `scheduler_config.json` (diffusers' name; `config.json`
is read when that is absent) with `num_train_timesteps`, `shift` and `use_dynamic_shifting`.
The schedule itself is `moca_jax.flow.rectified_flow_sigmas` / `time_grid` (see the module
docstring of `moca_jax.flow`); what this project needs from the folder is the shift, passed
to the samplers as `time_shift`.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from moca_jax import flow
from moca_jax.convert.common import ConversionError

CLASS_NAMES = ("RectifiedFlowScheduler",)
CONFIG_NAMES = ("scheduler_config.json", "config.json")


def settings_from_config(config: dict, source: str = "scheduler config") -> dict:
  """{'time_shift': float, 'num_train_timesteps': 1000} from a scheduler config dict.

  Raises:
    ConversionError: an unknown `_class_name`, dynamic shifting, a train-timestep count other
      than 1000 (the DiT's sinusoid is on the 0..1000 scale), or a bad shift (named).
  """
  name = config.get("_class_name")
  if name is not None and name not in CLASS_NAMES:
    raise ConversionError(f"{source}: class {name!r} is not one of {', '.join(CLASS_NAMES)}")
  if config.get("use_dynamic_shifting"):
    raise ConversionError(f"{source}: use_dynamic_shifting=true is not supported")
  n = config.get("num_train_timesteps", 1000)
  if n != 1000:
    raise ConversionError(f"{source}: num_train_timesteps={n}, only 1000 is supported")
  shift = config.get("shift", 1.0)
  if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not np.isfinite(shift) \
      or shift <= 0:
    raise ConversionError(f"{source}: shift must be a positive number, got {shift!r}")
  return {"time_shift": float(shift), "num_train_timesteps": 1000}


def load(folder: str) -> dict:
  """Sampler settings from a published `scheduler/` folder (see `settings_from_config`).

  Raises:
    ConversionError: missing folder or config file, unreadable JSON, unsupported settings.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise ConversionError(f"{folder}: no such folder")
  for name in CONFIG_NAMES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      break
  else:
    raise ConversionError(f"{folder}: no {' or '.join(CONFIG_NAMES)}")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: not a readable JSON file ({e})") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: not a JSON object")
  return settings_from_config(config, path)


def _replay(sample0: np.ndarray, model_outputs: np.ndarray, shift: float) -> np.ndarray:
  """Runs `flow.sample_ode` (Euler, one lax.scan) with the stored upstream model outputs
  (negated into this project's velocity convention); returns the state after every step."""
  steps = model_outputs.shape[0]
  grid = flow.time_grid(steps, shift)
  outputs = jnp.asarray(model_outputs)

  def velocity(x, t, cond):
    del x, cond
    index = jnp.sum(grid[:-1] > t[0])  # this step's position in the decreasing grid
    return -outputs[index]

  _, trajectory = jax.jit(lambda x: flow.sample_ode(
      velocity, x, None, steps=steps, time_shift=shift, return_trajectory=True))(
      jnp.asarray(sample0))
  return np.asarray(trajectory)


def parity(fixture_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """This project's schedule and sampler vs tests/golden/scheduler.

  The fixture's config.json holds two scheduler configs ('main', 'extra_shift'), each read
  through `settings_from_config`. Returns {array name: (ours, reference)} for every array
  of its io.npz except the replay inputs `loop_sample0`, `loop_model_outputs`.
  """
  with open(os.path.join(fixture_dir, "config.json"), encoding="utf-8") as f:
    configs = json.load(f)
  io = np.load(os.path.join(fixture_dir, "io.npz"))
  main = settings_from_config(configs["main"], "scheduler/config.json:main")["time_shift"]
  extra = settings_from_config(configs["extra_shift"],
                               "scheduler/config.json:extra_shift")["time_shift"]
  out = {}
  train = flow.rectified_flow_train_sigmas(1000, main)
  out["train_sigmas"] = (train, io["train_sigmas"])
  out["train_timesteps"] = (flow.timesteps_from_sigmas(train), io["train_timesteps"])
  for prefix, shift in (("", main), ("shift_", extra)):
    for steps in (10, 50):
      sigmas = np.asarray(flow.time_grid(steps, shift))
      out[f"{prefix}sigmas_{steps}"] = (sigmas, io[f"{prefix}sigmas_{steps}"])
      out[f"{prefix}timesteps_{steps}"] = (flow.timesteps_from_sigmas(sigmas[:-1]),
                                           io[f"{prefix}timesteps_{steps}"])
  out["loop_prev_samples"] = (_replay(io["loop_sample0"], io["loop_model_outputs"], main),
                              io["loop_prev_samples"])
  return out
