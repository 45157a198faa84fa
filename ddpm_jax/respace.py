"""Respacing: run the reverse chain on a subset of the training timesteps.

A chain over kept timesteps k_0 < k_1 < ... < k_{N-1} is the diffusion whose alphas_cumprod are
those of the kept steps, so its betas are recomputed as 1 - abar(k_i) / abar(k_{i-1}) (with
abar(k_{-1}) = 1), as improved-diffusion does. The model still sees the original timesteps k_i.
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import numpy as np

from ddpm_jax.schedules import Schedule

SpacingSpec = Union[int, str, Sequence[int]]


def _even(num_timesteps: int, count: int, start: int = 0) -> list:
  """`count` timesteps spread evenly over [start, start + num_timesteps - 1], both ends kept."""
  if count == 1:
    return [start]
  stride = (num_timesteps - 1) / (count - 1)
  return [start + round(i * stride) for i in range(count)]


def space_timesteps(num_timesteps: int, spec: SpacingSpec) -> np.ndarray:
  """The kept timesteps, sorted int32 [N].

  spec: an int N (N steps evenly spaced over [0, T-1], both ends kept); "ddimN" (the DDIM
  paper's uniform stride T // N starting at 0); "a,b,c" (improved-diffusion's sections: the
  timesteps are cut into equal sections and each is spaced evenly with its own count); or an
  explicit sequence of distinct timesteps in [0, T-1].
  """
  T = num_timesteps
  if isinstance(spec, str) and spec.startswith("ddim"):
    count = int(spec[len("ddim"):])
    if not 1 <= count <= T:
      raise ValueError(f"{spec!r} asks for {count} steps; accepted: 1 to {T} (num_timesteps).")
    stride = T // count
    steps = list(range(0, T, stride))[:count]
  elif isinstance(spec, str):
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(T, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
      section = size + (1 if i < extra else 0)
      if not 1 <= count <= section:
        raise ValueError(f"Section {i} of {spec!r} asks for {count} steps; accepted: 1 to "
                         f"{section} (its number of timesteps).")
      steps += _even(section, count, start)
      start += section
  elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
    if not 1 <= spec <= T:
      raise ValueError(f"num_steps must be an integer in [1, {T}] (the schedule's "
                       f"num_timesteps), got {spec}.")
    steps = _even(T, int(spec))
  else:
    steps = [int(s) for s in spec]
    if len(set(steps)) != len(steps) or not all(0 <= s < T for s in steps) or not steps:
      raise ValueError(f"timesteps must be distinct integers in [0, {T - 1}], got {spec!r}.")
  return np.array(sorted(steps), dtype=np.int32)


def respace(sched: Schedule, timesteps) -> Schedule:
  """The Schedule of the chain that visits only `timesteps` (sorted, from `space_timesteps`).

  Recomputed in float64 on the host from the schedule's betas, so `sched` must be concrete
  (not a tracer inside jit). Keeping every timestep returns `sched` itself.
  """
  if isinstance(sched.betas, jax.core.Tracer):
    raise ValueError("Respacing needs a concrete Schedule: call the sampling loop with the "
                     "Schedule closed over (not a traced jit argument), or pass num_steps=None.")
  timesteps = np.asarray(timesteps)
  if len(timesteps) == sched.num_timesteps:
    return sched
  alphas_cumprod = np.cumprod(1.0 - np.asarray(sched.betas, dtype=np.float64))
  kept = alphas_cumprod[timesteps]
  return Schedule.from_betas(1.0 - kept / np.append(1.0, kept[:-1]))
