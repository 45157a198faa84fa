"""Training speed of the DDPM U-Net: img/s, MFU, peak memory, the largest batch that fits, the
per-example vmap's cost, and the end-to-end loop with its input pipeline.

    # GPU (one device is used; batches are per device):
    python benchmarks/train.py --batches 128,max --sections step,fit,remat,vmap,loop
    # this 2-core CPU: small batches, "fits" judged against --memory_gib by compiled sizes
    python benchmarks/train.py --batches 8 --memory_gib 16 --iters 3

Sections (--sections):
  step   the real train step (ddpm_jax.train.make_train_step under Parallel, shard_map on one
         device: loss, gradients, clipping, Adam, EMA, metrics) for each --dtypes and --batches:
         compile time, median step time, img/s, XLA's GFLOP/step, TFLOP/s, MFU (FLOPs / (step
         time x the device's dense peak)), peak memory (compiled temp + arguments + outputs).
         "max" in --batches is the largest per-device batch <= --max_batch that fits.
  fit    that largest batch for --config (default cifar10), per dtype.
  remat  the largest batch of --remat_config (default celebahq, 256x256) without and with
         rematerialisation (config.model.remat), with XLA's GFLOP per example.
  vmap   the train step runs the U-Net once per example under jax.vmap (per-example dropout
         masks, so 1 device == 8 devices); this times loss+gradient that way against one
         batched apply, interleaved, and prints the ratio.
  loop   the end-to-end loop: the tf.data input pipeline (tfds' mock CIFAR-10 through
         ddpm_jax.data), device prefetch and the step, with metrics fetched every --log_every
         steps, against the same loop on a resident batch (interleaved), and the pipeline's
         own img/s.
  profile the step's time by category (convolution, matmul + attention, normalisation +
         elementwise, reductions, layout, random numbers, collectives), per dtype, at the first
         of --batches, from a jax.profiler trace of --iters steps (benchmarks/_profile.py);
         benchmarks/peer.py --sections profile puts the peer's beside it.

"Fits": the compiled program's memory_analysis() (temp + arguments + outputs - donated aliases)
<= the device's bytes_limit (GPU/TPU) or --memory_gib (CPU, where it is an estimate of the
compiled size, never probed by allocating; a run of only fit/remat compiles with XLA:CPU's
memory-minimising scheduler, see below). The search compiles without allocating: two sizes
give a linear fit, then the predicted batch and the one after it are compiled to confirm.
"""
import argparse
import os
import sys
import time


def _memory_scheduler_for_fit_sections(argv):
  """Before JAX starts: a run of only the fit/remat sections compiles with XLA:CPU's
  memory-minimising scheduler. The CPU default (the concurrency-optimised scheduler) trades
  memory for parallelism and schedules rematerialised recomputation early, which hides what
  remat saves (measured on celebahq, bf16, batch 5: 15.44 GiB without remat, 15.51 with, vs
  12.47 and 9.96 GiB with this flag). GPUs use their own memory-aware scheduler; the flag is
  ignored there."""
  sections = next((a.split("=", 1)[1] for a in argv if a.startswith("--sections=")), None)
  if sections is None and "--sections" in argv[:-1]:
    sections = argv[argv.index("--sections") + 1]
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  if sections and set(sections.split(",")) <= {"fit", "remat"}:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


_memory_scheduler_for_fit_sections(sys.argv)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _profile  # noqa: E402  (imports nothing heavy)

_profile.enable_cpu_tracing(sys.argv)

import jax  # noqa: E402  (after XLA_FLAGS is final)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import (GIB, Report, Runner, bench_config, cell, device_line,  # noqa: E402
                     device_memory_budget, load_config, peak_memory_bytes, peak_tflops, step_of, time_calls,
                     xla_flops)
from ddpm_jax import diffusion, train  # noqa: E402  (_common makes the repository importable)
from ddpm_jax.unet import UNet  # noqa: E402

