"""Stopping a training run on a signal: SIGTERM (a preemption, `kill`) and Ctrl-C.

The loop asks `Preemption.reached(step)` after every step; once a signal has come it saves that
step and raises `Interrupted`, whose exit_status main.py exits with.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax
from jax.experimental import multihost_utils


class Interrupted(Exception):
  """Training stopped on a signal after saving the checkpoint of `step`.

  exit_status: 128 + the signal's number, the shell's convention (143 after SIGTERM, 130 after
  Ctrl-C), so that a supervisor can tell a stopped run from a finished one (status 0).
  """

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step, self.exit_status = signum, step, 128 + signum
    super().__init__(f"{signal.Signals(signum).name}: saved the checkpoint of step {step} in "
                     f"{workdir}; stopped.")


class Preemption:
  """Notices SIGTERM (a TPU preemption, `kill`) and Ctrl-C (SIGINT), so that the loop can
  checkpoint the step it is on and stop. A second Ctrl-C exits at once (status 130, without
  saving; a save in progress stays a temporary directory that the next run removes).

  One process: our own handlers. Several: SIGTERM through jax.distributed's preemption
  notifier, whose sync point makes every process stop after the same step; Ctrl-C keeps
  Python's default there (one process stopping alone would leave the others waiting in a
  collective).
  """

  def __init__(self, finished_step: Callable[[], int]):
    """finished_step(): the newest step known to have finished on the device; recorded when a
    signal arrives, so that the stop can say how late it came."""
    self.signum = None
    self.arrived_after = None
    self._finished_step = finished_step
    self.multiprocess = jax.process_count() > 1
    self._previous = {}
    if not self.multiprocess and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    # os.write, not print: the signal may arrive inside a print to the same stream.
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      os.write(2, b"Second Ctrl-C: exiting now, without saving.\n")
      os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
    if self.signum is None:
      self.signum, self.arrived_after = signum, self._finished_step()
      name = signal.Signals(signum).name
      os.write(2, f"{name}: saving the checkpoint of the current step, then stopping "
                  f"(Ctrl-C again to exit at once).\n".encode())

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; every process must call it every step."""
    if self.multiprocess:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = signal.SIGTERM
    return self.signum is not None

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
