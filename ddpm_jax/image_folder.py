"""A folder of the user's images as a dataset (config.data.dataset = "folder").

Every file under config.data.path (a local folder, or anything tf.io.gfile opens, e.g. gs://),
recursively, whose extension is .png, .jpg, .jpeg, .bmp or .gif in any case, is an example;
names starting with "." (e.g. macOS' "._x.jpg") are skipped. The relative paths are sorted, so
the order never depends on the file system. Images of any size and mode are converted to
config.data.num_channels (sources.to_channels: alpha composited on black), centre-cropped to a
square and resized to config.data.image_size (bilinear, antialiased), then rounded to uint8.
GIFs give their first frame.

`check_folder` reads every file's header and end before a run writes anything (and decodes
the whole of files up to 64 KiB, which it reads whole anyway): it refuses missing folders,
folders without images, files that are not images, are truncated or (when small) damaged inside
their data, and palette or 1-bit BMPs (which TensorFlow decodes as gray); it warns about images
smaller than image_size, which are upsampled. A larger file damaged inside its data is named
when the stream first fails to decode it (`naming_damaged_files`): the run stops there with
that sentence, its earlier checkpoints intact. Links are followed, each folder and image once.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import posixpath
from typing import Any

import numpy as np
from absl import logging

from ddpm_jax import sources
from ddpm_jax.errors import MissingFileError, UserError
from ddpm_jax.tf_lazy import tf

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
LABELS_FROM = ("none", "subfolders")
_FORMATS = ("PNG", "JPEG", "BMP", "GIF")
_TAIL = 4096  # bytes read from a file's end to find its format's end marker


def _images(config: Any) -> tuple[str, list[str]]:
  """(config.data.path, its images' relative paths), or the sentence that says what is wrong."""
  root = config.data.get("path")
  if not root or not tf.io.gfile.isdir(root):
    raise MissingFileError(f"config.data.path={root!r} is not a folder; dataset 'folder' needs "
                           "a folder of PNG, JPEG, BMP or GIF images (local or gs://).")
  root = root.rstrip("/")
  paths = list_images(root)
  if not paths:
    raise UserError(f"config.data.path={root!r} holds no image: dataset 'folder' reads files "
                    f"ending in {', '.join(EXTENSIONS)} (any case), in any subfolder.")
  return root, paths


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def list_images(root: str) -> list[str]:
  """The images' paths relative to `root`, "/"-separated, sorted."""
  if "://" not in root:
    return _list_local_images(root)
  found = []
  for directory, _, files in tf.io.gfile.walk(root):  # object stores have no links
    rel = directory[len(root):].strip("/")
    found += [posixpath.join(rel, f) for f in files if _is_image(f)]
  return sorted(found)


def _list_local_images(root: str) -> list[str]:
  """list_images on a local disk, following links but taking each folder and each image once:
  a link to a folder already walked (a loop such as `ln -s . loop`, or one pointing back up) and
  a second path to an image already found are skipped, with one warning."""
  found, seen_dirs, seen_files, skipped = [], set(), set(), []
  for directory, subdirs, files in os.walk(root, followlinks=True):
    seen_dirs.add(os.path.realpath(directory))
    keep = []
    for d in sorted(subdirs):  # sorted: which of two paths to one folder is kept is fixed
      real = os.path.realpath(os.path.join(directory, d))
      if real in seen_dirs:
        skipped.append(os.path.join(directory, d))
      else:
        seen_dirs.add(real)
        keep.append(d)
    subdirs[:] = keep
    rel = os.path.relpath(directory, root).replace(os.sep, "/")
    rel = "" if rel == "." else rel
    for f in sorted(files):
      if _is_image(f):
        real = os.path.realpath(os.path.join(directory, f))
        if real in seen_files:
          skipped.append(os.path.join(directory, f))
        else:
          seen_files.add(real)
          found.append(posixpath.join(rel, f))
  if skipped:
    logging.warning("Skipped %d links in %s to folders or images already read (e.g. %s): each "
                    "image is used once.", len(skipped), root, skipped[0])
  return sorted(found)


def _labels(root: str, paths: list[str], config: Any) -> tuple[np.ndarray, tuple[str, ...]]:
  """int32 [N] labels and the class names: first-level subfolders in sorted order, or none."""
  how = config.data.get("labels_from", "none")
  num_classes = config.model.get("num_classes", 0)
  if how not in LABELS_FROM:
    raise UserError(f"config.data.labels_from={how!r} is not known; accepted: "
                    f"{', '.join(LABELS_FROM)}.")
  if how == "none":
    if num_classes:
      raise UserError(f"config.model.num_classes={num_classes} needs labels: set "
                      "config.data.labels_from=subfolders (one subfolder per class) or "
                      "config.model.num_classes=0.")
    return np.zeros(len(paths), np.int32), ()
  loose = [p for p in paths if "/" not in p]
  if loose:
    raise UserError(f"config.data.labels_from=subfolders but {root} has images outside any "
                    f"subfolder (e.g. {loose[0]!r}); put every image in its class's subfolder.")
  firsts = [p.split("/", 1)[0] for p in paths]
  names = tuple(sorted(set(firsts)))
  if num_classes != len(names):
    raise UserError(f"config.model.num_classes={num_classes} but {root} has {len(names)} "
                    f"class subfolders ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                    f"); set config.model.num_classes={len(names)}.")
  index = {name: i for i, name in enumerate(names)}
  return np.array([index[f] for f in firsts], np.int32), names


def _inspect(path: str) -> tuple[str | None, tuple[int, int]]:
  """(what is wrong with the file or None, its (width, height)), from its header and end."""
  from PIL import Image  # pylint: disable=import-outside-toplevel  (only for checking)
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      head = f.read(1 << 16)
      with Image.open(io.BytesIO(head)) as image:
        kind, mode, size = image.format, image.mode, image.size
      length = f.size()
      f.seek(max(0, length - _TAIL))
      tail = f.read()
  except (OSError, SyntaxError, ValueError) as e:
    return f"is not a readable image ({type(e).__name__})", (0, 0)
  if kind not in _FORMATS:
    return f"is {kind}, not PNG, JPEG, BMP or GIF", size
  if kind == "BMP" and mode in ("P", "1"):
    return "is a palette or 1-bit BMP, which TensorFlow decodes as gray", size
  complete = {"PNG": tail[-8:-4] == b"IEND", "JPEG": b"\xff\xd9" in tail,
              "GIF": b";" in tail[-16:],
              "BMP": length >= int.from_bytes(head[2:6], "little")}[kind]
  if not complete:
    return f"is a truncated {kind}", size
  if length <= len(head):  # read whole already: decode its data too (larger files: when used)
    try:
      with Image.open(io.BytesIO(head)) as image:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
      return f"is damaged inside its image data ({type(e).__name__}: {e})", size
  return None, size


def _decodes(path: str) -> str | None:
  """What is wrong with the file's pixel data (PIL decodes all of it), or None."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with tf.io.gfile.GFile(path, "rb") as f, Image.open(io.BytesIO(f.read())) as image:
      image.load()
  except (OSError, SyntaxError, ValueError) as e:
    return f"is damaged inside its image data ({type(e).__name__}: {e})"
  return None


def naming_damaged_files(batches, config: Any):
  """`batches`, where a decoding error of TensorFlow (which does not name the file) becomes one
  sentence naming the first damaged file of the folder."""
  try:
    yield from batches
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
    _, paths = _images(config)
    full = [posixpath.join(config.data.path.rstrip("/"), p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      for path, problem in zip(full, pool.map(_decodes, full)):
        if problem:
          raise UserError(f"{path} {problem}; config.data.path must hold only complete PNG, "
                          "JPEG, BMP or GIF images (re-save it as PNG or remove it).") from e
    raise UserError(f"An image of config.data.path={config.data.path!r} cannot be decoded "
                    f"({e.message.splitlines()[0]}); re-save the folder's images as PNG.") from e


def check_folder(config: Any) -> None:
  """Refuses a folder the stream cannot read (one sentence naming the file); warns about images
  smaller than config.data.image_size, which are upsampled: a few small photos in a large folder
  should not stop a run, and the warning names them so that they can be removed."""
  root, paths = _images(config)
  _labels(root, paths, config)
  full = [posixpath.join(root, p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # I/O bound, above all on gs://
    found = list(pool.map(_inspect, full))
  size = config.data.image_size
  small = []
  for path, (problem, (w, h)) in zip(full, found):
    if problem:
      raise UserError(f"{path} {problem}; config.data.path must hold only complete PNG, JPEG, "
                      "BMP or GIF images (re-save it as PNG or remove it).")
    if min(w, h) < size:
      small.append((min(w, h), path))
  if small:
    logging.warning("%d of the %d images in %s are smaller than config.data.image_size=%d and "
                    "are upsampled (the smallest: %s, side %d).", len(small), len(paths), root,
                    size, min(small)[1], min(small)[0])
  large = [min(w, h) for _, (w, h) in found if min(w, h) >= 2 * size]
  if large:  # a 64x64 folder trained at 32x32 loses detail the user may expect to keep
    logging.info("%d of the %d images in %s are downscaled %.0fx or more to config.data."
                 "image_size=%d (their shorter side: %d to %d).", len(large), len(paths), root,
                 min(large) / size, size, min(large), max(large))


def class_names(config: Any) -> tuple[str, ...]:
  """The class names of a folder with config.data.labels_from=subfolders, else ()."""
  return _labels(*_images(config), config)[1]


def open_folder(config: Any, split: str) -> sources.Source:
  """The "train" or "test" split of the folder (sources.split_indices by relative path)."""
  root, paths = _images(config)
  labels, names = _labels(root, paths, config)
  keep = sources.split_indices(paths, config, split, root)
  files = np.array([posixpath.join(root, paths[i]) for i in keep])
  labels = labels[keep]

  def read(a: int, b: int):
    return tf.data.Dataset.from_tensor_slices({"image": files[a:b], "label": labels[a:b]})

  def decode(path):  # uint8 [h, w, 1..4]
    return tf.io.decode_image(tf.io.read_file(path), channels=0, dtype=tf.uint8,
                              expand_animations=False)

  return sources.Source(len(keep), read, decode, sources.user_preprocess(config), names)
