"""Input pipelines: tensorflow-datasets (and scikit-learn's digits) -> per-host batches.

`create_input_iter(config, ...)` yields NumPy batches
    {"image": float32 [B, S, S, C] in [-1, 1], "label": int32 [B]}
with B = per_host_batch_size, S = config.data.image_size, C = config.data.num_channels; one-pass
iterators (repeat=False) add "mask": bool [B] (see "Evaluation" below).

Datasets (config.data.dataset):
    cifar10                32x32x3, labels.
    celeb_a                218x178 (h x w) centre-cropped to 140x140 at (top, left) = (39, 19),
                           then resized to S with tf.image.resize(antialias=True) and its
                           default BILINEAR method: score_sde's `central_crop` + `resize_small`.
    celeb_a_hq/256         256x256x3 (manual download); "celeb_a_hq" is accepted for it.
    lsun/church_outdoor    centre crop to a square, BICUBIC antialiased resize to S (score_sde's
                           `crop_resize`).
    mnist, fashion_mnist   28x28x1, labels.
    digits                 scikit-learn's bundled 8x8x1 digits (values 0..16 -> round(v*255/16));
                           the first 1500 images are "train", the last 297 "test". No download.
Whenever a dataset's images are not S x S they are resized to S (bilinear, antialiased), or,
with the optional `config.data.pad_to_size = True`, zero-padded centrally (e.g. MNIST 28 -> 32).
Resized images are rounded back to uint8 before scaling: the data stay on the 256-level grid that
the discretized likelihood (bits/dim) assumes; score_sde keeps the float values instead.

Sharding: a split of N examples is cut into process_count contiguous blocks
[i*N//P, (i+1)*N//P); host i reads only its block (a tfds absolute ReadInstruction "split[a:b]",
or the same slice of the digits array). Blocks are disjoint, cover the split, and differ in size
by at most one example.

Randomness and resuming. A host's stream is epoch 0, epoch 1, ... concatenated, each epoch a
permutation of the host's n examples, and batches are cut from that stream (they may straddle
an epoch boundary; nothing is dropped). Every random choice is a pure function of a key:
  * keys: (shuffle_key, flip_key) = SeedSequence([seed, process_index]), so hosts differ;
  * epoch e is shuffled by tf.data's shuffle with seed = stateless_hash(shuffle_key, e) and
    reshuffle_each_iteration=False: its order depends on (seed, e) only, never on history;
  * the element at stream position g = e*n + i is flipped iff
    stateless_uniform(seed=(flip_key, g)) < 1/2.
So the batch at step s is a function of (seed, s) and the data alone. start_step=s starts the
stream at position k = s*B: epoch k // n, skipping k % n elements of that epoch only. The skip
runs on the records *before* decoding (tfds images are read with SkipDecoding and decoded after
the skip), so resuming costs at most one epoch of reading encoded records and no image decoding.
Shuffling uses a buffer of min(n, config.data.shuffle_buffer_size or 50_000) encoded records:
a full permutation of shards up to that size (CIFAR-10, CelebA-HQ, digits), a windowed one of
larger shards (tfds stores records pre-shuffled, so a window is already a fair sample).
The position depends on per_host_batch_size and process_count: resume with the same ones.

Evaluation (repeat=False): one pass over the host's block; after the real examples the stream is
padded with black images (-1, label 0, mask False) so that every host yields the same number of
batches, ceil(ceil(N/P) / B) (collectives need the hosts in step). Summing over mask=True sees
every example of the split exactly once. One-pass iterators never flip (evaluation sees the data
as they are).

TensorFlow is kept off the accelerators on import: JAX owns them.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

try:  # TF must not allocate GPU memory that JAX needs; harmless on CPU-only TF.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices elsewhere; too late to hide them.
  pass

DEFAULT_SHUFFLE_BUFFER = 50_000
DIGITS_NUM_TEST = 297  # the last 297 of scikit-learn's 1797 digits are the test split

# score_sde's CelebA crop: 140x140 at ((218 - 140) // 2, (178 - 140) // 2) = (39, 19).
CELEB_A_CROP = 140


# ----------------------------------------------------------------------------------------------
# Per-image preprocessing: uint8 [h, w, C] -> uint8 [S, S, C].


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """float [.., 0..255] (bicubic may overshoot) -> uint8, rounded and clipped."""
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _resize_float(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
  """Antialiased resize of uint8 [h, w, C] -> float32 [size, size, C] in [0, 255] (unrounded)."""
  return tf.image.resize(tf.cast(image, tf.float32), [size, size], method=method, antialias=True)


def _resize(image: tf.Tensor, size: int, method: str = "bilinear") -> tf.Tensor:
  """uint8 [h, w, C] -> uint8 [size, size, C]; the identity when already that size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return _to_uint8(_resize_float(image, size, method))


