"""The user's own images: a folder (mixed formats, modes, sizes, nesting) and an npz.

Expected pixels come from the documented rules written here in float64 NumPy: alpha composited
on black, ITU-R 601 luma, centre square, triangle-filter resize (tests/test_data.py).
"""
import hashlib
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import ddpm_jax
from configs import default
from ddpm_jax import data, errors, rundir, train
from tests.test_data import check_batch, check_global_batches, reference_resize, take, to_uint8

# (relative path, PIL format, mode, (width, height), colour): colour is the RGB(A) value of a
# constant image, distinct per file so that a batch's pixels tell which file they came from.
FILES = [
    ("cats/a.png", "PNG", "RGB", (12, 10), (200, 40, 40)),
    ("cats/b.JPG", "JPEG", "RGB", (16, 16), (40, 200, 40)),
    ("cats/deep/c.gif", "GIF", "P", (9, 11), (40, 40, 200)),
    ("cats/deep/er/d.Jpeg", "JPEG", "L", (10, 14), (90, 90, 90)),
    ("dogs/e.PNG", "PNG", "L", (8, 8), (150, 150, 150)),
    ("dogs/f.png", "PNG", "RGBA", (13, 9), (250, 250, 0, 128)),
    ("dogs/g.png", "PNG", "P", (10, 10), (0, 220, 220)),
    ("dogs/inner/h.bmp", "BMP", "RGB", (11, 12), (120, 60, 230)),
]
CLASSES = ("cats", "dogs")


def expected_value(colour, channels):
  """The documented conversion of one constant colour, before rounding."""
  rgb = np.array(colour[:3], np.float64)
  if len(colour) == 4:
    rgb = rgb * colour[3] / 255.0  # composited on black
  return rgb if channels == 3 else np.array([rgb @ [0.299, 0.587, 0.114]])


