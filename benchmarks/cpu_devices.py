"""The train step on the CPU as 1, 2, 4 ... XLA devices (config.cpu_devices), side by side.

A device count is fixed when JAX starts, so each count runs in its own worker process (this
script with --worker), all alive at once; the parent has them take turns, one round of
--steps steps each, so that whatever else loads the machine hits every count alike. The model
and data are peer_quality.py's: configs/<--config>.py on scikit-learn's digits at --sizes
(8, or upsampled to 32x32 with ch_mult (1, 2, 2) and attention at 8), batch --batch.

    python benchmarks/cpu_devices.py --sizes 8,32 --counts 1,2,4,8
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # benchmarks/ and the repository


def worker(args):
  """One JSON line per command on stdin ("train" n steps, or "quit"); answers on stdout."""
  from ddpm_jax import placement
  placement.set_cpu_devices(args.count, args.batch)
  import peer_quality
  out = sys.stdout
  sys.stdout = sys.stderr
  model = peer_quality.OursModel(args.config, args.size, args.batch, 5e-4, 1000, 0, args.data,
                                 peer_quality.parse_overrides(args.overrides))
  model.train(2)  # compilation
  out.write(json.dumps({"devices": len(model.par.local_devices)}) + "\n")
  out.flush()
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
      break
    out.write(json.dumps(model.train(cmd["steps"])) + "\n")
    out.flush()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--worker", action="store_true", help="(internal) one device count")
  p.add_argument("--count", type=int, default=1, help="(worker) its device count")
  p.add_argument("--data", default="", help="(worker) the .npz of digits")
  p.add_argument("--size", type=int, default=8, help="(worker) the image size")
  p.add_argument("--sizes", default="8,32")
  p.add_argument("--counts", default="1,2,4,8")
  p.add_argument("--config", default="digits")
  p.add_argument("--overrides", default="", help="config overrides, e.g. parallel=pmap")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=5, help="steps per round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--no_save", action="store_true", help="do not append to benchmarks/HISTORY.md")
  args = p.parse_args()
  if args.worker:
    return worker(args)

  import peer_quality
  from _common import Report
  report = Report("The train step on 1 to N CPU devices (cpu_devices.py)")
  report(f"configs/{args.config}.py on scikit-learn's digits, batch {args.batch}, "
         f"{args.rounds} rounds of {args.steps} steps per device count, taking turns, after "
         f"2 untimed steps; overrides: {args.overrides or 'none'}")
  directory = tempfile.mkdtemp(prefix="cpu_devices_")
  for size in (int(s) for s in args.sizes.split(",")):
    data = peer_quality.data_npz(size, directory)
    workers = {}
    for count in (int(c) for c in args.counts.split(",")):
      workers[count] = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--worker", f"--count={count}",
           f"--size={size}", f"--data={data}", f"--config={args.config}",
           f"--batch={args.batch}", f"--overrides={args.overrides}"],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
          env=dict(os.environ, TQDM_DISABLE="1"))
    devices = {c: json.loads(w.stdout.readline())["devices"] for c, w in workers.items()}
    times = {c: [] for c in workers}
    for _ in range(args.rounds):
      for count, w in workers.items():
        w.stdin.write(json.dumps({"op": "train", "steps": args.steps}) + "\n")
        w.stdin.flush()
        times[count].append(json.loads(w.stdout.readline())["seconds"] / args.steps)
    for w in workers.values():
      w.stdin.write(json.dumps({"op": "quit"}) + "\n")
      w.stdin.close()
      w.wait()
    base = float(np.median(times[min(times)]))
    report(f"\n{size}x{size} digits")
    report.header(f"{'cpu_devices':>11} {'devices':>8} {'median s/step':>14} {'best s/step':>12} "
                  f"{'img/s':>8} {'speed-up':>9}")
    for count, t in times.items():
      med = float(np.median(t))
      report(f"{count:>11} {devices[count]:>8} {med:>14.4f} {min(t):>12.4f} "
             f"{args.batch / med:>8.1f} {base / med:>8.2f}x")
  if not args.no_save:
    report.save()


if __name__ == "__main__":
  main()
