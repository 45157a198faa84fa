"""The run-level edits (ddpm_jax.inpaint / edit / invert / interpolate): the library chains
with the run's model, labels and guidance, the same on 1 and 8 devices, and one sentence for a
bad mask or image."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import editing, from_run, run_edits, settings
from ddpm_jax.errors import UserError
from tests.test_loop import random_params, smoke_config


@pytest.fixture(scope="module")
def run():
  """A class-conditional smoke config (20 timesteps, guidance 1.5) and random params."""
  config = smoke_config(**{"model.num_classes": 3, "sampling.guidance_scale": 1.5,
                           "sampling.batch_size": 8, "edit.num_steps": 10,
                           "edit.jump_length": 3, "edit.jump_n_sample": 2})
  model, params = random_params(config)
  images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
  return config, model, params, images


def _guided(run, key, n, labels=None):
  config, model, params, _ = run
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))
  if labels is None:
    labels = from_run.sample_labels(config, key, np.arange(n))
  sched = settings.Settings.from_config(config).diffusion.make_schedule()
  return sched, from_run.guided_model_fn(model, params, jnp.asarray(labels), 1.5), keys


def test_inpaint_is_repaint_with_the_runs_model_on_1_and_8_devices(run):
  config, _, params, images = run
  key = jax.random.PRNGKey(1)
  eight = ddpm_jax.inpaint(params, key, images, "center", config=config)
  one = ddpm_jax.inpaint(params, key, images, "center", config=config,
                         devices=jax.local_devices()[:1])
  np.testing.assert_allclose(eight, one, atol=2e-5)
  x = images.astype(np.float32) / 127.5 - 1
  mask = run_edits.named_mask("center", 8)
  keep = np.broadcast_to(mask, x.shape) == 1
  np.testing.assert_array_equal(eight[keep], x[keep])  # the known region, exactly
  sched, guided, keys = _guided(run, key, 8)
  want = editing.repaint_sample_loop(sched, guided, x, mask, keys, num_steps=10, jump_length=3,
                                     jump_n_sample=2)
  np.testing.assert_allclose(eight, np.clip(want, -1, 1), atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_inpaint_with_fast_samplers_keeps_the_known_region(run, sampler):
  config, _, params, images = run
  masks = np.random.default_rng(1).integers(0, 2, (8, 8, 8, 1)).astype(bool)
  out = ddpm_jax.inpaint(params, jax.random.PRNGKey(2), images, masks, config=config,
                         sampler=sampler)
  x = images.astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(out[masks], x[masks])
  assert np.mean(out[~masks] != x[~masks]) > 0.9  # the rest is the model's


def test_edit_is_sdedit_and_strength_zero_keeps_the_images(run):
  config, _, params, images = run
  key = jax.random.PRNGKey(3)
  x = images.astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(
      ddpm_jax.edit(params, key, images, strength=0.0, config=config), x)
  got = ddpm_jax.edit(params, key, x, strength=0.6, config=config, sampler="ancestral")
  one = ddpm_jax.edit(params, key, x, strength=0.6, config=config, sampler="ancestral",
                      devices=jax.local_devices()[:1])
  np.testing.assert_allclose(got, one, atol=2e-5)
  sched, guided, keys = _guided(run, key, 8)
  want = editing.sdedit(sched, guided, x, keys, strength=0.6, sampler="ancestral", num_steps=10)
  np.testing.assert_allclose(got, np.clip(want, -1, 1), atol=1e-5)


def test_invert_and_interpolate(run):
  config, model, params, images = run
  x = images.astype(np.float32) / 127.5 - 1
  noise = ddpm_jax.invert(params, images[:2], config=config)
  null = from_run.guided_model_fn(model, params, jnp.full((2,), 3), 1.5)
  sched = settings.Settings.from_config(config).diffusion.make_schedule()
  np.testing.assert_allclose(noise, editing.ddim_invert(sched, null, x[:2], num_steps=10),
                             atol=1e-4)
  path = ddpm_jax.interpolate(params, images[0], images[1], num=4, config=config)
  assert path.shape == (4, 8, 8, 1)
  ends = ddpm_jax.ddim_sample_loop(sched, null, (2, 8, 8, 1), jax.random.PRNGKey(0),
                                 num_steps=10, x_T=noise)
  np.testing.assert_allclose(path[[0, -1]], np.clip(ends, -1, 1), atol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda p, c, x: ddpm_jax.inpaint(p, jax.random.PRNGKey(0), x, np.ones((4, 4)), config=c),
     r"masks of shape \(4, 4\) do not fit 8 images of shape \(8, 8, 1\)"),
    (lambda p, c, x: ddpm_jax.inpaint(p, jax.random.PRNGKey(0), x, np.full((8, 8), 0.5), config=c),
     r"masks must hold only 0 \(fill\) and 1 \(keep\)"),
    (lambda p, c, x: ddpm_jax.inpaint(p, jax.random.PRNGKey(0), x, "middle", config=c),
     r"mask='middle' is not a named mask; accepted: center, left-half"),
    (lambda p, c, x: ddpm_jax.edit(p, jax.random.PRNGKey(0), x[:, :4], config=c),
     r"images of shape \(8, 4, 8, 1\) do not fit the run's images"),
    (lambda p, c, x: ddpm_jax.edit(p, jax.random.PRNGKey(0), x * 2.0, config=c),
     r"images must be uint8 in \[0, 255\] or floats in \[-1, 1\]"),
    (lambda p, c, x: ddpm_jax.edit(p, jax.random.PRNGKey(0), x, strength=2, config=c),
     r"strength must be a number in \[0, 1\]"),
    (lambda p, c, x: ddpm_jax.edit(p, jax.random.PRNGKey(0), x, sampler="repaint", config=c),
     r"sampler='repaint' cannot edit; accepted: ancestral, ddim, dpm_solver"),
])
def test_bad_input_is_one_sentence(run, call, message):
  config, _, params, images = run
  with pytest.raises(UserError, match=message):
    call(params, config, images)
