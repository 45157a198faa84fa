"""--mode=sample: a run's EMA samples, written as resumable uint8 .npz shards.

    workdir/samples/<step:08d>_<tag>/      e.g. 00800000_ancestral1000, 00800000_ddim100_eta0,
                                           00800000_dpm_solver20_order2
        sampling.json                      the settings of these samples (checked on resume)
        shard_000000.npz                   images uint8 [n, S, S, C], labels int32 [n],
        shard_000001.npz ...               index int64 [n] (the samples' global indices)
        grid.png                           the first 64 samples

Shard k holds samples [k * shard_size, (k + 1) * shard_size). Sample i is drawn from
fold_in(sample_key(config), i) alone (`ddpm_jax.sample`'s first_index), so a shard is the same
whichever host or how many devices compute it: host p of P computes the shards with k % P == p,
each host writes only its own files, and a restarted job (on any number of hosts) keeps every
finished shard and computes only the missing ones. Files are written to a temporary name and
renamed, so a crash never leaves a partial shard.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Optional, Tuple

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import from_run, loading, placement, rundir, settings
from ddpm_jax.errors import MissingFileError, UserError
from ddpm_jax.reporting import Progress, save_png

MANIFEST = "sampling.json"
GRID = "grid.png"
SAMPLE_STREAM = 0x5A3F1E  # folded into the run's seed: sampling's key differs from training's


def sample_key(config) -> jax.Array:
  """The key of every sample of a run: fold_in(PRNGKey(config.seed), SAMPLE_STREAM)."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLE_STREAM)


def _manifest_settings(config, step: int) -> dict:
  """What the samples of a directory depend on: step, seed, compute dtype and the chain."""
  s = settings.Settings.from_config(config)
  return dict(step=step, seed=s.seed, dtype=s.model.dtype,
              **dataclasses.asdict(s.sampling.chain))


def sample_dir(workdir: str, config, step: int) -> epath.Path:
  """workdir/samples/<step>_<tag>: one directory per checkpoint step and sampler setting."""
  s = settings.Settings.from_config(config)
  tag = s.sampling.chain.tag()
  if s.model.dtype != "float32":
    tag += f"_{s.model.dtype}"
  return epath.Path(workdir) / "samples" / f"{step:08d}_{tag}"


def shard_path(directory: epath.Path, k: int) -> epath.Path:
  return directory / f"shard_{k:06d}.npz"


def _read_shard(path: epath.Path) -> Optional[dict]:
  """A shard's arrays, or None if it is missing or unreadable."""
  if not path.exists():
    return None
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (ValueError, OSError, EOFError) as e:
    logging.warning("Recomputing %s: it cannot be read (%s).", path, e)
    return None


def _shard_done(path: epath.Path, indices: np.ndarray, image_shape: tuple) -> bool:
  shard = _read_shard(path)
  return (shard is not None and shard.get("images") is not None
          and shard["images"].shape == (len(indices),) + image_shape
          and np.array_equal(shard.get("index"), indices))


def _manifest(directory: epath.Path, wanted: dict, shard_size: int, primary: bool) -> int:
  """The directory's shard size: the stored one on resume (after checking its settings)."""
  path = directory / MANIFEST
  if path.exists():
    stored = json.loads(path.read_text())
    different = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if different:
      raise UserError(f"{path} records other sampling settings than asked for ("
                       + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in
                                   different.items())
                       + "); move that directory away or sample into a new workdir.")
    return int(stored["shard_size"])
  if primary:
    rundir.write_atomically(path, json.dumps(dict(wanted, shard_size=shard_size),
                                             indent=2).encode())
  return shard_size


def generate(config, workdir: str, *, num_samples: Optional[int] = None,
             step: Optional[int] = None, params=None, process_index: Optional[int] = None,
             process_count: Optional[int] = None) -> epath.Path:
  """Writes samples 0 .. num_samples-1 of the run in `workdir` as shards; returns their directory.

  config: the run's config (sampling settings from config.sampling); num_samples defaults to
  config.sampling.num_samples; step: the checkpoint (default: the latest); params: EMA params
  already loaded for that step (else read here). process_index/process_count: this host's
  share of the shards (default: jax's); several hosts write into one directory.
  """
  num_samples = config.sampling.num_samples if num_samples is None else num_samples
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise UserError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
  from_run.check_settings(config)
  if params is None or step is None:
    step, params, _ = loading.load_with_step(workdir, step=step)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count

  directory = sample_dir(workdir, config, step)
  directory.mkdir(parents=True, exist_ok=True)
  shard_size = _manifest(directory, _manifest_settings(config, step), config.sampling.batch_size,
                         primary=process_index == 0)
  num_shards = math.ceil(num_samples / shard_size)
  mine = list(range(process_index, num_shards, process_count))
  size, channels = config.data.image_size, config.data.num_channels
  indices = lambda k: np.arange(k * shard_size, min((k + 1) * shard_size, num_samples))
  todo = [k for k in mine if not _shard_done(shard_path(directory, k), indices(k),
                                               (size, size, channels))]
  total = sum(len(indices(k)) for k in mine)
  done = total - sum(len(indices(k)) for k in todo)
  logging.info("Sampling %d images into %s: this host has %d of them, %d already written.",
               num_samples, directory, total, done)
  progress = Progress(f"sampling {directory.name}", total, start=done)
  key = sample_key(config)
  params = placement.replicate(params)  # on the devices once, not once per shard
  for k in todo:
    index = indices(k)
    images = from_run.sample(params, key, config=config, num_samples=len(index),
                             first_index=int(index[0]))
    pixels = np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    arrays = dict(images=pixels, index=index.astype(np.int64))
    if config.model.num_classes:
      arrays["labels"] = from_run.sample_labels(config, key, index)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    rundir.write_atomically(shard_path(directory, k), buffer.getvalue())
    done += len(index)
    progress.update(done)

  if process_count > 1 and process_count == jax.process_count():
    multihost_utils.sync_global_devices(f"samples written to {directory}")
  if process_index == 0:
    first = min(64, num_samples)
    shards = [_read_shard(shard_path(directory, k)) for k in range(math.ceil(first / shard_size))]
    if all(s is not None for s in shards):
      grid = np.concatenate([s["images"] for s in shards])[:first]
      save_png(os.fspath(directory / GRID), grid.astype(np.float32) / 127.5 - 1.0,
               upscale=max(1, 64 // size))
  return directory


def read_samples(directory, num_samples: int, *,
                 shards: Optional[list] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """(images uint8 [N, S, S, C], labels int32 [N] or None) of samples 0..num_samples-1 in a
  directory written by `generate`, or only of the listed shard numbers (in that order)."""
  directory = epath.Path(directory)
  path = directory / MANIFEST
  if not path.exists():
    raise MissingFileError(f"{directory} holds no samples ({MANIFEST} is missing); write them "
                            "with --mode=sample.")
  shard_size = int(json.loads(path.read_text())["shard_size"])
  if shards is None:
    shards = range(math.ceil(num_samples / shard_size))
  images, labels = [], []
  for k in shards:
    shard = _read_shard(shard_path(directory, k))
    if shard is None:
      raise MissingFileError(f"Shard {k} of {directory} is missing; run --mode=sample again to "
                              "complete it.")
    keep = shard["index"] < num_samples
    images.append(shard["images"][keep])
    if "labels" in shard:
      labels.append(shard["labels"][keep])
  return np.concatenate(images), (np.concatenate(labels) if labels else None)