def write_image(path, fmt, mode, size, colour):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  base = Image.new("RGBA" if len(colour) == 4 else "RGB", size, tuple(colour))
  if mode == "P":  # an exact palette (the default WEB palette would dither the colour)
    image = base.convert("P", palette=Image.Palette.ADAPTIVE)
  else:
    image = base if mode == base.mode else base.convert(mode)
  image.save(path, fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for rel, fmt, mode, size, colour in FILES:
    write_image(os.path.join(root, rel), fmt, mode, size, colour)
  (root / "cats" / "notes.txt").write_text("not an image")
  (root / "dogs" / "._f.png").write_bytes(b"macOS resource fork, not an image")
  return str(root)


def folder_config(path, image_size=8, channels=3, **data_fields):
  config = default.get_config()
  config.data.dataset = "folder"
  config.data.path = path
  config.data.image_size = image_size
  config.data.num_channels = channels
  config.data.random_flip = False
  config.data.eval_fraction = 0.0
  config.model.num_classes = 0
  for key, value in data_fields.items():
    setattr(config.data, key, value)
  if config.data.labels_from == "subfolders":
    config.model.num_classes = len(CLASSES)
  return config


def file_of(image, channels):
  """Which FILES entry a constant output image is (JPEG may be off by one level)."""
  pixels = to_uint8(image).reshape(-1, channels).astype(np.float64)
  assert np.ptp(pixels, axis=0).max() <= 1  # constant, as its source
  distance = [np.abs(pixels.mean(0) - expected_value(c, channels)).max() for *_, c in FILES]
  best = int(np.argmin(distance))
  assert distance[best] <= (1.5 if FILES[best][1] == "JPEG" else 0.5 + 1e-6)
  return best


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_every_image_once_per_epoch_with_subfolder_labels(folder, channels):
  config = folder_config(folder, channels=channels, labels_from="subfolders")
  assert data.check_dataset(config) == len(FILES)
  assert data.class_names(config) == CLASSES
  batches = take(data.create_input_iter(config, per_host_batch_size=4, seed=3), 6)  # 3 epochs
  for b in batches:
    check_batch(b, (4, 8, 8, channels), num_classes=2)
  seen = [file_of(im, channels) for b in batches for im in b["image"]]
  labels = np.concatenate([b["label"] for b in batches])
  for epoch in range(3):
    assert sorted(seen[epoch * 8:(epoch + 1) * 8]) == list(range(8))
  assert seen[:8] != seen[8:16]  # reshuffled
  want = [CLASSES.index(FILES[i][0].split("/")[0]) for i in seen]
  assert labels.tolist() == want


@pytest.mark.parametrize("process_count", [1, 2])
def test_folder_resume_and_hosts_give_the_same_stream(folder, process_count):
  config = folder_config(folder, random_flip=True)
  make_iter = lambda **kw: data.create_input_iter(config, seed=5, **kw)
  # G = 4, N = 8: steps 0, 1 (epoch 0), 2 (epoch 1), 5 (epoch 2).
  check_global_batches(make_iter, 4, process_count, steps=(0, 1, 2, 5))


def test_folder_crop_and_resize_match_the_reference(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # h x w: centre square 20x20
  Image.fromarray(pixels).save(tmp_path / "wide.png")
  config = folder_config(str(tmp_path), image_size=8)
  total, batches = data.eval_batches(config, "train", batch_size=1)
  got = to_uint8(next(batches)["image"][0])
  want = reference_resize(pixels[:, 5:25], 8)
  diff = np.abs(got - np.round(want))
  assert total == 1 and diff.max() <= 1 and (diff == 0).mean() > 0.95  # ties may round either way


def test_npz_gives_the_same_batches_as_the_same_images_as_pngs(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (12, 10, 14, 3), dtype=np.uint8)
  os.makedirs(tmp_path / "pngs")
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / "pngs" / f"{i:02d}.png")
  np.savez(tmp_path / "images.npz", images=images)
  from_folder = folder_config(str(tmp_path / "pngs"), random_flip=True)
  from_npz = folder_config(str(tmp_path / "images.npz"), random_flip=True)
  from_npz.data.dataset = "npz"
  for a, b in zip(take(data.create_input_iter(from_folder, per_host_batch_size=5, seed=2), 4),
                  take(data.create_input_iter(from_npz, per_host_batch_size=5, seed=2), 4)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  a = next(data.eval_batches(from_folder, "train", batch_size=12)[1])
  b = next(data.eval_batches(from_npz, "train", batch_size=12)[1])
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(b["index"], np.arange(12))


def test_npz_gray_images_and_labels(tmp_path):
  images = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8)
  np.savez(tmp_path / "gray.npz", images=images, labels=np.array([0, 1, 2, 1, 0]))
  config = folder_config(str(tmp_path / "gray.npz"), channels=1)
  config.data.dataset, config.model.num_classes = "npz", 3
  batch = next(data.eval_batches(config, "train", batch_size=5)[1])
  np.testing.assert_array_equal(to_uint8(batch["image"])[..., 0], images)
  assert batch["label"].tolist() == [0, 1, 2, 1, 0]


def test_held_out_split_is_by_name_disjoint_and_stable(folder, tmp_path):
  config = folder_config(folder, eval_fraction=0.4)
  names = sorted(rel for rel, *_ in FILES)
  test = [n for n in names
          if int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") / 2**64 < 0.4]
  assert 0 < len(test) < len(names)  # this folder has both splits at 0.4
  n_test, test_batches = data.eval_batches(config, "test", batch_size=8)
  n_train, train_batches = data.eval_batches(config, "train", batch_size=8)
  got_test = [FILES[file_of(im, 3)][0] for b in test_batches for im in b["image"]]
  got_train = [FILES[file_of(im, 3)][0] for b in train_batches for im in b["image"]]
  assert (n_test, n_train) == (len(test), len(names) - len(test))
  assert got_test == test and sorted(got_train + got_test) == names


def test_a_folder_behind_a_url_scheme(folder):
  """TensorFlow's in-memory ram:// file system stands in for gs://: the same listing, checks
  and pixels as the local copy."""
  import tensorflow as tf
  url = "ram://test_image_folder/images"
  for rel, *_ in FILES:
    tf.io.gfile.makedirs(os.path.dirname(f"{url}/{rel}"))
    tf.io.gfile.copy(os.path.join(folder, rel), f"{url}/{rel}", overwrite=True)
  local, remote = folder_config(folder), folder_config(url)
  assert data.check_dataset(remote) == len(FILES)
  a = next(data.eval_batches(local, "train", batch_size=8)[1])
  b = next(data.eval_batches(remote, "train", batch_size=8)[1])
  np.testing.assert_array_equal(a["image"], b["image"])


def test_smaller_images_are_upsampled_with_a_warning(tmp_path, caplog):
  write_image(str(tmp_path / "small.png"), "PNG", "RGB", (5, 6), (10, 20, 30))
  write_image(str(tmp_path / "big.png"), "PNG", "RGB", (16, 16), (10, 20, 30))
  config = folder_config(str(tmp_path), image_size=8)
  with caplog.at_level("WARNING"):
    assert data.check_dataset(config) == 2
  assert "1 of the 2 images" in caplog.text and "small.png, side 5" in caplog.text
  batch = next(data.create_input_iter(config, per_host_batch_size=2, seed=0))
  check_batch(batch, (2, 8, 8, 3))


def test_images_downscaled_twofold_or_more_get_a_note(tmp_path, caplog):
  write_image(str(tmp_path / "large.png"), "PNG", "RGB", (20, 16), (10, 20, 30))
  write_image(str(tmp_path / "near.png"), "PNG", "RGB", (15, 12), (10, 20, 30))
  with caplog.at_level("INFO"):
    assert data.check_dataset(folder_config(str(tmp_path), image_size=8)) == 2
  assert (f"1 of the 2 images in {tmp_path} are downscaled 2x or more to "
          "config.data.image_size=8 (their shorter side: 16 to 16).") in caplog.text


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence naming the path, before anything is written.


def truncated(fmt):
  def write(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
        buffer, fmt)
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 2 // 3])
  return write


BAD_FOLDERS = {
    "missing": (lambda root: None, {}, r"config.data.path='.*/nowhere' is not a folder"),
    "no images": (lambda root: (root / "a.txt").write_text("x"), {},
                  r"holds no image: dataset 'folder' reads files ending in .png"),
    "not an image": (lambda root: (root / "x.png").write_text("hello"), {},
                     r"/x.png is not a readable image"),
    "truncated png": (lambda root: truncated("PNG")(root / "t.png"), {},
                      r"/t.png is a truncated PNG"),
    "truncated jpeg": (lambda root: truncated("JPEG")(root / "t.jpg"), {},
                       r"/t.jpg is a truncated JPEG"),
    "palette bmp": (lambda root: write_image(str(root / "p.bmp"), "BMP", "P", (8, 8), (1, 2, 3)),
                    {}, r"/p.bmp is a palette or 1-bit BMP, which TensorFlow decodes as gray"),
    "no subfolders": (lambda root: write_image(str(root / "a.png"), "PNG", "RGB", (8, 8),
                                               (1, 2, 3)),
                      {"labels_from": "subfolders", "num_classes": 1},
                      r"labels_from=subfolders but .* has images outside any subfolder"),
    "class count": (lambda root: [write_image(str(root / c / "a.png"), "PNG", "RGB", (8, 8),
                                              (1, 2, 3)) for c in "xyz"],
                    {"labels_from": "subfolders", "num_classes": 2},
                    r"num_classes=2 but .* has 3 class subfolders \(x, y, z\)"),
    "unknown labels_from": (lambda root: write_image(str(root / "a.png"), "PNG", "RGB", (8, 8),
                                                     (1, 2, 3)), {"labels_from": "folders"},
                            r"labels_from='folders' is not known; accepted: none, subfolders"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_are_refused_in_one_sentence(tmp_path, case):
  make, fields, message = BAD_FOLDERS[case]
  root = tmp_path / ("nowhere" if case == "missing" else "images")
  if case != "missing":
    root.mkdir()
    make(root)
  config = folder_config(str(root))
  for key, value in fields.items():
    if key == "num_classes":
      config.model.num_classes = value
    else:
      setattr(config.data, key, value)
  with pytest.raises(errors.UserError, match=message) as info:
    data.check_dataset(config)
  assert "\n" not in str(info.value)


BAD_NPZ = {
    "no images": ({"pixels": np.zeros((2, 8, 8), np.uint8)}, r"holds no array named 'images'"),
    "dtype": ({"images": np.zeros((2, 8, 8), np.float32)}, r"'images' is float32 \[2, 8, 8\]"),
    "rank": ({"images": np.zeros((8, 8), np.uint8)}, r"'images' is uint8 \[8, 8\]; accepted"),
    "labels": ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, 5])},
               r"'labels' .* must be 2 ints in \[0, config.model.num_classes=2\)"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_refused_in_one_sentence(tmp_path, case):
  arrays, message = BAD_NPZ[case]
  np.savez(tmp_path / "d.npz", **arrays)
  config = folder_config(str(tmp_path / "d.npz"), channels=1)
  config.data.dataset, config.model.num_classes = "npz", 2 if case == "labels" else 0
  with pytest.raises(errors.UserError, match=message):
    data.check_dataset(config)


def test_labels_from_is_refused_for_other_datasets(tmp_path):
  np.savez(tmp_path / "d.npz", images=np.zeros((2, 8, 8), np.uint8))
  config = folder_config(str(tmp_path / "d.npz"), channels=1, labels_from="subfolders")
  config.data.dataset = "npz"
  with pytest.raises(errors.UserError, match=r"labels_from='subfolders' applies to dataset "
                                             r"'folder' only; 'npz' brings its own labels"):
    data.check_dataset(config)


def test_class_names_are_stored_once_and_a_changed_set_is_refused(tmp_path):
  rundir.write_class_names(str(tmp_path), ("cat", "dog"))
  rundir.write_class_names(str(tmp_path), ("cat", "dog"))  # resuming: the same names
  assert rundir.read_class_names(str(tmp_path)) == ("cat", "dog")
  assert json.loads((tmp_path / "classes.json").read_text()) == ["cat", "dog"]
  with pytest.raises(errors.UserError, match=r"\(cat, cow\) differ from the run's \(cat, dog"):
    rundir.write_class_names(str(tmp_path), ("cat", "cow"))
  assert rundir.read_class_names(str(tmp_path / "elsewhere")) == ()


def test_a_bad_folder_stops_training_before_the_workdir_exists(tmp_path):
  config = folder_config(str(tmp_path / "nowhere"))
  config.model.ch_mult, config.model.attn_resolutions = (1, 2), (4,)  # a model that fits 8x8
  with pytest.raises(errors.MissingFileError, match="is not a folder"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# main.py end to end on a folder: train, resume, sample, eval; class names by name.


def test_main_trains_resumes_samples_and_evaluates_on_a_labelled_folder(tmp_path, main_py):
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)
  for i in range(90):  # 30 of each of the digits 0, 1, 2, in subfolders named by digit
    label = i % 3
    index = np.flatnonzero(digits.target == label)[i // 3]
    path = tmp_path / "digits" / f"digit{label}" / f"{index:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[index]).save(path)
  run = str(tmp_path / "run")
  overrides = ["--config=configs/smoke.py", "--config.data.dataset=folder",
               f"--config.data.path={tmp_path / 'digits'}", "--config.data.labels_from=subfolders",
               "--config.data.eval_fraction=0.2", "--config.model.num_classes=3",
               "--config.training.sample_every=0"]

  def main(*args):  # python main.py --workdir=run *args, in this process (conftest.py)
    status, log = main_py(f"--workdir={run}", *args)
    assert status == 0, log[-3000:]
    return log

  main(*overrides, "--config.training.num_train_steps=3")
  log = main(*overrides, "--config.training.num_train_steps=6")
  assert "Resuming from the checkpoint of step 3" in log
  main("--mode=sample")
  main("--mode=eval", *overrides, "--config.eval.metrics=bpd", "--config.eval.batch_size=4",
       "--config.eval.bpd_num_examples=5")
  with open(os.path.join(run, "eval", "00000006.json")) as f:
    (bpd,) = json.load(f)["bpd"].values()  # one protocol: the test split's first 5 examples
  assert bpd["split"] == "test" and bpd["num_examples"] == 5 and np.isfinite(bpd["bpd"])
  assert len(os.listdir(os.path.join(run, "samples"))) > 0

  params, config = ddpm_jax.load(run)
  assert config.data.class_names == ("digit0", "digit1", "digit2")
  key = jax.random.PRNGKey(0)
  by_name = ddpm_jax.sample(params, key, config=config, num_samples=2, labels="digit2")
  by_index = ddpm_jax.sample(params, key, config=config, num_samples=2, labels=2)
  np.testing.assert_array_equal(by_name, by_index)
  with pytest.raises(errors.UserError, match=r"labels='cat' is not a class of this run; "
                                             r"accepted: its class names \(digit0, digit1"):
    ddpm_jax.sample(params, key, config=config, num_samples=2, labels="cat")
