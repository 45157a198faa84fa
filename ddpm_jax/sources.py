"""Where the images come from: one split of a dataset as a `Source` of still-encoded records.

A Source reads contiguous blocks [a, b) of its split in a fixed order, as records
{"image": encoded, "label": int32}; `decode` turns a record's image into [h, w, C] pixels and
`preprocess` makes them uint8 [S, S, C]. The stream (data.py) decides which records each host
decodes. Datasets: the tfds ones of the table below, scikit-learn's bundled "digits", and an
"npz" of arrays; "folder" is in image_folder.py. docs/data.md says how each is prepared.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import zipfile
from typing import Any, Callable

import numpy as np
from etils import epath

from ddpm_jax.errors import MissingFileError, UserError
from ddpm_jax.tf_lazy import tf, tfds

DIGITS_NUM_TEST = 297  # the last 297 of scikit-learn's 1797 digits are the test split
CELEB_A_CROP = 140  # score_sde's CelebA crop: 140x140 at ((218 - 140) // 2, (178 - 140) // 2)
DEFAULT_EVAL_FRACTION = 0.02
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L")


@dataclasses.dataclass(frozen=True)
class Source:
  """One split: `num_examples` records, readable by blocks, decoded one by one."""
  num_examples: int
  read: Callable[[int, int], Any]  # [a, b) -> tf.data.Dataset of {"image": raw, "label": int32}
  decode: Callable[[Any], Any]  # raw -> [h, w, C] uint8, or float32 in [0, 255]
  preprocess: Callable[[Any], Any]  # [h, w, C] -> uint8 [S, S, C], rounded
  class_names: tuple[str, ...] = ()  # the label names of a labelled folder


# ----------------------------------------------------------------------------------------------
# Per-image preprocessing: [h, w, C] -> uint8 [S, S, C].


def to_uint8(x):
  """float [.., 0..255] (bicubic may overshoot) -> uint8, rounded and clipped."""
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _resize_float(image, size: int, method: str):
  """Antialiased resize of [h, w, C] -> float32 [size, size, C] in [0, 255] (unrounded)."""
  return tf.image.resize(tf.cast(image, tf.float32), [size, size], method=method, antialias=True)


def _resize(image, size: int):
  """uint8 [h, w, C] -> uint8 [size, size, C] (bilinear); the identity when already that size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return to_uint8(_resize_float(image, size, "bilinear"))


