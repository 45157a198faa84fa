"""Input pipelines: a dataset's split -> this host's NumPy batches, in two ways.

- `create_input_iter`: the training stream. Endless epochs of one global stream, shuffled by
  (seed, epoch), randomly flipped; host i keeps its slice of every global batch, so the stream
  does not depend on the number of hosts and resumes exactly at any step.
- `eval_batches`: one pass over the first `limit` examples of a split, each example on exactly
  one host, with its index in the split; nothing to mask.
Both yield {"image": float32 [B, S, S, C] in [-1, 1], "label": int32 [B]} (S =
config.data.image_size, C = config.data.num_channels), on the 256-level grid of uint8 data.

`check_dataset` validates config.data and opens the split before a run writes anything. The
datasets (sources.py, image_folder.py) and the stream's design are described in docs/data.md.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np

from ddpm_jax import image_folder, sources
from ddpm_jax.errors import UserError
from ddpm_jax.tf_lazy import tf

DEFAULT_SHUFFLE_BUFFER = 50_000
DATASETS = sources.DATASETS


def open_source(config: Any, split: str) -> sources.Source:
  """The split of config.data.dataset, after checking config.data's generic fields."""
  d = config.data
  size = d.image_size
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise UserError(f"config.data.image_size={size!r} must be a positive integer.")
  if not isinstance(split, str) or not split.isidentifier():
    raise UserError(f"split={split!r} must be a plain split name such as 'train' or 'test' "
                    "(hosts slice it themselves).")
  if d.get("labels_from", "none") != "none" and d.dataset != "folder":
    raise UserError(f"config.data.labels_from={d.labels_from!r} applies to dataset 'folder' "
                    f"only; {d.dataset!r} brings its own labels (set it to 'none').")
  if d.dataset in sources.USER_DATASETS:
    if d.num_channels not in (1, 3):
      raise UserError(f"config.data.num_channels={d.num_channels!r}: dataset {d.dataset!r} "
                      "converts images to 1 (gray) or 3 (RGB) channels.")
    if d.dataset == "npz":
      return sources.open_npz(config, split)
    return image_folder.open_folder(config, split)
  return sources.open_known(config, split)


def check_dataset(config: Any, split: str = "train") -> int:
  """Checks config.data and that the split is prepared and readable; returns its size.

  A folder's files are checked from their headers and ends (image_folder.check_folder), other
  datasets are opened without reading examples, so a run can refuse bad data before it writes
  anything to its workdir.
  """
  if config.data.dataset == "folder":
    image_folder.check_folder(config)
  return open_source(config, split).num_examples


def class_names(config: Any) -> tuple[str, ...]:
  """The label names of a labelled folder (index = position), () for other datasets."""
  if config.data.dataset == "folder" and config.data.get("labels_from", "none") != "none":
    return image_folder.class_names(config)
  return ()


# ----------------------------------------------------------------------------------------------
# The stream: epochs, shuffling, host slices, flips, batching.


def host_block(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Host i's contiguous block [a, b) = [i*N//P, (i+1)*N//P) of N examples (evaluation)."""
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def _keys(seed: int) -> tuple[int, int]:
  """(shuffle_key, flip_key): uint32 values derived from the seed alone (the same on all hosts)."""
  state = np.random.SeedSequence([int(seed) % 2**64]).generate_state(2)
  return int(state[0]), int(state[1])


def _epoch_stream(records, n: int, *, first_epoch: int, skip: int, shuffle: bool,
                  buffer_size: int, shuffle_key: int):
  """Epochs first_epoch, first_epoch+1, ... of `records` (n elements), each in its own order.

  Elements gain "index": their position e*n + i in the infinite stream. The first epoch skips
  its first `skip` elements (resuming). Every epoch's order is a function of (shuffle_key, e).
  """
  key = tf.constant(shuffle_key, tf.int64)

  def one_epoch(epoch):
    ds = records
    if shuffle:  # stateless in the epoch: no dependence on how many epochs came before
      epoch_seed = tf.random.stateless_uniform(
          [], seed=tf.stack([key, epoch]), minval=None, maxval=None, dtype=tf.int64)
      ds = ds.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().map(lambda i, ex: {**ex, "index": epoch * n + i})
    skip_here = tf.where(epoch == first_epoch, tf.constant(skip, tf.int64),
                         tf.constant(0, tf.int64))
    return ds.skip(skip_here)

  return tf.data.Dataset.range(first_epoch, 2**62).flat_map(one_epoch)


def _process_fn(source: sources.Source, config: Any,
                flip_key: int | None) -> Callable[[dict], dict]:
  """Record -> {"image": float32 [S, S, C] in [-1, 1], "label": int32 []}."""
  shape = [config.data.image_size, config.data.image_size, config.data.num_channels]

  def process(ex):
    image = tf.ensure_shape(source.preprocess(source.decode(ex["image"])), shape)
    if flip_key is not None:  # keyed by stream position: identical whether resumed or not
      u = tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(flip_key, tf.int64), ex["index"]]))
      image = tf.where(u < 0.5, tf.reverse(image, axis=[1]), image)
    image = tf.cast(image, tf.float32) / 127.5 - 1.0
    return {"image": image, "label": ex["label"]}

  return process


