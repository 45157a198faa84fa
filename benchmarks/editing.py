"""Editing: inpainting against the closed-form conditional, DDIM inversion error against steps,
and the speed of each run-level edit on this machine. Prints tables for BENCHMARKS.md.

    python benchmarks/editing.py                      # all three sections
    python benchmarks/editing.py --sections=inversion

Data for the first two: x0 ~ N(mu, Sigma) on a 4x4 image with strongly correlated pixels (the
tests' squared-exponential kernel, length 1.5 pixels, sd 0.5), the left half known at
mu + 0.8; the optimal denoiser is exact. Errors are the largest over the 8 filled pixels of
|mean - conditional mean| and |sd - conditional sd| (conditional sd 0.24-0.43), propagated
exactly in float64 through each chain (tests/references.py) and measured on samples.
Speed: a class-free smoke-sized model (configs/smoke.py: 8x8x1, ch 32, 20 timesteps) with
random weights, batch 8, all local devices, after one warm-up call.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddpm_jax  # noqa: E402
from ddpm_jax import editing  # noqa: E402
from tests import references as ref  # noqa: E402

H = W = 4


def gaussian_problem(T, beta_start, beta_end):
  mu, sigma = ref.correlated_gaussian(H, W, length=1.5, sd=0.5)
  mask = np.zeros((H, W, 1), np.float32)
  mask[:, :2] = 1.0
  known = (mu.reshape(H, W, 1) + 0.8 * mask).astype(np.float32)
  abar = np.cumprod(1.0 - ddpm_jax.get_beta_schedule("linear", T, beta_start=beta_start,
                                                      beta_end=beta_end))
  lam, u = np.linalg.eigh(sigma)
  lam_j, u_j, mu_j, abar_j = (jnp.asarray(a, jnp.float32) for a in (lam, u, mu, abar))

  def eps_fn(x_t, t):
    ab = abar_j[t].reshape(-1, 1)
    flat = x_t.reshape(x_t.shape[0], -1)
    gain = jnp.sqrt(ab) * lam_j / (ab * lam_j + 1.0 - ab)
    x0 = mu_j + (gain * ((flat - jnp.sqrt(ab) * mu_j) @ u_j)) @ u_j.T
    return ((flat - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)).reshape(x_t.shape)

  sched = ddpm_jax.make_schedule("linear", T, beta_start=beta_start, beta_end=beta_end)
  return dict(mu=mu, sigma=sigma, mask=mask, known=known, abar=abar, eps=eps_fn, sched=sched)


def inpainting(samples: int):
  print("## Inpainting vs the closed-form conditional (Gaussian 4x4, left half known)\n")
  print(f"Samples measured: {samples} per row (standard error of a mean <= "
        f"{0.43 / np.sqrt(samples):.3f}).\n")
  print("| schedule | steps | method | jump_length | jump_n_sample | model calls | mean err "
        "(exact) | sd err (exact) | mean err (sampled) | sd err (sampled) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for T, b0, b1, name in [(100, 1e-3, 0.2, "linear T=100"), (1000, 1e-4, 0.02, "linear T=1000")]:
    p = gaussian_problem(T, b0, b1)
    unknown = p["mask"].ravel() == 0
    cond_mean, cond_cov = ref.gaussian_conditional(p["mu"], p["sigma"], ~unknown,
                                                   p["known"].ravel())
    cond_sd = np.sqrt(np.diag(cond_cov))
    steps = 100
    kept = ddpm_jax.space_timesteps(T, steps)
    known = jnp.broadcast_to(p["known"], (samples, H, W, 1))
    for jl, jn in [(1, 1), (10, 5), (10, 10), (5, 20), (1, 10)]:
      walk = editing.repaint_schedule(steps, jl, jn)
      mean, cov = ref.repaint_moments(p["mu"], p["sigma"], p["abar"][kept], walk,
                                      p["mask"].ravel(), p["known"].ravel())
      exact = (np.abs(mean[unknown] - cond_mean).max(),
               np.abs(np.sqrt(np.diag(cov))[unknown] - cond_sd).max())
      run = jax.jit(lambda k, jl=jl, jn=jn: editing.repaint_sample_loop(
          p["sched"], p["eps"], known, p["mask"], k, num_steps=None if steps == T else steps,
          jump_length=jl, jump_n_sample=jn, clip_denoised=False))
      x = np.asarray(run(jax.random.key(0))).reshape(samples, -1)[:, unknown]
      sampled = (np.abs(x.mean(0) - cond_mean).max(), np.abs(x.std(0) - cond_sd).max())
      method = "replacement" if jn == 1 else "RePaint"
      calls = int((walk[:, 0] == 0).sum())
      print(f"| {name} | {steps} | {method} | {jl} | {jn} | {calls} | {exact[0]:.3f} | "
            f"{exact[1]:.3f} | {sampled[0]:.3f} | {sampled[1]:.3f} |")
    for loop, label in [(editing.ddim_inpaint_loop, "DDIM replacement"),
                        (editing.dpm_solver_inpaint_loop, "DPM-Solver++ replacement")]:
      # 50, not 100: DPM-Solver++'s "linspace" timesteps repeat one when num_steps = T
      for n in (20, 50):
        run = jax.jit(lambda k, loop=loop, n=n: loop(p["sched"], p["eps"], known, p["mask"], k,
                                                     num_steps=n, clip_denoised=False))
        x = np.asarray(run(jax.random.key(0))).reshape(samples, -1)[:, unknown]
        print(f"| {name} | {n} | {label} | - | - | {n} | - | - | "
              f"{np.abs(x.mean(0) - cond_mean).max():.3f} | "
              f"{np.abs(x.std(0) - cond_sd).max():.3f} |")
  print()


def inversion():
  print("## DDIM inversion then decoding: rms reconstruction error (Gaussian 4x4 data, sd 0.5)\n")
  print("| schedule | steps | rms error | float64 reference rms |")
  print("|---|---|---|---|")
  for T, b0, b1, name, counts in [(100, 1e-3, 0.2, "linear T=100", (5, 10, 20, 50, 100)),
                                  (1000, 1e-4, 0.02, "linear T=1000", (10, 50, 250, 1000))]:
    p = gaussian_problem(T, b0, b1)
    z = np.random.default_rng(0).standard_normal((256, H * W))
    x0_64 = p["mu"] + z @ np.linalg.cholesky(p["sigma"]).T
    x0 = jnp.asarray(x0_64, jnp.float32).reshape(-1, H, W, 1)
    for n in counts:
      x_T = editing.ddim_invert(p["sched"], p["eps"], x0, num_steps=n)
      back = ddpm_jax.ddim_sample_loop(p["sched"], p["eps"], x0.shape, jax.random.key(0),
                                       num_steps=n, x_T=x_T, clip_denoised=False)
      err = float(jnp.sqrt(jnp.mean((back - x0) ** 2)))
      kept = ddpm_jax.space_timesteps(T, n)
      inverted = ref.ddim_inversion(p["mu"], p["sigma"], p["abar"][kept], x0_64)
      decoded = _ddim_decode64(p, kept, inverted)
      err64 = float(np.sqrt(np.mean((decoded - x0_64) ** 2)))
      print(f"| {name} | {n} | {err:.4f} | {err64:.4f} |")
  print()


def _ddim_decode64(p, kept, x):
  """Deterministic DDIM with the exact denoiser in float64 over the kept timesteps."""
  abar = p["abar"][kept]
  eye = np.eye(len(p["mu"]))
  for i in range(len(kept) - 1, -1, -1):
    ab, ab_prev = abar[i], (abar[i - 1] if i else 1.0)
    gain = np.sqrt(ab) * p["sigma"] @ np.linalg.inv(ab * p["sigma"] + (1 - ab) * eye)
    x0 = p["mu"] + (x - np.sqrt(ab) * p["mu"]) @ gain.T
    eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
    x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev) * eps
  return x


def speed(repeats: int):
  from configs import smoke  # pylint: disable=import-outside-toplevel
  from tests.test_loop import random_params  # pylint: disable=import-outside-toplevel
  config = smoke.get_config()
  config.sampling.batch_size = 8
  _, params = random_params(config)
  images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
  key = jax.random.PRNGKey(0)
  print(f"## Speed of the run-level edits ({jax.local_device_count()} {jax.default_backend()} "
        f"devices, smoke model 8x8x1, T=20, batch 8)\n")
  print("| edit | settings | model calls per chain | img/s |")
  print("|---|---|---|---|")
  cases = [
      ("inpaint", "repaint, 20 steps, j=5 r=5",
       int((editing.repaint_schedule(20, 5, 5)[:, 0] == 0).sum()),
       lambda: ddpm_jax.inpaint(params, key, images, "center", config=config, sampler="repaint",
                                num_steps=20, jump_length=5, jump_n_sample=5)),
      ("inpaint", "ddim, 20 steps", 20,
       lambda: ddpm_jax.inpaint(params, key, images, "center", config=config, sampler="ddim",
                                num_steps=20)),
      ("inpaint", "dpm_solver, 10 steps", 10,
       lambda: ddpm_jax.inpaint(params, key, images, "center", config=config,
                                sampler="dpm_solver", num_steps=10)),
      ("edit", "ddim, 20 steps, strength 0.5", 10,
       lambda: ddpm_jax.edit(params, key, images, strength=0.5, config=config, sampler="ddim",
                             num_steps=20)),
      ("invert", "ddim, 20 steps", 20,
       lambda: ddpm_jax.invert(params, images, config=config, num_steps=20)),
      ("interpolate", "8 images, ddim 20 steps (2 inversions, 8 decodings)", "20 + 20",
       lambda: ddpm_jax.interpolate(params, images[0], images[1], num=8, config=config,
                                    num_steps=20)),
  ]
  for name, what, calls, fn in cases:
    fn()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn()
    np.asarray(out)
    seconds = (time.perf_counter() - start) / repeats
    n = 8
    print(f"| {name} | {what} | {calls} | {n / seconds:.1f} |")
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sections", default="inpainting,inversion,speed")
  parser.add_argument("--samples", type=int, default=4000)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  sections = args.sections.split(",")
  if "inpainting" in sections:
    inpainting(args.samples)
  if "inversion" in sections:
    inversion()
  if "speed" in sections:
    speed(args.repeats)


if __name__ == "__main__":
  main()
