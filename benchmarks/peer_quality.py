"""Ours against lucidrains' denoising-diffusion-pytorch (LDP) at an equal budget, on digits:
sample quality (a Fréchet distance, benchmarks/digits_frechet.py) and CPU speed.

Two processes, one per environment: this script runs in the project's environment and drives
a worker, itself under the peer's environment (benchmarks/requirements-peer.txt; LDP imports
torchvision, for which a CPU-only machine needs a stand-in on PYTHONPATH, see BENCHMARKS.md),
over JSON lines on its stdin/stdout; they exchange .npz files (the data and the samples).

    python benchmarks/peer_quality.py --peer_python venv-peer/bin/python \\
        [--peer_pythonpath path/to/torchvision-shim] [--sizes 8,32] [--steps 1000]
    python benchmarks/peer_quality.py --peer_python ... --sections speed   # timing only, quick
    python benchmarks/peer_quality.py --no_peer --sequential --sizes 8 --steps 300 \\
        --variants "eps:diffusion.mean_type=eps;v:diffusion.mean_type=v"    # ablations of ours

On a loaded machine add --peer_threads 1: torch's OpenMP threads spin-wait for each other and
slow LDP down several times over when other processes hold the cores.

What each side gets (sizes 8: scikit-learn's 8x8 digits; 32: the same digits upsampled
bilinearly to 32x32, so the models have three levels and attention):
- the same 1,500 train digits, the same batch size, number of steps and learning rate; the
  batches are drawn by each side's own seeded generator (with replacement of epochs);
- models of matched FLOPs, printed (ours: XLA's cost analysis of the forward pass; LDP: torch's
  FlopCounterMode), ours from configs/<--config>.py (ch_mult (1, 2, 2) with attention at 8 for
  32x32), LDP's `Unet(dim=--peer_dim, dim_mults=(1, 2) or (1, 2, 2))`;
- each side's own recipe otherwise. LDP: what its Trainer does by default (v-prediction with
  its SNR weighting, its sigmoid schedule, no dropout, Adam betas (0.9, 0.99), gradient
  clipping 1.0, no lr warm-up, ema-pytorch's EMA 0.995 every 10 steps with its warm-up). Ours:
  the config's recipe (--variants adds overrides, one trained model per variant);
- the same sampler: DDIM, --ddim_steps steps, eta 0, x0 clipped, --samples samples, each
  side's EMA weights; scored against the train digits' features, with the 297 held-out
  digits' own distance as the floor.

Timings (s/step, training img/s, sampling img/s): training runs in chunks of --chunk steps,
ours and LDP taking turns, so that load from other processes hits both alike; sampling too.
--sections speed times only the train step (--speed_rounds rounds of --speed_steps steps,
taking turns), after a warm-up, and prints the ratio ours / LDP. --sections profile splits
both train steps into categories (convolution, elementwise, ...; benchmarks/_profile.py); run it
under `taskset -c 0` with --cpu_devices 1 --peer_threads 1 for sums that add up to the wall time.

Ours trains as main.py would on this machine: on the CPU, data-parallel over --cpu_devices
XLA devices (config.cpu_devices; 0, the default, picks the count as main.py does).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _profile  # noqa: E402  (imports nothing heavy)
import digits_frechet  # noqa: E402  (NumPy, SciPy, scikit-learn only: both environments)

if __name__ == "__main__" and "--worker" not in sys.argv:
  _profile.enable_cpu_tracing(sys.argv)  # before JAX starts


def data_npz(size, directory):
  """The train split at size x size as uint8 [N, S, S, 1] in an .npz; its path."""
  images, labels = digits_frechet.digits_uint8()
  train, _, _, _ = digits_frechet.split(images, labels)
  if size != 8:
    train = digits_frechet.upsample(train, size)
  path = os.path.join(directory, f"digits{size}.npz")
  np.savez(path, images=train)
  return path


def batches(images, batch, seed):
  """An endless stream of float32 [batch, S, S, 1] in [-1, 1]: epochs of a seeded shuffle."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch + 1, batch):
      yield images[order[start:start + batch]].astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- LDP's worker


