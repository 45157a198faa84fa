"""The presets: the paper's configs keep the paper's recipe; digits and small take the small-scale
recipe, and small builds its model at 32x32 and 64x64."""
import importlib

import jax
import pytest

from ddpm_jax import train

PAPER = ("cifar10", "celeba", "celebahq", "church")
SMALL_SCALE = ("digits", "small")


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_keep_the_paper_recipe(name):
  c = load(name)
  assert (c.diffusion.mean_type, c.diffusion.beta_schedule, c.diffusion.var_type) == (
      "eps", "linear", "fixedlarge")
  assert (c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.num_timesteps) == (
      1e-4, 0.02, 1000)
  assert c.diffusion.min_snr_gamma == 0.0
  assert c.model.dropout in (0.1, 0.0)  # 0.1 (CIFAR-10, CelebA), 0.0 (the 256x256 models)
  assert (c.training.ema_decay, c.training.ema_warmup) == (0.9999, False)
  assert (c.optim.learning_rate <= 2e-4, c.optim.b2, c.optim.grad_clip) == (True, 0.999, 1.0)


@pytest.mark.parametrize("name", SMALL_SCALE)
def test_small_scale_configs_take_the_ablations_recipe(name):
  c = load(name)
  assert (c.diffusion.mean_type, c.diffusion.beta_schedule) == ("v", "cosine")
  assert c.model.dropout == 0.0
  assert c.training.ema_warmup is True


@pytest.mark.parametrize("size", [32, 64])
def test_small_builds_its_model_at_32_and_64(size):
  c = load("small")
  c.data.image_size = size
  params = jax.eval_shape(lambda k: train.create_train_state(c, k), jax.random.PRNGKey(0)).params
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 8_952_067
