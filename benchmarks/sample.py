"""Sampling speed of the CIFAR-10 model through the public `ddpm_jax.sample`: img/s for 1000
ancestral steps and DDIM at 100 and 50 steps, in float32 and bfloat16 compute.

    python benchmarks/sample.py                                  # GPU: batch 256
    python benchmarks/sample.py --batch_size 2 --samplers ancestral:1000,ddim:100,ddim:50 \\
        --dtypes float32 --repeats 1                             # this 2-core CPU, a few minutes

Each (dtype, sampler) is called once untimed (compilation + one run: `sample()` compiles its
chain on first use and caches it), then --repeats times timed; the call returns host images, so
every timing includes the device-to-host copy of the samples. `compile s` is the first call's
time minus the median run time. The parameters are a fresh initialisation (the speed does not
depend on their values).
"""
import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Report, device_line, load_config, time_calls  # noqa: E402
import ddpm_jax  # noqa: E402  (_common makes the repository importable)
from ddpm_jax import train  # noqa: E402


def parse_samplers(text):
  """"ancestral:1000,ddim:100" -> [("ancestral", 1000), ("ddim", 100)]."""
  out = []
  for item in text.split(","):
    name, _, steps = item.partition(":")
    out.append((name, int(steps or 1000)))
  return out


class OurSampler:
  """ddpm_jax.sample for one config, dtype and batch; called as sampler(name, num_steps)."""

  def __init__(self, config_name, dtype, batch_size, seed=0):
    self.config = load_config(config_name)
    self.config.model.dtype = dtype
    self.config.sampling.batch_size = batch_size
    self.batch_size = batch_size
    self.params = train.init_params(self.config, jax.random.PRNGKey(seed))
    self.key = jax.random.PRNGKey(seed + 1)

  def __call__(self, sampler, num_steps):
    return ddpm_jax.sample(self.params, self.key, config=self.config,
                           num_samples=self.batch_size, sampler=sampler, num_steps=num_steps)

  def first_call_s(self, sampler, num_steps):
    """Seconds of the first call: compilation and one run."""
    start = time.perf_counter()
    jax.block_until_ready(self(sampler, num_steps))
    return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="cifar10", help="a module name under configs/")
  parser.add_argument("--batch_size", type=int, default=256, help="samples per call")
  parser.add_argument("--samplers", default="ancestral:1000,ddim:100,ddim:50",
                      help="comma-separated NAME:STEPS, NAME in ancestral, ddim")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  report = Report(f"Sampling, configs/{args.config}.py")
  report(f"ddpm_jax.sample() of configs/{args.config}.py, {args.batch_size} samples per call, "
         f"on {device_line()}; median of {args.repeats} timed calls after one untimed")
  report.header(f"{'dtype':<9} {'sampler':<10} {'steps':>5} {'compile s':>9} {'run s':>8} "
                f"{'img/s':>8} {'ms/step':>8}")
  for dtype in args.dtypes.split(","):
    ours = OurSampler(args.config, dtype, args.batch_size)
    for name, steps in parse_samplers(args.samplers):
      first = ours.first_call_s(name, steps)
      run = time_calls(lambda: ours(name, steps), 0, args.repeats)
      report(f"{dtype:<9} {name:<10} {steps:>5} {first - run:>9.1f} {run:>8.2f} "
             f"{args.batch_size / run:>8.3f} {run / steps * 1e3:>8.1f}")
  report.save()


if __name__ == "__main__":
  main()
