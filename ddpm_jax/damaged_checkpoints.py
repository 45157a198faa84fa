"""Damaged checkpoints: what orbax raises for a checkpoint it cannot read, in one line, and
moving such a checkpoint aside (never deleting it).

    workdir/damaged_checkpoints/<step>-<UTC time>/    a checkpoint that could not be restored

They are moved out of workdir/checkpoints because orbax's CheckpointManager lists every
step-named directory there; they may still hold what a user wants, so nothing is deleted.
"""
from __future__ import annotations

import time

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

DAMAGED_DIR = "damaged_checkpoints"
# What orbax and tensorstore raise for a checkpoint they cannot read: a truncated or missing
# file (ValueError "OUT_OF_RANGE"/"DATA_LOSS", FileNotFoundError), unreadable JSON
# (JSONDecodeError, a ValueError), a missing entry (KeyError).
READ_ERRORS = (OSError, ValueError, KeyError)


class Damaged(Exception):
  """orbax could not read a checkpoint; the message says why, in one line."""


def reason(error: Exception) -> str:
  """An orbax/tensorstore error in one short line (theirs carry the whole tensorstore spec)."""
  text = str(error).split(" [tensorstore_spec=")[0].splitlines()
  parts = (text[0] if text else "").split(": ")
  # tensorstore nests its causes ("OUT_OF_RANGE: Error opening ...: ...: the cause"): keep the
  # code and the innermost cause.
  text = ": ... ".join((parts[0], parts[-1])) if len(parts) > 2 else ": ".join(parts)
  text = text if len(text) <= 300 else text[:300] + " ..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def set_aside(workdir: str, directory: epath.Path, step: int, why: str, *,
              process_local: bool) -> None:
  """Moves damaged checkpoint directory/<step> to workdir/damaged_checkpoints/<step>-<time>.

  The mover is process 0, or this process alone when `process_local`; a failed move (e.g. a
  read-only workdir) is only a warning. With several processes and not `process_local`, every
  process must call this (they meet at a barrier after the move).
  """
  source = directory / str(step)
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  destination = epath.Path(workdir) / DAMAGED_DIR / f"{step}-{stamp}"
  if process_local or jax.process_index() == 0:
    try:
      destination.parent.mkdir(parents=True, exist_ok=True)
      source.rename(destination)
      moved = f"moved it to {destination}"
    except OSError as e:  # e.g. a read-only workdir: the checkpoint stays where it is
      moved = f"could not move it aside ({e.strerror or e})"
  else:
    moved = f"process 0 moves it to {destination}"
  logging.warning("Checkpoint step %d in %s is damaged (%s); %s, and using the newest intact "
                  "checkpoint before it.", step, directory, why, moved)
  if not process_local and jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"ddpm_jax_set_aside_{step}")