class PeerModel:
  """LDP's Unet + GaussianDiffusion, trained as its Trainer does (worker side, torch)."""

  def __init__(self, size, dim, batch, lr, seed, data, timesteps, threads):
    import torch
    if threads:
      torch.set_num_threads(threads)
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    self.torch = torch
    mults = (1, 2) if size == 8 else (1, 2, 2)
    unet = Unet(dim=dim, dim_mults=mults, channels=1)
    self.diffusion = GaussianDiffusion(unet, image_size=size, timesteps=timesteps)
    self.opt = torch.optim.Adam(self.diffusion.parameters(), lr=lr, betas=(0.9, 0.99))
    self.ema = EMA(self.diffusion, beta=0.995, update_every=10)
    images = np.load(data)["images"]
    # LDP's data are [0, 1] NCHW; its GaussianDiffusion normalises them to [-1, 1].
    self.stream = ((torch.from_numpy(b).permute(0, 3, 1, 2) + 1) / 2
                   for b in batches(images, batch, seed))
    self.batch, self.size = batch, size

  def describe(self):
    from torch.utils.flop_counter import FlopCounterMode
    torch = self.torch
    unet = self.diffusion.model
    x = torch.zeros(self.batch, 1, self.size, self.size)
    t = torch.zeros(self.batch, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
      unet(x, t)
    return {"params": sum(p.numel() for p in unet.parameters()),
            "gflop": counter.get_total_flops() / 1e9, "threads": torch.get_num_threads(),
            "version": __import__("importlib").metadata.version("denoising-diffusion-pytorch")}

  def train(self, steps):
    torch, loss = self.torch, None
    self.diffusion.train()
    start = time.perf_counter()
    for _ in range(steps):
      loss = self.diffusion(next(self.stream))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
      self.opt.step()
      self.opt.zero_grad()
      self.ema.update()
    return {"seconds": time.perf_counter() - start, "loss": loss.item()}

  def profile(self, n):
    """The train step's time by category over n traced steps (benchmarks/_profile.py)."""
    return _profile.torch_profile(lambda: self.train(1), n)

  def sample(self, n, ddim_steps, batch, out, timed=True):
    torch = self.torch
    model = self.ema.ema_model
    model.eval()
    model.sampling_timesteps, model.is_ddim_sampling = ddim_steps, True  # eta 0 by default
    model.ddim_sampling_eta = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
      parts = [model.sample(batch_size=min(batch, n - i)) for i in range(0, n, batch)]
    seconds = time.perf_counter() - start
    images = torch.cat(parts).permute(0, 2, 3, 1).numpy()  # [0, 1]
    np.savez(out, images=np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
    return {"seconds": seconds}


def worker():
  """Reads one JSON command a line, answers one JSON line; stdout carries nothing else."""
  os.environ.setdefault("TQDM_DISABLE", "1")
  out, model = sys.stdout, None
  sys.stdout = sys.stderr  # anything a library prints goes to stderr
  for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    if op == "quit":
      break
    if op == "setup":
      model = PeerModel(**cmd)
      answer = model.describe()
    else:
      answer = getattr(model, op)(**cmd)
    out.write(json.dumps(answer) + "\n")
    out.flush()


class Peer:
  """The worker process, driven from the project's side."""

  def __init__(self, python, pythonpath):
    env = dict(os.environ, TQDM_DISABLE="1")
    if pythonpath:
      env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def __call__(self, op, **kw):
    self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"The peer's worker exited (status {self.proc.wait()}); see stderr.")
    return json.loads(line)

  def close(self):
    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
    self.proc.stdin.close()
    self.proc.wait()


# ----------------------------------------------------------------------------- ours


def parse_overrides(text):
  """"a.b=1,c.d=v" -> {"a.b": 1, "c.d": "v"} (values as Python literals where they parse)."""
  import ast
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, value = item.split("=", 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


class OursModel:
  """A ddpm_jax run in this process: the train step on one device, our data stream, sample()."""

  def __init__(self, config_name, size, batch, lr, steps, seed, data, overrides):
    import jax
    from _common import load_config
    from ddpm_jax import train
    config = load_config(config_name)
    config.data.image_size = size
    if size == 32:
      config.model.ch_mult, config.model.attn_resolutions = (1, 2, 2), (8,)
    config.training.batch_size = batch
    config.training.num_train_steps = steps
    config.optim.learning_rate = lr
    config.seed = seed
    config.parallel = "shard_map"
    config.update_from_flattened_dict(overrides)
    self.config, self.jax, self.train_mod = config, jax, train
    self.par = train.Parallel(config, train.make_train_step(config))
    init_key, self.key = jax.random.split(jax.random.PRNGKey(seed))
    self.state = self.par.put_state(train.create_train_state(config, init_key))
    self.stream = batches(np.load(data)["images"], batch, seed)
    self.batch, self.size = batch, size

  def describe(self):
    import jax
    import jax.numpy as jnp
    from _common import xla_flops
    from ddpm_jax.unet import UNet
    model = UNet(**self.config.model)
    params = self.par.get(self.state.params)
    x = jnp.zeros((self.batch, self.size, self.size, 1))
    t = jnp.zeros((self.batch,), jnp.int32)
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    flops = xla_flops(fwd.lower(params, x, t).compile())
    return {"params": sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params)),
            "gflop": flops / 1e9 if flops else float("nan")}

  def train(self, steps):
    metrics = None
    start = time.perf_counter()
    for _ in range(steps):
      batch = self.par.put_batch({"image": next(self.stream),
                                  "label": np.zeros((self.batch,), np.int32)})
      self.state, metrics = self.par.step(self.state, batch, self.key)
    loss = float(self.par.get(metrics)["loss"])  # waits for the last step
    return {"seconds": time.perf_counter() - start, "loss": loss}

  def profile(self, n):
    """The train step's time by category over n traced steps (benchmarks/_profile.py)."""
    batch = self.par.put_batch({"image": next(self.stream),
                                "label": np.zeros((self.batch,), np.int32)})
    compiled = self.par.step.lower(self.state, batch, self.key).compile()

    def step():
      self.state, metrics = compiled(self.state, batch, self.key)
      return metrics
    return _profile.xla_profile(step, compiled, n)

  def sample(self, n, ddim_steps, batch, out, timed=True):
    from ddpm_jax import from_run
    ema = self.par.get(self.state.ema_params[0])
    self.config.sampling.batch_size = batch
    run = lambda k: np.asarray(from_run.sample(ema, k, config=self.config, num_samples=n,
                                               sampler="ddim", num_steps=ddim_steps, eta=0.0))
    key = self.jax.random.PRNGKey(self.config.seed + 1)
    # The first call compiles: time a second one (sampling is cheap next to training here).
    images = run(key)
    seconds = 0.0
    if timed:
      start = time.perf_counter()
      images = run(key)
      seconds = time.perf_counter() - start
    np.savez(out, images=digits_frechet.to_uint8(images))
    return {"seconds": seconds}


