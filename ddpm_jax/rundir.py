"""The run directory's own files: config.json, its compatibility with a new command, and atomic
writes (checkpoints live in checkpoint.py).

    workdir/config.json     the run's full config (`config.to_json(indent=2, sort_keys=True)`)
    workdir/classes.json    a folder labelled by its subfolders: the class names, label order

A new run writes its config; a later command in the same workdir must agree with it on every
field that decides what is trained or what a checkpoint means. Which fields those are follows
from the config's sections, as settings.py declares them (`settings.is_changeable`): model,
diffusion, data, optim, training and seed are fixed, except the fields that change only how
the same run is computed or reported (model.dtype, model.remat, data.data_dir, the training
schedule's length and intervals); sampling, eval and parallel are changeable.

Only process 0 writes; paths may be local or anything `etils.epath` opens (e.g. gs://).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional

import jax
import ml_collections
from absl import logging
from etils import epath

from ddpm_jax import settings
from ddpm_jax.errors import MissingFileError, UserError

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"  # a labelled folder's class names, beside config.json
_ABSENT = "<absent>"
# The sections a --mode=sample/eval config file must agree on with the run (else it was written
# for another run); its other fixed fields (training, optim, seed) are ignored there.
IDENTITY_SECTIONS = ("model", "diffusion", "data")


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


def _show(value: Any) -> str:
  return _ABSENT if value is _ABSENT else repr(_tuples(value))


def workdir_error(workdir, err: OSError) -> UserError:
  reason = err.strerror or str(err)
  return UserError(f"Cannot write the run directory {os.fspath(workdir)} ({reason}); pass a "
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


def read_json(path: epath.Path, what: str, fix: str) -> Any:
  """The JSON value in `path`, or a UserError naming the file, what is wrong with it, `what` it
  should be and `fix` (what to do). Refuses text that is not UTF-8, not JSON, or nested too
  deep for Python's parser."""
  try:
    return json.loads(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    problem = f"is not UTF-8 text (byte {e.start})"
  except json.JSONDecodeError as e:
    problem = f"is not valid JSON ({e})"
  except RecursionError:
    problem = "is JSON nested too deep to read"
  raise UserError(f"{path} {problem}; it should be {what}: {fix}.")


def _class_names(path: epath.Path) -> tuple:
  names = read_json(path, "the list of the run's class names",
                    "restore it, or start a new --workdir")
  if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
      or len(set(names)) != len(names)):
    raise UserError(f"{path} holds {_show(names)[:80]}, not a list of distinct class names "
                    "(strings); restore it, or start a new --workdir.")
  return tuple(names)


def write_class_names(workdir: str, names) -> None:
  """Stores a labelled folder's class names in workdir/classes.json (process 0, atomically), or
  refuses names that differ from those already stored (the labels would change meaning)."""
  path = epath.Path(workdir) / CLASSES_FILE
  if path.exists():
    stored = _class_names(path)
    if stored != tuple(names):
      raise UserError(f"The classes of config.data.path ({', '.join(names)}) differ from the "
                      f"run's ({', '.join(stored)}, in {path}); resume with the same classes or "
                      "start a new --workdir.")
  elif jax.process_index() == 0:
    write_atomically(path, json.dumps(list(names), indent=1) + "\n")


def read_class_names(workdir: str) -> tuple:
  """The class names in workdir/classes.json, () when the run has none."""
  path = epath.Path(workdir) / CLASSES_FILE
  return _class_names(path) if path.exists() else ()


def _check_writable(root: epath.Path) -> None:
  """Creates and deletes a file in `root` (an existing directory can still be read-only)."""
  probe = root / f".write-test-{os.getpid()}"
  probe.write_text("")
  probe.unlink()


def _read_tree(workdir: str) -> Dict[str, Any]:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise MissingFileError(f"{workdir} is not a ddpm_jax run directory: it has no "
                           f"{CONFIG_FILE} (looked for {path}); pass the --workdir of a "
                           "training run.")
  tree = read_json(path, "the run's config", f"move it away to start a new run in {workdir}, "
                   "or use a new --workdir")
  if not isinstance(tree, dict):
    raise UserError(f"{path} holds a JSON {type(tree).__name__}, not the run's config object.")
  return tree


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored in workdir/config.json, with JSON lists turned back into tuples."""
  return ml_collections.ConfigDict(_tuples(_read_tree(workdir)))


def write_or_check_config(workdir: str,
                          config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Records `config` in workdir/config.json, or checks it against the one already there.

  A new workdir gets the config (written by process 0, atomically). An existing one keeps its
  run: fixed fields must be equal (else a UserError names each with its stored and new value);
  changeable ones (`settings.is_changeable`) may differ, and config.json is updated to them.
  Returns `config`.
  """
  root = epath.Path(workdir)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise workdir_error(workdir, e) from e
  if not root.is_dir():
    raise UserError(f"Cannot use {workdir} as the run directory: it is not a directory; pass a "
                    "--workdir you can create and write.")
  path = root / CONFIG_FILE
  new_text = _config_json(config)
  primary = jax.process_index() == 0
  if primary:
    try:
      _check_writable(root)
    except OSError as e:
      raise workdir_error(workdir, e) from e

  def write():
    if primary:
      try:
        write_atomically(path, new_text + "\n")
      except OSError as e:
        raise workdir_error(workdir, e) from e

  if not path.exists():
    write()
    return config
  changed = _changed_fields(workdir, _flatten(_read_tree(workdir)), _flatten(json.loads(new_text)))
  if changed:
    logging.info("Updating %s in %s.", ", ".join(changed), path)
    write()
  return config