def _resize_or_pad(image: tf.Tensor, size: int, pad: bool) -> tf.Tensor:
  """Generic datasets: resize to size x size, or zero-pad centrally when `pad`."""
  if pad:
    h, w = image.shape[0], image.shape[1]
    return tf.image.pad_to_bounding_box(image, (size - h) // 2, (size - w) // 2, size, size)
  return _resize(image, size)


def celeb_a_crop_resize_float(image: tf.Tensor, size: int) -> tf.Tensor:
  """score_sde's CelebA: uint8 [218, 178, 3] -> float32 [size, size, 3] in [0, 255], unrounded.

  Centre crop 140x140 at ((h - 140) // 2, (w - 140) // 2), then tf.image.resize with
  antialias=True and the default (bilinear) method, as score_sde's `resize_small`.
  """
  top = (tf.shape(image)[0] - CELEB_A_CROP) // 2
  left = (tf.shape(image)[1] - CELEB_A_CROP) // 2
  crop = image[top:top + CELEB_A_CROP, left:left + CELEB_A_CROP]
  return _resize_float(crop, size, "bilinear")


def _celeb_a(image: tf.Tensor, size: int, pad: bool) -> tf.Tensor:
  del pad  # CelebA is always cropped and resized
  return _to_uint8(celeb_a_crop_resize_float(image, size))


def _center_square(image: tf.Tensor, size: int, pad: bool) -> tf.Tensor:
  """LSUN (score_sde's `crop_resize`): centre square crop, bicubic antialiased resize."""
  del pad
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = image[top:top + side, left:left + side]
  return _to_uint8(_resize_float(crop, size, "bicubic"))


# ----------------------------------------------------------------------------------------------
# Datasets.


@dataclasses.dataclass(frozen=True)
class _Spec:
  tfds_name: str | None  # None: scikit-learn's digits, in memory
  channels: int
  label_key: str | None  # None: unlabelled; labels are 0
  preprocess: Callable[[tf.Tensor, int, bool], tf.Tensor]  # uint8 [h,w,C] -> uint8 [S,S,C]
  native_size: int | None  # square side of the stored images, None when they vary


_DATASETS = {
    "cifar10": _Spec("cifar10", 3, "label", _resize_or_pad, 32),
    "celeb_a": _Spec("celeb_a", 3, None, _celeb_a, None),
    "celeb_a_hq/256": _Spec("celeb_a_hq/256", 3, None, _resize_or_pad, 256),
    "lsun/church_outdoor": _Spec("lsun/church_outdoor", 3, None, _center_square, None),
    "mnist": _Spec("mnist", 1, "label", _resize_or_pad, 28),
    "fashion_mnist": _Spec("fashion_mnist", 1, "label", _resize_or_pad, 28),
    "digits": _Spec(None, 1, "label", _resize_or_pad, 8),
}
_ALIASES = {"celeb_a_hq": "celeb_a_hq/256"}
DATASETS = tuple(_DATASETS)


def _get_spec(name: str) -> _Spec:
  spec = _DATASETS.get(_ALIASES.get(name, name))
  if spec is None:
    raise ValueError(f"Unknown dataset config.data.dataset={name!r}; accepted: "
                     f"{', '.join(DATASETS)} (and 'celeb_a_hq' for 'celeb_a_hq/256').")
  return spec


@dataclasses.dataclass(frozen=True)
class _Source:
  """One split of a dataset, readable by contiguous blocks, images still encoded."""
  num_examples: int
  read: Callable[[int, int], tf.data.Dataset]  # [a, b) -> {"image": raw, "label": int32}
  decode: Callable[[tf.Tensor], tf.Tensor]  # raw -> uint8 [h, w, C]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: uint8 [1797, 8, 8, 1] (0..16 -> round(v*255/16)), int32 [1797]."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int32)


def _digits_source(split: str) -> _Source:
  images, labels = _digits_arrays()
  cut = len(images) - DIGITS_NUM_TEST
  if split == "train":
    images, labels = images[:cut], labels[:cut]
  elif split == "test":
    images, labels = images[cut:], labels[cut:]
  else:
    raise ValueError(f"Unknown split {split!r} for dataset 'digits'; accepted: 'train', 'test'.")

  def read(a: int, b: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices({"image": images[a:b], "label": labels[a:b]})

  return _Source(len(images), read, lambda image: image)


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


def _tfds_source(name: str, label_key: str | None, data_dir: str | None, split: str) -> _Source:
  """A tfds split read without shuffling files (a fixed record order) and images undecoded."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"tensorflow-datasets cannot find {name!r} in data_dir {data_dir!r} "
                     f"(config.data.data_dir): {e}") from e
  decoders = {"image": tfds.decode.SkipDecoding()}  # decode after skipping/shuffling: cheap resume
  read_config = tfds.ReadConfig(try_autocache=False, options=_options())
  try:
    full = builder.as_dataset(split=split, decoders=decoders, read_config=read_config)
  except AssertionError as e:  # tfds' "could not find data in data_dir"; never downloads
    raise FileNotFoundError(_not_prepared_message(name, builder, data_dir)) from e
  num_examples = int(full.cardinality())
  if num_examples < 0:  # tfds asserts cardinality; fall back on the metadata if it did not
    num_examples = builder.info.splits[split].num_examples

  def read(a: int, b: int) -> tf.data.Dataset:
    ds = full.take(0) if a == b else builder.as_dataset(
        split=f"{split}[{a}:{b}]", shuffle_files=False, decoders=decoders,
        read_config=read_config)
    return ds.map(lambda ex: {"image": ex["image"], "label": _label(ex, label_key)})

  return _Source(num_examples, read, builder.info.features["image"].decode_example)


def _label(example: dict[str, tf.Tensor], key: str | None) -> tf.Tensor:
  return tf.constant(0, tf.int32) if key is None else tf.cast(example[key], tf.int32)


def _open_source(spec: _Spec, config: Any, split: str) -> _Source:
  if spec.tfds_name is None:
    return _digits_source(split)
  return _tfds_source(spec.tfds_name, spec.label_key, config.data.get("data_dir"), split)


# ----------------------------------------------------------------------------------------------
# The stream: sharding, epochs, shuffling, flips, batching.


def host_block(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Host i's contiguous block [a, b) = [i*N//P, (i+1)*N//P) of a split of N examples."""
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def _keys(seed: int, process_index: int) -> tuple[int, int]:
  """(shuffle_key, flip_key): uint32 values derived from (seed, process_index)."""
  state = np.random.SeedSequence([int(seed) % 2**64, process_index]).generate_state(2)
  return int(state[0]), int(state[1])


def _epoch_stream(records: tf.data.Dataset, n: int, *, first_epoch: int, skip: int,
                  num_epochs: int | None, shuffle: bool, buffer_size: int,
                  shuffle_key: int) -> tf.data.Dataset:
  """Epochs first_epoch, first_epoch+1, ... of `records` (n elements), each in its own order.

  Elements gain "index": their position e*n + i in the infinite stream. The first epoch skips
  its first `skip` elements (resuming). Every epoch's order is a function of (shuffle_key, e).
  """
  key = tf.constant(shuffle_key, tf.int64)

  def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
    ds = records
    if shuffle:  # stateless in the epoch: no dependence on how many epochs came before
      epoch_seed = tf.random.stateless_uniform(
          [], seed=tf.stack([key, epoch]), minval=None, maxval=None, dtype=tf.int64)
      ds = ds.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().map(lambda i, ex: {**ex, "index": epoch * n + i})
    skip_here = tf.where(epoch == first_epoch, tf.constant(skip, tf.int64),
                         tf.constant(0, tf.int64))
    return ds.skip(skip_here)

  stop = 2**62 if num_epochs is None else first_epoch + num_epochs
  return tf.data.Dataset.range(first_epoch, stop).flat_map(one_epoch)


def _process_fn(decode: Callable, preprocess: Callable, size: int, channels: int, pad: bool,
                flip_key: int | None) -> Callable[[dict], dict]:
  """Record -> {"image": float32 [S, S, C] in [-1, 1], "label": int32 []}."""

  def process(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = preprocess(decode(ex["image"]), size, pad)
    image = tf.ensure_shape(image, [size, size, channels])
    if flip_key is not None:  # keyed by stream position: identical whether resumed or not
      u = tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(flip_key, tf.int64), ex["index"]]))
      image = tf.where(u < 0.5, tf.reverse(image, axis=[1]), image)
    image = tf.cast(image, tf.float32) / 127.5 - 1.0
    return {"image": image, "label": ex["label"]}

  return process


