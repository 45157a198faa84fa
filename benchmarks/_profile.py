"""Where a compiled step's time goes, by category, for ours (XLA) and for the peer (PyTorch).

Ours: a jax.profiler trace of `n` calls; each traced event is matched to the HLO instruction of
the compiled program it ran (by event name on CPU, where XLA's thunks emit one event each when
XLA_FLAGS has --xla_cpu_enable_xprof_traceme=true; by the event's `hlo_op` stat on GPU, an
untested path so far: no GPU was available when this was written). The instruction, or for a fusion
the computation it calls, decides the category. The peer: torch.profiler's self time per aten
op, mapped to the same categories by op name.

The sums are per call and over all the threads (CPU) or streams that ran an op, so on a
multi-core CPU they add up to more than the wall time when ops run side by side; the rows are
comparable between the two, the totals are the work done. `taskset -c 0` gives one core and
times that add up to the wall time.

Import this module before JAX only through `enable_cpu_tracing` (it imports nothing heavy).
"""
import collections
import glob
import os
import re
import tempfile
import time

CATEGORIES = ("convolution", "matmul + attention", "normalisation + elementwise", "reductions",
              "layout (transpose, copy)", "random numbers", "collectives", "other")
TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def enable_cpu_tracing(argv):
  """Before JAX starts, if --sections asks for "profile": XLA:CPU emits one trace event per
  thunk only with this flag (it costs nothing measurable otherwise, but other sections run
  without it so that their XLA_FLAGS line stays as it was)."""
  sections = next((a.split("=", 1)[1] for a in argv if a.startswith("--sections=")), "")
  if not sections and "--sections" in argv[:-1]:
    sections = argv[argv.index("--sections") + 1]
  if "profile" in sections.split(","):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACEME_FLAG}".strip()


# ----------------------------------------------------------------------------- ours (XLA)

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
# Ops whose own events enclose their children's: counting both would count twice.
_CONTAINERS = {"while", "call", "conditional", "async-start", "async-done"}
_LAYOUT_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape"}


def parse_hlo(text):
  """{instruction name: (opcode, result shape, text of the computation it calls or "")}."""
  computations, current = {}, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      current = m.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  instructions = {}
  for lines in computations.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        calls = _CALLS.search(line)
        body = "\n".join(computations.get(calls.group(1), [])) if calls else ""
        instructions[m.group(1)] = (m.group(3), m.group(2), body or line)
  return instructions


def hlo_category(opcode, shape, body):
  """The category of one HLO instruction (a fusion by what its computation holds)."""
  if opcode in ("convolution",) or " convolution(" in body or "cudnn$conv" in body:
    return "convolution"
  if opcode == "dot" or " dot(" in body or "cudnn$fmha" in body or "__cublas" in body:
    return "matmul + attention"
  if opcode in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all") or "all-reduce" in opcode:
    return "collectives"
  if shape.startswith("u32") or ("shift-right-logical" in body and "u32[" in body):
    return "random numbers"  # threefry: dropout masks, noise, timesteps
  inner = {m.group(3) for m in map(_INSTRUCTION.match, body.splitlines()) if m}
  if opcode in ("copy", "transpose") or (opcode == "fusion" and inner <= _LAYOUT_OPS):
    return "layout (transpose, copy)"
  if opcode == "reduce" or " reduce(" in body:
    return "reductions"
  if opcode in ("fusion", "add", "multiply", "subtract", "divide", "select", "convert",
                "exponential", "rsqrt", "maximum", "minimum", "negate", "compare", "tanh",
                "logistic", "log", "sqrt", "power", "clamp", "pad", "concatenate", "slice",
                "dynamic-slice", "dynamic-update-slice", "broadcast", "iota", "reshape"):
    return "normalisation + elementwise"
  return "other"


