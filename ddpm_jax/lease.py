"""One writer per folder: a lease file that a run holds while it writes there.

    <folder>/lease.json   {"host", "pid", "token", "purpose", "started", "heartbeat"}

Training holds the lease of its workdir; --mode=sample (and eval, which samples through it)
holds the lease of its own sample folder, so sampling and evaluating a run while it trains is
fine, but two trainings of one workdir, or two samplers of one folder, are not.

Neither orbax, TensorFlow's CheckpointManager nor t5x/MaxText guard a directory against a second
writer (they leave that to the job scheduler), and gs:// has no flock. So this follows
PostgreSQL's postmaster.pid: the file is created only if absent (locally an atomic hard link of
a complete temporary file; on object stores a write that is read back after a moment and must
still hold our random token), it names the holder, and the holder rewrites its heartbeat time
every HEARTBEAT_S seconds from a background thread and deletes the file when it ends.

A lease is free when its file is absent, when its holder ran on this host and its process no
longer exists (after SIGKILL: taken over at once), or when its heartbeat is older than
STALE_AFTER_S (a holder on a lost VM; the bound allows for slow object-store writes and a few
seconds of clock difference between hosts). A free lease is taken over with one warning;
`force=True` (main.py's --force_lease) takes over a live one, for when its holder is known to
be gone. Anything else is a UserError naming the holder's host, process and last heartbeat.

In a multi-process job, process 0 holds the lease for all (`hold(..., primary=...)`); the
others learn whether it succeeded and stop with it if not.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

from absl import logging
from etils import epath

from ddpm_jax.errors import UserError

LEASE_FILE = "lease.json"
HEARTBEAT_S = 20.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 6 * HEARTBEAT_S  # a heartbeat older than this: the holder is gone
_SETTLE_S = 1.0  # object stores: wait before reading a new lease back (a rival's write lands)
_TRIES = 3  # take-overs raced by another process before giving up
_YOUNG_S = 10.0  # an unreadable lease file younger than this may still be being written


def _seconds_since_modified(path: epath.Path) -> float:
  try:
    return time.time() - path.stat().mtime
  except (OSError, AttributeError):
    return float("inf")


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _ago(seconds: float) -> str:
  seconds = max(0.0, seconds)
  if seconds < 120:
    return f"{seconds:.0f} s ago"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min ago"
  return f"{seconds / 3600:.1f} h ago"


def read(folder) -> Optional[dict]:
  """The lease record in `folder`: a dict, {} if the file is unreadable, None if absent."""
  path = epath.Path(folder) / LEASE_FILE
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):  # damaged (or being replaced on a store without rename)
    return {} if path.exists() else None
  ok = isinstance(record, dict) and all(
      isinstance(record.get(k), t) for k, t in (("host", str), ("pid", int), ("token", str),
                                                ("heartbeat", (int, float))))
  return record if ok else {}


def _write_new(path: epath.Path, text: str) -> bool:
  """Creates `path` holding `text` if it is absent; False if it exists."""
  if _is_local(path):
    tmp = path.parent / f".{path.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    try:
      os.link(tmp, path)  # atomic and exclusive: the file appears whole, or not at all
      return True
    except FileExistsError:
      return False
    except OSError:  # no hard links here (e.g. some FUSE mounts): exclusive create, then write
      try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    finally:
      tmp.unlink()
  if path.exists():
    return False
  path.write_text(text)
  return True


def _replace(path: epath.Path, text: str) -> None:
  if _is_local(path):
    tmp = path.parent / f".{path.name}.beat-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
  else:
    path.write_text(text)


def _why_free(holder: dict, stale_after_s: float, now: float) -> Optional[str]:
  """Why the lease `holder` may be taken over, or None while it is live."""
  if not holder:
    return "its lease file is unreadable"
  if holder["host"] == socket.gethostname():
    if holder["pid"] == os.getpid():
      return f"it names this process's id {os.getpid()}, left by an earlier process"
    if not _alive(holder["pid"]):
      return f"its process {holder['pid']} on this host no longer runs"
  age = now - holder["heartbeat"]
  if age > stale_after_s:
    return f"its last heartbeat was {_ago(age)} (more than {stale_after_s:.0f} s)"
  return None


def _describe(holder: dict, now: Optional[float] = None) -> str:
  """"process P on host H (training, last heartbeat 5 s ago)"; without `now`, no heartbeat."""
  if not holder:
    return "an unknown process"
  beat = "" if now is None else f", last heartbeat {_ago(now - holder['heartbeat'])}"
  return (f"process {holder['pid']} on host {holder['host']} "
          f"({holder.get('purpose', 'a writer')}{beat})")


class Lease:
  """A held lease: `release()` (or leaving `hold`) ends it; `lost` says whether another process
  took it over while held (then this one must stop writing)."""

  def __init__(self, path: epath.Path, record: dict, heartbeat_s: float):
    self.path = path
    self.record = record
    self.lost = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                    name=f"lease heartbeat {path}")
    self._thread.start()

  def _beat(self, period: float) -> None:
    while not self._stop.wait(period):
      try:
        holder = read(self.path.parent)
        self.record = dict(self.record, heartbeat=time.time())
        if holder is None:  # deleted by hand: put it back
          _write_new(self.path, json.dumps(self.record))
        elif holder.get("token") != self.record["token"]:
          self.lost = True
          logging.error("The lease %s was taken over by %s; this process no longer holds it "
                        "and stops before its next checkpoint.", self.path,
                        _describe(holder, time.time()))
          return
        else:
          _replace(self.path, json.dumps(self.record))
      except OSError as e:  # a slow or failing store: try again next period
        logging.warning("Could not renew the lease %s (%s); retrying.", self.path, e)

  def check(self) -> None:
    """Raises UserError if another process has taken the lease over."""
    if self.lost:
      raise UserError(f"Another process took over the lease {self.path} (it judged this one "
                      "gone, or was started with --force_lease); stopped without writing more.")

  def release(self) -> None:
    """Stops the heartbeat and deletes the lease file if it is still this one's."""
    self._stop.set()
    self._thread.join()
    try:
      holder = read(self.path.parent)
      if holder and holder.get("token") == self.record["token"]:
        self.path.unlink()
    except OSError as e:
      logging.warning("Could not remove the lease %s (%s); the next run takes it over.",
                      self.path, e)


