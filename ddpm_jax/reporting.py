"""What a training run shows: console progress, TensorBoard scalars, PNG sample grids.

Only process 0 reports; every method is a no-op on the others.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
from etils import epath
from PIL import Image

from ddpm_jax import console, run_summary
from ddpm_jax.heartbeat import Heartbeat, duration as _duration


def image_grid(images: np.ndarray, padding: int = 1) -> np.ndarray:
  """[N, S, S, C] floats in [-1, 1] -> one uint8 grid, as square as possible, the images apart
  by `padding` grey pixels (and framed by them): [rows*(S+p)+p, cols*(S+p)+p, C]."""
  n, s, _, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  pixels = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  step = s + padding
  grid = np.full((rows * step + padding, cols * step + padding, c), 128, np.uint8)
  for i, image in enumerate(pixels):
    r, q = divmod(i, cols)
    grid[padding + r * step:padding + r * step + s, padding + q * step:padding + q * step + s] = image
  return grid


def save_png(path: str, images: np.ndarray, upscale: int = 1) -> np.ndarray:
  """Writes a grid of images as PNG (local or gs://), through a temporary file and a rename;
  returns the grid (uint8 [H, W, C])."""
  grid = image_grid(images)
  if upscale > 1:  # small images (8x8 digits) are easier to look at enlarged
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
  tmp = epath.Path(path + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)
  return grid


def progress_line(label: str, done: int, total: int, rate: float, unit: str) -> str:
  """`label 30/100 [#######.................]  30.0% | 12 unit/s | ETA 0:00:05`."""
  frac = done / max(total, 1)
  bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
  eta = (total - done) / rate if rate > 0 else float("inf")
  return (f"{label} {done}/{total} [{bar}] {100 * frac:5.1f}% | {rate:.1f} {unit}/s | "
          f"ETA {_duration(eta)}")


class Progress:
  """A console progress line for a long job (sampling, evaluation), printed on process 0 after
  every `update` and, while an update is slow in coming (compiling, a long batch), a line at
  least every `every_s` seconds."""

  def __init__(self, label: str, total: int, unit: str = "img", start: int = 0,
               every_s: float = 30.0):
    self.label, self.total, self.unit = label, total, unit
    self.start, self.t0 = start, time.perf_counter()
    self.done = start
    self.active = jax.process_index() == 0
    self._heartbeat = Heartbeat(self._waiting, every_s, active=self.active and start < total,
                                while_running=sys._getframe(1))  # pylint: disable=protected-access

  def _waiting(self, seconds: float) -> str:
    what = "the first batch, with compilation" if self.done == self.start else "the next batch"
    return (f"{self.label} {self.done}/{self.total} | {_duration(seconds)} so far, working on "
            f"{what} ...")

  def update(self, done: int) -> None:
    self.done = done
    self._heartbeat.beat()
    if done >= self.total:
      self._heartbeat.stop()
    rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)
    if self.active:
      print(progress_line(self.label, done, self.total, rate, self.unit), file=sys.stderr,
            flush=True)


class Reporter:
  """Console progress bar, TensorBoard scalars under workdir/tensorboard, and sample grids.

  The console gets a line at every `scalars` call (every log_every steps) and, between them, at
  least every `progress_every_s` seconds (`progress_due`/`progress`), so that a run with a
  large log_every or slow steps still shows that it is moving. The step rate and the ETA count
  training alone: time spent `aside` (sample grids, evaluation) is left out of both.
  """

  def __init__(self, workdir: str, *, num_steps: int, start_step: int, batch_size: int,
               progress_every_s: float = 30.0):
    self.active = jax.process_index() == 0
    self.num_steps, self.batch_size = num_steps, batch_size
    self.progress_every_s = progress_every_s
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.workdir, self.first_step, self.started = workdir, start_step, self.last_time
    self.compile_s = 0.0
    self.last_line = self.last_time
    self.compile_start = None
    self._compile_heartbeat: Optional[Heartbeat] = None
    self.aside_s = 0.0  # time spent aside since the last rate
    self.samples_dir = os.path.join(workdir, "samples")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self.last_grid: Optional[str] = None
    self.writer = None
    console.commit_log()  # the run is being written: its log file too, from here on
    if self.active:
      epath.Path(self.samples_dir).mkdir(parents=True, exist_ok=True)
      from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
      self.writer = tensorboard.SummaryWriter(self.tensorboard_dir)

  def _print(self, text: str) -> None:
    self.last_line = time.perf_counter()
    if self.active:
      print(text, file=sys.stderr, flush=True)

  def compiling(self) -> None:
    """Says that the train step is being compiled (minutes for a large model on a CPU)."""
    self.compile_start = time.perf_counter()
    self._print("Compiling the train step (once per run; the first step waits for it) ...")
    self._compile_heartbeat = Heartbeat(
        lambda s: f"Compiling the train step ... {_duration(s)} so far",
        self.progress_every_s, active=self.active,
        while_running=sys._getframe(1))  # pylint: disable=protected-access

  def compiled(self) -> None:
    """Says how long compiling took; the step rate is counted from here."""
    now = time.perf_counter()
    if self._compile_heartbeat is not None:
      self._compile_heartbeat.stop()
    self.compile_s = now - self.compile_start
    self._print(f"Compiled the train step in {self.compile_s:.1f} s.")
    self.last_time, self.aside_s = now, 0.0

  @contextlib.contextmanager
  def aside(self, what: str) -> Iterator[None]:
    """A block of work that is not training (`what`: "sampling a grid at step 1000"): a line at
    least every progress_every_s seconds while it runs; its time is left out of the step rate
    and the ETA."""
    start = time.perf_counter()
    heartbeat = Heartbeat(lambda s: f"{what} ... {_duration(s)} so far",
                          self.progress_every_s, active=self.active)
    try:
      with heartbeat:
        yield
    finally:
      self.aside_s += time.perf_counter() - start

  def _rate(self, step: int) -> float:
    """Steps per second since the last line with a rate."""
    now = time.perf_counter()
    steps_per_s = (step - self.last_step) / max(now - self.last_time - self.aside_s, 1e-9)
    self.last_step, self.last_time, self.aside_s = step, now, 0.0
    return steps_per_s

  def _line(self, step: int, steps_per_s: float, loss: float) -> None:
    self._print(progress_line("step", step, self.num_steps, steps_per_s, "step") +
                f" | loss {loss:.4f} | {steps_per_s * self.batch_size:.0f} img/s")

  def progress_due(self) -> bool:
    """Whether progress_every_s has passed since the last console line."""
    return time.perf_counter() - self.last_line >= self.progress_every_s

  def progress(self, step: int, metrics: Mapping[str, np.ndarray]) -> None:
    """A console progress line for `step` (no TensorBoard scalars)."""
    self._line(step, self._rate(step), float(np.asarray(metrics.get("loss", np.nan))))

  def scalars(self, step: int, metrics: Mapping[str, np.ndarray]) -> None:
    """Logs a step's metrics to TensorBoard and the console, with images per second since the
    last line."""
    steps_per_s = self._rate(step)
    if not self.active:
      return
    scalars = {"images_per_second": steps_per_s * self.batch_size}
    for name, value in metrics.items():
      value = np.asarray(value)
      if value.ndim == 0:
        scalars[name] = float(value)
      else:  # loss_by_quartile: one scalar per quarter of the timesteps
        scalars.update({f"{name}/q{i}": float(v) for i, v in enumerate(value)})
    for name, value in scalars.items():
      self.writer.scalar(name, value, step)
    self.writer.flush()
    self._line(step, steps_per_s, scalars.get("loss", float("nan")))

  def eval_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs evaluation scalars (no effect on the img/s of the progress line)."""
    if self.active and scalars:
      for name, value in scalars.items():
        self.writer.scalar(name, value, step)
      self.writer.flush()
      print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()),
            file=sys.stderr, flush=True)

  def samples(self, step: int, images: np.ndarray) -> str:
    """Writes workdir/samples/ema_{step}.png and the same grid to TensorBoard ("samples");
    returns its path."""
    path = os.path.join(self.samples_dir, f"ema_{step:08d}.png")
    if self.active:
      grid = save_png(path, images, upscale=max(1, 64 // images.shape[1]))
      self.writer.image("samples", grid, step, max_outputs=1)
      self.writer.flush()
      self.last_grid = path
      self._print(f"step {step}: EMA samples written to {path}")
    return path

  def summary(self, step: int, checkpoint_step: Optional[int],
              stopped_by: Optional[str] = None) -> None:
    """Prints the run's closing lines (run_summary.training_summary) on process 0."""
    if self.active:
      lines = run_summary.training_summary(
          self.workdir, first_step=self.first_step, step=step, num_steps=self.num_steps,
          seconds=time.perf_counter() - self.started, compile_seconds=self.compile_s,
          checkpoint_step=checkpoint_step, last_grid=self.last_grid,
          tensorboard_dir=self.tensorboard_dir, stopped_by=stopped_by)
      print("\n".join(lines), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
