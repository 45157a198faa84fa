"""Input pipelines: tfds under tfds.testing.mock_data (cifar10, celeb_a), and the real digits.

No download happens anywhere: tfds datasets are mocked, and digits ships with scikit-learn.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from ddpm_jax import data, sources

USE_CODE = tfds.testing.MockPolicy.USE_CODE  # no metadata files needed: works offline


def make_config(dataset="digits", image_size=8, channels=1, random_flip=False, data_dir=None):
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.num_channels = channels
  config.data.random_flip = random_flip
  config.data.data_dir = data_dir
  return config


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def assert_batches_equal(x, y):
  assert set(x) == set(y)
  for key in x:
    np.testing.assert_array_equal(x[key], y[key])


def concat_hosts(batches):
  """The global batch: the hosts' batches concatenated in process order."""
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def check_global_batches(make_iter, global_batch, process_count, steps):
  """Global batch s for process_count hosts == the 1-host batch s of the same global size.

  make_iter(**kw) builds an iterator. The 1-host reference is advanced step by step; the hosts
  are advanced from step 0 too up to the second step, and started at start_step for the others
  (resuming with a different process count).
  """
  reference = make_iter(per_host_batch_size=global_batch)
  expected = {s: b for s, b in enumerate(take(reference, max(steps) + 1)) if s in steps}
  per_host = global_batch // process_count
  fresh = [make_iter(per_host_batch_size=per_host, process_index=i, process_count=process_count)
           for i in range(process_count)]
  for s, batches in enumerate(zip(*(take(it, 2) for it in fresh))):
    if s in steps:
      assert_batches_equal(concat_hosts(batches), expected[s])
  for s in steps:
    resumed = [next(make_iter(per_host_batch_size=per_host, start_step=s, process_index=i,
                              process_count=process_count)) for i in range(process_count)]
    assert_batches_equal(concat_hosts(resumed), expected[s])


def to_uint8(image):
  """[-1, 1] -> 0..255; the pipeline's values must land exactly on that grid."""
  pixels = (np.asarray(image, np.float64) + 1.0) * 127.5
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  return np.round(pixels).astype(np.int64)


def check_batch(batch, shape, num_classes=None):
  assert batch["image"].shape == shape and batch["image"].dtype == np.float32
  assert batch["label"].shape == shape[:1] and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  to_uint8(batch["image"])
  if num_classes is None:
    assert (batch["label"] == 0).all()
  else:
    assert ((batch["label"] >= 0) & (batch["label"] < num_classes)).all()


# ----------------------------------------------------------------------------------------------
# tfds datasets under mock_data.


def test_cifar10_mock_shapes_and_ranges():
  with tfds.testing.mock_data(num_examples=20, policy=USE_CODE):
    it = data.create_input_iter(make_config("cifar10", 32, 3, random_flip=True),
                                per_host_batch_size=8, seed=0)
    batches = take(it, 3)  # 24 > 20: straddles an epoch boundary
  for batch in batches:
    check_batch(batch, (8, 32, 32, 3), num_classes=10)
    assert set(batch) == {"image", "label"}
  assert batches[0]["image"].std() > 0.3  # mock images are uniform noise, not a constant


def test_celeb_a_mock_shapes_and_ranges():
  with tfds.testing.mock_data(num_examples=5, policy=USE_CODE):
    it = data.create_input_iter(make_config("celeb_a", 64, 3), per_host_batch_size=4, seed=0)
    batch = next(it)
  check_batch(batch, (4, 64, 64, 3))  # unlabelled: labels 0


@pytest.mark.parametrize("process_count", [2, 4])
def test_cifar10_mock_global_batch_does_not_depend_on_process_count(process_count):
  config = make_config("cifar10", 32, 3, random_flip=True)
  make_iter = lambda **kw: data.create_input_iter(config, seed=5, **kw)
  with tfds.testing.mock_data(num_examples=20, policy=USE_CODE):
    # G = 8, N = 20: steps 0, 1 in epoch 0; 2 straddles epochs 0|1; 5 is inside epoch 2.
    check_global_batches(make_iter, 8, process_count, steps=(0, 1, 2, 5))


