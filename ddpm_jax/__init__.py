"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho et al., 2020) in JAX/Flax."""
from ddpm_jax.loading import load
from ddpm_jax.diffusion import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    get_v,
    min_snr_loss_weight,
    normal_kl,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    prior_bpd,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    training_losses,
    vb_terms_bpd,
)
from ddpm_jax.editing import (
    ddim_inpaint_loop,
    ddim_interpolate,
    ddim_invert,
    dpm_solver_inpaint_loop,
    repaint_sample_loop,
    sdedit,
    slerp,
)
from ddpm_jax.heun import heun_sample_loop
from ddpm_jax.likelihood import ode_bits_per_dim, ode_likelihood
from ddpm_jax.respace import respace, space_timesteps
from ddpm_jax.from_run import sample
from ddpm_jax.run_edits import edit, interpolate, invert, inpaint
from ddpm_jax.sampling import ddim_sample_loop, p_sample, p_sample_loop
from ddpm_jax.solvers import dpm_solver_sample_loop, dpm_solver_timesteps, dynamic_threshold
from ddpm_jax.schedules import Schedule, get_beta_schedule, make_schedule
from ddpm_jax.unet import UNet

__version__ = "0.1.0"