def acquire(folder, *, purpose: str, force: bool = False, heartbeat_s: float = HEARTBEAT_S,
            stale_after_s: float = STALE_AFTER_S) -> Lease:
  """Takes the lease of `folder` (created if absent), or raises UserError naming its holder.

  purpose: what the holder does, shown to a refused second writer ("training", "sampling").
  force: take over a live lease (with a warning). Raises OSError if `folder` is not writable.
  """
  path = epath.Path(folder) / LEASE_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  for _ in range(_TRIES):
    now = time.time()
    record = dict(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
                  purpose=purpose, started=now, heartbeat=now)
    if _write_new(path, json.dumps(record)):
      if not _is_local(path):  # no exclusive create: the last of racing writers wins
        time.sleep(_SETTLE_S)
        if (read(folder) or {}).get("token") != record["token"]:
          continue
      return Lease(path, record, heartbeat_s)
    holder = read(folder)
    if holder is None:  # released meanwhile
      continue
    if not holder and _seconds_since_modified(path) < _YOUNG_S:  # still being written
      time.sleep(_SETTLE_S)
      continue
    why = _why_free(holder, stale_after_s, now)
    if why is None and not force:
      raise UserError(
          f"{epath.Path(folder)} is in use by {_describe(holder, now)}: one writer at a time "
          f"(its lease is {path}); wait for it to end, or pass --force_lease if that process "
          "is known to be gone.")
    logging.warning("Taking over the lease %s of %s: %s.", path, _describe(holder),
                    why or "--force_lease was given")
    with contextlib.suppress(FileNotFoundError):
      if read(folder) == holder:  # not already taken over by another process meanwhile
        path.unlink()
  raise UserError(f"Could not take the lease {path}: it kept changing (other processes are "
                  "taking it, or one is writing it); start one writer at a time.")


@contextlib.contextmanager
def hold(folder, *, purpose: str, force: bool = False, primary: bool = True,
         sync: bool = False) -> Iterator[Optional[Lease]]:
  """The lease of `folder` for a `with` block; None on processes other than the primary.

  primary: this process takes the lease (process 0 of a job). sync: the job's processes learn
  together whether it succeeded (every process must enter `hold`); a refusal is then raised on
  every process. Raises UserError when the lease is held, or when `folder` cannot be written.
  """
  from ddpm_jax import rundir  # pylint: disable=import-outside-toplevel  (rundir imports jax)
  lease, error = None, None
  if primary:
    try:
      lease = acquire(folder, purpose=purpose, force=force)
    except OSError as e:
      error = rundir.workdir_error(folder, e)
    except UserError as e:
      error = e
  if sync:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = UserError(f"Process 0 could not take the lease of {epath.Path(folder)}; its log "
                        "says why.")
  if error is not None:
    raise error
  try:
    yield lease
  finally:
    if lease is not None:
      lease.release()