def fake_image(index, shape):
  """A constant image whose value identifies example `index` (< 25), even after JPEG/resizing."""
  return np.full(shape, 10 * index + 5, np.uint8)


def index_of(image):
  return int(round((to_uint8(image).mean() - 5) / 10))


def split_aware_as_dataset(num_examples, make_image):
  """An `as_dataset_fn` for mock_data that honours "split[a:b]" (the stock mock ignores splits).

  Example i of every split is `make_image(i)` (PNG-encoded: lossless, and tfds' Image feature
  decodes PNG whatever its declared format) with label i % 10.
  """

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del read_config, kwargs
    assert decoders and isinstance(decoders["image"], tfds.decode.SkipDecoding)
    match = re.fullmatch(r"(\w+)(?:\[(\d+):(\d+)\])?", str(split))
    a, b = (int(match[2]), int(match[3])) if match[2] else (0, num_examples)
    shape = self.info.features["image"].shape
    images = [tf.io.encode_png(make_image(i, shape)).numpy() for i in range(a, b)]
    return tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(images, tf.string),
        "label": tf.range(a, b, dtype=tf.int64) % 10,
    })

  return as_dataset


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("celeb_a", 16)])
def test_tfds_eval_hosts_read_disjoint_blocks_covering_the_split(dataset, size):
  n, batch_size = 21, 4
  fn = split_aware_as_dataset(n, fake_image)
  seen = []
  with tfds.testing.mock_data(policy=USE_CODE, as_dataset_fn=fn):
    for host in range(2):
      total, batches = data.eval_batches(make_config(dataset, size, 3), "test",
                                         batch_size=batch_size, process_index=host,
                                         process_count=2)
      assert total == n
      batches = list(batches)
      for b in batches:
        check_batch({k: b[k] for k in ("image", "label")}, (len(b["label"]), size, size, 3),
                    num_classes=10)
        assert [index_of(im) for im in b["image"]] == b["index"].tolist()
      assert [len(b["label"]) for b in batches][:-1] == [batch_size] * (len(batches) - 1)
      seen.append([i for b in batches for i in b["index"].tolist()])
  assert seen == [list(range(10)), list(range(10, 21))]  # contiguous blocks, in order


def test_tfds_train_hosts_keep_their_slice_of_each_global_batch():
  """Unshuffled, the stream is examples 0..N-1, 0..N-1, ...; host i of P keeps [i*B, (i+1)*B)
  of each global batch of G = B*P."""
  n, per_host, hosts = 21, 4, 2
  fn = split_aware_as_dataset(n, fake_image)
  with tfds.testing.mock_data(policy=USE_CODE, as_dataset_fn=fn):
    for host in range(hosts):
      it = data.create_input_iter(make_config("cifar10", 32, 3), per_host_batch_size=per_host,
                                  seed=0, process_index=host, process_count=hosts,
                                  shuffle=False)
      for step, batch in enumerate(take(it, 6)):
        start = step * per_host * hosts + host * per_host
        expected = [g % n for g in range(start, start + per_host)]
        assert [index_of(im) for im in batch["image"]] == expected
        assert batch["label"].tolist() == [i % 10 for i in expected]


def reference_resize(image, size):
  """Antialiased bilinear (triangle-filter) resize in float64, written from its definition.

  Output pixel j of a side shrunk by s = in/out is centred at input coordinate (j + 1/2) s and
  averages input pixels x (centres x + 1/2) with weights max(0, 1 - |x + 1/2 - centre| / s),
  normalised to sum to one.
  """

  def weights(n_in, n_out):
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / scale)
    return w / w.sum(axis=1, keepdims=True)

  rows, cols = weights(image.shape[0], size), weights(image.shape[1], size)
  return np.einsum("ih,jw,hwc->ijc", rows, cols, image.astype(np.float64))


def test_celeb_a_crop_resize_matches_reference():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
  crop = image[39:39 + 140, 19:19 + 140]  # ((218 - 140) // 2, (178 - 140) // 2)
  expected = reference_resize(crop, 64)

  got = sources.celeb_a_crop_resize_float(tf.constant(image), 64).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-3)

  # Through the whole pipeline (decode, crop, resize, round, scale); ties may round either way.
  fn = split_aware_as_dataset(2, lambda i, shape: image)
  with tfds.testing.mock_data(policy=USE_CODE, as_dataset_fn=fn):
    batch = next(data.eval_batches(make_config("celeb_a", 64, 3), "train", batch_size=2)[1])
  diff = np.abs(to_uint8(batch["image"][0]) - np.round(expected))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99


