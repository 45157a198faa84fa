"""Orbax checkpoints of the training state: the `Checkpointer` (save, restore, fall back past
damaged checkpoints; see damaged_checkpoints.py). `load(workdir)` is in loading.py.

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

import contextlib
import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax import damaged_checkpoints as damaged, failed_writes, rundir
from ddpm_jax.errors import MissingFileError, UserError

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"

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
    self._pending = None  # (step, bytes) of the save in flight
    self._failed = False  # a save failed and was reported: nothing more to wait for

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
    self.wait()  # orbax waits for the previous save anyway; its failure names its own step
    self._pending = (step, sum(x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes
                             for x in jax.tree_util.tree_leaves(tree)))
    with self._writing():
      saved = self._manager.save(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.PyTreeSave(tree), META_ITEM: ocp.args.JsonSave(meta)}))
    if not saved:
      raise RuntimeError(f"orbax declined to save step {step} in {self.directory} (steps there: "
                         f"{_steps_text(self.all_steps())}).")

  def wait(self) -> None:
    """Blocks until every save started so far is complete on disk (raises its error if any:
    a failed write is a UserError naming the path, why and the bytes needed)."""
    if self._failed:
      return
    with self._writing():
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    if self._failed:  # reported already; orbax may raise the same error again
      with contextlib.suppress(Exception):
        self._manager.close()
      return
    with self._writing():
      self._manager.close()

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed write of the save in flight (disk full, no permission) into one UserError
    (see failed_writes.py), after removing its partial folder; other errors pass unchanged."""
    try:
      yield
    except (OSError, ValueError) as e:
      why = failed_writes.reason(e)
      if why is None or self._pending is None:
        raise
      self._failed = True
      step, needed = self._pending
      if jax.process_index() == 0:
        failed_writes.remove_partial(self.directory, step)
      with contextlib.suppress(Exception):
        self._manager.reload()
      previous = [s for s in self._complete_steps() if s < step]
      raise UserError(failed_writes.sentence(self.directory, step, why, needed,
                                             previous[-1] if previous else None)) from e

  def _complete_steps(self) -> List[int]:
    """The steps with a finished checkpoint folder on disk (no save in flight among them)."""
    try:
      return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    except OSError:
      return []

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore

  def _state_metadata(self, step: int) -> Any:
    """The saved state's tree of array metadata; damaged.Damaged if orbax cannot read it."""
    if not (self.directory / str(step) / STATE_ITEM / "_METADATA").exists():
      # Checked here: orbax would only warn, without naming the step, and return no tree.
      raise damaged.Damaged(f"{STATE_ITEM}/_METADATA is missing")
    try:
      meta = self._manager.item_metadata(step)[STATE_ITEM]
    except damaged.READ_ERRORS as e:
      raise damaged.Damaged(damaged.reason(e)) from e
    tree = getattr(meta, "tree", meta)
    if tree is None:  # orbax only warns when state/_METADATA is unreadable
      raise damaged.Damaged(f"{STATE_ITEM}/_METADATA is unreadable")
    return tree

  def _read(self, step: int, args: ocp.args.Composite) -> Any:
    try:
      return self._manager.restore(step, args=args)
    except damaged.READ_ERRORS as e:
      raise damaged.Damaged(damaged.reason(e)) from e

  def _restore_intact(self, step: Optional[int], restore_step) -> Tuple[int, Any]:
    """(step, restore_step(step)) for `step`, or for the newest checkpoint that restores.

    restore_step(step) reads one checkpoint and raises damaged.Damaged when orbax cannot. A
    damaged latest checkpoint is moved aside (see the class docstring) and the next older one is
    tried; a damaged `step` asked for by number is a UserError.
    """
    self.wait()
    if step is not None:
      step = self._resolve_step(step)
      try:
        return step, restore_step(step)
      except damaged.Damaged as e:
        others = [s for s in self.all_steps() if s != step]
        raise UserError(
            f"Checkpoint step {step} in {self.directory} is damaged ({e}); pass another step "
            f"(the others: {_steps_text(others)}), or none to use the newest intact one.") from e
    self._resolve_step(None)  # "train first" when there is none
    for candidate in reversed(self.all_steps()):
      try:
        return candidate, restore_step(candidate)
      except damaged.Damaged as e:
        damaged.set_aside(self.workdir, self.directory, candidate, str(e),
                          process_local=self._process_local)
        self._manager.reload()
    moved_to = epath.Path(self.workdir) / damaged.DAMAGED_DIR
    raise UserError(f"No intact checkpoint in {self.directory}: every one was damaged and was "
                    f"moved to {moved_to}; training again with `"
                    f"{train_command(self.workdir)}` starts from step 0.")

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


