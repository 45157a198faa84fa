"""docs/editing_digits.png: inpainting and interpolation with a trained digits run.

    python main.py --config=configs/digits.py --workdir=/tmp/ddpm-digits   # README's digits run
    python benchmarks/editing_picture.py --workdir=/tmp/ddpm-digits

Rows, on 8 held-out digits (the last of scikit-learn's test split), each 8x enlarged:
the masked input (the hole grey), RePaint (100 steps, j = r = 10), DDIM replacement (100
steps), the truth; then the interpolation between the first two digits (DDIM inversion,
slerp of the noises, 8 images). Masks alternate center / left-half / bottom-half / right-half.
"""
import argparse
import os
import sys

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddpm_jax  # noqa: E402
from ddpm_jax import run_edits  # noqa: E402

MASKS = ("center", "left-half", "bottom-half", "right-half")


def held_out_digits(n: int) -> np.ndarray:
  """uint8 [n, 8, 8, 1]: the last n of scikit-learn's digits (in the test split), scaled as
  the digits dataset is (0..16 -> round(v * 255 / 16))."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  images = load_digits().images[-n:]
  return np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def to_uint8(x) -> np.ndarray:
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def strip(images: np.ndarray, scale: int = 8, pad: int = 2) -> np.ndarray:
  """One row of [n, S, S, 1] images, enlarged, on a white background."""
  big = images[..., 0].repeat(scale, 1).repeat(scale, 2)
  n, s = big.shape[0], big.shape[1]
  row = np.full((s, n * (s + pad) - pad), 255, np.uint8)
  for i, image in enumerate(big):
    row[:, i * (s + pad):i * (s + pad) + s] = image
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained digits run")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                     "editing_digits.png"))
  args = parser.parse_args()
  params, config = ddpm_jax.load(args.workdir)
  truth = held_out_digits(8)
  masks = np.stack([run_edits.named_mask(MASKS[i % len(MASKS)], 8) for i in range(8)])
  key = jax.random.PRNGKey(0)
  repaint = ddpm_jax.inpaint(params, key, truth, masks, config=config, sampler="repaint",
                             num_steps=100, jump_length=10, jump_n_sample=10)
  ddim = ddpm_jax.inpaint(params, key, truth, masks, config=config, sampler="ddim",
                          num_steps=100)
  path = ddpm_jax.interpolate(params, truth[0], truth[1], num=8, config=config, num_steps=100)
  shown = np.where(masks > 0, truth, 128).astype(np.uint8)
  rows = [strip(shown), strip(to_uint8(repaint)), strip(to_uint8(ddim)), strip(truth),
          strip(to_uint8(path))]
  gap = np.full((6, rows[0].shape[1]), 255, np.uint8)
  picture = np.concatenate(sum(([r, gap] for r in rows), [])[:-1])
  Image.fromarray(picture).save(args.out)
  print(f"wrote {os.path.normpath(args.out)}: rows = masked input, RePaint, DDIM replacement, "
        "truth, interpolation")


if __name__ == "__main__":
  main()
