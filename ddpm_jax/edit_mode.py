"""--mode=edit: config.edit's task on a folder of images, written beside the run's samples.

    workdir/samples/<step:08d>_<task>_<tag>/   e.g. 00800000_inpaint_repaint100_j10r10_center,
                                              00800000_edit_ddim100_s0.5
        edit.json        the settings and input names of these edits (checked on resume)
        <name>.png       one result per input image (inpaint, edit), or frame_000.png ...
                         (interpolate: between the first two images, sorted by name)
        edits.npz        images uint8 [N, S, S, C] and names; inpaint adds masks uint8 (1 keeps);
                         invert writes noise.npz: x_T float32 [N, S, S, C] and names
        grid.png         inputs (masked for inpaint) above their results

Image i (in name order) draws from fold_in(edit key, i) alone, so a restarted command keeps
every finished PNG and computes only the missing ones, with the same result. Every input image
and mask is read and checked before anything is written.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import List, Optional, Tuple

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from ddpm_jax import generate, loading, rundir, run_edits, settings
from ddpm_jax.errors import MissingFileError, UserError
from ddpm_jax.reporting import save_png

MANIFEST = "edit.json"
EDIT_STREAM = 0xED17  # folded into the sampling key: edits draw other noise than samples
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def edit_key(config) -> jax.Array:
  return jax.random.fold_in(generate.sample_key(config), EDIT_STREAM)


def tag(s: settings.Settings) -> str:
  """The directory name's task and options, e.g. "inpaint_repaint100_j10r10_center"."""
  e, chain = s.edit, s.sampling.chain
  if e.task == "inpaint":
    out = f"inpaint_{e.sampler}{e.num_steps}"
    if e.sampler == "repaint":
      out += f"_j{e.jump_length}r{e.jump_n_sample}"
    out += "_masks" if e.masks else f"_{e.mask}"
  elif e.task == "edit":
    out = f"edit_{e.sampler}{e.num_steps}_s{e.strength:g}"
  else:
    out = f"{e.task}_ddim{e.num_steps}" + (f"_num{e.num}" if e.task == "interpolate" else "")
  return out + (f"_cfg{chain.guidance_scale:g}" if chain.guidance_scale else "")


