"""`load(workdir)`: a training run's EMA parameters and its config, for research code.

Reads workdir/config.json (and classes.json, see rundir.py) and the main EMA tree of one
checkpoint (checkpoint.py); needs neither the optimizer state nor the model.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import ml_collections
from etils import epath

from ddpm_jax import rundir
from ddpm_jax.checkpoint import CHECKPOINT_DIR, Checkpointer, train_command
from ddpm_jax.errors import MissingFileError, UserError


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