def xla_profile(call, compiled, n):
  """({category: ms per call}, wall ms per call) from a trace of n synchronised calls of
  call(); compiled: the jax compiled executable those calls run (its HLO names the events)."""
  import jax  # pylint: disable=import-outside-toplevel  (after enable_cpu_tracing)
  text = compiled.as_text()
  instructions = parse_hlo(text)
  module = re.match(r"HloModule (\S+?),?\s", text)
  module = module.group(1) if module else None
  with tempfile.TemporaryDirectory() as logdir:
    jax.block_until_ready(call())
    jax.profiler.start_trace(logdir)
    start = time.perf_counter()
    for _ in range(n):
      jax.block_until_ready(call())
    wall = (time.perf_counter() - start) / n
    jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    data = jax.profiler.ProfileData.from_file(files[-1])
    totals = collections.Counter()
    matched = 0
    # On a GPU/TPU the ops' time is on the device planes; the host's launch events for the same
    # ops are not counted again.
    planes = [p for p in data.planes if p.name.startswith("/device:")] or list(data.planes)
    for plane in planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          name = stats.get("hlo_op", event.name)
          if name not in instructions or stats.get("hlo_module", module) != module:
            continue  # another program's op (instruction names repeat across programs)
          opcode, shape, body = instructions[name]
          if opcode in _CONTAINERS:
            continue
          totals[hlo_category(opcode, shape, body)] += event.duration_ns
          matched += 1
  if not matched:
    raise RuntimeError("No trace event matched the compiled program; on CPU XLA_FLAGS needs "
                       f"{TRACEME_FLAG} before JAX starts.")
  return {k: v / 1e6 / n for k, v in totals.items()}, wall * 1e3


# ----------------------------------------------------------------------------- the peer (torch)

_TORCH_RULES = (  # (category, substrings of aten op names), first match wins
    ("convolution", ("conv",)),
    ("matmul + attention", ("mm", "matmul", "linear", "dot_product", "attention", "baddbmm")),
    ("random numbers", ("bernoulli", "rand", "normal_", "dropout")),
    ("layout (transpose, copy)", ("copy", "clone", "contiguous", "permute", "transpose",
                                  "to_copy", "_to_dense", "cat", "empty_like")),
    ("reductions", ("sum", "mean", "norm(", "vector_norm", "mse_loss")),
)


def torch_category(name):
  lower = name.lower()
  if "group_norm" in lower or "layer_norm" in lower or "batch_norm" in lower:
    return "normalisation + elementwise"
  for category, keys in _TORCH_RULES:
    if any(k in lower for k in keys):
      return category
  if lower.startswith("aten::") or lower.startswith("optimizer"):
    return "normalisation + elementwise"
  return "other"


def torch_profile(call, n, cuda=False):
  """({category: ms per call}, wall ms per call) from torch.profiler's self time per op over
  n calls of call() (which synchronises)."""
  import torch  # pylint: disable=import-outside-toplevel  (only peer.py has it)
  call()
  activities = [torch.profiler.ProfilerActivity.CPU]
  if cuda:
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities) as prof:
    start = time.perf_counter()
    for _ in range(n):
      call()
    wall = (time.perf_counter() - start) / n
  totals = collections.Counter()
  for row in prof.key_averages():
    us = row.self_device_time_total if cuda else row.self_cpu_time_total
    if us and not row.key.startswith(("ProfilerStep", "Optimizer.step", "Optimizer.zero_grad")):
      totals[torch_category(row.key)] += us
  return {k: v / 1e3 / n for k, v in totals.items()}, wall * 1e3


def report_profiles(report, columns):
  """A table: one row per category, one column per {name: (per-category ms, wall ms)}."""
  names = list(columns)
  report(f"{'ms per step, by category':<30} " + " ".join(f"{n:>20}" for n in names))
  report("-" * (31 + 21 * len(names)))
  for category in CATEGORIES:
    if any(columns[n][0].get(category) for n in names):
      report(f"{category:<30} " + " ".join(
          f"{columns[n][0].get(category, 0.0):>20.1f}" for n in names))
  report(f"{'sum of the rows':<30} " + " ".join(
      f"{sum(columns[n][0].values()):>20.1f}" for n in names))
  report(f"{'wall time per step':<30} " + " ".join(f"{columns[n][1]:>20.1f}" for n in names))