def _unflatten(flat: Dict[str, Any]) -> ml_collections.ConfigDict:
  tree: Dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return ml_collections.ConfigDict(_tuples(tree))


def _meant_already(old: Dict[str, Any], key: str, value: Any) -> bool:
  """Whether `key`, absent from a run written by an older version, set to `value` leaves the
  run's settings as they were: the field is new, and `value` is what the run did without it
  (e.g. training.ema_warmup=False for a run from before EMA warm-up existed)."""
  if key in old or value is _ABSENT:
    return False
  try:
    return (settings.Settings.from_config(_unflatten({**old, key: value}))
            == settings.Settings.from_config(_unflatten(old)))
  except UserError:
    return False


def _changed_fields(workdir: str, old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """The dotted fields in which `new` differs from the run's `old`; refuses (one UserError
  naming each field and both values) those that are not changeable."""
  changed = sorted(k for k in old.keys() | new.keys()
                   if not _same(old.get(k, _ABSENT), new.get(k, _ABSENT)))
  refused = [k for k in changed if not settings.is_changeable(k)]
  refused = [k for k in refused if not _meant_already(old, k, new[k] if k in new else _ABSENT)]
  if refused:
    try:  # a run directory of an older version may hold values that were never checked
      settings.validate(ml_collections.ConfigDict(_tuples(_read_tree(workdir))))
    except UserError as e:
      raise UserError(f"{epath.Path(workdir) / CONFIG_FILE} holds a config that cannot train "
                      f"({str(e).rstrip('.')}); move it away to start the run afresh in "
                      f"{workdir}, or pass a new --workdir.") from e
    listing = "; ".join(f"{k}: {_show(old.get(k, _ABSENT))} in the run, "
                        f"{_show(new.get(k, _ABSENT))} now" for k in refused)
    first = old.get(refused[0], _ABSENT)
    hint = (f" (e.g. --config.{refused[0]}={first if isinstance(first, str) else _show(first)})"
            if first is not _ABSENT else "")
    raise UserError(
        f"The config differs from the run in {workdir} in fields that change what is trained "
        f"or what its checkpoints mean ({listing}); restore the run's values{hint} to resume "
        "it, or pass a new --workdir to start a new run.")
  return changed


def config_for_use(workdir: str, given: Optional[ml_collections.ConfigDict] = None,
                   overrides: Mapping[str, Any] = ()) -> ml_collections.ConfigDict:
  """The config of --mode=sample/eval: the run's config.json, changed only where it may change.

  given: the command line's --config (file and overrides), or None without --config; its
  changeable fields (sampling, eval, parallel, model.dtype, ...) replace the run's.
  overrides: {dotted field: value} of the --config.* flags given; without --config these are
  the only changes. A fixed field that differs from the run's is refused (one UserError) if it
  was given as a flag or is in IDENTITY_SECTIONS (a config file for another run); the file's
  other fixed fields (training, optim, seed) are ignored: the run's are used. Writes nothing.
  """
  run = _read_tree(workdir)
  old = _flatten(run)
  new = dict(overrides) if given is None else _flatten(json.loads(given.to_json()))
  new = {k: json.loads(json.dumps(v)) for k, v in new.items()}  # tuples as in config.json
  refused = [k for k in sorted(new) if not settings.is_changeable(k) and k in old
             and not _same(old[k], new[k])
             and (k in overrides or k.split(".")[0] in IDENTITY_SECTIONS)]
  if refused:
    listing = "; ".join(f"{k}: {_show(old[k])} in the run, {_show(new[k])} now" for k in refused)
    raise UserError(
        f"--mode=sample and --mode=eval use the run's own model, diffusion, data and training "
        f"settings from {epath.Path(workdir) / CONFIG_FILE}, but the command line differs "
        f"({listing}); drop those flags (or --config), or pass the --workdir of the run they "
        "belong to.")
  for key, value in new.items():
    if settings.is_changeable(key):
      node = run
      *parents, leaf = key.split(".")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
  return ml_collections.ConfigDict(_tuples(run))
