"""What the absl front-ends (experiments/*.py) share about their command line.

This project's commands exit with 2 on bad arguments (README, "Bad input and exit codes").
absl's own flag parsing exits with 1 on a flag it cannot parse, such as an unknown flag, a
value outside an enum or a non-number for an integer flag. `parse_flags_or_exit` is the
`flags_parser` for `absl.app.run` that gives those the project's code and one line on stderr.
"""

from __future__ import annotations

import os
import sys
from typing import List

from absl import flags

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

  Use: `app.run(main, flags_parser=cli.parse_flags_or_exit)`.
  """
  try:
    return flag_values(argv)
  except flags.Error as error:
    sys.stderr.write(flag_error_line(argv[0] if argv else "command", error) + "\n")
    sys.exit(BAD_ARGUMENTS)
