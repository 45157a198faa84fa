"""Our U-Net with converted weights against diffusers' UNet2DModel, output for output.

    python benchmarks/diffusers_fixture.py --model=cifar10 --out=/tmp/ddpm-cifar10-random   # peer's env
    python benchmarks/convert_equality.py --src=/tmp/ddpm-cifar10-random                    # ours

The first command (in the peer's environment, benchmarks/requirements-peer.txt) writes a
randomly initialised, perturbed UNet2DModel in google/ddpm-cifar10-32's configuration as a
diffusers folder, with reference.npz: inputs (x_t, t) and the diffusers outputs. This one
converts the folder with ddpm_jax.convert (in memory; no run directory is written), runs our
U-Net on the same inputs in float32, and prints the largest absolute difference.
"""
import argparse
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from ddpm_jax import convert  # noqa: E402
from ddpm_jax.unet import UNet  # noqa: E402


def converted_outputs(src: str):
  """(our outputs, diffusers' outputs, config, parameter count) on reference.npz's inputs."""
  unet_cfg, sched_cfg, weights = convert.read_source(src)
  config = convert.build_config(unet_cfg, sched_cfg, src)
  params = convert.convert_params(convert.read_tensors(weights), config, weights)
  ref = np.load(os.path.join(src, "reference.npz"))
  model = UNet(**{**config.model, "dtype": "float32"})
  out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))(
      params, ref["x_t"], ref["t"])
  count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  return np.asarray(out), ref["out"], config, count


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help="a folder written by diffusers_fixture.py")
  args = parser.parse_args()
  ours, theirs, config, count = converted_outputs(args.src)
  diff = np.abs(ours.astype(np.float64) - theirs)
  print(f"{args.src}: {count:,} parameters, {config.data.image_size}x{config.data.image_size}x"
        f"{config.data.num_channels}, ch_mult={tuple(config.model.ch_mult)}, "
        f"attn_resolutions={tuple(config.model.attn_resolutions)}; {ours.shape[0]} inputs; "
        f"diffusers output |max| {np.abs(theirs).max():.4f}; max abs difference {diff.max():.3e}, "
        f"mean {diff.mean():.3e} ({jax.devices()[0].platform}, float32)")


if __name__ == "__main__":
  main()
