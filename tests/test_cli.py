"""moca_jax.cli: a flag that cannot be parsed, and an absl UsageError raised inside a
front-end's main, are one line on stderr and exit code 2, the project's code for bad
arguments (absl itself exits with 1)."""

import os
import subprocess
import sys

import pytest
from absl import flags

from moca_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flag_values() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_enum("kind", "object", ["object", "scene"], "Kind.", flag_values=fv)
  flags.DEFINE_integer("steps", 50, "Steps.", flag_values=fv)
  return fv


def test_good_flags_parse_and_return_the_rest():
  fv = _flag_values()
  rest = cli.parse_flags_or_exit(["prog", "--kind=scene", "--steps=3", "extra"], fv)
  assert rest == ["prog", "extra"] and fv.kind == "scene" and fv.steps == 3


@pytest.mark.parametrize(
    "arg, reason",
    [
        ("--kind=room", "flag --kind=room: value should be one of <object|scene>"),
        ("--steps=abc", "flag --steps=abc: invalid literal for int()"),
        ("--nope=1", "Unknown command line flag 'nope'"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(capsys, arg, reason):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags_or_exit(["/some/dir/prog.py", arg], _flag_values())
  assert exit_info.value.code == cli.BAD_ARGUMENTS == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("prog.py: error: ") and reason in err


def test_a_front_end_exits_2_on_an_enum_it_cannot_parse():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.generate", "--kind=room"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=200,
  )
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "generate.py: error: flag --kind=room: value should be one of <object|scene> "
      "(--helpshort lists the flags)"
  ]


def test_a_usage_error_inside_main_is_one_line_and_exit_2(capsys):
  def main(argv):
    from absl import app  # pylint: disable=import-outside-toplevel
    raise app.UsageError("Too many command-line arguments.")

  with pytest.raises(SystemExit) as exit_info:
    cli.exit_on_usage_error(main)(["/x/prog.py", "extra"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
      "prog.py: error: Too many command-line arguments. (--helpshort lists the flags)\n")


def test_main_s_return_value_and_other_errors_pass_through():
  assert cli.exit_on_usage_error(lambda argv: len(argv))(["prog", "a"]) == 2

  def broken(argv):
    raise ValueError("not a usage error")

  with pytest.raises(ValueError, match="not a usage error"):
    cli.exit_on_usage_error(broken)(["prog"])


def test_a_front_end_exits_2_on_extra_arguments():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.cfg_sweep", "--runs=a", "stray"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=200,
  )
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "cfg_sweep.py: error: Too many command-line arguments. (--helpshort lists the flags)"]