# ----------------------------------------------------------------------------------------------
# digits: the real data.


def digits_iter(**kw):
  config = make_config(random_flip=kw.pop("random_flip", False))
  return data.create_input_iter(config, **{"per_host_batch_size": 64, "seed": 0, **kw})


def test_digits_test_split_is_the_last_297_images_once():
  from sklearn.datasets import load_digits
  digits = load_digits()
  total, batches = data.eval_batches(make_config(), "test", batch_size=100)
  batches = list(batches)
  assert total == 297 and [len(b["label"]) for b in batches] == [100, 100, 97]
  for b in batches:
    check_batch({k: b[k] for k in ("image", "label")}, (len(b["label"]), 8, 8, 1), num_classes=10)
  images = np.concatenate([to_uint8(b["image"]) for b in batches])[..., 0]
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(images, np.round(digits.images[-297:] * 255 / 16))
  np.testing.assert_array_equal(labels, digits.target[-297:])
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(297))


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_digits_eval_limit_is_the_same_examples_on_any_number_of_hosts(process_count):
  """The first `limit` examples, each on exactly one host, whatever the host count."""
  from sklearn.datasets import load_digits
  per_host = []
  for host in range(process_count):
    total, batches = data.eval_batches(make_config(), "test", batch_size=16, limit=50,
                                       process_index=host, process_count=process_count)
    assert total == 50
    per_host.append([b for b in batches])
  index = np.concatenate([b["index"] for host in per_host for b in host])
  labels = np.concatenate([b["label"] for host in per_host for b in host])
  np.testing.assert_array_equal(index, np.arange(50))
  np.testing.assert_array_equal(labels, load_digits().target[-297:][:50])


def test_digits_train_shapes_and_epochs_are_permutations():
  from sklearn.datasets import load_digits
  train = np.round(load_digits().images[:1500] * 255 / 16).astype(np.int64)
  batches = take(digits_iter(per_host_batch_size=100), 30)  # two epochs of 1500
  for b in batches:
    check_batch(b, (100, 8, 8, 1), num_classes=10)
  epochs = [np.concatenate([to_uint8(b["image"])[..., 0] for b in batches[e * 15:(e + 1) * 15]])
            for e in range(2)]
  key = lambda x: x.reshape(len(x), -1).tolist()
  for epoch in epochs:  # each epoch holds every training image once
    assert sorted(key(epoch)) == sorted(key(train))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
  assert not np.array_equal(epochs[0], train)  # and shuffled at all


