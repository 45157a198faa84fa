"""A checkpoint that could not be written (disk full, no permission): one sentence, the partial
folder removed, the earlier checkpoints untouched.

orbax writes a checkpoint in the background into <step>.orbax-checkpoint-tmp* and renames it to
<step> once complete; a write that fails there surfaces later, from tensorstore, as e.g.

    ValueError: RESOURCE_EXHAUSTED: Error writing "..." in OCDBT database at local file "...":
    Failed to write 7041024 bytes to file 5: No space left on device [os_error_code='28']

or as an OSError from orbax's own files. `reason` recognises these; `remove_partial` deletes the
step's temporary folder (called only by the run that holds the workdir's lease, whose save it
was); `sentence` says what happened and what to do.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Optional

from absl import logging
from etils import epath

# errno -> the words of the sentence; tensorstore reports the errno as os_error_code='N'.
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")


def reason(error: BaseException) -> Optional[str]:
  """What stopped a write, in words, if `error` is a failed write (else None: not ours to
  explain, e.g. a bug)."""
  code = getattr(error, "errno", None) if isinstance(error, OSError) else None
  if code is None and isinstance(error, ValueError):
    match = _TENSORSTORE_ERRNO.search(str(error))
    code = int(match.group(1)) if match else None
  return _REASONS.get(code)


def remove_partial(directory: epath.Path, step: int) -> None:
  """Deletes the temporary folders of `step` under `directory` (orbax's *-tmp* names)."""
  for path in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
    try:
      path.rmtree()
    except OSError as e:  # e.g. the folder vanished meanwhile; the next run's clean-up retries
      logging.warning("Could not remove the partial checkpoint %s (%s).", path, e)


def free_bytes(directory: epath.Path) -> Optional[int]:
  """Free bytes on the disk of a local `directory`; None elsewhere (gs://...)."""
  path = os.fspath(directory)
  if "://" in path:
    return None
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def size_text(n: float) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def sentence(directory: epath.Path, step: int, why: str, needed: int,
             previous: Optional[int]) -> str:
  """One sentence: the path, what stopped the write, the bytes needed, and what is kept."""
  free = free_bytes(directory)
  space = f"it needs about {size_text(needed)}" + (
      f", {size_text(free)} are free there" if free is not None else "")
  kept = (f"the previous checkpoint, step {previous}, is intact" if previous is not None
          else "no earlier checkpoint exists")
  fix = ("free some space (or move the run to a larger disk)" if why in (
      "no space left on device", "disk quota exceeded", "file too large")
         else "make it writable")
  return (f"Could not write the checkpoint of step {step} to {directory} ({why}; {space}); the "
          f"partial checkpoint was removed and {kept}: {fix}, then run the same command to "
          "resume.")
