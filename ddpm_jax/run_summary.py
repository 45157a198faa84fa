"""The lines a training run ends with: what was done, where it is, what to run next."""
from __future__ import annotations

import os
import shlex
import sys
from typing import List, Optional, Sequence

from ddpm_jax.heartbeat import duration


def program(argv0: Optional[str] = None) -> str:
  """How the user started us: `ddpm-jax` (the installed command) or `python main.py`."""
  argv0 = sys.argv[0] if argv0 is None else argv0
  name = os.path.basename(argv0)
  return name if name.startswith("ddpm-jax") else "python main.py"


def same_command(argv: Optional[Sequence[str]] = None) -> str:
  """The command line that started this process, to be run again (resuming)."""
  argv = sys.argv if argv is None else argv
  return " ".join([program(argv[0])] + [shlex.quote(a) for a in argv[1:]])


def training_summary(workdir: str, *, first_step: int, step: int, num_steps: int,
                     seconds: float, compile_seconds: float, checkpoint_step: Optional[int],
                     last_grid: Optional[str], tensorboard_dir: str,
                     stopped_by: Optional[str] = None,
                     argv: Optional[Sequence[str]] = None) -> List[str]:
  """The closing lines of a training run that finished (stopped_by=None) or was stopped by a
  signal (its name): steps done and time taken, where the checkpoint, the sample grids, the
  TensorBoard logs and the log file are, and the command to run next."""
  done = step - first_step
  took = f"in {duration(seconds)}"
  if compile_seconds > 0:
    took += f" ({duration(compile_seconds)} of it compiling)"
  if stopped_by is None:
    head = f"Training finished: {done} steps {took}, step {step} of {num_steps}."
  else:
    head = f"Training stopped by {stopped_by} at step {step} of {num_steps}: {done} steps {took}."
  lines = [head]
  if checkpoint_step is not None:
    lines.append(f"  checkpoint   {os.path.join(workdir, 'checkpoints')} (step {checkpoint_step})")
  if last_grid:
    lines.append(f"  samples      {last_grid}")
  lines.append(f"  TensorBoard  tensorboard --logdir {tensorboard_dir}")
  log = os.path.join(workdir, "log.txt")
  if os.path.exists(log):
    lines.append(f"  log          {log} (the libraries' messages too)")
  if stopped_by is None and step >= num_steps:
    lines.append(f"Next: {program(None if argv is None else argv[0])} "
                 f"--workdir={shlex.quote(workdir)} --mode=sample")
  else:
    lines.append(f"Next: resume with the same command: {same_command(argv)}")
  return lines
