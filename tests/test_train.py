"""The train step: EMA, warmup, clipping, non-finite guard, and 1 device == 8 devices == shard_map."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke
from ddpm_jax import train


def smoke_config(**overrides):
  """configs/smoke.py with dotted overrides, e.g. **{"training.batch_size": 16}."""
  config = smoke.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def global_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s = config.training.batch_size, config.data.image_size
  pixels = rng.integers(0, 256, size=(b, s, s, config.data.num_channels))
  return {"image": (pixels / 127.5 - 1).astype(np.float32),
          "label": rng.integers(0, 10, size=(b,)).astype(np.int32)}


def run_steps(config, devices, num_steps=2):
  """num_steps train steps on the same global batches over `devices`; the host state and metrics."""
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  par = train.Parallel(config, train.make_train_step(config), devices=devices)
  p_state = par.put_state(state)
  for i in range(num_steps):
    p_state, metrics = par.step(p_state, par.put_batch(global_batch(config, i)), jax.random.PRNGKey(1))
  return par.get(p_state), par.get(metrics)


def leaves_of(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_same_global_batch_same_state_on_1_and_8_devices_pmap_and_shard_map():
  assert jax.device_count() >= 8, "tests/conftest.py asks XLA for 8 CPU devices"
  config = smoke_config(**{"training.batch_size": 16})
  one, m1 = run_steps(config, jax.devices()[:1])
  eight, m8 = run_steps(config, jax.devices()[:8])
  config.parallel = "shard_map"
  shard, ms = run_steps(config, jax.devices()[:8])
  assert int(one.step) == int(eight.step) == int(shard.step) == 2
  # Same examples, same noise, same dropout: only float summation order differs.
  for other, m in ((eight, m8), (shard, ms)):
    assert_trees_close(one.params, other.params, rtol=1e-4, atol=2e-6)
    assert_trees_close(one.ema_params, other.ema_params, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-4)
  # and the update is not trivial
  init = train.create_train_state(config, jax.random.PRNGKey(0))
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(init.params)))
  assert moved > 1e-4


def test_ema_update_equals_its_formula():
  ema = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
  params = {"w": jnp.array([0.0, 4.0]), "b": jnp.array(-1.0)}
  out = train.ema_update(ema, params, 0.9)
  np.testing.assert_allclose(out["w"], [0.9, 2.2], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 2.6, rtol=1e-6)


def test_ema_after_steps_follows_params():
  config = smoke_config(**{"training.ema_decay": 0.9, "training.extra_ema_decays": (0.5,),
                           "optim.warmup_steps": 0})  # so that step 0 moves the parameters
  state0 = train.create_train_state(config, jax.random.PRNGKey(0))
  state1, _ = run_steps(config, jax.devices()[:1], num_steps=1)
  assert not np.allclose(leaves_of(state1.params)[0], leaves_of(state0.params)[0])
  for ema0, ema1, decay in zip(state0.ema_params, state1.ema_params, (0.9, 0.5)):
    want = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema0, state1.params)
    assert_trees_close(ema1, want, rtol=1e-6, atol=1e-7)


def test_ema_warmup_follows_diffusers_recurrence_in_float64():
  """Three steps with training.ema_warmup against diffusers' EMAModel decays replayed in float64:
  update k (0-based) uses 0 at k = 0, then min(decay, (1 + k) / (10 + k))."""
  config = smoke_config(**{"training.ema_decay": 0.2, "training.extra_ema_decays": (0.99,),
                           "training.ema_warmup": True, "optim.warmup_steps": 0})
  par = train.Parallel(config, train.make_train_step(config), devices=jax.devices()[:1])
  state = par.put_state(train.create_train_state(config, jax.random.PRNGKey(0)))
  batch = par.put_batch(global_batch(config))
  want = [[np.asarray(x, np.float64) for x in leaves_of(e)] for e in par.get(state).ema_params]
  for k in range(3):
    state, _ = par.step(state, batch, jax.random.PRNGKey(1))
    params = [np.asarray(x, np.float64) for x in leaves_of(par.get(state).params)]
    for i, decay in enumerate((0.2, 0.99)):
      d = 0.0 if k == 0 else min(decay, (1.0 + k) / (10.0 + k))  # 0, 2/11, 3/12 (0.2 caps)
      want[i] = [d * e + (1 - d) * p for e, p in zip(want[i], params)]
  for got, ref in zip(par.get(state).ema_params, want):
    for g, r in zip(leaves_of(got), ref):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  assert float(train.ema_decay_at(0.99, 5, False)) == 0.99  # off: the fixed decay


def test_warmup_schedule_values():
  config = smoke_config(**{"optim.learning_rate": 2e-4, "optim.warmup_steps": 5000})
  lr = train.learning_rate_fn(config)
  for step, want in [(0, 0.0), (1, 2e-4 / 5000), (2500, 1e-4), (5000, 2e-4), (800_000, 2e-4)]:
    assert float(lr(step)) == pytest.approx(want, rel=1e-3, abs=1e-12)  # float32 arithmetic


def test_gradients_are_clipped_to_the_global_norm():
  config = smoke_config(**{"optim.grad_clip": 1.0})
  tx = train.make_optimizer(config)
  params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
  grads = {"a": jnp.full(3, 3.0), "b": jnp.full(4, 4.0)}  # global norm sqrt(27 + 64)
  _, opt_state = tx.update(grads, tx.init(params), params)
  mu = opt_state[1][0].mu  # Adam's first moment after one step: (1 - b1) * clipped gradient
  norm = float(optax.tree.norm(mu)) / (1 - config.optim.b1)
  assert norm == pytest.approx(1.0, rel=1e-5)
  small = {"a": jnp.full(3, 0.1), "b": jnp.full(4, 0.1)}  # under the threshold: untouched
  _, opt_state = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(opt_state[1][0].mu["a"], 0.1 * (1 - config.optim.b1), rtol=1e-6)


def test_nonfinite_loss_skips_the_update_and_is_counted():
  config = smoke_config()
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  par = train.Parallel(config, train.make_train_step(config), devices=jax.devices()[:2])
  p_state = par.put_state(state)
  batch = global_batch(config)
  batch["image"][0, 0, 0, 0] = np.nan
  p_state, metrics = par.step(p_state, par.put_batch(batch), jax.random.PRNGKey(1))
  host = par.get(p_state)
  m = par.get(metrics)
  assert int(m["nonfinite"]) == 1 and int(host.nonfinite_steps) == 1 and int(host.step) == 1
  assert_trees_close(host.params, state.params, rtol=0, atol=0)
  assert_trees_close(host.ema_params, state.ema_params, rtol=0, atol=0)


def test_metrics():
  config = smoke_config()
  _, m = run_steps(config, jax.devices()[:2], num_steps=1)
  assert set(m) == {"loss", "loss_by_quartile", "grad_norm", "learning_rate", "nonfinite"}
  assert m["loss_by_quartile"].shape == (4,)
  assert float(m["learning_rate"]) == 0.0  # step 0 of the warmup
  assert np.isfinite(m["loss"]) and float(m["grad_norm"]) > 0


def test_batch_that_does_not_divide_over_devices():
  config = smoke_config(**{"training.batch_size": 12})
  with pytest.raises(ValueError, match=r"training.batch_size=12 \(global\) does not divide over the 8 devices"):
    train.check_batch_size(config)


def test_bad_parallel_and_ema_settings():
  with pytest.raises(ValueError, match=r"Unknown parallel mapping 'pjit'; accepted: pmap, shard_map"):
    train.Parallel(smoke_config(parallel="pjit"), lambda *a: a)
  with pytest.raises(ValueError, match=r"EMA decays must be floats in \[0, 1\), got 1.5"):
    train.ema_decays(smoke_config(**{"training.ema_decay": 1.5}))


def test_class_conditional_step_uses_the_labels():
  config = smoke_config(**{"model.num_classes": 10, "training.label_dropout": 0.0,
                           "optim.warmup_steps": 0})  # a non-zero learning rate at step 0
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  assert "label_emb" in state.params
  par = train.Parallel(config, train.make_train_step(config), devices=jax.devices()[:2])
  batch = global_batch(config)
  outs = []
  for labels in (batch["label"], (batch["label"] + 1) % 10):
    p_state, metrics = par.step(par.put_state(state), par.put_batch(dict(batch, label=labels)),
                                jax.random.PRNGKey(1))
    outs.append(par.get(p_state))
    assert np.isfinite(par.get(metrics)["loss"])
  # The embedding rows of the labels seen are the ones updated: other labels, other rows.
  emb = [np.asarray(o.params["label_emb"]["embedding"]) for o in outs]
  assert not np.allclose(emb[0], emb[1])


def test_image_grid_places_every_image():
  from ddpm_jax.reporting import image_grid
  images = np.stack([np.full((2, 2, 1), v) for v in (-1.0, -0.5, 1.0)])
  grid = image_grid(images)
  assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)  # 3 images -> 2x2, one cell empty
  assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 64 and grid[4, 1, 0] == 255
  assert grid[0, 0, 0] == 128 and grid[4, 4, 0] == 128  # frame and the empty cell are grey
