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

Training stream (repeat=True): one global stream, the same on every host. With N examples in
the split, the stream is epoch 0, epoch 1, ... of the WHOLE split concatenated; position
g = e*N + i is the i-th example of epoch e. Batches are cut from it (they may straddle an epoch
boundary; nothing is dropped): with P = process_count, B = per_host_batch_size and the global
batch size G = B*P, global batch s is positions [s*G, (s+1)*G), and host i yields the part whose
offset within the global batch lies in [i*B, (i+1)*B). So the concatenation of the hosts' batches
at step s, in process order, is global batch s, and it depends on (config, seed, G, s) and the
data only, never on P: a 2-host run and a 1-host run with the same global batch see the same
examples, flips and order, and a run may resume on a different number of hosts.
Every host therefore reads every (encoded) record and keeps 1/P of them: the selection is a
`filter` on the stream *before* decoding (tfds images are read with tfds.decode.SkipDecoding), so
reading I/O is x P but decoding and preprocessing, the expensive part, is / P. tf.data's
AutoShardPolicy.DATA makes the same trade. Reading only a contiguous block per host would cut
I/O by P too, but it ties the global batch to P (what this module did before).

Randomness and resuming. Every random choice is a pure function of a key, and no key depends on
the process index:
  * keys: (shuffle_key, flip_key) = SeedSequence([seed]);
  * epoch e is shuffled by tf.data's shuffle with seed = stateless_hash(shuffle_key, e),
    reshuffle_each_iteration=False, over the same records in the same stored order (tfds reads
    files unshuffled) with the same buffer on every host: its order depends on (seed, e) only,
    never on history nor on the host;
  * the element at stream position g is flipped iff stateless_uniform(seed=(flip_key, g)) < 1/2,
    computed by whichever host keeps g.
start_step=s starts the stream at position k = s*G: epoch k // N, skipping k % N elements of
that epoch only. The skip runs on the encoded records, before the host filter and the decoding,
so resuming costs at most one epoch of reading encoded records and no image decoding. Resume
with the same global batch size G; B and P may change as long as B*P stays G.
Shuffling uses a buffer of min(N, config.data.shuffle_buffer_size or 50_000) encoded records
(on every host): a full permutation of splits up to that size (CIFAR-10, CelebA-HQ, digits), a
windowed one of larger splits (tfds stores records pre-shuffled, so a window is already a fair
sample).
scikit-learn's digits go through the same code: their arrays are wrapped in a tf.data dataset
(from_tensor_slices) and take the place of the encoded records (decoding is the identity).

Evaluation (repeat=False): order does not matter there, so hosts read disjoint blocks instead:
the split is cut into P contiguous blocks [i*N//P, (i+1)*N//P) (a tfds absolute ReadInstruction
"split[a:b]", or the same slice of the digits arrays), host i reads only its block, in one pass
(shuffled by (seed, epoch 0) when shuffle=True). After the real examples the stream is padded
with black images (-1, label 0, mask False) so that every host yields the same number of
batches, ceil(ceil(N/P) / B) (collectives need the hosts in step). Summing over mask=True sees
every example of the split exactly once. One-pass iterators never flip (evaluation sees the data
as they are); start_step=s skips the first s*B examples of the host's block.

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
from etils import epy


def _keep_tf_off_the_gpus(_module_name: str) -> None:
  import tensorflow  # pylint: disable=import-outside-toplevel  (already imported by now)
  try:  # TF must not allocate GPU memory that JAX needs; harmless on CPU-only TF.
    tensorflow.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices elsewhere; too late to hide them.
    pass


# Imported on first use, by the input pipeline: the model, the train step, sampling and the
# benchmarks on synthetic data run where TensorFlow is not installed (e.g. a bare GPU image).
with epy.lazy_imports(
    error_callback="ddpm_jax's input pipeline needs tensorflow and tensorflow-datasets: "
                   "pip install -r requirements.txt",
    success_callback=_keep_tf_off_the_gpus):
  import tensorflow as tf
  import tensorflow_datasets as tfds

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
  decoders = {"image": tfds.decode.SkipDecoding()}  # decode after skip/shuffle/host filter
  read_config = tfds.ReadConfig(try_autocache=False, options=_options())
  try:
    full = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                              read_config=read_config)
  except AssertionError as e:  # tfds' "could not find data in data_dir"; never downloads
    raise FileNotFoundError(_not_prepared_message(name, builder, data_dir)) from e
  num_examples = int(full.cardinality())
  if num_examples < 0:  # tfds asserts cardinality; fall back on the metadata if it did not
    num_examples = builder.info.splits[split].num_examples

  def read(a: int, b: int) -> tf.data.Dataset:
    if (a, b) == (0, num_examples) or a == b:
      ds = full if a < b else full.take(0)
    else:
      ds = builder.as_dataset(split=f"{split}[{a}:{b}]", shuffle_files=False,
                              decoders=decoders, read_config=read_config)
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
  """Host i's contiguous block [a, b) = [i*N//P, (i+1)*N//P) of a split of N (evaluation)."""
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def _keys(seed: int) -> tuple[int, int]:
  """(shuffle_key, flip_key): uint32 values derived from the seed alone (the same on all hosts)."""
  state = np.random.SeedSequence([int(seed) % 2**64]).generate_state(2)
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


