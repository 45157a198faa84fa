"""Exact likelihood through the probability-flow ODE (Song et al., 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", section 4.3 and appendix D.2).

The trained model defines, through its eps prediction, the ODE

    dx/dt = -beta(t) / 2 * (x - eps(x, t) / sigma(t)),    sigma(t) = sqrt(1 - abar(t)),

in the continuous time of continuous.py (t a float in [0, T-1], log abar linear between integer
steps, so beta(t) is piecewise constant). Its flow maps the data at t = 0 to the prior
N(0, I) at t = T-1, and along the flow d log p(x(t)) / dt = -div f(x(t), t), hence

    log p_0(x_0) = log N(x(T-1); 0, I) + integral_0^{T-1} div f(x(t), t) dt.

The state at t = 0, the first noise level of the chain (sigma = sqrt(beta_0), 0.01 for the
linear schedule), is taken to be the data, as score_sde takes its data at t = eps: the model was
never trained closer to the data. The integration runs data -> noise (t from 0 to T-1) with an
adaptive Runge-Kutta solver (diffrax's Tsit5, PID step-size control over the whole batch state);
the divergence is the Skilling-Hutchinson estimate eps^T (df/dx) eps with one Rademacher probe
per example kept fixed over the integration, or, with exact_trace, the trace of the Jacobian from
D Jacobian-vector products (small inputs only: memory and time grow with D = H * W * C).

Units. bits/dim is -log2 of the density of the data on the 8-bit scale v = (x + 1) * 128, per
dimension, i.e. -log2 p(x) / D + 7 for x in [-1, 1] (score_sde's offset). With dequantize=True
(score_sde's uniform dequantization) the images are put back on their 256 levels,
v = level + u with u ~ U[0, 1)^D, so the result is an upper bound on the discrete NLL of the
8-bit data in expectation over u, comparable with the variational bound of bits_per_dim; with
dequantize=False it is the continuous density of x0 itself in the same units.
"""
from __future__ import annotations

import math
from typing import Dict

import diffrax
import jax
import jax.numpy as jnp

from ddpm_jax import continuous, diffusion, rng
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.schedules import Schedule

BITS_OFFSET = 7.0  # log2(128): [-1, 1] -> the 8-bit scale [0, 256)
# Tsit5 is first-same-as-last: 6 new evaluations per step (accepted or rejected), plus 1 at t0
# (diffrax's first step size comes from f(t0) and f(t0 + h0); the second is the first step's).
EVALS_PER_STEP, EVALS_AT_START = 6, 1


def _draw(sampler, key, shape, dtype):
  """sampler(key, shape, dtype) from one key, or row b from key[b] alone for a key batch."""
  if rng.is_key_batch(key):
    return jax.vmap(lambda k: sampler(k, shape[1:], dtype))(key)
  return sampler(key, shape, dtype)


def dequantize_images(x0: jnp.ndarray, key) -> jnp.ndarray:
  """score_sde's uniform dequantization of images in [-1, 1] on 256 levels: (level + u) / 128 - 1,
  u ~ U[0, 1) per dimension; x0 off the grid is rounded to it first. Same shape, in [-1, 1)."""
  level = jnp.clip(jnp.round((x0 + 1.0) * 127.5), 0.0, 255.0)
  return (level + _draw(jax.random.uniform, key, x0.shape, x0.dtype)) / 128.0 - 1.0


def probability_flow(sched: Schedule, model_fn: ModelFn, *, mean_type: str = "eps",
                     var_type: str = "fixedlarge"):
  """f(x [B, ...], t scalar float) -> dx/dt [B, ...], the ODE above; the model sees t as [B]."""

  def f(x, t):
    log_abar = continuous.log_alpha_bar(sched, t)
    alpha, sigma = jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))
    output = model_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
    eps, _ = continuous.eps_and_x0(output, x, alpha, sigma, mean_type, var_type)
    return -0.5 * continuous.beta(sched, t) * (x - eps / sigma)
  return f


def _sum_per_example(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _exact_divergence(f, x):
  """(f(x), tr df/dx per example [B]) from D Jacobian-vector products, each on the whole batch
  (the model treats examples independently)."""
  d = math.prod(x.shape[1:])
  basis = jnp.eye(d, dtype=x.dtype).reshape((d,) + x.shape[1:])
  fx = f(x)
  jv = jax.vmap(lambda e: jax.jvp(f, (x,), (jnp.broadcast_to(e, x.shape),))[1])(basis)
  return fx, jnp.einsum("kbk->b", jv.reshape(d, x.shape[0], d))


def integrate(sched: Schedule, model_fn: ModelFn, x: jnp.ndarray, probe_key, *, t_start: float,
              t_end: float, exact_trace: bool = False, mean_type: str = "eps",
              var_type: str = "fixedlarge", rtol: float = 1e-5, atol: float = 1e-5,
              max_steps: int = 4096):
  """Solves the ODE with its divergence from t_start to t_end: (x(t_end) [B, ...],
  integral of div f [B], diffrax stats). ode_likelihood integrates 0 -> T-1 (data -> noise)."""
  f = probability_flow(sched, model_fn, mean_type=mean_type, var_type=var_type)
  probe = _draw(jax.random.rademacher, probe_key, x.shape, x.dtype)

  def field(t, state, args):
    x, _ = state
    if exact_trace:
      fx, div = _exact_divergence(lambda y: f(y, t), x)
    else:
      fx, jv = jax.jvp(lambda y: f(y, t), (x,), (probe,))
      div = _sum_per_example(probe * jv)
    return fx, div

  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(field), diffrax.Tsit5(), t0=float(t_start), t1=float(t_end), dt0=None,
      y0=(x, jnp.zeros((x.shape[0],), jnp.float32)),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps)
  (z,), (div,) = sol.ys
  return z, div, sol.stats


