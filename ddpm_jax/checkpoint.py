"""Orbax checkpoints of the training state, and `load(workdir)`.

A run directory (see docs/design.md, "Workdir layout"; config.json is rundir.py's) holds

    checkpoints/<step>/         one orbax checkpoint per saved step, two items:
        state/                  the state tree (PyTreeCheckpointHandler, OCDBT): every leaf a host
                                numpy array, so a checkpoint carries no device or sharding layout
        meta/metadata           a JSON object (JsonCheckpointHandler): RNG key, data position, ...

Training saves `flax.serialization.to_state_dict(train_state)`, i.e.
{"step", "params", "ema_params": {"0": tree, "1": tree, ...}, "opt_state", ...}; `load` reads
only `ema_params[0]` (the EMA that sampling uses), so it needs neither the optimizer nor the model.

Paths may be local or anything `etils.epath` opens (e.g. gs://). Every process of a multi-process
job calls `Checkpointer.save`/`restore` (orbax coordinates who writes what); only process 0
writes config.json. `load` is process-local and may be called by any subset.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import rundir
from ddpm_jax.errors import MissingFileError, UserError

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
# Damaged checkpoints are moved here, out of the CheckpointManager's view (it lists every
# step-named directory of CHECKPOINT_DIR), never deleted: they may still hold what a user wants.
DAMAGED_DIR = "damaged_checkpoints"
# What orbax and tensorstore raise for a checkpoint they cannot read: a truncated or missing
# file (ValueError "OUT_OF_RANGE"/"DATA_LOSS", FileNotFoundError), unreadable JSON
# (JSONDecodeError, a ValueError), a missing entry (KeyError).
_READ_ERRORS = (OSError, ValueError, KeyError)

# ----------------------------------------------------------------------------- checkpoints


def _to_host(x: Any) -> Any:
  """A leaf as saved: jax arrays become host numpy (no device layout in the checkpoint)."""
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return x  # a sharded global array: orbax writes each process's shards
  return x  # host numpy arrays: orbax's NumpyHandler copies them before saving in the background


def _dtype(x: Any) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  return "/".join(parts) or "<root>"


def _leaves_by_path(tree: Any) -> Dict[str, Any]:
  return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_mismatch(have: Any, want: Any) -> str:
  """How the leaves of `have` differ from those of `want` by path and shape ("" if they match)."""
  have, want = _leaves_by_path(have), _leaves_by_path(want)
  problems = []
  missing = [k for k in want if k not in have]
  extra = [k for k in have if k not in want]
  if missing:
    problems.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
  if extra:
    problems.append(f"unexpected {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
  shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
  for k in want.keys() & have.keys():
    s, t = shape(have[k]), shape(want[k])
    if s != t:
      problems.append(f"{k} has shape {s}, expected {t}")
  return "; ".join(sorted(problems)[:8])


def _steps_text(steps: Iterable[int]) -> str:
  steps = list(steps)
  return ", ".join(map(str, steps)) if steps else "none"


def train_command(workdir) -> str:
  return f"python main.py --config=configs/<dataset>.py --workdir={workdir}"


class Checkpointer:
  """Saves and restores (state tree, JSON metadata) pairs under workdir/checkpoints with orbax.

  Saves run in the background (`wait()` blocks until they are on disk) and are atomic: orbax
  writes workdir/checkpoints/<step>.orbax-checkpoint-tmp and renames it to <step> only once
  complete (on GCS it commits with a commit_success.txt marker instead), so a crash mid-save never
  touches the earlier checkpoints; leftover temporary directories are deleted when the next
  Checkpointer opens the directory. Only `keep` checkpoints are kept, the oldest deleted after a
  newer one is complete. A step is never saved twice.

  Every leaf is saved as a host numpy array and restored as one, so checkpoints move freely
  between machines with different device counts.

  A checkpoint that orbax cannot read (a truncated or missing file) is damaged: restoring the
  latest step falls back to the newest one that restores, after one warning, and moves the
  damaged step's directory to workdir/damaged_checkpoints/<step>-<UTC time> (process 0, or the
  process of a process-local Checkpointer; a failed move is only a warning). Asking for a
  damaged step by number is a UserError.

  With several processes, every process must construct the Checkpointer and call `save` (and
  `wait`/`close`) with the same arguments; process 0 writes the files, the others take part in
  orbax's barriers. `restore` reads on every process that calls it.
  """

  def __init__(self, workdir: str, *, keep: Optional[int], read_only: bool = False,
               process_local: bool = False):
    """keep: the number of checkpoints kept (None: all). read_only: never create, delete or
    write anything, except moving a damaged checkpoint aside. process_local: this process alone
    uses the Checkpointer (no barriers with the other processes of a multi-process job; only
    for reading)."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep={keep!r}: the number of checkpoints to keep must be an int >= 1 "
                       "(training.keep_checkpoints).")
    if process_local and not read_only:
      raise ValueError("A process-local Checkpointer must be read_only=True.")
    self.workdir = workdir
    self.directory = epath.Path(workdir) / CHECKPOINT_DIR
    self._process_local = process_local
    multiprocessing = ocp.options.MultiprocessingOptions()
    if process_local:
      me = jax.process_index()
      multiprocessing = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True,
        multiprocessing_options=multiprocessing,
    )
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=(STATE_ITEM, META_ITEM),
          item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                         META_ITEM: ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise rundir.workdir_error(self.directory, e) from e

  # -- queries

  def all_steps(self) -> List[int]:
    """The steps of the complete checkpoints (and of saves in flight), ascending."""
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The step of the newest checkpoint, or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _resolve_step(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise MissingFileError(
            f"No checkpoint in {self.directory}; train first with `"
            f"{train_command(self.workdir)}`.")
      return steps[-1]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise TypeError(f"step={step!r}: pass an int checkpoint step (or None for the latest).")
    if int(step) not in steps:
      raise UserError(f"No checkpoint of step {int(step)} in {self.directory}; available steps: "
                      f"{_steps_text(steps)}.")
    return int(step)

  # -- save

  def save(self, step: int, state: Any, meta: Optional[Dict[str, Any]] = None) -> None:
    """Starts saving `state` (a pytree of arrays) and `meta` (a JSON-serialisable dict) as `step`.

    Returns once the arrays are copied; the files are written in the background (see `wait`).
    Refuses a step that already exists or that precedes the latest checkpoint.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step={step!r}: a checkpoint step must be an int >= 0.")
    step = int(step)
    steps = self.all_steps()
    if step in steps:
      raise ValueError(f"A checkpoint of step {step} already exists in {self.directory}; "
                       "checkpoints are never overwritten (delete that step's directory to save "
                       "it again).")
    if steps and step < steps[-1]:
      raise ValueError(f"Cannot save step {step} in {self.directory}: it precedes the latest "
                       f"checkpoint, step {steps[-1]}; use a new workdir to branch off an older "
                       "step.")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
      raise TypeError(f"meta must be a dict of JSON-serialisable values, got "
                      f"{type(meta).__name__}.")
    try:
      meta = json.loads(json.dumps(meta, default=_json_default))
    except (TypeError, ValueError) as e:
      raise ValueError(f"Checkpoint metadata must be JSON-serialisable: {e}.") from e
    tree = jax.tree_util.tree_map(_to_host, state)
    saved = self._manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeSave(tree), META_ITEM: ocp.args.JsonSave(meta)}))
    if not saved:
      raise RuntimeError(f"orbax declined to save step {step} in {self.directory} (steps there: "
                         f"{_steps_text(self.all_steps())}).")

  def wait(self) -> None:
    """Blocks until every save started so far is complete on disk (raises its error if any)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore

  def _state_metadata(self, step: int) -> Any:
    """The saved state's tree of array metadata; _Damaged if orbax cannot read it."""
    if not (self.directory / str(step) / STATE_ITEM / "_METADATA").exists():
      # Checked here: orbax would only warn, without naming the step, and return no tree.
      raise _Damaged(f"{STATE_ITEM}/_METADATA is missing")
    try:
      meta = self._manager.item_metadata(step)[STATE_ITEM]
    except _READ_ERRORS as e:
      raise _Damaged(_reason(e)) from e
    tree = getattr(meta, "tree", meta)
    if tree is None:  # orbax only warns when state/_METADATA is unreadable
      raise _Damaged(f"{STATE_ITEM}/_METADATA is unreadable")
    return tree

  def _read(self, step: int, args: ocp.args.Composite) -> Any:
    try:
      return self._manager.restore(step, args=args)
    except _READ_ERRORS as e:
      raise _Damaged(_reason(e)) from e

  def _restore_intact(self, step: Optional[int], restore_step) -> Tuple[int, Any]:
    """(step, restore_step(step)) for `step`, or for the newest checkpoint that restores.

    restore_step(step) reads one checkpoint and raises _Damaged when orbax cannot. A damaged
    latest checkpoint is moved aside (see the class docstring) and the next older one is tried;
    a damaged `step` asked for by number is a UserError.
    """
    self.wait()
    if step is not None:
      step = self._resolve_step(step)
      try:
        return step, restore_step(step)
      except _Damaged as e:
        others = [s for s in self.all_steps() if s != step]
        raise UserError(
            f"Checkpoint step {step} in {self.directory} is damaged ({e}); pass another step "
            f"(the others: {_steps_text(others)}), or none to use the newest intact one.") from e
    self._resolve_step(None)  # "train first" when there is none
    for candidate in reversed(self.all_steps()):
      try:
        return candidate, restore_step(candidate)
      except _Damaged as e:
        self._set_aside(candidate, str(e))
    raise UserError(f"No intact checkpoint in {self.directory}: every one was damaged and was "
                    f"moved to {epath.Path(self.workdir) / DAMAGED_DIR}; training again with `"
                    f"{train_command(self.workdir)}` starts from step 0.")

  def _set_aside(self, step: int, reason: str) -> None:
    """Moves damaged checkpoint `step` out of the manager's view (never deletes it)."""
    source = self.directory / str(step)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    destination = epath.Path(self.workdir) / DAMAGED_DIR / f"{step}-{stamp}"
    moved = ""
    if self._process_local or jax.process_index() == 0:
      try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.rename(destination)
        moved = f"moved it to {destination}"
      except OSError as e:  # e.g. a read-only workdir: the checkpoint stays where it is
        moved = f"could not move it aside ({e.strerror or e})"
    else:
      moved = f"process 0 moves it to {destination}"
    logging.warning("Checkpoint step %d in %s is damaged (%s); %s, and using the newest intact "
                    "checkpoint before it.", step, self.directory, reason, moved)
    if not self._process_local and jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"ddpm_jax_set_aside_{step}")
    self._manager.reload()

  def restore(self, step: Optional[int] = None, *, target: Any = None) -> Tuple[Any, Dict]:
    """(state, meta) of checkpoint `step` (the newest intact one by default); leaves are host
    numpy arrays. A damaged latest checkpoint is moved aside (see the class docstring).

    target: a pytree of arrays or jax.ShapeDtypeStruct; the state is restored into its structure
    (tuples stay tuples) with its dtypes, and must match the saved keys and shapes exactly.
    Without a target the saved structure comes back (dicts and lists; tuples were saved as lists).
    """
    _, (state, meta) = self.restore_with_step(step, target=target)
    return state, meta

  def restore_with_step(self, step: Optional[int] = None, *,
                        target: Any = None) -> Tuple[int, Tuple[Any, Dict]]:
    """(the step restored, (state, meta)): `restore`, saying which step it used."""
    def restore_step(step):
      saved = self._state_metadata(step)
      if target is None:
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
      else:
        self._check_target(step, saved, target)
        restore_args = jax.tree_util.tree_map(
            lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=_dtype(x)), target)
      out = self._read(step, ocp.args.Composite(**{
          STATE_ITEM: ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
          META_ITEM: ocp.args.JsonRestore()}))
      return out[STATE_ITEM], out[META_ITEM]
    return self._restore_intact(step, restore_step)

  def _check_target(self, step: int, saved: Any, target: Any) -> None:
    problem = tree_mismatch(saved, target)
    if problem:
      raise ValueError(f"Checkpoint step {step} in {self.directory} does not match the expected "
                       f"state ({problem}); it was written by a different model or config than "
                       "the one given.")

  def restore_params_only(self, step: Optional[int] = None, *,
                          ema_index: Optional[int] = 0) -> Any:
    """One parameter tree of checkpoint `step` (the newest intact one by default), as float32
    numpy; see `restore_params_with_step`."""
    return self.restore_params_with_step(step, ema_index=ema_index)[1]

  def restore_params_with_step(self, step: Optional[int] = None, *,
                               ema_index: Optional[int] = 0) -> Tuple[int, Any]:
    """(the step restored, one parameter tree of it as float32 numpy).

    step: a checkpoint step, or None for the newest intact one (a damaged latest checkpoint is
    moved aside). ema_index: which EMA tree of "ema_params" (0: the main EMA, the one sampling
    uses); None gives the raw "params". Reads no optimizer state and needs no template.
    """
    return self._restore_intact(step, lambda s: self._params_of(s, ema_index))

  def _params_of(self, step: int, ema_index: Optional[int]) -> Any:
    saved = self._state_metadata(step)
    if not isinstance(saved, dict):
      raise ValueError(f"Checkpoint step {step} in {self.directory} is not a ddpm_jax training "
                       f"state (its state is a {type(saved).__name__}, not a dict).")
    if ema_index is None:
      key, sub = "params", saved.get("params")
    else:
      key, emas = "ema_params", saved.get("ema_params")
      if isinstance(emas, dict):
        sub = emas.get(str(ema_index))
        item = {str(ema_index): sub}
      elif isinstance(emas, (list, tuple)):
        sub = emas[ema_index] if -len(emas) <= ema_index < len(emas) else None
        item = list(emas)  # orbax restores whole lists; the other EMAs are dropped below
      else:
        sub = None
    if sub is None:
      raise ValueError(f"Checkpoint step {step} in {self.directory} has no "
                       f"{key if ema_index is None else f'{key}[{ema_index}]'} (its top-level "
                       f"keys: {', '.join(map(str, saved))}); it is not a ddpm_jax training state.")
    request = {key: sub if ema_index is None else item}

    def args(meta):
      floating = jnp.issubdtype(np.dtype(getattr(meta, "dtype", np.float32)), jnp.floating)
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32 if floating else None)

    out = self._read(step, ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(item=request,
                                           restore_args=jax.tree_util.tree_map(args, request),
                                           partial_restore=True)}))
    tree = out[STATE_ITEM][key]
    if ema_index is None:
      return tree
    return tree[str(ema_index)] if isinstance(tree, dict) else tree[ema_index]