def _host_slice(stream: tf.data.Dataset, *, global_batch: int, per_host_batch: int,
                process_index: int) -> tf.data.Dataset:
  """Keeps the stream elements (with "index" g) of host i: (g mod G) in [i*B, (i+1)*B).

  Run on encoded records, so a host decodes only what it keeps. The stream must start at a
  multiple of G for its batches of B to be the hosts' slices of the global batches.
  """
  g, b, i = (tf.constant(v, tf.int64) for v in (global_batch, per_host_batch, process_index))
  return stream.filter(lambda ex: tf.equal(ex["index"] % g // b, i))


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


def check_dataset(config: Any, split: str = "train") -> int:
  """Checks config.data and that the split is prepared and readable; returns its size.

  Opens the dataset without reading examples, so a run can refuse a bad dataset before it
  writes anything to its workdir.
  """
  spec = _get_spec(config.data.dataset)
  _validate(config, spec, split, 1, 0, 0, 1)
  return _open_source(spec, config, split).num_examples


def create_input_iter(config: Any, *, split: str = "train", per_host_batch_size: int,
                      seed: int, start_step: int = 0, process_index: int | None = None,
                      process_count: int | None = None, repeat: bool = True,
                      shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """This host's batches of `split`, from global step `start_step` on.

  Args:
    config: the run's config; reads config.data (dataset, data_dir, image_size, num_channels,
      random_flip, optional shuffle_buffer_size and pad_to_size).
    split: a plain split name ("train", "test", "validation").
    per_host_batch_size: B, examples per batch on this host; the global batch is
      G = B * process_count.
    seed: fixes shuffling and flips: same seed and G, same global batches, whatever the
      number of hosts.
    start_step: the global step of the first batch; batch s is the same whether the iterator
      started at 0 and was advanced s times or started at s (with any B, P of the same G).
    process_index, process_count: this host and the number of hosts (default: jax's).
    repeat: True: endless epochs of one global stream; host i yields examples
      [i*B, (i+1)*B) of each global batch. False: one pass over host i's block of the split,
      padded (see `mask`).
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
  shuffle_key, flip_key = _keys(seed)
  flip = config.data.random_flip and split == "train" and repeat
  process = _process_fn(source.decode, spec.preprocess, size, channels,
                        bool(config.data.get("pad_to_size", False)), flip_key if flip else None)

  def buffer_size(n: int) -> int:
    return max(1, min(n, config.data.get("shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER)))

  if repeat:  # one global stream; this host keeps its slice of every global batch
    n = source.num_examples
    if n == 0:
      raise ValueError(f"Split {split!r} of dataset {config.data.dataset!r} has no examples.")
    global_batch = batch * process_count
    position = start_step * global_batch  # first element of global batch start_step
    ds = _epoch_stream(source.read(0, n), n, first_epoch=position // n, skip=position % n,
                       num_epochs=None, shuffle=shuffle, buffer_size=buffer_size(n),
                       shuffle_key=shuffle_key)
    ds = _host_slice(ds, global_batch=global_batch, per_host_batch=batch,
                     process_index=process_index)
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch, drop_remainder=True)
  else:  # one pass over this host's block, padded to the batches of the largest, ceil(N/P)
    a, b = host_block(source.num_examples, process_index, process_count)
    n = b - a
    offset = start_step * batch  # position of this step's first element in the host's block
    ds = _epoch_stream(source.read(a, b), n, first_epoch=0, skip=min(offset, n), num_epochs=1,
                       shuffle=shuffle, buffer_size=buffer_size(n), shuffle_key=shuffle_key)
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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
