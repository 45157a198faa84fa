"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho et al., 2020) in JAX/Flax."""
__version__ = "0.1.0"
