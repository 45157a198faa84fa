"""Speed, FLOPs and memory of the DDPM U-Net, float32 against bfloat16 compute.

    python benchmarks/unet.py                      # the CIFAR-10 model at batch 128
    python benchmarks/unet.py --batch_size 8 --config celeba --iters 5

For each compute dtype it times the jit-compiled forward pass (train=False, as in sampling) and
forward+backward pass (the gradient of an MSE loss with dropout, as in training): compile time
separately, then the median of --iters timed calls after --warmup untimed ones. FLOPs are XLA's
own count (cost_analysis), memory the compiled program's temp + argument + output buffers
(memory_analysis). On a GPU it also prints achieved TFLOP/s and MFU against the device's peak.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Report, cell, compile_timed, device_line, load_config,  # noqa: E402
                     peak_tflops, peak_memory_bytes, time_calls, xla_flops)
from ddpm_jax.unet import UNet  # noqa: E402  (_common makes the repository importable)


def measure(fn, args, warmup, iters):
  """Compiles fn(*args) and times it: dict(compile_s, median_s, flops, memory)."""
  compiled, compile_s = compile_timed(fn, *args)
  return dict(compile_s=compile_s, median_s=time_calls(lambda: compiled(*args), warmup, iters),
              flops=xla_flops(compiled), memory=peak_memory_bytes(compiled))


def benchmark(model_config, image_size, channels, batch_size, dtype, warmup, iters):
  """Yields (pass name, measure() dict) for the forward and forward+backward passes."""
  model = UNet(**{**model_config, "dtype": dtype})
  kx, kt, kinit, kdrop = jax.random.split(jax.random.key(0), 4)
  x = jax.random.uniform(kx, (batch_size, image_size, image_size, channels), minval=-1, maxval=1)
  t = jax.random.randint(kt, (batch_size,), 0, 1000, jnp.int32)
  params = jax.jit(model.init)(kinit, x, t)["params"]

  def forward(params, x, t):
    return model.apply({"params": params}, x, t, train=False)

  def loss(params, x, t, key):
    out = model.apply({"params": params}, x, t, train=True, rngs={"dropout": key})
    return jnp.mean(jnp.square(out - x))

  yield "forward", measure(forward, (params, x, t), warmup, iters)
  yield "fwd+bwd", measure(jax.grad(loss), (params, x, t, kdrop), warmup, iters)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--config", default="cifar10", help="a module name under configs/")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()

  config = load_config(args.config)
  size, channels = config.data.image_size, config.data.num_channels
  device = jax.devices()[0]
  report = Report(f"U-Net forward and fwd+bwd, configs/{args.config}.py")
  report(f"UNet of configs/{args.config}.py, {size}x{size}x{channels}, batch {args.batch_size}, "
         f"on {device_line()}, using 1; median of {args.iters} after {args.warmup} warm-up calls")
  header = (f"{'dtype':<9} {'pass':<8} {'compile s':>9} {'median ms':>10} {'img/s':>9} "
            f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'peak':>10} {'MFU':>6} {'memory GiB':>10}")
  report.header(header)
  for dtype in args.dtypes.split(","):
    peak, peak_name = peak_tflops(device, dtype)
    for name, r in benchmark(config.model, size, channels, args.batch_size, dtype, args.warmup,
                             args.iters):
      tflops = r["flops"] / r["median_s"] / 1e12 if r["flops"] else None
      cells = [
          f"{dtype:<9}", f"{name:<8}", f"{r['compile_s']:>9.1f}", f"{r['median_s'] * 1e3:>10.1f}",
          f"{args.batch_size / r['median_s']:>9.1f}",
          cell(r["flops"] and r["flops"] / 1e9, 10, ".1f"), cell(tflops, 8, ".2f"),
          f"{f'{peak:.0f} {peak_name}' if peak else 'n/a':>10}",
          cell(tflops / peak if tflops and peak else None, 6, ".1%"),
          cell(r["memory"] and r["memory"] / 2**30, 10, ".2f")]
      report(" ".join(cells))
  report("GFLOP/step: XLA's count for the whole batch. memory: temp + argument + output buffers. "
        "MFU: achieved TFLOP/s over the dense peak named (float32 runs on TF32 tensor cores "
        "under JAX's default matmul precision).")
  report.save()


if __name__ == "__main__":
  main()
