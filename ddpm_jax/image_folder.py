"""A folder of the user's images as a dataset (config.data.dataset = "folder").

Every file under config.data.path (a local folder, or anything tf.io.gfile opens, e.g. gs://),
recursively, whose extension is .png, .jpg, .jpeg, .bmp or .gif in any case, is an example;
names starting with "." (e.g. macOS' "._x.jpg") are skipped. The relative paths are sorted, so
the order never depends on the file system. Images of any size and mode are converted to
config.data.num_channels (sources.to_channels: alpha composited on black), centre-cropped to a
square and resized to config.data.image_size (bilinear, antialiased), then rounded to uint8.
GIFs give their first frame.

`check_folder` reads every file's header and end (not its pixels) before a run writes anything:
it refuses missing folders, folders without images, files that are not images or are truncated,
and palette or 1-bit BMPs (which TensorFlow decodes as gray); it warns about images smaller than
image_size, which are upsampled.
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


def list_images(root: str) -> list[str]:
  """The images' paths relative to `root`, "/"-separated, sorted."""
  found = []
  for directory, _, files in tf.io.gfile.walk(root):
    rel = os.path.relpath(directory, root) if "://" not in root else directory[len(root):]
    rel = rel.strip("/").replace(os.sep, "/")
    rel = "" if rel == "." else rel
    found += [posixpath.join(rel, f) for f in files
              if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
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
  return (None if complete else f"is a truncated {kind}"), size


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