def test_digits_deterministic_by_seed():
  a, b = take(digits_iter(seed=3), 4), take(digits_iter(seed=3), 4)
  c = take(digits_iter(seed=4), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("step", [5, 23, 61])  # inside epoch 0; straddling 0|1; inside epoch 2
def test_digits_resume_equals_advancing(step, process_count):
  # Global batch 64: host batches of 64 // process_count; the last host is checked.
  kw = dict(seed=7, random_flip=True, per_host_batch_size=64 // process_count,
            process_index=process_count - 1, process_count=process_count)
  fresh = digits_iter(**kw)
  for _ in range(step):
    next(fresh)
  expected = take(fresh, 2)
  resumed = take(digits_iter(start_step=step, **kw), 2)
  for x, y in zip(expected, resumed):
    assert_batches_equal(x, y)


@pytest.mark.parametrize("process_count", [2, 4])
def test_digits_global_batch_does_not_depend_on_process_count(process_count):
  make_iter = lambda **kw: digits_iter(seed=11, random_flip=True, **kw)
  # G = 8, N = 1500: steps 0, 1 in epoch 0; 200 (positions 1600..1607) in epoch 1.
  check_global_batches(make_iter, 8, process_count, steps=(0, 1, 200))


def test_digits_hosts_of_one_step_are_disjoint_and_an_epoch_covers_the_split():
  from sklearn.datasets import load_digits
  train = np.round(load_digits().images[:1500] * 255 / 16).astype(np.int64)
  # G = 300 = 3 hosts x 100: an epoch is 5 global steps, the union of 15 host batches.
  hosts = [take(digits_iter(per_host_batch_size=100, process_index=i, process_count=3), 5)
           for i in range(3)]
  epoch = np.concatenate([to_uint8(b["image"])[..., 0] for host in hosts for b in host])
  key = lambda x: sorted(x.reshape(len(x), -1).tolist())
  assert key(epoch) == key(train)


def test_digits_seed_changes_every_host_and_flips():
  """Different seeds give different global batches; a seed's flips differ from another's."""
  def global_batch(seed, flip):
    return concat_hosts([next(digits_iter(seed=seed, random_flip=flip, per_host_batch_size=32,
                                          process_index=i, process_count=2))
                         for i in range(2)])
  a, b = global_batch(1, True), global_batch(2, True)
  assert_batches_equal(a, global_batch(1, True))
  assert not np.array_equal(a["image"][:32], b["image"][:32])
  assert not np.array_equal(a["image"][32:], b["image"][32:])


def test_digits_flips_are_exact_mirrors_and_only_when_asked():
  plain = np.concatenate([b["image"] for b in take(digits_iter(seed=1), 5)])
  flipped = np.concatenate([b["image"] for b in take(digits_iter(seed=1, random_flip=True), 5)])
  same = (flipped == plain).all(axis=(1, 2, 3))
  mirror = (flipped == plain[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (same | mirror).all()  # shuffling is independent of flipping: same order
  assert 0.3 < (mirror & ~same).mean() < 0.7
  # Not on the test split, nor in evaluation reads.
  test_a = next(digits_iter(split="test", seed=1, random_flip=True))
  test_b = next(digits_iter(split="test", seed=1))
  np.testing.assert_array_equal(test_a["image"], test_b["image"])
  once = next(data.eval_batches(make_config(random_flip=True), "train", batch_size=64)[1])
  from sklearn.datasets import load_digits
  np.testing.assert_array_equal(to_uint8(once["image"])[..., 0],
                                np.round(load_digits().images[:64] * 255 / 16))


def test_digits_resize_to_image_size():
  config = make_config(image_size=16)
  batch = next(data.create_input_iter(config, per_host_batch_size=8, seed=0))
  check_batch(batch, (8, 16, 16, 1), num_classes=10)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_unknown_dataset_names_it_and_lists_accepted():
  with pytest.raises(ValueError, match=r"imagenet.*cifar10.*digits"):
    data.create_input_iter(make_config("imagenet"), per_host_batch_size=8, seed=0)


def test_channel_mismatch_is_an_error():
  with pytest.raises(ValueError, match="num_channels=3"):
    data.create_input_iter(make_config(channels=3), per_host_batch_size=8, seed=0)


@pytest.mark.parametrize("name,hint", [("cifar10", "tfds build cifar10 --data_dir="),
                                       ("celeb_a_hq/256", "--manual_dir=")])
def test_dataset_not_prepared_says_how_to_prepare(tmp_path, name, hint):
  config = make_config(name, 32, 3, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not prepared") as info:
    data.create_input_iter(config, per_host_batch_size=8, seed=0)
  message = str(info.value)
  assert hint in message and str(tmp_path) in message and "config.data.data_dir" in message


def test_tensorflow_is_imported_only_by_the_input_pipeline():
  """The model, train step, sampling and evaluation import without TensorFlow (a GPU image may
  not have it); building an input pipeline imports it and hides the GPUs from it."""
  # In a fresh interpreter: this one has TF loaded already.
  code = ("import sys; import ddpm_jax, ddpm_jax.train, ddpm_jax.evaluation, ddpm_jax.generate; "
          "assert 'tensorflow' not in sys.modules, 'imported TF'; "
          "from configs import digits; from ddpm_jax import data; "
          "next(iter(data.create_input_iter(digits.get_config(), split='train', "
          "per_host_batch_size=4, seed=0, start_step=0))); "
          "import tensorflow as tf; assert 'tensorflow' in sys.modules; "
          "assert not tf.config.get_visible_devices('GPU')")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