class _Damaged(Exception):
  """orbax could not read a checkpoint; the message says why, in one line."""


def _reason(error: Exception) -> str:
  """An orbax/tensorstore error in one short line (theirs carry the whole tensorstore spec)."""
  text = str(error).split(" [tensorstore_spec=")[0].splitlines()
  parts = (text[0] if text else "").split(": ")
  # tensorstore nests its causes ("OUT_OF_RANGE: Error opening ...: ...: the cause"): keep the
  # code and the innermost cause.
  text = ": ... ".join((parts[0], parts[-1])) if len(parts) > 2 else ": ".join(parts)
  text = text if len(text) <= 300 else text[:300] + " ..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------- load


def load_with_step(workdir: str, *, step: Optional[int] = None
                   ) -> Tuple[int, Any, ml_collections.ConfigDict]:
  """(the step loaded, EMA params, config): `load`, saying which step it read. One Checkpointer
  resolves the step and reads it, so sampling and evaluation name the step they used."""
  root = epath.Path(workdir)
  if not root.exists():
    raise MissingFileError(f"Workdir {workdir} does not exist; pass the --workdir of a "
                           "training run.")
  if not root.is_dir():
    raise UserError(f"Workdir {workdir} is not a directory; pass the --workdir of a "
                    "training run.")
  config = rundir.read_config(workdir)
  names = rundir.read_class_names(workdir)
  if names:  # a folder labelled by its subfolders: for sample(..., labels="name")
    config.data.class_names = names
  if not (root / CHECKPOINT_DIR).is_dir():
    raise MissingFileError(f"No checkpoint in {root / CHECKPOINT_DIR}; train first with `"
                           f"{train_command(workdir)}`.")
  with Checkpointer(workdir, keep=None, read_only=True, process_local=True) as ckpt:
    step, params = ckpt.restore_params_with_step(step)
  return step, params, config


def load(workdir: str, *, step: Optional[int] = None) -> Tuple[Any, ml_collections.ConfigDict]:
  """(EMA params, config) of a training run: the main EMA tree of checkpoint `step` (the newest
  intact one by default; a damaged latest checkpoint is moved aside with a warning) as nested
  dicts of float32 numpy arrays, for `UNet(**config.model).apply({"params": ema_params}, ...)`,
  and the run's own config.

  Reads only (but for moving a damaged checkpoint aside); works on any number of devices and
  in any subset of a job's processes.
  """
  _, params, config = load_with_step(workdir, step=step)
  return params, config
