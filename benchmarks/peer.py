"""Ours against the PyTorch peer a user would pick, in the same run on the same machine:
diffusers' UNet2DModel configured as the DDPM CIFAR-10 network, trained like ours and sampled
with DDPMPipeline's 1000 ancestral steps.

Its environment (torch and diffusers are not in requirements.txt):

    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install -r requirements.txt -r benchmarks/requirements-peer.txt
    /work/venv-bench/bin/python benchmarks/peer.py --batch 8 --sample_batch 1   # 2-core CPU
    /work/venv-bench/bin/python benchmarks/peer.py --batch 128 --sample_batch 256 --torch_compile

(on a GPU, install the CUDA builds: `jax[cuda12]==0.10.2` and torch==2.13.0 from the CUDA index.)

The peer, at its best settings: channels_last, AMP bfloat16 autocast (and float32), eager and,
with --torch_compile, torch.compile; its train step is what a diffusers user writes for DDPM:
DDPMScheduler.add_noise, UNet2DModel, MSE on the noise, backward, clip_grad_norm_(1.0), Adam,
and diffusers' EMAModel (foreach) -- the same work as ours (ddpm_jax.train.make_train_step:
loss, gradients, clipping, Adam, EMA). Both get the same batch size and the same data shapes.

Timing: warm-up first (compilation reported on its own), then --rounds rounds in which every
variant runs --iters steps in turn (ours and the peer interleaved, so load from other processes
hits both alike); a variant's figures are its median and its fastest round (on a shared CPU the
fastest round is the closest to the uncontended speed: PyTorch's OpenMP threads suffer more
than XLA's thread pool when another process takes a core). Sampling: each sampler runs once
untimed, then --sample_rounds interleaved timed runs. The ratios printed are ours / the peer's
img/s: against the peer's best variant, and like for like (float32 vs float32, bf16 vs AMP bf16).

--sections profile: where the train step's time goes, by category (convolution, matmul +
attention, normalisation + elementwise, ...), ours and the peer's side by side, from
jax.profiler and torch.profiler traces (benchmarks/_profile.py). Run it under `taskset -c 0`
to compare single-core work, where each column adds up to the wall time.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _profile  # noqa: E402  (imports nothing heavy)

_profile.enable_cpu_tracing(sys.argv)  # before JAX starts

import jax  # noqa: E402
import numpy as np
import torch
import torch.nn.functional as F

from _common import Report, Runner, bench_config, device_line, time_calls  # noqa: E402
from sample import OurSampler  # noqa: E402
from ddpm_jax import train  # noqa: E402

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The peer's best CPU settings: denormals flushed to zero (Adam's second moments and tiny
# activations otherwise hit the slow denormal path), one thread per core.
torch.set_flush_denormal(True)


def peer_unet(dropout=0.1):
  """UNet2DModel as the DDPM CIFAR-10 network (google/ddpm-cifar10-32's configuration): channels
  128/256/256/256, 2 ResNet blocks per level, one-head attention at 16x16 and in the middle,
  GroupNorm(32, eps 1e-6), the original's sinusoidal embedding, dropout 0.1."""
  return UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
      block_out_channels=(128, 256, 256, 256),
      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      attention_head_dim=None, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False,
      downsample_padding=0, act_fn="silu", dropout=dropout)


def peer_scheduler():
  # fixed_large is our CIFAR-10 config's var_type (the paper's choice for CIFAR-10).
  return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                       variance_type="fixed_large", clip_sample=True)


def sync():
  if TORCH_DEVICE == "cuda":
    torch.cuda.synchronize()


class PeerTrainer:
  """One diffusers-style DDPM train step per call, on a resident batch."""

  def __init__(self, batch, amp, compiled):
    torch.manual_seed(0)
    self.model = peer_unet().to(TORCH_DEVICE, memory_format=torch.channels_last).train()
    self.forward = torch.compile(self.model) if compiled else self.model
    self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    self.ema = EMAModel(self.model.parameters(), decay=0.9999, foreach=True)
    self.sched = peer_scheduler()
    self.amp = amp
    self.x0 = (torch.rand(batch, 3, 32, 32, device=TORCH_DEVICE) * 2 - 1).contiguous(
        memory_format=torch.channels_last)

  def __call__(self):
    noise = torch.randn_like(self.x0)
    t = torch.randint(0, 1000, (self.x0.shape[0],), device=TORCH_DEVICE)
    x_t = self.sched.add_noise(self.x0, noise, t)
    with torch.autocast(TORCH_DEVICE, dtype=torch.bfloat16, enabled=self.amp):
      pred = self.forward(x_t, t).sample
    loss = F.mse_loss(pred.float(), noise)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.ema.step(self.model.parameters())
    sync()
    return loss


