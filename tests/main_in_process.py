"""`python main.py ARGS` inside the test process: main.py's own steps (main.parse_flags on a fresh
FlagValues, main.execute, main.report_user_errors turning a UserError into its one sentence and
exit status 2), without a new process, so the programs the test session compiled are reused and
JAX starts once. A bug raises as usual. Tests keep a subprocess only where the process boundary
is the point: signals, a real exit status, several processes, a device count set at start-up
(and tests/test_cli.py runs one README command as a real `python main.py`).
"""
import contextlib
import io
import sys

from absl import flags

import main


def parse(*args) -> flags.FlagValues:
  """main's flags parsed from `python main.py *args` on a fresh FlagValues (a UserError if the
  parser refuses them)."""
  argv = ["main.py", *args]
  fv = flags.FlagValues()
  main.define_flags(fv)
  saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
  try:
    main.parse_flags(argv, fv)
  finally:
    sys.argv = saved
  return fv


def run(*args):
  """(exit status, stderr) of `python main.py *args`: 0, or the status main.py exits with."""
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      main.report_user_errors(lambda: main.execute(parse(*args)))
    status = 0
  except SystemExit as e:
    status = e.code
  return status, err.getvalue()
