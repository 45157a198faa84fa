"""Helpers shared by the benchmark scripts: device peaks, XLA's FLOP and memory counts, timing,
and the report that is printed and appended to benchmarks/HISTORY.md (BENCHMARKS.md quotes it).

Every script times compiled calls after warm-up with the device synchronised
(`jax.block_until_ready`); compilation is timed on its own.
"""
import datetime
import importlib
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import numpy as np

GIB = 2**30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every run is appended to the history; BENCHMARKS.md summarises it by hand, area by area.
HISTORY_MD = os.path.join(REPO, "benchmarks", "HISTORY.md")
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # the scripts run as `python benchmarks/NAME.py` from anywhere
from ddpm_jax import train as ddpm_train  # noqa: E402  (after REPO is on sys.path)

# Dense peak FLOP/s per compute dtype, by a substring of jax.Device.device_kind (first match
# wins). float32 matmuls and convolutions run on TF32 tensor cores under JAX's default precision
# on these GPUs, so float32 MFU is measured against the TF32 peak unless the precision is
# "highest" (then against the plain FP32 peak).
PEAK_TFLOPS = {  # device: (bfloat16, tf32, fp32)
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 495.0, 67.0),  # SXM
    "H200": (989.0, 495.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
}


def peak_tflops(device, dtype):
  """(peak TFLOP/s, its name) for this device and compute dtype, or (None, "n/a")."""
  for kind, (bf16, tf32, fp32) in PEAK_TFLOPS.items():
    if kind in device.device_kind:
      if dtype == "bfloat16":
        return bf16, "bf16"
      if jax.config.jax_default_matmul_precision in ("highest", "float32"):
        return fp32, "fp32"
      return tf32, "tf32"
  return None, "n/a"


def xla_flops(compiled):
  """XLA's FLOP count; cost_analysis() returns a dict, or a list of dicts in some versions."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return (cost or {}).get("flops")


def peak_memory_bytes(compiled):
  """Temp + argument + output buffer bytes of the compiled program (None if not reported).

  Donated arguments that alias outputs are counted once (alias_size_in_bytes).
  """
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          - getattr(mem, "alias_size_in_bytes", 0))


def device_memory_budget(memory_gib=None):
  """(bytes, description): a GPU's/TPU's allocator limit, else `memory_gib` (CPU)."""
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"], "the device's bytes_limit"
  if memory_gib is None:
    raise ValueError("On CPU pass --memory_gib: the memory budget that 'fits' is judged against.")
  return int(memory_gib * 2**30), f"--memory_gib={memory_gib:g} (CPU: compiled-size estimate)"


def compile_timed(fn, *args):
  """(compiled, seconds): fn lowered and compiled for args; fn is jitted unless already."""
  start = time.perf_counter()
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_calls(call, warmup, iters):
  """Median seconds of `iters` synchronised calls of call() after `warmup` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def cell(value, width, spec):
  """value right-aligned in width characters by a format spec such as ".1f", or "n/a"."""
  return f"{value:>{width}{spec}}" if value is not None else f"{'n/a':>{width}}"


def load_config(name):
  """configs/<name>.py's config."""
  return importlib.import_module(f"configs.{name}").get_config()


def versions(*extra):
  """'python 3.11.x, jax 0.10.2, ...' for the packages that are installed."""
  names = ("jax", "jaxlib", "flax", "optax") + extra
  found = [f"python {platform.python_version()}"]
  for name in names:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


def device_line():
  d = jax.devices()[0]
  # The cores this process may use (taskset narrows them), not the machine's count.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cpu = f", {cores} CPU cores" if d.platform == "cpu" else ""
  return f"{d.platform}: {d.device_kind} ({jax.device_count()} device(s){cpu})"


class Report:
  """Lines printed as they come and, by save(), appended to benchmarks/HISTORY.md with the
  command line, date, device and software versions."""

  def __init__(self, title, packages=()):
    self.title = title
    self.packages = tuple(packages)
    self.lines = []

  def __call__(self, line=""):
    print(line, flush=True)
    self.lines.append(line)

  def header(self, line):
    """A table's header line and a rule under it."""
    self(line)
    self("-" * len(line))

  def save(self, path=HISTORY_MD):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    head = [f"## {self.title} ({now})", "", f"    {command}", "",
            f"- device: {device_line()}", f"- software: {versions(*self.packages)}"]
    if os.environ.get("XLA_FLAGS"):
      head.append(f"- XLA_FLAGS: {os.environ['XLA_FLAGS']}")
    head += ["", "```"]
    new = not os.path.exists(path)
    with open(path, "a") as f:
      if new:
        f.write("# Benchmark history\n\nAppended by the scripts in benchmarks/; newest last.\n\n")
      f.write("\n".join(head + self.lines + ["```", "", ""]))
    print(f"(appended to {os.path.relpath(path, REPO)})")


# ----------------------------------------------------------------------------- the train step


def bench_config(name, batch, dtype, remat=False):
  """configs/<name>.py for one device: global batch = per-device batch, shard_map mapping."""
  config = load_config(name)
  config.training.batch_size = batch
  config.model.dtype = dtype
  config.model.remat = remat
  config.parallel = "shard_map"
  return config


def step_of(config):
  """The mapped train step (ddpm_jax.train.Parallel) on the first device."""
  return ddpm_train.Parallel(config, ddpm_train.make_train_step(config), devices=jax.devices()[:1])


class Runner:
  """The train step compiled for one config, with its state and a resident batch on device."""

  def __init__(self, config):
    self.config = config
    self.par = step_of(config)
    b, d = config.training.batch_size, config.data
    rng = np.random.default_rng(0)
    self.batch = self.par.put_batch({
        "image": rng.uniform(-1, 1, (b, d.image_size, d.image_size, d.num_channels))
                 .astype(np.float32),
        "label": rng.integers(0, 10, (b,)).astype(np.int32)})
    self.key = jax.random.PRNGKey(1)
    self.state = self.par.put_state(ddpm_train.create_train_state(config, jax.random.PRNGKey(0)))
    self.compiled, self.compile_s = compile_timed(self.par.step, self.state, self.batch, self.key)
    self.flops = xla_flops(self.compiled)
    self.memory = peak_memory_bytes(self.compiled)

  def __call__(self, batch=None):
    """One step (the state is donated and replaced); returns the metrics."""
    self.state, metrics = self.compiled(self.state, self.batch if batch is None else batch,
                                        self.key)
    return metrics