def _check_hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count}).")
  return process_index, process_count


def create_input_iter(config: Any, *, split: str = "train", per_host_batch_size: int,
                      seed: int, start_step: int = 0, process_index: int | None = None,
                      process_count: int | None = None,
                      shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """This host's training batches of `split`, from global step `start_step` on, endlessly.

  Args:
    config: the run's config; reads config.data (dataset and its fields, image_size,
      num_channels, random_flip, shuffle_buffer_size when set).
    split: a plain split name ("train", "test", "validation").
    per_host_batch_size: B, examples per batch on this host; the global batch is
      G = B * process_count, and host i yields examples [i*B, (i+1)*B) of each global batch.
    seed: fixes shuffling and flips: same seed and G, same global batches, whatever the
      number of hosts.
    start_step: the global step of the first batch; batch s is the same whether the iterator
      started at 0 and was advanced s times or started at s (with any B, P of the same G).
    process_index, process_count: this host and the number of hosts (default: jax's).
    shuffle: reshuffle every epoch (keyed by (seed, epoch)); False keeps the stored order.

  Yields:
    {"image": float32 [B, S, S, C] in [-1, 1], "label": int32 [B]}, horizontally flipped at
    random when config.data.random_flip and split == "train".
  """
  process_index, process_count = _check_hosts(process_index, process_count)
  if not isinstance(per_host_batch_size, (int, np.integer)) or per_host_batch_size < 1:
    raise ValueError(f"per_host_batch_size={per_host_batch_size!r} must be a positive integer.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  source = open_source(config, split)
  n, batch = source.num_examples, int(per_host_batch_size)
  if n == 0:
    raise UserError(f"Split {split!r} of dataset {config.data.dataset!r} has no examples.")
  shuffle_key, flip_key = _keys(seed)
  flip = config.data.random_flip and split == "train"
  process = _process_fn(source, config, flip_key if flip else None)
  buffer = max(1, min(n, config.data.get("shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER)))
  global_batch = batch * process_count
  position = start_step * global_batch  # first element of global batch start_step
  ds = _epoch_stream(source.read(0, n), n, first_epoch=position // n, skip=position % n,
                     shuffle=shuffle, buffer_size=buffer, shuffle_key=shuffle_key)
  # This host's slice, chosen on the encoded records: a host decodes only what it keeps.
  g, b, i = (tf.constant(v, tf.int64) for v in (global_batch, batch, process_index))
  ds = ds.filter(lambda ex: tf.equal(ex["index"] % g // b, i))
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(sources.read_options())
  if config.data.dataset == "folder":  # a file damaged inside its data fails only when decoded
    return image_folder.naming_damaged_files(ds.as_numpy_iterator(), config)
  return ds.as_numpy_iterator()


def eval_batches(config: Any, split: str, *, batch_size: int, limit: int = 0,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
  """One pass over the first `limit` examples of `split` (0: all), split between the hosts.

  Returns (the number of examples over all hosts, this host's batches). Host i reads the
  contiguous block `host_block(n, i, P)` of those n examples, in stored order, unflipped,
  in batches of `batch_size` (the last one may be smaller; a host may have none):
    {"image": float32 [b, S, S, C] in [-1, 1], "label": int32 [b], "index": int64 [b]},
  "index" being each example's position in the split. Hosts need not stay in step: summing
  per-example results over every host's batches sees each of the n examples exactly once.
  """
  process_index, process_count = _check_hosts(process_index, process_count)
  if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
    raise ValueError(f"limit={limit!r} must be an integer >= 0 (0: the whole split).")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
  source = open_source(config, split)
  n = min(source.num_examples, limit) if limit else source.num_examples
  a, b = host_block(n, process_index, process_count)
  process = _process_fn(source, config, None)
  ds = source.read(a, b).enumerate().map(lambda i, ex: {**ex, "index": a + i})
  ds = ds.map(lambda ex: {**process(ex), "index": ex["index"]},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE).with_options(sources.read_options())
  return n, ds.as_numpy_iterator()
