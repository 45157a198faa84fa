"""Input pipeline speed on the user's own images, against the train step's consumption.

    python benchmarks/data.py                        # a few minutes on a 2-core CPU

Datasets, written to a temporary folder from scikit-learn's bundled sample photos (china.jpg,
flower.jpg, 427x640) cut into tiles at random offsets, so that JPEG decoding sees real content:
  jpeg256  --num_large 256x256 JPEGs (quality 90), resized to 64 (configs/celeba.py's size);
  png32    --num_small 32x32 PNGs (tiles shrunk 8x), at 32;
  npz32    the same 32x32 images as one .npz, at 32.
Each goes through ddpm_jax.data.create_input_iter (training stream: shuffle, host slice, decode,
crop, resize, flip, batch) at --batch per batch. The figures: img/s of wall time, and img per
CPU-second of this process (user + system, all its threads): the pipeline's img/s per CPU core,
which holds on a shared machine where wall time does not. The consumer is the CPU train step of
configs/digits.py (8x8, batch --batch) on this machine, timed the same way, and the DDPM paper's
TPU v3-8 rate for CIFAR-10 (21 steps/s at batch 128, about 2.7k img/s) as an accelerator's.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Report, Runner, bench_config, device_line, load_config  # noqa: E402
from ddpm_jax import data  # noqa: E402  (_common makes the repository importable)

ACCELERATOR_IMG_S = 21 * 128  # the DDPM paper's CIFAR-10 training rate on a TPU v3-8


def tiles(num, side, shrink, seed=0):
  """uint8 [num, side, side, 3]: squares of side * shrink at random offsets of the sample
  photos, shrunk by `shrink` (PIL's antialiased reduce)."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  out = np.empty((num, side, side, 3), np.uint8)
  big = side * shrink
  for i in range(num):
    photo = photos[i % len(photos)]
    top = rng.integers(0, photo.shape[0] - big + 1)
    left = rng.integers(0, photo.shape[1] - big + 1)
    tile = Image.fromarray(photo[top:top + big, left:left + big])
    out[i] = np.asarray(tile.reduce(shrink) if shrink > 1 else tile)
  return out


def write_folder(root, images, ext, **save):
  from PIL import Image
  os.makedirs(root)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(root, f"{i:06d}.{ext}"), **save)
  return root


def pipeline_config(dataset, path, size):
  config = load_config("digits")
  config.data.update(dict(dataset=dataset, path=path, image_size=size, num_channels=3,
                          random_flip=True, eval_fraction=0.0))
  return config


def timed(call, count):
  """(wall s, CPU s of this process) of `count` calls after one untimed."""
  call()
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(count):
    call()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=16, help="timed batches per dataset")
  parser.add_argument("--num_large", type=int, default=512)
  parser.add_argument("--num_small", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=5, help="timed train steps")
  args = parser.parse_args()

  report = Report("Input pipeline: folders and arrays", packages=("tensorflow-cpu", "pillow"))
  report(f"device: {device_line()}; batch {args.batch}, {args.batches} timed batches after one "
         "untimed; img/core-s = images per CPU-second of this process (all threads)")
  report.header(f"{'source':<34} {'img/s':>8} {'img/core-s':>10} {'train img/s':>12} "
                f"{'cores for TPU v3-8':>18}")
  with tempfile.TemporaryDirectory() as tmp:
    small = tiles(args.num_small, 32, 8, seed=1)
    sources = [
        ("jpeg256: 256x256 JPEG -> 64",
         pipeline_config("folder", write_folder(os.path.join(tmp, "jpeg"),
                                                tiles(args.num_large, 256, 1), "jpg",
                                                quality=90), 64)),
        ("png32: 32x32 PNG -> 32",
         pipeline_config("folder", write_folder(os.path.join(tmp, "png"), small, "png"), 32)),
    ]
    np.savez(os.path.join(tmp, "small.npz"), images=small)
    sources.append(("npz32: 32x32 uint8 array -> 32",
                    pipeline_config("npz", os.path.join(tmp, "small.npz"), 32)))
    runner = Runner(bench_config("digits", args.batch, "float32"))
    step_wall, step_cpu = timed(lambda: runner.par.get(runner()), args.steps)
    train_img_s = args.batch * args.steps / step_wall
    for name, config in sources:
      batches = data.create_input_iter(config, per_host_batch_size=args.batch, seed=0)
      wall, cpu = timed(lambda: next(batches), args.batches)
      n = args.batch * args.batches
      report(f"{name:<34} {n / wall:>8.0f} {n / cpu:>10.0f} {train_img_s:>12.0f} "
             f"{ACCELERATOR_IMG_S / (n / cpu):>18.2f}")
  report(f"train img/s: the CPU train step of configs/digits.py (8x8, batch {args.batch}), wall "
         f"time here, {args.batch * args.steps / step_cpu:.0f} img per CPU-second. Cores for "
         f"TPU v3-8: the CPU cores that feed {ACCELERATOR_IMG_S} img/s (the DDPM paper's "
         "CIFAR-10 rate) at the img/core-s above.")
  report.save()


if __name__ == "__main__":
  main()
