"""Run directories: config.json, orbax checkpoints of the training state, and `load(workdir)`.

A run directory (see ../shared/DESIGN.md, "Workdir layout") holds

    config.json                 the run's full config (`config.to_json(indent=2, sort_keys=True)`)
    checkpoints/<step>/         one orbax checkpoint per saved step, two items:
        state/                  the state tree (PyTreeCheckpointHandler, OCDBT): every leaf a host
                                numpy array, so a checkpoint carries no device or sharding layout
        meta/metadata           a JSON object (JsonCheckpointHandler): RNG key, data position, ...

Training saves `flax.serialization.to_state_dict(train_state)`, i.e.
{"step", "params", "ema_params": {"0": tree, "1": tree, ...}, "opt_state", ...}; `load` reads
only `ema_params[0]` (the EMA that sampling uses), so it needs neither the optimizer nor the model.

Paths may be local or anything `etils.epath` opens (e.g. gs://). Every process of a multi-process
job calls `Checkpointer.save`/`restore` (orbax coordinates who writes what); only process 0
writes config.json. `load` and `read_config` are process-local and may be called by any subset.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax.errors import UserError

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"  # a labelled folder's class names, beside config.json
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"

# Config fields that may change between the runs of one workdir: how long to train and how
# often to log/save/sample/evaluate, sampling and evaluation settings, where the data live, and
# how the step is mapped over devices, and whether the U-Net rematerialises (memory vs compute,
# the same function and parameters). Everything else changes what is trained or what a
# checkpoint means (model, diffusion, data, optimizer, seed, batch size, EMA decays, ...).
COMPATIBLE_KEYS = frozenset({
    "data.data_dir",
    "model.dtype",  # compute dtype only: parameters are float32 whatever it is
    "model.remat",  # recomputation in the backward pass: the same parameters and results
    "parallel",
    "training.num_train_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.sample_every",
    "training.eval_every",
})
COMPATIBLE_PREFIXES = ("sampling.", "eval.")

_ABSENT = "<absent>"


# ----------------------------------------------------------------------------- config.json


def is_compatible_key(key: str) -> bool:
  """Whether the dotted config key `key` may differ from the value stored in a workdir."""
  return key in COMPATIBLE_KEYS or key.startswith(COMPATIBLE_PREFIXES)


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _same(a: Any, b: Any) -> bool:
  """JSON values equal, and a bool never equal to a number (True == 1 in Python)."""
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return isinstance(a, bool) == isinstance(b, bool) and type(a) is not list and a == b


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (ml_collections writes tuples as lists), dicts recursively."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json(indent=2, sort_keys=True)


def _workdir_error(workdir, err: OSError) -> ValueError:
  reason = err.strerror or str(err)
  return ValueError(f"Cannot write the run directory {os.fspath(workdir)} ({reason}); pass a "
                    "--workdir you can create and write.")


def write_atomically(path: epath.Path, data) -> None:
  """Writes `data` (str or bytes) to a temporary file beside `path`, then renames it over
  `path`: a reader sees the old file or the whole new one, never a part."""
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    if isinstance(data, bytes):
      tmp.write_bytes(data)
    else:
      tmp.write_text(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_class_names(workdir: str, names: Tuple[str, ...]) -> None:
  """Stores a labelled folder's class names in workdir/classes.json (process 0, atomically), or
  refuses names that differ from those already stored (the labels would change meaning)."""
  path = epath.Path(workdir) / CLASSES_FILE
  if path.exists():
    stored = tuple(json.loads(path.read_text()))
    if stored != tuple(names):
      raise UserError(f"The classes of config.data.path ({', '.join(names)}) differ from the "
                      f"run's ({', '.join(stored)}, in {path}); resume with the same classes or "
                      "start a new --workdir.")
  elif jax.process_index() == 0:
    write_atomically(path, json.dumps(list(names), indent=1) + "\n")


def read_class_names(workdir: str) -> Tuple[str, ...]:
  """The class names in workdir/classes.json, () when the run has none."""
  path = epath.Path(workdir) / CLASSES_FILE
  return tuple(json.loads(path.read_text())) if path.exists() else ()


def _check_writable(root: epath.Path) -> None:
  """Creates and deletes a file in `root` (an existing directory can still be read-only)."""
  probe = root / f".write-test-{os.getpid()}"
  probe.write_text("")
  probe.unlink()


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored in workdir/config.json, with JSON lists turned back into tuples."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir} is not a ddpm_jax run directory: it has no {CONFIG_FILE} "
                            f"(looked for {path}).")
  text = path.read_text()
  try:
    tree = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it should hold the run's config as "
                     "written by training.") from e
  if not isinstance(tree, dict):
    raise ValueError(f"{path} holds a JSON {type(tree).__name__}, not the run's config object.")
  return ml_collections.ConfigDict(_tuples(tree))


def write_or_check_config(workdir: str,
                          config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Records `config` in workdir/config.json, or checks it against the one already there.

  A new workdir gets the config (written by process 0, atomically). An existing one keeps its
  run: fields that change what is trained or what a checkpoint means must be equal (else a
  ValueError names each field with its stored and new values); the others (see
  `is_compatible_key`: step counts, logging/checkpoint/sample/eval intervals, sampling and eval
  settings, data.data_dir, parallel) may change, and config.json is updated to the new values.
  Returns `config`.
  """
  root = epath.Path(workdir)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _workdir_error(workdir, e) from e
  if not root.is_dir():
    raise ValueError(f"Cannot use {workdir} as the run directory: it is not a directory; pass a "
                     "--workdir you can create and write.")
  path = root / CONFIG_FILE
  new_text = _config_json(config)
  primary = jax.process_index() == 0
  if primary:
    try:
      _check_writable(root)
    except OSError as e:
      raise _workdir_error(workdir, e) from e

  def write():
    if primary:
      try:
        write_atomically(path, new_text + "\n")
      except OSError as e:
        raise _workdir_error(workdir, e) from e

  if not path.exists():
    write()
    return config

  changed = _changed_fields(workdir, path, new_text, "resume it")
  if changed:
    logging.info("Updating %s in %s.", ", ".join(changed), path)
    write()
  return config


