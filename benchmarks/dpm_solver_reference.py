"""Reference outputs of diffusers' DPM-Solver++ for tests/test_solvers.py (CI has no torch).

diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=k) with its
defaults (solver_type="midpoint", timestep_spacing="linspace", lower_order_final=True,
final_sigmas_type="zero", no thresholding) samples Gaussian data N(mu, diag(std^2)) from a fixed
x_T with the data's exact model, computed in float64 from the schedule's float64 alphas_cumprod:

    x0_hat(x_t, t) = mu + a std^2 / (a^2 std^2 + s^2) (x_t - a mu),   a = sqrt(abar_t),
    eps = (x_t - a x0_hat) / s,   v = a eps - s x0_hat,              s = sqrt(1 - abar_t),

for k = 1, 2, 3, 10/20/50 steps, eps/v/x0 prediction, and diffusers' "linear" and
"squaredcos_cap_v2" (= cosine) schedules of 1000 steps.

Regenerate the fixture in the peer's environment (benchmarks/requirements-peer.txt; numpy is
all it needs besides), from the repository root:

    python benchmarks/dpm_solver_reference.py      # writes tests/fixtures/dpm_solver_reference.npz

Keys: x_T [B, D], mu [D], std [D], alphas_cumprod_<schedule> [T] (diffusers' float32 schedule),
timesteps_<N> [N] (diffusers' timesteps), and x0_<schedule>_<prediction>_o<k>_n<N> [B, D].
"""
import math
import os

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

T = 1000
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
ORDERS = (1, 2, 3)
STEPS = (10, 20, 50)
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                   "fixtures", "dpm_solver_reference.npz")


def alphas_cumprod64(schedule: str) -> np.ndarray:
  """The schedule in float64, from the papers' formulas (Ho et al. 2020; Nichol & Dhariwal 2021)."""
  if schedule == "linear":
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
  else:
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
  return np.cumprod(1.0 - betas)


def exact_model(abar: np.ndarray, mu: np.ndarray, std: np.ndarray, prediction: str):
  def model(x, t):
    a, s = math.sqrt(abar[int(t)]), math.sqrt(1.0 - abar[int(t)])
    x0 = mu + a * std ** 2 / (a ** 2 * std ** 2 + s ** 2) * (x - a * mu)
    eps = (x - a * x0) / s
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]
  return model


def main():
  rng = np.random.default_rng(0)
  batch, dims = 6, 4
  mu = np.array([0.5, -0.3, 0.0, 0.2])
  std = np.array([0.1, 0.3, 0.6, 1.0])  # the narrow 0.1 makes the denoiser stiff near t = 0
  x_T = rng.standard_normal((batch, dims))
  arrays = dict(x_T=x_T, mu=mu, std=std)
  for name, diffusers_name in SCHEDULES.items():
    abar = alphas_cumprod64(name)
    for pred, diffusers_pred in PREDICTIONS.items():
      model = exact_model(abar, mu, std, pred)
      for k in ORDERS:
        for n in STEPS:
          sched = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=diffusers_name,
                                              algorithm_type="dpmsolver++", solver_order=k,
                                              prediction_type=diffusers_pred)
          sched.set_timesteps(n)
          arrays[f"alphas_cumprod_{name}"] = sched.alphas_cumprod.double().numpy()
          arrays[f"timesteps_{n}"] = sched.timesteps.numpy()
          x = torch.tensor(x_T, dtype=torch.float64)
          for t in sched.timesteps:
            out = torch.tensor(model(x.double().numpy(), int(t)), dtype=torch.float64)
            x = sched.step(out, t, x).prev_sample
          arrays[f"x0_{name}_{pred}_o{k}_n{n}"] = x.double().numpy()
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT}: {len(arrays)} arrays")


if __name__ == "__main__":
  main()
