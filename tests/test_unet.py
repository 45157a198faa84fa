"""Tests of ddpm_jax/unet.py: the DDPM U-Net.

Forward passes use a tiny model on 8x8 images; the paper-sized configs only go through
jax.eval_shape, which traces without allocating or computing anything.
"""
import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.unet import Downsample, UNet, Upsample, get_timestep_embedding

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
            resamp_with_conv=True, out_channels=3)
BATCH, SIZE = 4, 8
# bfloat16 has an 8-bit mantissa (relative rounding 2**-9 = 0.2%). Measured max |out_bf16 -
# out_f32| / max |out_f32|: 1.9% here (1.5-1.9% for perturbations of std 0.02-0.1), and 2.1% for
# the full CIFAR-10 model with params perturbed by std 0.01.
BF16_REL_BOUND = 0.05
# The initialisers draw through this key; the "rbg" generator compiles about 3x faster on CPU
# than the default threefry, which dominates these tests' run time otherwise.
INIT_KEY = jax.random.key(0, impl="rbg")


def load_config(name):
  return importlib.import_module(f"configs.{name}").get_config()


def inputs():
  """x [BATCH, SIZE, SIZE, 3] uniform in [-1, 1] and t [BATCH] from the whole range [0, 999]."""
  x = jax.random.uniform(jax.random.key(1), (BATCH, SIZE, SIZE, 3), minval=-1, maxval=1)
  return x, jnp.array([0, 10, 500, 999], jnp.int32)


def shapes_of(model, size, channels, batch=2):
  """(params, output) as ShapeDtypeStructs, traced by eval_shape without allocating."""
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t)
  return variables["params"], out


def perturb(params, std=0.05):
  """Adds N(0, std^2) to every parameter, so zero-initialised layers no longer hide anything."""
  rng = np.random.default_rng(2)  # NumPy: no compilation per parameter shape
  return jax.tree.map(lambda p: p + std * rng.standard_normal(p.shape, np.float32), params)


def init(model, x, t):
  """(output, params) at initialisation, jit-compiled once."""
  out, variables = jax.jit(model.init_with_output)(INIT_KEY, x, t)
  return out, variables["params"]


@pytest.fixture(scope="module")
def tiny_init():
  """(model, initial params, output at initialisation, x, t) for the tiny unconditional model."""
  model = UNet(**TINY)
  x, t = inputs()
  out, params = init(model, x, t)
  return model, params, out, x, t


@pytest.fixture(scope="module")
def tiny(tiny_init):
  """(model, perturbed params, x, t): the tiny model with every layer away from its init."""
  model, params, _, x, t = tiny_init
  return model, perturb(params), x, t


@pytest.mark.parametrize("name, expected", [("cifar10", 35_746_307), ("celebahq", 113_673_219)])
def test_parameter_count_matches_original(name, expected):
  config = load_config(name)
  params, _ = shapes_of(UNet(**config.model), config.data.image_size, config.data.num_channels)
  assert sum(p.size for p in jax.tree.leaves(params)) == expected