# ----------------------------------------------------------------------------- the run


def grid_png(images, path, cols=16):
  """uint8 [N, S, S, 1] -> one PNG grid of the first rows * cols images."""
  from PIL import Image
  n = (len(images) // cols) * cols
  s = images.shape[1]
  g = images[:n, ..., 0].reshape(-1, cols, s, s).transpose(0, 2, 1, 3).reshape(-1, cols * s)
  Image.fromarray(g).resize((g.shape[1] * (64 // s or 1), g.shape[0] * (64 // s or 1)),
                            Image.NEAREST).save(path)


HEADER = (f"{'model':<28}{'s/step':>8}{'img/s':>8}{'sample img/s':>14}{'Frechet':>9}"
          f"{'mean px':>9}")


def call(model, op, **kw):
  """op on ours (a method) or on the peer (a command to its worker)."""
  return model(op, **kw) if isinstance(model, Peer) else getattr(model, op)(**kw)


def train_in_turns(args, models, say):
  """Trains every model args.steps steps, in chunks taking turns; {name: timing and loss}."""
  results = {name: {"train_s": 0.0} for name in models}
  for m in models.values():  # a warm-up chunk (compilation), untimed, counted in the budget
    call(m, "train", steps=args.warmup)
  done = args.warmup
  while done < args.steps:
    n = min(args.chunk, args.steps - done)
    for name, m in models.items():
      r = call(m, "train", steps=n)
      results[name]["train_s"] += r["seconds"]
      results[name]["loss"] = r["loss"]
    done += n
    say(f"  step {done}: " + ", ".join(f"{k} loss {v['loss']:.4f}" for k, v in results.items()))
  return results


def sample_and_score(args, size, name, model, result, scorer, workdir, say):
  """Samples with DDIM, writes the .npz and a grid PNG, prints the model's row."""
  out = os.path.join(workdir, f"samples{size}_{name.replace(' ', '_')}.npz")
  r = call(model, "sample", n=args.samples, ddim_steps=args.ddim_steps,
           batch=args.sample_batch, out=out, timed=not args.sequential)
  images = np.load(out)["images"]
  grid_png(images, out[:-4] + ".png")
  s_step = result["train_s"] / max(args.steps - args.warmup, 1)
  sample_ips = f"{args.samples / r['seconds']:>14.1f}" if r["seconds"] else f"{'-':>14}"
  say(f"{name:<28}{s_step:>8.3f}{args.batch / s_step:>8.1f}{sample_ips}"
      f"{scorer.distance(images):>9.2f}{float(images.mean()):>9.1f}")


def speed(args, models, say):
  """s/step of every model, rounds of args.speed_steps steps taking turns; the ratios."""
  say(f"  train step, {args.speed_rounds} rounds of {args.speed_steps} steps taking turns, "
      f"after warm-up")
  times = {name: [] for name in models}
  for m in models.values():
    call(m, "train", steps=args.warmup)
  for _ in range(args.speed_rounds):
    for name, m in models.items():
      times[name].append(call(m, "train", steps=args.speed_steps)["seconds"] / args.speed_steps)
  for name, t in times.items():
    med, best = float(np.median(t)), min(t)
    say(f"  {name:<26} median {med:.4f} s/step ({args.batch / med:.1f} img/s), "
        f"best {best:.4f} s/step ({args.batch / best:.1f} img/s)")
  for name in times:
    if "LDP" in times and name != "LDP":
      say(f"  img/s {name} / LDP: median {np.median(times['LDP']) / np.median(times[name]):.2f}x"
          f", best {min(times['LDP']) / min(times[name]):.2f}x")


def run_size(args, size, scorer, workdir, say):
  data = data_npz(size, workdir)
  common = dict(size=size, batch=args.batch, lr=args.lr, seed=args.seed, data=data)
  ours = {f"ours {name}".strip(): (lambda o=overrides: OursModel(
      args.config, steps=args.steps, overrides=o, **common)) for name, overrides in args.variants}
  say(f"\n{size}x{size} digits: batch {args.batch}, lr {args.lr:g}, {args.steps} steps, DDIM "
      f"{args.ddim_steps} steps (eta 0), {args.samples} samples per model")
  if args.sequential:  # ablations of ours: one model at a time, its row as soon as it is done
    say(HEADER)
    say("-" * len(HEADER))
    for name, make in ours.items():
      model = make()
      result = train_in_turns(args, {name: model}, lambda line: None)[name]
      sample_and_score(args, size, name, model, result, scorer, workdir, say)
      del model
  else:
    models = {name: make() for name, make in ours.items()}
    if args.peer_python:
      peer = Peer(args.peer_python, args.peer_pythonpath)
      info = peer("setup", dim=args.peer_dim, timesteps=1000, threads=args.peer_threads,
                  **common)
      models["LDP"] = peer
    for name, m in models.items():
      d = info if name == "LDP" else m.describe()
      extra = f", {d['threads']} torch threads, LDP {d['version']}" if name == "LDP" else ""
      say(f"  {name}: {d['params']:,} parameters, forward {d['gflop']:.3f} GFLOP at batch "
          f"{args.batch}{extra}")
    if "quality" in args.sections:
      results = train_in_turns(args, models, say)
      say(HEADER)
      say("-" * len(HEADER))
      for name, m in models.items():
        sample_and_score(args, size, name, m, results[name], scorer, workdir, say)
    if "speed" in args.sections:
      speed(args, models, say)
    if "profile" in args.sections:
      say(f"  where the train step's time goes: ms per step by category, summed over the ops "
          f"that ran (benchmarks/_profile.py), {args.speed_steps} traced steps after warm-up")
      _profile.report_profiles(say, {name: tuple(call(m, "profile", n=args.speed_steps))
                                     for name, m in models.items()})
    if args.peer_python:
      peer.close()
  if "quality" in args.sections:
    held_out = scorer.test_x if size == 8 else digits_frechet.upsample(scorer.test_x, size)
    say(f"{'held-out digits (floor)':<28}{'':>8}{'':>8}{'':>14}{scorer.floor(size):>9.2f}"
        f"{float(held_out.mean()):>9.1f}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--worker", action="store_true", help="(internal) the peer's side")
  p.add_argument("--peer_python", default="", help="the peer environment's python")
  p.add_argument("--peer_pythonpath", default="", help="prepended to the worker's PYTHONPATH")
  p.add_argument("--no_peer", action="store_true")
  p.add_argument("--sections", default="quality",
                 help="quality, speed and/or profile, comma-separated (for a profile that adds "
                      "up to the wall time: taskset -c 0 ... --cpu_devices 1 --peer_threads 1)")
  p.add_argument("--sizes", default="8,32")
  p.add_argument("--config", default="digits", help="configs/<name>.py for ours")
  p.add_argument("--variants", default="",
                 help='"name:key=value,...;name2:..." runs of ours with config overrides')
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="ours on the CPU: this many devices, as config.cpu_devices (0: automatic)")
  p.add_argument("--peer_dim", type=int, default=32)
  p.add_argument("--peer_threads", type=int, default=0,
                 help="torch threads (0: torch's default). On a loaded machine OpenMP's spinning "
                      "threads slow torch down many times over: use 1, or run under taskset")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
  p.add_argument("--chunk", type=int, default=100)
  p.add_argument("--samples", type=int, default=1000)
  p.add_argument("--sample_batch", type=int, default=500)
  p.add_argument("--ddim_steps", type=int, default=50)
  p.add_argument("--speed_rounds", type=int, default=5)
  p.add_argument("--speed_steps", type=int, default=5)
  p.add_argument("--sequential", action="store_true",
                 help="ablations of ours (with --no_peer): train, sample and score one variant "
                      "after another, printing each row when done; sampling is not timed")
  p.add_argument("--workdir", default="", help="keeps the data, samples and grids")
  p.add_argument("--no_save", action="store_true", help="do not append to BENCHMARKS.md")
  args = p.parse_args()
  if args.worker:
    return worker()
  if args.no_peer:
    args.peer_python = ""
  elif not args.peer_python:
    p.error("--peer_python (the peer environment's python) is needed, or --no_peer.")
  args.sections = args.sections.split(",")
  args.variants = [(v.split(":", 1)[0], parse_overrides(v.split(":", 1)[1] if ":" in v else ""))
                   for v in (args.variants.split(";") if args.variants else [""])]
  from _common import Report, device_line  # puts the repository on sys.path
  from ddpm_jax import placement
  # As main.py does with config.cpu_devices, before JAX starts: ours trains data-parallel over
  # this many CPU devices (0: automatic, ddpm_jax.placement.auto_cpu_devices).
  placement.set_cpu_devices(args.cpu_devices, args.batch)
  report = Report("Ours vs denoising-diffusion-pytorch on digits (peer_quality.py)")
  report(f"device: {device_line()}; ours: configs/{args.config}.py"
         + (f"; variants: {args.variants}" if args.variants != [("", {})] else ""))
  scorer = digits_frechet.DigitsFrechet()
  report(scorer.describe())
  workdir = args.workdir or tempfile.mkdtemp(prefix="peer_quality_")
  os.makedirs(workdir, exist_ok=True)
  for size in (int(s) for s in args.sizes.split(",")):
    run_size(args, size, scorer, workdir, report)
  report(f"(data, samples and grids in {workdir})")
  if not args.no_save:
    report.save()


if __name__ == "__main__":
  main()
