"""Sampler overhead: the whole reverse chain in one lax.scan vs a Python loop over a jitted step.

With a model function that costs almost nothing, the difference is pure dispatch overhead: the
Python loop (how most peer code samples) pays a host round trip per step; the scan pays none.

    python benchmarks/sampler_overhead.py [--num_timesteps 1000] [--batch 16] [--image_size 32]
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm_jax  # noqa: E402  (after making the repository importable)


def timed(fn, repeats):
  """(seconds of the first call, median seconds of `repeats` later calls), device synchronised."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_timesteps", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  sched = ddpm_jax.make_schedule("linear", args.num_timesteps)
  shape = (args.batch, args.image_size, args.image_size, 3)
  model_fn = lambda x, t: 0.1 * x  # a cheap stand-in for the network
  key = jax.random.key(0)

  scan_loop = jax.jit(lambda k: ddpm_jax.p_sample_loop(sched, model_fn, shape, k))
  step = jax.jit(lambda x, t, k: ddpm_jax.p_sample(sched, model_fn, x, t, k))

  def python_loop():
    x = jax.random.normal(jax.random.fold_in(key, 0), shape)
    for i in reversed(range(args.num_timesteps)):
      x = step(x, jnp.full((args.batch,), i, jnp.int32), jax.random.fold_in(key, i))
    return x

  scan_first, scan_time = timed(lambda: scan_loop(key), args.repeats)
  loop_first, loop_time = timed(python_loop, args.repeats)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"T = {args.num_timesteps}, x shape = {shape}, model_fn = 0.1 * x")
  print(f"{'sampler':<34}{'compile+first (s)':>18}{'run (s)':>10}{'ms/step':>10}")
  for name, first, run in [("p_sample_loop (one lax.scan)", scan_first, scan_time),
                           ("Python loop over jitted p_sample", loop_first, loop_time)]:
    print(f"{name:<34}{first:>18.3f}{run:>10.4f}{1e3 * run / args.num_timesteps:>10.4f}")
  print(f"speed-up of the scan over the Python loop: {loop_time / scan_time:.1f}x")


if __name__ == "__main__":
  main()