@pytest.mark.parametrize("name", ["cifar10", "celebahq", "celeba", "digits"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shape_and_dtypes(name, dtype):
  config = load_config(name)
  model = UNet(**{**config.model, "dtype": dtype})
  size, channels = config.data.image_size, config.data.num_channels
  params, out = shapes_of(model, size, channels)
  chex.assert_shape(out, (2, size, size, config.model.out_channels))
  assert out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_learned_variance_output_has_twice_the_channels():
  _, out = shapes_of(UNet(**{**TINY, "out_channels": 6}), SIZE, 3)
  chex.assert_shape(out, (2, SIZE, SIZE, 6))


@pytest.mark.parametrize("dim", [32, 33, 128])
def test_timestep_embedding_matches_float64_formula(dim):
  t = np.array([0, 1, 10, 250, 999])
  half = dim // 2
  freqs = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000) / (half - 1)))
  args = t[:, None] * freqs[None, :]
  expected = np.pad(np.concatenate([np.sin(args), np.cos(args)], axis=1), ((0, 0), (0, dim % 2)))
  got = get_timestep_embedding(jnp.asarray(t, jnp.int32), dim)
  assert got.dtype == jnp.float32
  # float32 rounding of t * freq (t up to 999 rad) costs up to ~6e-5.
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_initialisation(tiny_init):
  _, params, out, _, _ = tiny_init
  flat = {"/".join(k.key for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, p in flat.items():
    if name.endswith("bias"):
      assert np.all(p == 0), name
    elif name.endswith("kernel") and name.split("/")[-2] in ("conv2", "proj_out", "conv_out"):
      # Variance scaling with scale 1e-10: weights below sqrt(3e-10 / fan_avg) ~ 1e-5.
      assert np.abs(p).max() < 2e-5, name
  # fan_avg uniform, scale 1: conv_in has fan_avg = 9 * (3 + 32) / 2, variance 1 / fan_avg.
  np.testing.assert_allclose(np.var(flat["conv_in/kernel"]), 2 / (9 * 35), rtol=0.25)
  # The output is zero up to the ~1e-10-variance last layer: about 1e-5, against O(1) targets.
  assert np.abs(out).max() < 1e-4


def test_downsample_pads_like_tensorflow_same():
  """TF's SAME padding for a stride-2 3x3 conv on an even size is 0 before and 1 after."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  layer = Downsample(with_conv=True, dtype=jnp.float32)
  params = layer.init(INIT_KEY, x)["params"]
  expected = jax.lax.conv_general_dilated(
      x, params["conv"]["kernel"], window_strides=(2, 2), padding=((0, 1), (0, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, atol=1e-5)
  pooled = Downsample(with_conv=False, dtype=jnp.float32).apply({}, x)
  np.testing.assert_allclose(pooled, x.reshape(2, 4, 2, 4, 2, 4).mean(axis=(2, 4)), atol=1e-6)


def test_upsample_matches_align_corners_nearest_resize():
  """TF1's align_corners nearest resize reads input round(i * (H-1) / (2H-1)) for output i."""
  size = 8
  x = jax.random.normal(jax.random.key(0), (1, size, size, 2))
  src = np.floor(np.arange(2 * size) * (size - 1) / (2 * size - 1) + 0.5).astype(int)
  expected = np.asarray(x)[:, src][:, :, src]
  np.testing.assert_array_equal(Upsample(with_conv=False, dtype=jnp.float32).apply({}, x), expected)


def test_dropout_only_in_training(tiny):
  model, params, x, t = tiny

  @jax.jit
  def outputs(params, key):
    """(eval, eval with another key, train, train with another key, train with dropout=0)."""
    keys = jax.random.split(key)
    run = lambda model, train, k: model.apply({"params": params}, x, t, train=train,
                                              rngs={"dropout": k})
    no_dropout = UNet(**{**TINY, "dropout": 0.0})
    return (run(model, False, keys[0]), run(model, False, keys[1]), run(model, True, keys[0]),
            run(model, True, keys[1]), run(no_dropout, True, keys[0]))

  eval0, eval1, train0, train1, train_no_dropout = outputs(params, INIT_KEY)
  np.testing.assert_array_equal(eval0, eval1)
  np.testing.assert_array_equal(train_no_dropout, eval0)
  assert np.abs(train0 - eval0).max() > 1e-3
  assert np.abs(train0 - train1).max() > 1e-3


def test_jit_matches_apply(tiny):
  model, params, x, t = tiny
  apply = lambda p, x, t: model.apply({"params": p}, x, t)
  np.testing.assert_allclose(jax.jit(apply)(params, x, t), apply(params, x, t), atol=1e-5)


def test_bfloat16_is_close_to_float32(tiny):
  model, params, x, t = tiny
  out32 = model.apply({"params": params}, x, t)
  out16 = UNet(**{**TINY, "dtype": "bfloat16"}).apply({"params": params}, x, t)
  assert out16.dtype == jnp.float32
  chex.assert_tree_all_finite(out16)
  assert np.abs(out16 - out32).max() <= BF16_REL_BOUND * np.abs(out32).max()


def test_remat_gives_the_same_outputs_and_gradients(tiny):
  """Rematerialisation only changes what the backward pass keeps: same parameter tree, same
  training output (dropout included) and the same gradients, up to float reassociation."""
  model, params, x, t = tiny
  remat = UNet(**{**TINY, "remat": True})
  _, remat_init = init(remat, x, t)
  chex.assert_trees_all_equal_shapes(remat_init, params)

  @jax.jit
  def out_and_grad(params, key):
    def loss(p, m):
      out = m.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
      return jnp.mean(jnp.square(out - x)), out
    return [jax.grad(loss, has_aux=True)(params, m) for m in (model, remat)]

  (grads, out), (grads_remat, out_remat) = out_and_grad(params, INIT_KEY)
  np.testing.assert_allclose(out_remat, out, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads_remat, grads, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # not trivial


def test_class_conditional():
  model = UNet(**{**TINY, "num_classes": 10})
  x, t = inputs()
  _, params = init(model, x, t)
  chex.assert_shape(params["label_emb"]["embedding"], (11, 4 * TINY["ch"]))
  params = perturb(params)
  apply = lambda y: model.apply({"params": params}, x, t, y=y)
  np.testing.assert_array_equal(apply(None), apply(jnp.full((BATCH,), 10, jnp.int32)))
  assert np.abs(apply(jnp.full((BATCH,), 3)) - apply(jnp.full((BATCH,), 5))).max() > 1e-3


@pytest.mark.parametrize("overrides, match", [
    ({"dtype": "float16"}, r"dtype must be one of \['bfloat16', 'float32'\], got 'float16'"),
    ({"ch": 48}, r"multiple of 32, but ch=48 with ch_mult=\(1, 2\) gives channel counts \[48, 96\]"),
])
def test_bad_config_fails_at_construction(overrides, match):
  with pytest.raises(ValueError, match=match):
    UNet(**{**TINY, **overrides})


@pytest.mark.parametrize("overrides, x_shape, t_shape, match", [
    ({"ch_mult": (1, 2, 2, 2)}, (2, 12, 12, 3), (2,),
     r"Image size 12 is not divisible by 2\*\*\(len\(ch_mult\) - 1\) = 8"),
    ({"attn_resolutions": (16,)}, (2, 8, 8, 3), (2,),
     r"Attention resolution 16 .* never occurs .* the resolutions are \(8, 4\)"),
    ({}, (2, 8, 8), (2,), r"x of shape \[B, H, W, C\] \(rank 4\), got shape \(2, 8, 8\)"),
    ({}, (2, 8, 8, 3), (3,), r"t of shape \[B\] = \(2,\) to match x's batch size, got shape \(3,\)"),
    ({}, (2, 8, 4, 3), (2,), r"square images"),
])
def test_bad_input_fails_at_first_call(overrides, x_shape, t_shape, match):
  model = UNet(**{**TINY, **overrides})
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.key(0), jnp.zeros(x_shape), jnp.zeros(t_shape, jnp.int32))


def test_labels_for_an_unconditional_model_fail():
  x, t = inputs()
  with pytest.raises(ValueError, match=r"unconditional UNet \(num_classes=0\)"):
    UNet(**TINY).init(jax.random.key(0), x, t, y=jnp.zeros((BATCH,), jnp.int32))