def abstract_inputs(config):
  """(state, batch, key) as shapes only, to compile without allocating."""
  b, d = config.training.batch_size, config.data
  state = jax.eval_shape(lambda: train.create_train_state(config, jax.random.PRNGKey(0)))
  batch = {"image": jax.ShapeDtypeStruct((b, d.image_size, d.image_size, d.num_channels),
                                         jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
  return state, batch, jax.random.PRNGKey(1)


def compiled_size(config):
  """(peak bytes, FLOPs) of the compiled train step for config's batch, nothing allocated."""
  compiled = step_of(config).step.lower(*abstract_inputs(config)).compile()
  return peak_memory_bytes(compiled), xla_flops(compiled)


def largest_batch(name, dtype, remat, budget, limit):
  """(batch, its peak bytes, FLOPs per example, the compiled sizes tried) for the largest
  per-device batch <= limit whose compiled train step needs <= budget bytes (None if not even 1).

  The answer is exact to a granularity g (about 3% of it): `batch` fits and batch + g does not.
  Each probe compiles once (no allocation): the linear guess from batches 8 and 32, then
  interpolation between the closest fitting and failing batches, each followed by its neighbour.
  """
  tried = {}

  def fits(b):
    if b not in tried:
      tried[b] = compiled_size(bench_config(name, b, dtype, remat))
    return tried[b][0] <= budget

  lo, hi = 0, limit + 1  # lo fits (0 trivially), hi does not
  for b in (8, 32):  # memory is close to linear in the batch: bytes = a + c * b ...
    lo, hi = (max(lo, b), hi) if fits(b) else (lo, min(hi, b))
  c = (tried[32][0] - tried[8][0]) / 24
  guess = int((budget - (tried[8][0] - 8 * c)) // c) if c > 0 else limit
  g = max(1, min(limit, guess) // 32)
  probes = [guess]  # ... so the linear guess, then its neighbour, usually settle it
  while hi - lo > g:
    interpolated = not probes
    if probes:
      b = probes.pop()
    elif lo and hi <= limit:  # not quite linear: interpolate between the closest sizes known
      b = lo + int((budget - tried[lo][0]) * (hi - lo) / (tried[hi][0] - tried[lo][0]))
    else:
      b = (lo + hi) // 2
    b = min(max(b, lo + 1), hi - 1)
    if fits(b):
      lo = b
    else:
      hi = b
    if interpolated or len(tried) == 3:  # after a guess, check the batch g beyond it
      probes = [b + g] if lo == b else [b - g]
  if lo == 0:
    return None, None, None, tried
  return lo, tried[lo][0], tried[lo][1] / lo, tried


def section_step(args, report, budget):
  device = jax.devices()[0]
  header = (f"{'dtype':<9} {'batch':>5} {'compile s':>9} {'step ms':>9} {'img/s':>8} "
            f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'peak':>9} {'MFU':>6} {'memory GiB':>10}")
  report(f"Train step of configs/{args.config}.py on one device (per-device batch), median of "
         f"{args.iters} after {args.warmup} warm-up steps")
  report.header(header)
  for dtype in args.dtypes.split(","):
    peak, peak_name = peak_tflops(device, dtype)
    for b in args.batches.split(","):
      if b == "max":
        b = largest_batch(args.config, dtype, False, budget[0], args.max_batch)[0]
        if b is None:
          report(f"{dtype:<9} no batch fits in {budget[1]}")
          continue
      run = Runner(bench_config(args.config, int(b), dtype))
      seconds = time_calls(run, args.warmup, args.iters)
      tflops = run.flops / seconds / 1e12 if run.flops else None
      report(" ".join([
          f"{dtype:<9}", f"{int(b):>5}", f"{run.compile_s:>9.1f}", f"{seconds * 1e3:>9.1f}",
          f"{int(b) / seconds:>8.1f}", cell(run.flops and run.flops / 1e9, 10, ".1f"),
          cell(tflops, 8, ".2f"), f"{f'{peak:.0f} {peak_name}' if peak else 'n/a':>9}",
          cell(tflops / peak if tflops and peak else None, 6, ".1%"),
          cell(run.memory and run.memory / GIB, 10, ".2f")]))
      del run
  report("GFLOP/step: XLA's count for the step (forward, backward, optimiser, EMA). memory: the "
         "compiled program's temp + arguments + outputs - donated aliases. MFU: achieved "
         "TFLOP/s over the dense peak named (float32 runs on TF32 tensor cores under JAX's "
         "default matmul precision).")


def report_fits(report, name, budget, limit, settings):
  """One row per (dtype, remat) in settings: the largest batch that fits."""
  report(f"Largest per-device batch <= {limit} of configs/{name}.py whose train step fits in "
         f"{budget[1]} ({budget[0] / GIB:.1f} GiB)")
  header = (f"{'dtype':<9} {'remat':<5} {'batch':>5} {'memory GiB':>10} {'GFLOP/img':>9}  "
            "compiled sizes tried (batch: GiB)")
  report.header(header)
  for dtype, remat in settings:
    start = time.perf_counter()
    b, peak, flops_per_img, tried = largest_batch(name, dtype, remat, budget[0], limit)
    sizes = ", ".join(f"{k}: {v[0] / GIB:.2f}" for k, v in sorted(tried.items()))
    report(f"{dtype:<9} {str(remat):<5} {cell(b, 5, 'd')} {cell(peak and peak / GIB, 10, '.2f')} "
           f"{cell(flops_per_img and flops_per_img / 1e9, 9, '.1f')}  {sizes} "
           f"({time.perf_counter() - start:.0f} s of compiling)")


def section_fit(args, report, budget):
  report_fits(report, args.config, budget, args.max_batch,
              [(dtype, False) for dtype in args.dtypes.split(",")])


def section_remat(args, report, budget):
  report_fits(report, args.remat_config, budget, args.max_batch,
              [(dtype, remat) for dtype in args.dtypes.split(",") for remat in (False, True)])


def section_vmap(args, report, _):
  """Loss+gradient with the U-Net vmapped per example (as the train step) vs one batched apply."""
  b = int(args.batches.split(",")[0])
  report(f"Per-example vmap (the train step's way: each example's own dropout key) vs one "
         f"batched apply: loss + gradient of configs/{args.config}.py at batch {b}, interleaved "
         f"rounds of {args.iters} calls")
  report(f"{'dtype':<9} {'vmap ms':>9} {'batched ms':>10} {'vmap/batched':>12}")
  for dtype in args.dtypes.split(","):
    config = bench_config(args.config, b, dtype)
    model = UNet(**config.model)
    sched = diffusion_schedule(config)
    d = config.data
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (b, d.image_size, d.image_size, d.num_channels)),
                     jnp.float32)
    t = jnp.asarray(rng.integers(0, sched.num_timesteps, (b,)), jnp.int32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(2), b)
    params = train.init_params(config, jax.random.PRNGKey(0))

    def per_example(p, x, tt):
      one = lambda xi, ti, k: model.apply({"params": p}, xi[None], ti[None], train=True,
                                          rngs={"dropout": k})[0]
      return jax.vmap(one)(x, tt, keys)

    def batched(p, x, tt):
      return model.apply({"params": p}, x, tt, train=True, rngs={"dropout": keys[0]})

    def grad_of(apply):
      loss = lambda p: diffusion.training_losses(sched, lambda x, tt: apply(p, x, tt), x0, t,
                                                 noise).mean()
      return jax.jit(jax.value_and_grad(loss))

    fns = [grad_of(per_example), grad_of(batched)]
    for fn in fns:
      jax.block_until_ready(fn(params))  # compile + warm-up
    times = [[], []]
    for _ in range(args.rounds):
      for i, fn in enumerate(fns):
        times[i].append(time_calls(lambda: fn(params), 0, args.iters))
    v, bt = (float(np.median(ts)) for ts in times)
    report(f"{dtype:<9} {v * 1e3:>9.1f} {bt * 1e3:>10.1f} {v / bt:>12.3f}")


def section_profile(args, report, budget):
  """The train step's time by category (benchmarks/_profile.py), per dtype, at the first of
  --batches ("max": the largest that fits)."""
  columns = {}
  for dtype in args.dtypes.split(","):
    b = args.batches.split(",")[0]
    b = largest_batch(args.config, dtype, False, budget[0], args.max_batch)[0] if b == "max" else b
    if b is None:
      report(f"{dtype}: no batch fits in {budget[1]}")
      continue
    run = Runner(bench_config(args.config, int(b), dtype))
    columns[f"{dtype} batch {b}"] = _profile.xla_profile(run, run.compiled, args.iters)
    del run
  report(f"Where the train step of configs/{args.config}.py spends its time: ms per step by "
         f"category, summed over the ops that ran (see benchmarks/_profile.py), {args.iters} "
         f"traced steps after warm-up")
  _profile.report_profiles(report, columns)


def diffusion_schedule(config):
  from ddpm_jax import settings  # noqa: E402  (the schedule of config.diffusion)
  return settings.Settings.from_config(config).diffusion.make_schedule()


def section_loop(args, report, _):
  """The loop's own path: ddpm_jax.data's tf.data pipeline (on tfds' mock records),
  train._device_batches' prefetch, the step, metrics read every --log_every steps; against the
  same loop on one resident batch, interleaved in --rounds rounds."""
  import tensorflow_datasets as tfds  # noqa: E402
  from ddpm_jax import data  # noqa: E402

  b = int(args.batches.split(",")[0])
  n = args.loop_steps
  report(f"End-to-end loop of configs/{args.config}.py at batch {b}: {args.rounds} interleaved "
         f"rounds of {n} steps with data and {n} on a resident batch, after {args.warmup} "
         f"warm-up steps; metrics fetched every {args.log_every} steps; data: "
         f"{load_config(args.config).data.dataset} through ddpm_jax.data (tfds datasets: "
         "tfds.testing.mock_data's random records; decode, flip, batch)")
  report(f"{'dtype':<9} {'pipeline img/s':>14} {'loop img/s':>10} {'resident img/s':>14} "
         f"{'loop/resident':>13}")
  for dtype in args.dtypes.split(","):
    run = Runner(bench_config(args.config, b, dtype))
    with tfds.testing.mock_data(num_examples=max(1024, 4 * b)):
      host = data.create_input_iter(run.config, split="train", per_host_batch_size=b, seed=0)
      start = time.perf_counter()
      for _ in range(n):
        next(host)
      pipeline_s = time.perf_counter() - start
      batches = train._device_batches(host, run.par)  # pylint: disable=protected-access

      def loop(steps, with_data):
        start = time.perf_counter()
        for i in range(1, steps + 1):
          metrics = run(next(batches) if with_data else None)
          if i % args.log_every == 0 or i == steps:
            run.par.get(metrics)  # a host sync, as the loop's logging does
        jax.block_until_ready(run.state)
        return time.perf_counter() - start

      loop(args.warmup, True)
      times = {True: [], False: []}
      for _ in range(args.rounds):
        for with_data in (True, False):
          times[with_data].append(loop(n, with_data))
    loop_s, resident_s = (float(np.median(times[k])) for k in (True, False))
    report(f"{dtype:<9} {n * b / pipeline_s:>14.1f} {n * b / loop_s:>10.2f} "
           f"{n * b / resident_s:>14.2f} {resident_s / loop_s:>13.3f}")


SECTIONS = {"step": section_step, "fit": section_fit, "remat": section_remat,
            "vmap": section_vmap, "loop": section_loop, "profile": section_profile}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sections", default="step,fit,remat,vmap,loop")
  parser.add_argument("--config", default="cifar10", help="a module name under configs/")
  parser.add_argument("--remat_config", default="celebahq")
  parser.add_argument("--batches", default="128,max", help="per-device batches; 'max' = fits")
  parser.add_argument("--max_batch", type=int, default=512)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--memory_gib", type=float, default=None,
                      help="CPU only: the memory budget for 'fits' (GPU/TPU use bytes_limit)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3, help="vmap, loop: interleaved timing rounds")
  parser.add_argument("--loop_steps", type=int, default=20)
  parser.add_argument("--log_every", type=int, default=10)
  args = parser.parse_args()

  sections = args.sections.split(",")
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
  needs_budget = {"fit", "remat"} & set(sections) or "max" in args.batches.split(",")
  budget = device_memory_budget(args.memory_gib) if needs_budget else None
  report = Report("Training: " + ", ".join(sections), packages=("tensorflow-datasets",))
  report(f"device: {device_line()}")
  for name in sections:
    report()
    SECTIONS[name](args, report, budget)
  report.save()


if __name__ == "__main__":
  main()
