"""What the absl front-ends (experiments/*.py) share about their command line.

This project's commands exit with 2 on bad arguments (README, "Bad input and exit codes").
absl's own flag parsing exits with 1 on a flag it cannot parse, such as an unknown flag, a
value outside an enum or a non-number for an integer flag. `parse_flags_or_exit` is the
`flags_parser` for `absl.app.run` that gives those the project's code and one line on stderr.
`run` is `absl.app.run` with that parser, which also gives an `absl.app.UsageError` raised
inside `main` (too many arguments, a flag value `main` refuses) the same line and code; absl
itself prints its usage text and exits with 1 there.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List

from absl import app, flags

BAD_ARGUMENTS = 2  # the exit code of a refused command line


def flag_error_line(program: str, error: Exception) -> str:
  """One line naming the program and absl's reason (its newlines folded into spaces)."""
  reason = " ".join(str(error).split())
  return f"{os.path.basename(program)}: error: {reason} (--helpshort lists the flags)"


def parse_flags_or_exit(
    argv: List[str], flag_values: flags.FlagValues = flags.FLAGS
) -> List[str]:
  """absl.app.run's flags_parser: parses argv into flag_values (absl.flags.FLAGS) and
  returns the remaining arguments (argv[0] first), like absl's default. A flag that cannot
  be parsed writes `flag_error_line` to stderr and exits with BAD_ARGUMENTS (SystemExit;
  absl's default exits with 1).

  Use: `cli.run(main)` (or `app.run(main, flags_parser=cli.parse_flags_or_exit)`).
  """
  try:
    return flag_values(argv)
  except flags.Error as error:
    sys.stderr.write(flag_error_line(argv[0] if argv else "command", error) + "\n")
    sys.exit(BAD_ARGUMENTS)


def exit_on_usage_error(main: Callable[[List[str]], object]) -> Callable[[List[str]], object]:
  """`main` for absl.app.run, with an absl.app.UsageError it raises turned into one line on
  stderr (`flag_error_line` of the program's name) and exit code BAD_ARGUMENTS."""

  def guarded(argv: List[str]):
    try:
      return main(argv)
    except app.UsageError as error:
      sys.stderr.write(flag_error_line(argv[0] if argv else "command", error) + "\n")
      sys.exit(BAD_ARGUMENTS)

  return guarded


def run(main: Callable[[List[str]], object],
        flags_parser: Callable[[List[str]], List[str]] = parse_flags_or_exit) -> None:
  """absl.app.run(main) for this project's front-ends: a flag that cannot be parsed
  (`parse_flags_or_exit`, or the front-end's own `flags_parser`) and an app.UsageError
  raised inside `main` both give one line on stderr and exit code 2 (BAD_ARGUMENTS)."""
  app.run(exit_on_usage_error(main), flags_parser=flags_parser)