def _pad_and_batch(ds: tf.data.Dataset, *, real_left: int, total_left: int, batch_size: int,
                   image_shape: Sequence[int]) -> tf.data.Dataset:
  """Appends masked black examples up to `total_left` elements, then batches (no remainder).

  Padding images are -1 (uint8 0 scaled), so even they lie on the data's 256-level grid.
  """
  ds = ds.map(lambda ex: {**ex, "mask": tf.constant(True)})
  padding = tf.data.Dataset.from_tensors({
      "image": tf.fill(image_shape, -1.0),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False),
  }).repeat(total_left - real_left)
  return ds.concatenate(padding).batch(batch_size, drop_remainder=True)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # parallel maps/interleaves keep their order: reproducible
  return options


def _validate(config: Any, spec: _Spec, split: str, per_host_batch_size: int, start_step: int,
              process_index: int, process_count: int) -> None:
  if not isinstance(per_host_batch_size, (int, np.integer)) or per_host_batch_size < 1:
    raise ValueError(f"per_host_batch_size={per_host_batch_size!r} must be a positive integer.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count}).")
  if not isinstance(split, str) or not split.isidentifier():
    raise ValueError(f"split={split!r} must be a plain split name such as 'train' or 'test' "
                     "(hosts slice it themselves).")
  if config.data.num_channels != spec.channels:
    raise ValueError(f"config.data.num_channels={config.data.num_channels} but dataset "
                     f"{config.data.dataset!r} has {spec.channels}-channel images.")
  size = config.data.image_size
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"config.data.image_size={size!r} must be a positive integer.")
  if config.data.get("pad_to_size", False) and (spec.native_size is None
                                                 or spec.native_size > size):
    raise ValueError(f"config.data.pad_to_size=True needs fixed-size images no larger than "
                     f"config.data.image_size={size} (dataset {config.data.dataset!r}).")


