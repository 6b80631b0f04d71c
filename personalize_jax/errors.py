"""Errors a user can cause, reported at the edge in one line."""

import sys
from typing import NoReturn


class UserError(Exception):
  """A problem with something the user supplied (a path, a file, a config value).

  The message is one line that says what is wrong and how to fix it. Entry points
  catch it, print it to stderr and exit with code 2.
  """


class CheckpointError(UserError):
  """A checkpoint folder or file that cannot be loaded as asked."""


def fail(message: str, code: int = 2) -> NoReturn:
  """How an entry point ends on a user's mistake: one line, a non-zero exit."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