def _names(folder: str, field: str) -> List[str]:
  root = epath.Path(folder)
  if not root.is_dir():
    raise MissingFileError(f"config.edit.{field}={folder!r} is not a folder; accepted: a folder "
                           f"of images ({', '.join(EXTENSIONS)}).")
  names = sorted(p.name for p in root.iterdir()
                 if p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
  if not names:
    raise UserError(f"config.edit.{field}={folder!r} holds no images; accepted: a folder of "
                    f"images ({', '.join(EXTENSIONS)}).")
  return names


def _read(path: epath.Path, mode: str, size: int, what: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
      image.load()
      if image.size != (size, size):
        raise UserError(f"{what} {path} is {image.size[0]}x{image.size[1]}, but the run's "
                        f"images are {size}x{size}; resize it first.")
      return np.asarray(image.convert(mode))
  except (OSError, SyntaxError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{what} {path} cannot be read as an image ({e}); replace or remove it.")


def read_inputs(s: settings.Settings) -> Tuple[List[str], np.ndarray, Optional[np.ndarray]]:
  """(names, images uint8 [N, S, S, C], masks float32 [N, S, S, 1] or None), all checked."""
  e = s.edit
  if not e.input:
    raise UserError("--mode=edit needs config.edit.input, a folder of images to edit, e.g. "
                    "--config.edit.input=/path/to/images.")
  size, channels = s.data.image_size, s.data.num_channels
  mode = "L" if channels == 1 else "RGB"
  names = _names(e.input, "input")
  if e.task == "interpolate" and len(names) < 2:
    raise UserError(f"config.edit.task='interpolate' needs two images in config.edit.input="
                    f"{e.input!r}, which holds {len(names)}.")
  images = np.stack([_read(epath.Path(e.input) / n, mode, size, "The image")
                     for n in names]).reshape(len(names), size, size, channels)
  masks = None
  if e.task == "inpaint" and e.masks:
    available = {os.path.splitext(n)[0]: n for n in _names(e.masks, "masks")}
    missing = [n for n in names if os.path.splitext(n)[0] not in available]
    if missing:
      raise UserError(f"config.edit.masks={e.masks!r} has no mask for {missing[0]} (a mask "
                      "is an image of the same name, any extension: white keeps, black fills).")
    masks = np.stack([
        _read(epath.Path(e.masks) / available[os.path.splitext(n)[0]], "L", size, "The mask")
        for n in names])[..., None] >= 128
    masks = masks.astype(np.float32)
  elif e.task == "inpaint":
    masks = np.broadcast_to(run_edits.named_mask(e.mask, size), (len(names), size, size, 1))
  return names, images, masks


def _manifest(directory: epath.Path, wanted: dict) -> None:
  path = directory / MANIFEST
  if path.exists():
    stored = json.loads(path.read_text())
    if stored != wanted:
      different = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
      raise UserError(f"{path} records other edits ({', '.join(different)} differ); move that "
                      "directory away to edit again.")
    return
  rundir.write_atomically(path, json.dumps(wanted, indent=2).encode())


def _png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def _uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _npz(path: epath.Path, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  rundir.write_atomically(path, buffer.getvalue())


def run(config, workdir: str, *, step: Optional[int] = None) -> epath.Path:
  """Runs config.edit's task on config.edit.input with the run's EMA params; returns the
  directory written. Reads and checks every input before writing anything."""
  s = settings.validate(config)
  e = s.edit
  names, images, masks = read_inputs(s)
  step, params, _ = loading.load_with_step(workdir, step=step)
  directory = epath.Path(workdir) / "samples" / f"{step:08d}_{tag(s)}"
  directory.mkdir(parents=True, exist_ok=True)
  _manifest(directory, dict(step=step, seed=s.seed, inputs=names,
                            edit=dataclasses.asdict(e), chain=dataclasses.asdict(s.sampling.chain)))
  key, batch = edit_key(config), s.sampling.batch_size
  size = max(1, 64 // s.data.image_size)
  if e.task == "invert":
    noise = run_edits.invert(params, images, config=config)
    _npz(directory / "noise.npz", noise=noise.astype(np.float32), names=np.array(names))
    return directory
  if e.task == "interpolate":
    path = _uint8(run_edits.interpolate(params, images[0], images[1], config=config))
    for i, frame in enumerate(path):
      rundir.write_atomically(directory / f"frame_{i:03d}.png", _png_bytes(frame))
    _npz(directory / "edits.npz", images=path, names=np.array(names[:2]))
    save_png(os.fspath(directory / "grid.png"), path.astype(np.float32) / 127.5 - 1, size)
    return directory
  outputs = [directory / (os.path.splitext(n)[0] + ".png") for n in names]
  todo = [i for i, p in enumerate(outputs) if not p.exists()]
  logging.info("Editing %d images into %s (%d already written).", len(names), directory,
               len(names) - len(todo))
  for start in range(0, len(todo), batch):
    index = todo[start:start + batch]  # runs of consecutive images share one call where possible
    for first, chunk in _runs(index):
      if e.task == "inpaint":
        out = run_edits.inpaint(params, key, images[chunk], masks[chunk], config=config,
                                first_index=first)
      else:
        out = run_edits.edit(params, key, images[chunk], config=config, first_index=first)
      for i, image in zip(chunk, _uint8(out)):
        rundir.write_atomically(outputs[i], _png_bytes(image))
  results = np.stack([_read(p, "L" if s.data.num_channels == 1 else "RGB", s.data.image_size,
                            "The result") for p in outputs]).reshape(images.shape)
  arrays = dict(images=results, names=np.array(names))
  shown = images
  if masks is not None:
    arrays["masks"] = masks.astype(np.uint8)
    shown = np.where(masks > 0, images, 127).astype(np.uint8)  # the hole in grey
  _npz(directory / "edits.npz", **arrays)
  first = min(len(names), 16)
  grid = np.concatenate([shown[:first], results[:first]]).astype(np.float32) / 127.5 - 1
  save_png(os.fspath(directory / "grid.png"), grid, size)
  return directory


def _runs(index: List[int]):
  """[(first, [first, first + 1, ...]), ...]: the consecutive runs of sorted `index`."""
  runs = []
  for i in index:
    if runs and runs[-1][1][-1] == i - 1:
      runs[-1][1].append(i)
    else:
      runs.append((i, [i]))
  return runs