def create_input_iter(config: Any, *, split: str = "train", per_host_batch_size: int,
                      seed: int, start_step: int = 0, process_index: int | None = None,
                      process_count: int | None = None, repeat: bool = True,
                      shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """This host's batches of `split`, from global step `start_step` on.

  Args:
    config: the run's config; reads config.data (dataset, data_dir, image_size, num_channels,
      random_flip, optional shuffle_buffer_size and pad_to_size).
    split: a plain split name ("train", "test", "validation").
    per_host_batch_size: B, examples per batch on this host.
    seed: fixes shuffling and flips (with the process index): same seed, same batches.
    start_step: the global step of the first batch; batch s is the same whether the iterator
      started at 0 and was advanced s times or started at s.
    process_index, process_count: this host and the number of hosts (default: jax's).
    repeat: True: endless epochs. False: one pass, padded (see `mask`).
    shuffle: reshuffle every epoch (keyed by (seed, epoch)); False keeps the stored order.

  Yields:
    {"image": float32 [B, S, S, C] in [-1, 1], "label": int32 [B]} and, when repeat=False,
    "mask": bool [B], False on padding. Random horizontal flips when config.data.random_flip,
    split == "train" and repeat.
  """
  spec = _get_spec(config.data.dataset)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  _validate(config, spec, split, per_host_batch_size, start_step, process_index, process_count)
  size, channels, batch = config.data.image_size, spec.channels, int(per_host_batch_size)

  source = _open_source(spec, config, split)
  a, b = host_block(source.num_examples, process_index, process_count)
  n = b - a
  shuffle_key, flip_key = _keys(seed, process_index)
  flip = config.data.random_flip and split == "train" and repeat
  offset = start_step * batch  # position of this step's first element in the host's stream
  if repeat and n == 0:
    raise ValueError(f"Host {process_index} of {process_count} has no examples of split "
                     f"{split!r} ({source.num_examples} in all).")

  ds = _epoch_stream(
      source.read(a, b), n,
      first_epoch=offset // n if repeat else 0,
      skip=offset % n if repeat else min(offset, n),
      num_epochs=None if repeat else 1, shuffle=shuffle,
      buffer_size=max(1, min(n, config.data.get("shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER))),
      shuffle_key=shuffle_key)
  ds = ds.map(_process_fn(source.decode, spec.preprocess, size, channels,
                          bool(config.data.get("pad_to_size", False)),
                          flip_key if flip else None),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if repeat:
    ds = ds.batch(batch, drop_remainder=True)
  else:  # every host the same number of batches: that of the largest block, ceil(N/P)
    num_batches = math.ceil(math.ceil(source.num_examples / process_count) / batch)
    ds = _pad_and_batch(ds, real_left=max(0, n - offset),
                        total_left=max(0, num_batches * batch - offset), batch_size=batch,
                        image_shape=(size, size, channels))
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return ds.as_numpy_iterator()


# ----------------------------------------------------------------------------------------------
# Devices.


def shard_for_devices(batch: Any, num_devices: int) -> Any:
  """Reshapes every leaf [B, ...] -> [num_devices, B // num_devices, ...] (for pmap)."""

  def reshape(x: np.ndarray) -> np.ndarray:
    if x.shape[0] % num_devices:
      raise ValueError(f"The per-host batch of {x.shape[0]} examples does not divide over "
                       f"{num_devices} devices; pick a batch size divisible by the number of "
                       "devices.")
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices} must be >= 1.")
  return jax.tree_util.tree_map(reshape, batch)


def prefetch_to_device(iterator: Iterable[Any], size: int,
                       devices: Sequence[jax.Device] | None = None) -> Iterator[Any]:
  """Keeps `size` batches in flight on `devices` (default: jax.local_devices()).

  Every leaf must be [len(devices), ...] (see `shard_for_devices`); it becomes a jax.Array
  split along axis 0 over a 1-D mesh with axis "batch", one slice per device, which pmap and
  shard_map both take as is. The equivalent of flax.jax_utils.prefetch_to_device, without its
  extra stack copy.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  queue = collections.deque()

  def enqueue(k: int) -> None:  # device_put is asynchronous: the copies overlap compute
    for item in itertools.islice(iterator, k):
      queue.append(jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), item))

  iterator = iter(iterator)
  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
