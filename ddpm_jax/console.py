"""What the command line prints, and the run's log file.

The console gets our own lines (ddpm_jax's log records as plain sentences, the progress lines
that reporting.py prints) and the libraries' warnings and errors; the libraries' INFO logs
(absl, orbax, JAX, TensorFlow) go to workdir/log.txt only (log.<p>.txt on process p > 0), and
to the console too with --verbose. The file is written once the command has begun to write
its run (training: its reporter exists) or at exit; a command refused as the user's mistake
writes none, so it leaves the workdir as it found it.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Iterator, Optional

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Library warnings that are expected and harmless in our use: file only.
_HARMLESS = (
    "Given directory is read only",  # orbax, opening a run's checkpoints to sample or evaluate
)
_BUFFERED = 10_000  # records kept while the workdir does not exist yet (the oldest are dropped)


def is_ours(record: logging.LogRecord) -> bool:
  """Whether a record was logged by ddpm_jax's own code (absl.logging and logging alike)."""
  return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)


def shown(record: logging.LogRecord, verbose: bool) -> bool:
  """Whether the console shows `record`: ours from INFO up (not those logged with
  extra={"console": False}), the libraries' from WARNING up (not the known harmless ones), or
  everything when verbose."""
  if verbose:
    return True
  if not getattr(record, "console", True):  # ours, for the log file alone
    return False
  if is_ours(record):
    return record.levelno >= logging.INFO
  return record.levelno >= logging.WARNING and not str(record.msg).startswith(_HARMLESS)


class ConsoleFormatter(logging.Formatter):
  """Our records as the sentence alone ("Warning: " before a warning); the libraries' in absl's
  format, which names the file and line they come from."""

  def __init__(self):
    super().__init__()
    self._absl = absl_logging.PythonFormatter()

  def format(self, record: logging.LogRecord) -> str:
    if not is_ours(record):
      return self._absl.format(record)
    prefix = {logging.WARNING: "Warning: ", logging.ERROR: "Error: "}.get(record.levelno, "")
    return prefix + record.getMessage()


class _ConsoleFilter(logging.Filter):

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def filter(self, record):
    return shown(record, self.verbose)


class RunLogHandler(logging.Handler):
  """Appends every record to a file in the workdir, in absl's format.

  Records are kept in memory until the command has started to write its run (`commit`, from
  then on they are written as they come) or ends (`close`, at exit); a command refused as the
  user's mistake `discard`s them, so that it leaves the workdir exactly as it found it.
  """

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.setFormatter(absl_logging.PythonFormatter())
    self.workdir: Optional[str] = None
    self.path: Optional[str] = None
    self._pending = collections.deque(maxlen=_BUFFERED)
    self._file = None
    self._committed = False
    self._disabled = False  # discarded, or the file could not be opened: records are dropped

  def log_to(self, workdir: str, process_index: int = 0) -> Optional[str]:
    """Names the file: workdir/log.txt (log.<p>.txt for process p > 0). A workdir that is not a
    local path (gs://) gets its log in the local temporary folder; returns that path then."""
    name = "log.txt" if process_index == 0 else f"log.{process_index}.txt"
    self.acquire()
    try:
      if "://" in workdir:
        self.workdir = tempfile.gettempdir()
        self.path = os.path.join(self.workdir, f"ddpm_jax-{os.getpid()}-{name}")
      else:
        self.workdir, self.path = workdir, os.path.join(workdir, name)
      self._open_when_ready()
    finally:
      self.release()
    return self.path if "://" in workdir else None

  def commit(self) -> None:
    """The command writes its run now: the records so far, and every later one, go to the file
    (once the workdir exists)."""
    self.acquire()
    try:
      self._committed = True
      self._open_when_ready()
    finally:
      self.release()

  def discard(self) -> None:
    """The command was refused: nothing it logged is written."""
    self.acquire()
    try:
      self._disabled = True
      self._pending.clear()
    finally:
      self.release()

  def _open_when_ready(self) -> None:
    if (self._file is None and self._committed and not self._disabled and
        self.path is not None and os.path.isdir(self.workdir)):
      try:
        self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      except OSError:  # a read-only run (sampling from it fails on its own, with one sentence)
        self._disabled = True
        self._pending.clear()
        return
      while self._pending:
        self._file.write(self.format(self._pending.popleft()) + "\n")
      self._file.flush()

  def emit(self, record: logging.LogRecord) -> None:
    if self._disabled:
      return
    try:
      self._open_when_ready()
      if self._file is None:
        self._pending.append(record)
      else:
        self._file.write(self.format(record) + "\n")
        self._file.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def close(self) -> None:
    """Writes what is still held (a command that ended without `commit`) and closes the file."""
    self.acquire()
    try:
      if self._pending:
        self._committed = True
        self._open_when_ready()
      if self._file is not None:
        self._file.close()
        self._file = None
    finally:
      self.release()
    super().close()