class PeerSampler:
  """DDPMPipeline's ancestral sampler, num_steps steps, one batch per call."""

  def __init__(self, batch, amp):
    torch.manual_seed(0)
    unet = peer_unet().to(TORCH_DEVICE, memory_format=torch.channels_last).eval()
    self.pipe = DDPMPipeline(unet=unet, scheduler=peer_scheduler())
    self.pipe.set_progress_bar_config(disable=True)
    self.batch, self.amp = batch, amp

  def __call__(self, num_steps):
    with torch.autocast(TORCH_DEVICE, dtype=torch.bfloat16, enabled=self.amp):
      out = self.pipe(batch_size=self.batch, num_inference_steps=num_steps, output_type="np",
                      generator=torch.Generator(TORCH_DEVICE).manual_seed(0))
    sync()
    return out.images


def seconds(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def count_params(args, report):
  ours = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(
      jax.eval_shape(lambda: train.init_params(bench_config("cifar10", 1, "float32"),
                                               jax.random.PRNGKey(0)))))
  peer = sum(p.numel() for p in peer_unet().parameters())
  report(f"parameters: ours {ours:,}, diffusers UNet2DModel {peer:,} (difference {peer - ours:+,})")


def section_train(args, report):
  """Interleaved train steps of every variant; returns {name: img/s}."""
  variants = {"ours float32": lambda: Runner(bench_config("cifar10", args.batch, "float32")),
              "ours bfloat16": lambda: Runner(bench_config("cifar10", args.batch, "bfloat16")),
              "peer fp32 eager": lambda: PeerTrainer(args.batch, False, False),
              "peer AMP bf16 eager": lambda: PeerTrainer(args.batch, True, False)}
  if args.torch_compile:
    variants["peer fp32 compile"] = lambda: PeerTrainer(args.batch, False, True)
    variants["peer AMP bf16 compile"] = lambda: PeerTrainer(args.batch, True, True)
  report(f"Train step, CIFAR-10 model, batch {args.batch} (peer: channels_last), "
         f"{args.rounds} interleaved rounds of {args.iters} steps after {args.warmup} warm-up")
  runs, first = {}, {}
  for name, make in variants.items():
    start = time.perf_counter()
    try:
      runs[name] = make()
      for _ in range(max(1, args.warmup)):  # the first call compiles (jit / torch.compile)
        jax.block_until_ready(runs[name]())
    except Exception as e:  # pylint: disable=broad-except  (torch.compile may fail on a CPU)
      report(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
      runs.pop(name, None)
      continue
    first[name] = time.perf_counter() - start
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      times[name].append(time_calls(run, 0, args.iters))
  report_times(report, "train", "set-up+warm-up s", first, times, args.batch)


def section_sample(args, report):
  report(f"Ancestral sampling, {args.sample_steps} steps, batch {args.sample_batch}: ours "
         f"ddpm_jax.sample (one lax.scan) vs DDPMPipeline (channels_last), "
         f"{args.sample_rounds} interleaved rounds after one untimed call each")
  ours = {f"ours {d}": OurSampler("cifar10", d, args.sample_batch)
          for d in args.sample_dtypes.split(",")}
  calls = {name: (lambda o=o: o("ancestral", args.sample_steps)) for name, o in ours.items()}
  peers = {"peer fp32 eager": False, "peer AMP bf16 eager": True}
  for name, amp in peers.items():
    if ("bf16" in name) == ("bfloat16" in args.sample_dtypes) or "fp32" in name:
      p = PeerSampler(args.sample_batch, amp)
      calls[name] = lambda p=p: p(args.sample_steps)
  first = {name: seconds(call) for name, call in calls.items()}
  times = {name: [] for name in calls}
  for _ in range(args.sample_rounds):
    for name, call in calls.items():
      times[name].append(seconds(call))
  report_times(report, "sampling", "first call s", first, times, args.sample_batch)


def section_profile(args, report):
  """The train step's time by category (benchmarks/_profile.py): ours float32 and bfloat16
  against the peer's fp32 and AMP bf16 eager steps, each over --iters traced steps."""
  report(f"Where the train step's time goes, CIFAR-10 model, batch {args.batch}: ms per step by "
         f"category, summed over the ops that ran (see benchmarks/_profile.py), {args.iters} "
         f"traced steps after warm-up")
  columns = {}
  for dtype in ("float32", "bfloat16"):
    run = Runner(bench_config("cifar10", args.batch, dtype))
    columns[f"ours {dtype}"] = _profile.xla_profile(run, run.compiled, args.iters)
    del run
  for name, amp in (("peer fp32", False), ("peer AMP bf16", True)):
    columns[name] = _profile.torch_profile(PeerTrainer(args.batch, amp, False), args.iters,
                                           cuda=TORCH_DEVICE == "cuda")
  _profile.report_profiles(report, columns)


def report_times(report, what, first_label, first, times, batch):
  """A row per variant (its first call, median and fastest round; seconds per call of `batch`
  images), then ours / the peer's img/s from the medians and from the fastest rounds."""
  report(f"{'variant':<24} {first_label:>16} {'median s':>9} {'img/s':>8} {'best s':>9} "
         f"{'img/s':>8}")
  speed, best = {}, {}
  for name, ts in times.items():
    run, fastest = statistics.median(ts), min(ts)
    speed[name], best[name] = batch / run, batch / fastest
    report(f"{name:<24} {first[name]:>16.1f} {run:>9.3f} {speed[name]:>8.3f} {fastest:>9.3f} "
           f"{best[name]:>8.3f}")
  report_ratios(report, f"{what} (medians)", speed)
  report_ratios(report, f"{what} (best rounds)", best)


def report_ratios(report, what, speed):
  """Ours over the peer's best variant, and like for like."""
  ours = {k: v for k, v in speed.items() if k.startswith("ours")}
  peer = {k: v for k, v in speed.items() if k.startswith("peer")}
  if not ours or not peer:
    return
  best_ours, best_peer = max(ours, key=ours.get), max(peer, key=peer.get)
  report(f"{what}: ours best ({best_ours}) / peer best ({best_peer}) = "
         f"{ours[best_ours] / peer[best_peer]:.2f}x")
  for mine, theirs in (("float32", "fp32"), ("bfloat16", "bf16")):
    a = [k for k in ours if mine in k]
    b = [k for k in peer if theirs in k]
    if a and b:
      bb = max(b, key=peer.get)
      report(f"{what}: {a[0]} / {bb} = {ours[a[0]] / peer[bb]:.2f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sections", default="params,train,sample",
                      help="any of params,train,sample,profile")
  parser.add_argument("--batch", type=int, default=128, help="train batch (one device)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--torch_compile", action="store_true",
                      help="also time the peer under torch.compile (minutes on a CPU)")
  parser.add_argument("--sample_batch", type=int, default=256)
  parser.add_argument("--sample_steps", type=int, default=1000)
  parser.add_argument("--sample_rounds", type=int, default=1)
  parser.add_argument("--sample_dtypes", default="float32,bfloat16")
  args = parser.parse_args()

  import diffusers  # noqa: E402
  report = Report("Ours vs the PyTorch peer (diffusers)", packages=("torch", "diffusers"))
  report(f"device: {device_line()}; torch {torch.__version__} on {TORCH_DEVICE} "
         f"({torch.get_num_threads()} threads), diffusers {diffusers.__version__}")
  sections = args.sections.split(",")
  if "params" in sections:
    count_params(args, report)
  if "train" in sections:
    section_train(args, report)
  if "sample" in sections:
    section_sample(args, report)
  if "profile" in sections:
    section_profile(args, report)
  report.save()


if __name__ == "__main__":
  main()