def prior_log_prob(z: jnp.ndarray) -> jnp.ndarray:
  """log N(z; 0, I) per example, nats [B]."""
  d = math.prod(z.shape[1:])
  return -0.5 * _sum_per_example(z ** 2) - 0.5 * d * math.log(2.0 * math.pi)


def nll_to_bpd(log_prob: jnp.ndarray, dim: int) -> jnp.ndarray:
  """log p(x) of x in [-1, 1]^dim (nats) -> bits/dim on the 8-bit scale (module docstring)."""
  return -log_prob / (dim * math.log(2.0)) + BITS_OFFSET


def ode_likelihood(sched: Schedule, model_fn: ModelFn, x0: jnp.ndarray, key, *,
                   dequantize: bool = True, exact_trace: bool = False, mean_type: str = "eps",
                   var_type: str = "fixedlarge", rtol: float = 1e-5, atol: float = 1e-5,
                   max_steps: int = 4096) -> Dict[str, jnp.ndarray]:
  """The probability-flow ODE's NLL of images x0 [B, ...] in [-1, 1] (module docstring).

  Returns dict(bpd [B]; prior_bpd [B], the prior's share -log2 N(z; 0, I) / D (bpd is prior_bpd
  - integral of div f / (D ln 2) + 7); z [B, ...], the state at t = T-1 (x0's latent); nfe,
  the evaluations of the ODE's field, each one jvp through the model (D of them with
  exact_trace); num_steps, the solver's steps, rejected ones included). key draws the
  dequantization noise (from fold_in(key, 0)) and the Hutchinson probes (fold_in(key, 1)); one
  key per example ([B] keys, as rng.py) makes an example's draws its own.
  rtol, atol: the solver's tolerances (score_sde's 1e-5); max_steps: diffrax raises an error
  past that many steps. Results depend slightly on the batch: the step size is controlled over
  the whole batch state. The standard error of the batch mean: standard_error(out["bpd"]).
  """
  diffusion.check_options(mean_type, var_type)
  if sched.num_timesteps < 2:
    raise ValueError("ode_likelihood needs a schedule of at least 2 timesteps.")
  if x0.ndim < 2:
    raise ValueError(f"x0 must be a batch [B, ...], got shape {tuple(x0.shape)}.")
  x0 = jnp.asarray(x0, jnp.float32)
  deq_key, probe_key = rng.fold_in(key, 0), rng.fold_in(key, 1)
  x = dequantize_images(x0, deq_key) if dequantize else x0
  z, div, stats = integrate(sched, model_fn, x, probe_key, t_start=0.0,
                            t_end=sched.num_timesteps - 1, exact_trace=exact_trace,
                            mean_type=mean_type, var_type=var_type, rtol=rtol, atol=atol,
                            max_steps=max_steps)
  dim = math.prod(x0.shape[1:])
  prior = prior_log_prob(z)
  return dict(bpd=nll_to_bpd(prior + div, dim), prior_bpd=-prior / (dim * math.log(2.0)), z=z,
              nfe=EVALS_PER_STEP * stats["num_steps"] + EVALS_AT_START,
              num_steps=stats["num_steps"])


def ode_bits_per_dim(sched: Schedule, model_fn: ModelFn, x0: jnp.ndarray, key, *,
                     dequantize: bool = True, exact_trace: bool = False,
                     **kwargs) -> jnp.ndarray:
  """bits/dim [B] of images x0 [B, ...] in [-1, 1] under the probability-flow ODE; see
  ode_likelihood for the options, the NFE and the standard error."""
  return ode_likelihood(sched, model_fn, x0, key, dequantize=dequantize,
                        exact_trace=exact_trace, **kwargs)["bpd"]


def standard_error(values) -> jnp.ndarray:
  """Standard error of the mean of per-example values [B]: std (ddof 1) / sqrt(B)."""
  values = jnp.asarray(values, jnp.float32)
  return jnp.std(values, ddof=1) / jnp.sqrt(values.shape[0])
