"""The one error type for a user's mistake.

A `UserError` carries one sentence that names the bad value (by its config field or flag) and
what would be accepted. main.py prints that sentence alone on stderr and exits non-zero, with no
traceback; every other exception is our bug and keeps its traceback.

It subclasses ValueError so that library callers who catch ValueError keep working.
"""


class UserError(ValueError):
  """A user's mistake: bad config value, missing file, unprepared dataset, damaged run."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or that the run needs) does not exist."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss or gradient became NaN/Inf: the run stopped, its last good checkpoint kept."""
