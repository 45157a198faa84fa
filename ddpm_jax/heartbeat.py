"""A console line at least every 30 s while one long call runs (compiling, a jit-compiled
sampling chain, a batch of bits/dim), where the caller cannot print from inside the call."""
from __future__ import annotations

import sys
import threading
import time
import weakref
from types import FrameType
from typing import Callable, Optional


def duration(seconds: float) -> str:
  """`h:mm:ss` ("?" for an unknown duration)."""
  if seconds != seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Heartbeat:
  """Prints `line(seconds_since_start)` to stderr from a daemon thread whenever `every_s`
  seconds pass without a line (see `beat`), until `stop` (or the end of a `with` block).

  `line` may be a bound method: the thread holds it weakly, and ends once its object is gone.
  `while_running`: a frame (the function that runs the long work, e.g. `sys._getframe(1)` in a
  helper it calls); the heartbeat ends once that frame has left its thread's stack, so one whose
  owner raised mid-way falls silent instead of speaking on in a notebook that keeps the
  traceback.
  """

  def __init__(self, line: Callable[[float], str], every_s: float = 30.0,
               active: bool = True, while_running: Optional[FrameType] = None):
    self.every_s, self.start = every_s, time.perf_counter()
    self._owner, self._owner_thread = while_running, threading.get_ident()
    self._last = self.start
    self._stopped = threading.Event()
    self._line = (weakref.WeakMethod(line) if hasattr(line, "__self__")
                  else (lambda: line))
    self._thread: Optional[threading.Thread] = None
    if active and every_s > 0:
      self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
      self._thread.start()

  def beat(self) -> None:
    """The owner has just printed a line: the next heartbeat is due every_s from now."""
    self._last = time.perf_counter()

  def stop(self) -> None:
    self._stopped.set()

  def __enter__(self) -> "Heartbeat":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def _owner_running(self) -> bool:
    if self._owner is None:
      return True
    frame = sys._current_frames().get(self._owner_thread)  # pylint: disable=protected-access
    while frame is not None:
      if frame is self._owner:
        return True
      frame = frame.f_back
    self._owner = None  # let the frame and its locals go
    self._stopped.set()
    return False

  def _run(self) -> None:
    while not self._stopped.wait(min(3600.0, max(0.05, self._last + self.every_s -
                                                 time.perf_counter()))):
      now = time.perf_counter()
      if now - self._last < self.every_s:
        continue
      line = self._line()
      if line is None or not self._owner_running():  # the owner is gone, or has returned
        return
      print(line(now - self.start), file=sys.stderr, flush=True)
      self._last = now