def _changed_fields(workdir: str, path: epath.Path, new_text: str, purpose: str) -> List[str]:
  """The dotted fields in which `new_text` differs from the stored config.json; refuses (one
  ValueError naming each field and both values) fields that are not `is_compatible_key`."""
  try:
    old = _flatten(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); move it away to start a new run in "
                     f"{workdir}, or use a new --workdir.") from e
  new = _flatten(json.loads(new_text))
  changed = sorted(k for k in old.keys() | new.keys()
                   if not _same(old.get(k, _ABSENT), new.get(k, _ABSENT)))
  refused = [k for k in changed if not is_compatible_key(k)]
  if refused:
    def show(v):
      return _ABSENT if v is _ABSENT else repr(_tuples(v))
    listing = "; ".join(f"{k}: {show(old.get(k, _ABSENT))} in the run, {show(new.get(k, _ABSENT))}"
                        f" now" for k in refused)
    first = old.get(refused[0], _ABSENT)
    hint = (f" (e.g. --config.{refused[0]}={first if isinstance(first, str) else show(first)})"
            if first is not _ABSENT else "")
    raise ValueError(
        f"The config differs from the run in {workdir} ({path}) in fields that change what is "
        f"trained or what its checkpoints mean ({listing}); restore the run's values{hint} to "
        f"{purpose}, or pass a new --workdir to start a new run.")
  return changed