@contextlib.contextmanager
def native_stderr_to_log(logger: logging.Logger) -> Iterator[None]:
  """Captures what native code writes to file descriptor 2 in the block (TensorFlow's C++ logs
  at import, which no setting turns off) and logs it line by line: glog-style "E..." lines as
  errors and "W..." as warnings (on the console too), the rest as INFO for the log file alone."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode("utf-8", "replace").splitlines():
        level = {"E": logging.ERROR, "F": logging.ERROR, "W": logging.WARNING}.get(line[:1])
        if level is None or not re.match(r"^[EFW]\d{4} ", line):
          level = logging.INFO  # including absl's "WARNING: All log messages before ..."
        logger.log(level, "%s", line, extra={"console": level >= logging.WARNING})


def preload_tensorflow() -> None:
  """Imports TensorFlow and tensorflow-datasets now, their C++ start-up lines into the log
  (nothing if they are not installed: only reading data needs them)."""
  from ddpm_jax import tf_lazy  # pylint: disable=import-outside-toplevel
  with native_stderr_to_log(logging.getLogger("ddpm_jax.native")):
    try:
      getattr(tf_lazy.tfds, "__name__")  # resolves both lazy imports (TF first)
    except ImportError:
      pass


def setup(verbose: bool = False, tensorflow: bool = False) -> RunLogHandler:
  """Routes logging as the module docstring says; returns the file handler (see `log_to`).

  Call once the flags are parsed (absl's app.run has installed its handler, which this replaces
  on the root logger). TensorFlow prints C++ INFO lines on import that bypass Python's logging
  and every setting; `tensorflow=True` (for a command that will use it) imports it here, those
  lines going to the log, unless `verbose`."""
  root = logging.getLogger()
  root.removeHandler(absl_logging.get_absl_handler())
  console = logging.StreamHandler(sys.stderr)
  console.setFormatter(ConsoleFormatter())
  console.addFilter(_ConsoleFilter(verbose))
  run_log = RunLogHandler()
  root.addHandler(console)
  root.addHandler(run_log)
  root.setLevel(min(root.level or logging.INFO, logging.INFO))
  if tensorflow and not verbose:
    preload_tensorflow()
  return run_log


def _run_logs():
  """The RunLogHandlers that `setup` put on the root logger (none if it was not called, as when
  tests call the command line's functions directly)."""
  return [h for h in logging.getLogger().handlers if isinstance(h, RunLogHandler)]


def log_to(workdir: str, process_index: int = 0) -> None:
  """Points the run log at `workdir` (see RunLogHandler.log_to)."""
  for handler in _run_logs():
    elsewhere = handler.log_to(workdir, process_index)
    if elsewhere:
      logging.getLogger(__name__).info(
          "The libraries' logs go to %s (the workdir is not a local folder).", elsewhere)


def commit_log() -> None:
  """The command has validated everything and writes its run: the log file is written from now
  on (see RunLogHandler.commit)."""
  for handler in _run_logs():
    handler.commit()


def discard_log() -> None:
  """The command was refused: its log is not written (see RunLogHandler.discard)."""
  for handler in _run_logs():
    handler.discard()