def _resize_or_pad(image, size: int, pad: bool):
  """Fixed-size tfds datasets: resize to size x size, or zero-pad centrally when `pad`."""
  if pad:
    h, w = image.shape[0], image.shape[1]
    return tf.image.pad_to_bounding_box(image, (size - h) // 2, (size - w) // 2, size, size)
  return _resize(image, size)


def celeb_a_crop_resize_float(image, size: int):
  """score_sde's CelebA: uint8 [218, 178, 3] -> float32 [size, size, 3] in [0, 255], unrounded.

  Centre crop 140x140 at ((h - 140) // 2, (w - 140) // 2), then tf.image.resize with
  antialias=True and the default (bilinear) method, as score_sde's `resize_small`.
  """
  top = (tf.shape(image)[0] - CELEB_A_CROP) // 2
  left = (tf.shape(image)[1] - CELEB_A_CROP) // 2
  crop = image[top:top + CELEB_A_CROP, left:left + CELEB_A_CROP]
  return _resize_float(crop, size, "bilinear")


def _celeb_a(image, size: int, pad: bool):
  del pad  # CelebA is always cropped and resized
  return to_uint8(celeb_a_crop_resize_float(image, size))


def center_square(image, size: int, method: str = "bicubic"):
  """The centred square of side min(h, w), resized with `method` (antialiased), rounded: uint8.

  LSUN uses bicubic (score_sde's `crop_resize`); folders and arrays use bilinear, a triangle
  filter that never overshoots. A square image of side `size` comes back unchanged (rounded).
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = tf.cast(image[top:top + side, left:left + side], tf.float32)
  crop = tf.cond(tf.equal(side, size), lambda: crop,
                 lambda: _resize_float(crop, size, method))
  return to_uint8(tf.ensure_shape(crop, [size, size, None]))


def to_channels(pixels, channels: int):
  """uint8 [h, w, c] with c in {1 (L), 2 (LA), 3 (RGB), 4 (RGBA)} -> float32 [h, w, channels].

  Alpha is composited on black (each colour times alpha / 255): what the image shows over a
  black background, and the same value whichever the hidden colour of transparent pixels.
  Gray becomes RGB by repetition; RGB becomes gray by ITU-R 601 luma. Unrounded.
  """
  x = tf.cast(pixels, tf.float32)
  c = tf.shape(x)[2]
  has_alpha = tf.equal(c % 2, 0)
  colour_c = tf.where(has_alpha, c - 1, c)
  alpha = tf.cond(has_alpha, lambda: x[..., -1:] / 255.0, lambda: tf.ones_like(x[..., :1]))
  colour = x[..., :colour_c] * alpha
  if channels == 3:
    return tf.broadcast_to(colour, tf.concat([tf.shape(x)[:2], [3]], 0))
  weights = tf.where(tf.equal(colour_c, 3), tf.constant(GRAY_WEIGHTS),
                     tf.constant((1.0, 0.0, 0.0)))[:colour_c]
  return tf.reduce_sum(colour * weights, axis=-1, keepdims=True)


def user_preprocess(config: Any) -> Callable[[Any], Any]:
  """Folders and arrays: uint8 [h, w, 1..4] -> to_channels -> centre square, bilinear
  antialiased resize to config.data.image_size -> uint8 [S, S, num_channels], rounded once."""
  channels, size = config.data.num_channels, config.data.image_size
  return lambda image: center_square(to_channels(image, channels), size, "bilinear")


# ----------------------------------------------------------------------------------------------
# Held-out splits of the user's data.


def held_out(keys: list[str], fraction: float) -> np.ndarray:
  """bool [N]: key k is in "test" iff the first 8 bytes of sha256(k), read as a fraction of
  2^64, are below `fraction`. An image's split depends on its own name alone, so it stays in
  its split when the data grow or shrink (no held-out image ever moves into training)."""
  codes = np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big")
                    for k in keys], dtype=np.float64)
  return codes / 2.0**64 < fraction


def split_indices(keys: list[str], config: Any, split: str, where: str) -> np.ndarray:
  """The indices (ascending) of `split` ("train" or "test") among `keys`; see `held_out`."""
  fraction = config.data.get("eval_fraction", DEFAULT_EVAL_FRACTION)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
      or not 0.0 <= fraction < 1.0:
    raise UserError(f"config.data.eval_fraction={fraction!r} must be a number in [0, 1), the "
                    "part of a folder or npz held out as the 'test' split.")
  if split not in ("train", "test"):
    raise UserError(f"Split {split!r} of {where}: a folder or npz has the splits 'train' and "
                    "'test' (config.data.eval_fraction of it).")
  test = held_out(keys, fraction)
  chosen = np.flatnonzero(test if split == "test" else ~test)
  if len(chosen) == 0:
    raise UserError(f"Split {split!r} of {where} is empty: config.data.eval_fraction="
                    f"{fraction} holds out {int(test.sum())} of its {len(keys)} images; "
                    "choose a value that leaves images in both 'train' and 'test'.")
  return chosen


# ----------------------------------------------------------------------------------------------
# tfds datasets and digits.


@dataclasses.dataclass(frozen=True)
class _Spec:
  tfds_name: str | None  # None: scikit-learn's digits, in memory
  channels: int
  label_key: str | None  # None: unlabelled; labels are 0
  preprocess: Callable[[Any, int, bool], Any]  # uint8 [h,w,C] -> uint8 [S,S,C]
  native_size: int | None  # square side of the stored images, None when they vary


def _lsun(image, size: int, pad: bool):
  del pad
  return center_square(image, size, "bicubic")


_DATASETS = {
    "cifar10": _Spec("cifar10", 3, "label", _resize_or_pad, 32),
    "celeb_a": _Spec("celeb_a", 3, None, _celeb_a, None),
    "celeb_a_hq/256": _Spec("celeb_a_hq/256", 3, None, _resize_or_pad, 256),
    "lsun/church_outdoor": _Spec("lsun/church_outdoor", 3, None, _lsun, None),
    "mnist": _Spec("mnist", 1, "label", _resize_or_pad, 28),
    "fashion_mnist": _Spec("fashion_mnist", 1, "label", _resize_or_pad, 28),
    "digits": _Spec(None, 1, "label", _resize_or_pad, 8),
}
_ALIASES = {"celeb_a_hq": "celeb_a_hq/256"}
USER_DATASETS = ("folder", "npz")
DATASETS = tuple(_DATASETS) + USER_DATASETS


def _get_spec(name: str) -> _Spec:
  spec = _DATASETS.get(_ALIASES.get(name, name))
  if spec is None:
    raise UserError(f"Unknown dataset config.data.dataset={name!r}; accepted: "
                    f"{', '.join(DATASETS)} (and 'celeb_a_hq' for 'celeb_a_hq/256').")
  return spec


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: uint8 [1797, 8, 8, 1] (0..16 -> round(v*255/16)), int32 [1797]."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int32)


def _arrays_reader(images: np.ndarray, labels: np.ndarray) -> Callable:
  """read(a, b) over in-memory arrays; records are indices, so no array is copied into the
  tf.data graph (whose protos stop at 2 GB)."""

  def read(a: int, b: int):
    return tf.data.Dataset.from_tensor_slices({"image": np.arange(a, b, dtype=np.int64),
                                               "label": labels[a:b].astype(np.int32)})

  def decode(index):
    pixels = tf.numpy_function(lambda i: images[i], [index], tf.uint8, stateful=False)
    return tf.ensure_shape(pixels, images.shape[1:])

  return read, decode


def _digits_source(split: str, preprocess: Callable) -> Source:
  images, labels = _digits_arrays()
  cut = len(images) - DIGITS_NUM_TEST
  if split == "train":
    images, labels = images[:cut], labels[:cut]
  elif split == "test":
    images, labels = images[cut:], labels[cut:]
  else:
    raise UserError(f"Unknown split {split!r} for dataset 'digits'; accepted: 'train', 'test'.")
  read, decode = _arrays_reader(images, labels)
  return Source(len(images), read, decode, preprocess)


def _not_prepared_message(name: str, builder: Any, config_data_dir: str | None) -> str:
  data_dir = builder.data_dir_root
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    how = (f"it needs a manual download: put the files described at "
           f"https://www.tensorflow.org/datasets/catalog/{name.split('/')[0]} "
           f"({' '.join(manual.split())}) in a folder MANUAL and run "
           f"`tfds build {name} --data_dir={data_dir} --manual_dir=MANUAL`")
  else:
    how = (f"run `tfds build {name} --data_dir={data_dir}` on a machine with internet access "
           f"and copy {data_dir}/{name.split('/')[0]} here")
  return (f"Dataset {name!r} is not prepared in {data_dir!r} "
          f"(config.data.data_dir={config_data_dir!r}): {how}; or set config.data.data_dir to "
          "the folder that holds it.")


def read_options():
  options = tf.data.Options()
  options.deterministic = True  # parallel maps/interleaves keep their order: reproducible
  return options


def _tfds_source(spec: _Spec, data_dir: str | None, split: str, preprocess: Callable) -> Source:
  """A tfds split read without shuffling files (a fixed record order) and images undecoded."""
  name, label_key = spec.tfds_name, spec.label_key
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(f"tensorflow-datasets cannot find {name!r} in data_dir {data_dir!r} "
                    f"(config.data.data_dir): {e}") from e
  decoders = {"image": tfds.decode.SkipDecoding()}  # decode after skip/shuffle/host filter
  read_config = tfds.ReadConfig(try_autocache=False, options=read_options())
  try:
    full = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                              read_config=read_config)
  except AssertionError as e:  # tfds' "could not find data in data_dir"; never downloads
    raise MissingFileError(_not_prepared_message(name, builder, data_dir)) from e
  num_examples = int(full.cardinality())
  if num_examples < 0:  # tfds asserts cardinality; fall back on the metadata if it did not
    num_examples = builder.info.splits[split].num_examples

  def label(example):
    return (tf.constant(0, tf.int32) if label_key is None
            else tf.cast(example[label_key], tf.int32))

  def read(a: int, b: int):
    if (a, b) == (0, num_examples) or a == b:
      ds = full if a < b else full.take(0)
    else:
      ds = builder.as_dataset(split=f"{split}[{a}:{b}]", shuffle_files=False,
                              decoders=decoders, read_config=read_config)
    return ds.map(lambda ex: {"image": ex["image"], "label": label(ex)})

  return Source(num_examples, read, builder.info.features["image"].decode_example, preprocess)


def open_known(config: Any, split: str) -> Source:
  """A tfds dataset or digits (config.data.dataset), with config.data's size and channels."""
  d = config.data
  spec = _get_spec(d.dataset)
  if d.num_channels != spec.channels:
    raise UserError(f"config.data.num_channels={d.num_channels} but dataset {d.dataset!r} has "
                    f"{spec.channels}-channel images; set it to {spec.channels}.")
  pad = bool(d.get("pad_to_size", False))
  if pad and (spec.native_size is None or spec.native_size > d.image_size):
    raise UserError(f"config.data.pad_to_size=True needs fixed-size images no larger than "
                    f"config.data.image_size={d.image_size} (dataset {d.dataset!r}).")
  preprocess = functools.partial(spec.preprocess, size=d.image_size, pad=pad)
  if spec.tfds_name is None:
    return _digits_source(split, preprocess)
  return _tfds_source(spec, d.get("data_dir"), split, preprocess)


# ----------------------------------------------------------------------------------------------
# Arrays a researcher already holds: an .npz with "images" (and optional "labels").


def open_npz(config: Any, split: str) -> Source:
  """config.data.path, an .npz holding `images` uint8 [N, H, W] or [N, H, W, C] (C in 1..4:
  L, LA, RGB, RGBA) and optionally `labels` int [N]; the held-out split is chosen by
  `held_out` of each image's index (as text)."""
  path = config.data.get("path")
  if not path or not epath.Path(path).is_file():
    raise MissingFileError(f"config.data.path={path!r} is not an .npz file; dataset 'npz' "
                           "needs a file holding images uint8 [N, H, W] or [N, H, W, C].")
  try:
    with epath.Path(path).open("rb") as f:
      loaded = np.load(f, allow_pickle=False)
      if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy: one array, no names
        raise ValueError(f"it holds a single {type(loaded).__name__} (an .npy), not named "
                         "arrays")
      with loaded as npz:
        arrays = {k: npz[k] for k in npz.files if k in ("images", "labels")}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"config.data.path={path!r} is not a readable .npz ({type(e).__name__}: "
                    f"{e}); accepted: np.savez(path, images=uint8 [N, H, W(, C)], "
                    "labels=int [N]).") from e
  images = arrays.get("images")
  if images is None:
    raise UserError(f"config.data.path={path!r} holds no array named 'images'; accepted: an "
                    ".npz with images uint8 [N, H, W] or [N, H, W, C] and optional labels [N].")
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
      images.ndim == 4 and not 1 <= images.shape[3] <= 4):
    raise UserError(f"config.data.path={path!r}: 'images' is {images.dtype} {list(images.shape)}"
                    "; accepted: uint8 [N, H, W] or [N, H, W, C] with C in 1..4.")
  if images.ndim == 3:
    images = images[..., None]
  num_classes = config.model.get("num_classes", 0)
  # Labels are used only by a class-conditional model (as subfolder names only with
  # labels_from=subfolders): an unconditional model ignores those the arrays carry.
  labels = arrays.get("labels") if num_classes else None
  if labels is None:
    if num_classes:
      raise UserError(f"config.model.num_classes={num_classes} but {path} holds no 'labels'; "
                      "add labels int [N] to it or set config.model.num_classes=0.")
    labels = np.zeros(len(images), np.int32)
  elif (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)
        or (len(labels) and (labels.min() < 0 or labels.max() >= max(num_classes, 1)))):
    raise UserError(f"config.data.path={path!r}: 'labels' ({labels.dtype} {list(labels.shape)}) "
                    f"must be {len(images)} ints in [0, config.model.num_classes="
                    f"{num_classes}).")
  keep = split_indices([str(i) for i in range(len(images))], config, split, path)
  read, decode = _arrays_reader(images[keep], labels[keep])
  return Source(len(keep), read, decode, user_preprocess(config))