def check_config(workdir: str, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks `config` against workdir/config.json without writing anything: fields that change
  what was trained must equal the run's (one ValueError naming them otherwise); sampling, eval
  and the other `is_compatible_key` fields may differ. Returns `config`."""
  path = epath.Path(workdir) / CONFIG_FILE
  read_config(workdir)  # a clear error for a directory that is not a run
  _changed_fields(workdir, path, _config_json(config), "use its checkpoints")
  return config


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

  With several processes, every process must construct the Checkpointer and call `save` (and
  `wait`/`close`) with the same arguments; process 0 writes the files, the others take part in
  orbax's barriers. `restore` reads on every process that calls it.
  """

  def __init__(self, workdir: str, *, keep: Optional[int], read_only: bool = False,
               process_local: bool = False):
    """keep: the number of checkpoints kept (None: all). read_only: never create, delete or
    write anything. process_local: this process alone uses the Checkpointer (no barriers with
    the other processes of a multi-process job; only for reading)."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep={keep!r}: the number of checkpoints to keep must be an int >= 1 "
                       "(training.keep_checkpoints).")
    if process_local and not read_only:
      raise ValueError("A process-local Checkpointer must be read_only=True.")
    self.workdir = workdir
    self.directory = epath.Path(workdir) / CHECKPOINT_DIR
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
      raise _workdir_error(self.directory, e) from e

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
        raise FileNotFoundError(
            f"No checkpoint in {self.directory}; train first with `"
            f"{train_command(self.workdir)}`.")
      return steps[-1]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise TypeError(f"step={step!r}: pass an int checkpoint step (or None for the latest).")
    if int(step) not in steps:
      raise ValueError(f"No checkpoint of step {int(step)} in {self.directory}; available steps: "
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
    meta = self._manager.item_metadata(step)[STATE_ITEM]
    return getattr(meta, "tree", meta)

  def restore(self, step: Optional[int] = None, *, target: Any = None) -> Tuple[Any, Dict]:
    """(state, meta) of checkpoint `step` (the latest by default); leaves are host numpy arrays.

    target: a pytree of arrays or jax.ShapeDtypeStruct; the state is restored into its structure
    (tuples stay tuples) with its dtypes, and must match the saved keys and shapes exactly.
    Without a target the saved structure comes back (dicts and lists; tuples were saved as lists).
    """
    self.wait()
    step = self._resolve_step(step)
    saved = self._state_metadata(step)
    if target is None:
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    else:
      self._check_target(step, saved, target)
      restore_args = jax.tree_util.tree_map(
          lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=_dtype(x)), target)
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
        META_ITEM: ocp.args.JsonRestore()}))
    return out[STATE_ITEM], out[META_ITEM]

  def _check_target(self, step: int, saved: Any, target: Any) -> None:
    problem = tree_mismatch(saved, target)
    if problem:
      raise ValueError(f"Checkpoint step {step} in {self.directory} does not match the expected "
                       f"state ({problem}); it was written by a different model or config than "
                       "the one given.")

  def restore_params_only(self, step: Optional[int] = None, *,
                          ema_index: Optional[int] = 0) -> Any:
    """One parameter tree of checkpoint `step` (the latest by default), as float32 numpy.

    ema_index: which EMA tree of "ema_params" (0: the main EMA, the one sampling uses); None
    gives the raw "params". Reads no optimizer state and needs no template.
    """
    self.wait()
    step = self._resolve_step(step)
    saved = self._state_metadata(step)
    if not isinstance(saved, dict):
      raise ValueError(f"Checkpoint step {step} in {self.directory} is not a ddpm_jax training "
                       "state (its state is not a dict).")
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

    out = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(item=request,
                                           restore_args=jax.tree_util.tree_map(args, request),
                                           partial_restore=True)}))
    tree = out[STATE_ITEM][key]
    if ema_index is None:
      return tree
    return tree[str(ema_index)] if isinstance(tree, dict) else tree[ema_index]


# ----------------------------------------------------------------------------- load


def resolve_step(workdir: str, step: Optional[int] = None) -> int:
  """`step` if workdir has a checkpoint of it, else the latest step (step=None); clear errors
  for a workdir without checkpoints or without that step."""
  if not (epath.Path(workdir) / CHECKPOINT_DIR).is_dir():
    raise FileNotFoundError(f"No checkpoint in {epath.Path(workdir) / CHECKPOINT_DIR}; train "
                            f"first with `{train_command(workdir)}`.")
  with Checkpointer(workdir, keep=None, read_only=True, process_local=True) as ckpt:
    return ckpt._resolve_step(step)  # pylint: disable=protected-access


def load(workdir: str, *, step: Optional[int] = None) -> Tuple[Any, ml_collections.ConfigDict]:
  """(EMA params, config) of a training run: the main EMA tree of checkpoint `step` (the latest
  by default) as nested dicts of float32 numpy arrays, for
  `UNet(**config.model).apply({"params": ema_params}, ...)`, and the run's own config.

  Reads only; works on any number of devices and in any subset of a job's processes.
  """
  root = epath.Path(workdir)
  if not root.exists():
    raise FileNotFoundError(f"Workdir {workdir} does not exist; pass the --workdir of a "
                            "training run.")
  if not root.is_dir():
    raise NotADirectoryError(f"Workdir {workdir} is not a directory; pass the --workdir of a "
                             "training run.")
  config = read_config(workdir)
  ckpt_dir = root / CHECKPOINT_DIR
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"No checkpoint in {ckpt_dir}; train first with `"
                            f"{train_command(workdir)}`.")
  with Checkpointer(workdir, keep=None, read_only=True, process_local=True) as ckpt:
    params = ckpt.restore_params_only(step)
  config.data.class_names = read_class_names(workdir)  # for sample(..., labels="name")
  return params, config
