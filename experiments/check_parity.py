r"""Parity of the JAX reimplementation with an upstream golden fixture.

  python -m experiments.check_parity --fixture=tests/golden/triposg_vae

The fixture is recognised by its folder name (triposg_vae, triposg_dit, partcrafter_dit,
dinov2, image_preproc, scheduler, partcrafter_pipeline_e2e, as in tests/golden/); its weights,
config and io.npz are read from the folder (and its siblings where a fixture needs them). For
every stored output array it prints the relative error = max |ours - reference| /
max |reference| and the tolerance: 1e-4 for every model output, 1e-3 for the PartCrafter
pipeline's final latents after its steps (issue 16); --tolerance overrides both.

Exit codes: 0 all arrays within tolerance; 1 some array above it (or of another shape);
2 bad input (unknown fixture name, missing folder, unreadable fixture, no parity code yet).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Callable, Optional

import numpy as np

# fixture folder name -> (module, function) of its parity entry point
ENTRY_POINTS = {
    "triposg_vae": ("moca_jax.convert.triposg_vae", "parity"),
    "dinov2": ("moca_jax.convert.dinov2", "parity"),
    "image_preproc": ("moca_jax.convert.image_preproc", "parity"),
    "triposg_dit": ("moca_jax.convert.triposg_dit", "parity_triposg"),
    "partcrafter_dit": ("moca_jax.convert.triposg_dit", "parity_partcrafter"),
    "scheduler": ("moca_jax.convert.scheduler", "parity"),
    "partcrafter_pipeline_e2e": ("moca_jax.convert.pipeline_e2e", "parity"),
}
DEFAULT_TOLERANCE = 1e-4
# (fixture, array) pairs with a looser default: results of a whole sampling loop
LOOSE_TOLERANCE = {("partcrafter_pipeline_e2e", "final_latents"): 1e-3}


class ParityInputError(ValueError):
  """The fixture cannot be checked (bad folder, unknown name, no parity code)."""


@dataclasses.dataclass(frozen=True)
class ArrayResult:
  name: str
  shape: tuple[int, ...]
  max_abs_err: float
  max_abs_ref: float
  relative_error: float
  tolerance: float
  ok: bool
  note: str = ""


def fixture_name(fixture_dir: str) -> str:
  """The fixture's kind from its folder name; ParityInputError if unknown or missing."""
  path = os.path.normpath(os.fspath(fixture_dir))
  if not os.path.isdir(path):
    raise ParityInputError(f"{fixture_dir}: no such fixture folder")
  name = os.path.basename(path)
  if name not in ENTRY_POINTS:
    raise ParityInputError(f"{fixture_dir}: unknown fixture name {name!r}; the folder must be "
                           f"named one of {', '.join(sorted(ENTRY_POINTS))}")
  return name


def entry_point(name: str) -> Callable[[str], dict]:
  """The parity function of fixture `name`; ParityInputError when its code is not there."""
  module_name, func_name = ENTRY_POINTS[name]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise ParityInputError(f"no parity code for fixture {name!r} yet: module {module_name} "
                             "does not exist") from e
    raise
  func = getattr(module, func_name, None)
  if func is None:
    raise ParityInputError(f"no parity code for fixture {name!r} yet: "
                           f"{module_name}.{func_name} does not exist")
  return func


def compare(name: str, results: dict[str, tuple[np.ndarray, np.ndarray]],
            tolerance: Optional[float] = None) -> list[ArrayResult]:
  """Per-array relative errors of a parity entry point's {name: (ours, reference)}."""
  rows = []
  for array, (ours, ref) in sorted(results.items()):
    tol = tolerance if tolerance is not None else LOOSE_TOLERANCE.get((name, array),
                                                                      DEFAULT_TOLERANCE)
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
      rows.append(ArrayResult(array, tuple(ref.shape), float("inf"), float("nan"),
                              float("inf"), tol, False,
                              f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"))
      continue
    ref_max = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    if not np.isfinite(err):
      rel = float("inf")
    elif ref_max > 0:
      rel = err / ref_max
    else:
      rel = 0.0 if err == 0 else float("inf")
    rows.append(ArrayResult(array, tuple(ref.shape), err, ref_max, rel, tol, rel <= tol))
  return rows


def check(fixture_dir: str, tolerance: Optional[float] = None) -> list[ArrayResult]:
  """Runs the fixture's parity entry point and compares every stored output.

  Raises:
    ParityInputError: unknown / missing fixture or no parity code; ValueError from the
      converter (e.g. moca_jax.convert.common.ConversionError) for an unreadable fixture.
  """
  name = fixture_name(fixture_dir)
  results = entry_point(name)(os.path.normpath(fixture_dir))
  if not results:
    raise ParityInputError(f"{fixture_dir}: the parity code returned no arrays")
  return compare(name, results, tolerance)


def format_rows(rows: list[ArrayResult]) -> str:
  width = max(len(r.name) for r in rows)
  lines = [f"{'array':<{width}}  {'shape':<18} {'rel err':>10} {'tol':>8}  result"]
  for r in rows:
    shape = "x".join(str(d) for d in r.shape) or "scalar"
    lines.append(f"{r.name:<{width}}  {shape:<18} {r.relative_error:>10.3g} "
                 f"{r.tolerance:>8.0e}  {'ok' if r.ok else 'FAIL'}"
                 + (f" ({r.note})" if r.note else ""))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not f.fixture:
    print("check_parity: error: --fixture=DIR is required", file=sys.stderr)
    sys.exit(2)
  if f.tolerance is not None and not (np.isfinite(f.tolerance) and f.tolerance >= 0):
    print(f"check_parity: error: --tolerance must be a finite number >= 0, got {f.tolerance}",
          file=sys.stderr)
    sys.exit(2)
  try:
    rows = check(f.fixture, f.tolerance)
  except (FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback
    print(f"check_parity: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"fixture {fixture_name(f.fixture)} ({os.path.abspath(f.fixture)})")
  print(format_rows(rows))
  failed = [r.name for r in rows if not r.ok]
  if failed:
    print(f"FAILED: {len(failed)} of {len(rows)} arrays above tolerance: {', '.join(failed)}")
    sys.exit(1)
  print(f"all {len(rows)} arrays within tolerance")


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("fixture", None, "Fixture folder, named as in tests/golden/ "
                      f"({', '.join(sorted(ENTRY_POINTS))}).")
  flags.DEFINE_float("tolerance", None, "Relative tolerance for every array (default 1e-4; "
                     "1e-3 for the e2e final latents).")


if __name__ == "__main__":
  from moca_jax import cli  # pylint: disable=import-outside-toplevel

  _define_flags()
  cli.run(main)
