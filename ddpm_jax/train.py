"""Training: the TrainState with EMA, the pure train step, and its data-parallel mapping.

One step function, two mappings: `jax.pmap` (the default) or `jax.shard_map` over a 1-D mesh
(`config.parallel = "shard_map"`). Inside, gradients and metrics are averaged over the mapped
axis "batch", then clipped by global norm, so every device applies the same update.

Randomness: each example draws its timestep, noise and dropout from
fold_in(fold_in(key, step), global example index), where the global index follows from the
device's position on the "batch" axis (which counts devices over all hosts). The update of a
global batch is therefore the same on 1 device, 8 devices or 2 hosts, up to float reduction order.
"""
from __future__ import annotations

import collections
import signal
from typing import Any, Callable, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from ddpm_jax import (checkpoint, data, diffusion, evaluation, from_run, lease, placement, rundir,
                      settings, short_run)
from ddpm_jax.errors import NonFiniteLossError, UserError
from ddpm_jax.preemption import Interrupted, Preemption
from ddpm_jax.reporting import Reporter

PARALLEL = settings.PARALLEL
AXIS = placement.AXIS


@struct.dataclass
class TrainState:
  """step: int32 []; params / opt_state: the model's; ema_params: one tree per EMA decay;
  nonfinite_steps: int32 [], steps whose update was skipped for a non-finite loss or gradient."""
  step: jax.Array
  params: Any
  ema_params: Tuple[Any, ...]
  opt_state: Any
  nonfinite_steps: jax.Array


def ema_decays(config) -> Tuple[float, ...]:
  """(training.ema_decay, *training.extra_ema_decays): the first EMA is the one sampled from."""
  decays = (config.training.ema_decay,) + tuple(config.training.get("extra_ema_decays", ()))
  for d in decays:
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
      raise ValueError(f"EMA decays must be floats in [0, 1), got {d!r} in training.ema_decay/"
                       "extra_ema_decays.")
  return tuple(float(d) for d in decays)


def learning_rate_fn(config) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate over warmup_steps, then constant (as the paper)."""
  o = config.optim
  if o.warmup_steps > 0:
    return optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  return optax.constant_schedule(o.learning_rate)


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping (of the already device-averaged gradient), then Adam."""
  o = config.optim
  adam = optax.adam(learning_rate_fn(config), b1=o.b1, b2=o.b2, eps=o.eps)
  if o.grad_clip and o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam)
  return adam


def _dummy_inputs(config):
  d = config.data
  x = jnp.zeros((1, d.image_size, d.image_size, d.num_channels), jnp.float32)
  return x, jnp.zeros((1,), jnp.int32)


def init_params(config, key) -> Any:
  """The model's initial float32 parameters from `key`."""
  return jax.jit(lambda k: _init_params(config, k))(key)


def _init_params(config, key):
  x, t = _dummy_inputs(config)
  model = settings.Settings.from_config(config).model.make_model()
  return model.init({"params": key}, x, t, train=False)["params"]


def create_train_state(config, key) -> TrainState:
  """A fresh TrainState on the default device; EMA trees start as copies of the parameters.

  One jit-compiled program: run op by op, the initialisers and Adam's zeros compile one
  small program each (hundreds of compilations, seconds to tens of seconds at start-up).
  """
  def build(key):
    params = _init_params(config, key)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=tuple(params for _ in ema_decays(config)),
        opt_state=make_optimizer(config).init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32))
  return jax.jit(build)(key)


def ema_update(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (decay: a float or a traced [])."""
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def ema_decay_at(decay: float, step, warmup: bool):
  """The decay of the update that follows `step` earlier updates (int32 [] or an int).

  Without warm-up it is `decay`. With it (training.ema_warmup), as diffusers' EMAModel (its
  default, non-power form): 0 for the first update (the EMA becomes the updated parameters),
  then min(decay, (1 + step) / (10 + step)), so the average covers about the last 10% of the
  steps until that reaches `decay`. One decay then suits short and long runs: with a fixed 0.9999
  a 2,000-step run would sample from weights still 80% at their initialisation.
  """
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.where(step == 0, 0.0, jnp.minimum(decay, (1.0 + step) / (10.0 + step)))


def make_train_step(config) -> Callable:
  """The pure step `train_step(state, batch, key) -> (state, metrics)` for one device's shard.

  batch: {"image": float32 [b, S, S, C] in [-1, 1], "label": int32 [b]} (b = per-device batch).
  key: the run's training key (the same every step; the step number is folded in here).
  Must run under a mapping with axis name "batch" (see `Parallel`).
  """
  s = settings.Settings.from_config(config)
  model = s.model.make_model()
  sched = s.diffusion.make_schedule()
  tx = make_optimizer(config)
  lr_fn = learning_rate_fn(config)
  decays = ema_decays(config)
  ema_warmup = s.training.ema_warmup
  d = config.diffusion
  diffusion.check_options(d.mean_type, d.var_type, d.loss_type)
  loss_weight = (diffusion.min_snr_loss_weight(sched, d.min_snr_gamma, d.mean_type)
                 if d.get("min_snr_gamma", 0) else None)
  num_classes = config.model.num_classes
  label_dropout = config.training.get("label_dropout", 0.0)
  T = sched.num_timesteps

  def train_step(state: TrainState, batch, key):
    images = batch["image"]
    b = images.shape[0]
    index = jax.lax.axis_index(AXIS) * b + jnp.arange(b)  # global example index
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, state.step), index)
    draw = lambda i, fn: jax.vmap(lambda k: fn(jax.random.fold_in(k, i)))(keys)
    t = draw(0, lambda k: jax.random.randint(k, (), 0, T))
    noise = draw(1, lambda k: jax.random.normal(k, images.shape[1:], images.dtype))
    dropout_keys = draw(2, lambda k: k)
    labels = None
    if num_classes:  # a null label with probability label_dropout trains classifier-free guidance
      drop = draw(3, lambda k: jax.random.bernoulli(k, label_dropout))
      labels = jnp.where(drop, num_classes, batch["label"])

    def loss_fn(params):
      def model_fn(x_t, t_):
        # One example at a time under vmap, so each example's dropout mask comes from its own key.
        def one(x, tt, k, y):
          y = None if y is None else y[None]
          return model.apply({"params": params}, x[None], tt[None], train=True, y=y,
                             rngs={"dropout": k})[0]
        return jax.vmap(one)(x_t, t_, dropout_keys, labels)

      losses = diffusion.training_losses(sched, model_fn, images, t, noise, mean_type=d.mean_type,
                                         var_type=d.var_type, loss_type=d.loss_type,
                                         loss_weight=loss_weight)
      return losses.mean(), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = tuple(ema_update(e, params, ema_decay_at(decay, state.step, ema_warmup))
                for e, decay in zip(state.ema_params, decays))

    # A non-finite loss or gradient leaves the state as it was and is counted; the loop stops.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + (1 - finite.astype(jnp.int32)))

    quartile = jnp.minimum(t * 4 // T, 3)
    sums = jax.lax.psum(jax.ops.segment_sum(losses, quartile, 4), AXIS)
    counts = jax.lax.psum(jax.ops.segment_sum(jnp.ones_like(losses), quartile, 4), AXIS)
    metrics = dict(loss=loss, loss_by_quartile=sums / jnp.maximum(counts, 1.0),
                   grad_norm=grad_norm, learning_rate=lr_fn(state.step),
                   nonfinite=1 - finite.astype(jnp.int32))
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------- mappings


class Parallel:
  """The train step mapped over devices as config.parallel says, and where its state and
  batches live: `step(state, batch, key)`, `put_state`, `put_batch`, `get` (see placement.py)."""

  def __init__(self, config, step_fn: Callable, devices=None):
    """devices: all devices by default; a subset (single process only) e.g. for tests."""
    where = placement.data_parallel(config.parallel, devices)
    self.kind, self.local_devices = where.kind, where.local_devices
    self.step = where.map_step(step_fn)
    self.put_state, self.put_batch, self.get = where.put_state, where.put_batch, where.get


def check_batch_size(config) -> int:
  """The per-device batch; the global batch must split evenly over every device of every host."""
  global_batch = config.training.batch_size
  devices = jax.device_count()
  if global_batch < 1 or global_batch % devices:
    raise UserError(
        f"training.batch_size={global_batch} (global) does not divide over the {devices} devices "
        f"({jax.process_count()} processes x {jax.local_device_count()} local); use a multiple of "
        f"{devices}.")
  return global_batch // devices


def state_dict(state: TrainState) -> dict:
  return flax.serialization.to_state_dict(state)


def state_from_dict(template: TrainState, tree: dict) -> TrainState:
  return flax.serialization.from_state_dict(template, tree)


# ----------------------------------------------------------------------------- the loop


def _device_batches(iterator, par: Parallel, ahead: int = 2):
  """Host batches placed on the devices `ahead` steps early (transfers overlap the compute)."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(par.put_batch({k: batch[k] for k in ("image", "label")}))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def train_and_evaluate(config, workdir: str, *, progress_every_s: float = 30.0,
                       force_lease: bool = False) -> TrainState:
  """Trains config's model in workdir, resuming from its newest intact checkpoint; returns the
  state.

  Checkpoints every training.checkpoint_every steps and at the end; logs every
  training.log_every steps, and prints a progress line at least every `progress_every_s`
  seconds between them; writes an EMA sample grid every training.sample_every steps.
  SIGTERM or Ctrl-C saves the step the loop is on and raises `Interrupted` (see its
  exit_status). A non-finite loss stops the run with NonFiniteLossError (a FloatingPointError and UserError); the bad update is
  never applied, so no checkpoint holds it.

  Dispatch: the host runs at most 2 steps ahead of the device (it waits for step n-2 after
  dispatching step n), so that a signal is answered within about 2 steps, and a step's metrics
  are read once it has finished, never stalling the device on the newest step.
  """
  tc = config.training
  # Refuse bad settings before anything is written to the workdir.
  settings.validate(config, device_count=jax.device_count())
  settings.check_dataset(config, "train")
  short_run.warn(config)
  evaluator = None
  if tc.get("eval_every", 0):  # built first: missing Inception weights stop the run at once
    evaluator = evaluation.TrainingEvaluator(config, workdir)
  # One writer per workdir, from its first write (config.json) to its last; the Checkpointer's
  # clean-up of temporary checkpoint folders happens only under it.
  with lease.hold(workdir, purpose="training", force=force_lease,
                  primary=jax.process_index() == 0, sync=jax.process_count() > 1) as held:
    return _train_under_lease(config, workdir, evaluator, held, progress_every_s)


def _train_under_lease(config, workdir: str, evaluator, held, progress_every_s: float):
  """train_and_evaluate once the settings are checked and the workdir's lease is held (`held`:
  the Lease on process 0, None on the others)."""
  tc = config.training
  config = rundir.write_or_check_config(workdir, config)
  if names := data.class_names(config):  # a folder labelled by subfolders: load() returns them
    rundir.write_class_names(workdir, names)
  init_key, train_key, sample_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)

  finished = None  # the newest step known to have finished on the device
  preemption = Preemption(lambda: finished)
  ckpt = reporter = None
  try:
    ckpt = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
    if ckpt.latest_step() is not None:
      # Resuming needs only the state's structure: no initialisation to compile and run.
      template = jax.eval_shape(lambda k: create_train_state(config, k), init_key)
      tree, _ = ckpt.restore(target=state_dict(template))
      state = state_from_dict(template, tree)
      logging.info("Resuming from the checkpoint of step %d in %s.", int(state.step), workdir)
    else:
      state = create_train_state(config, init_key)
    finished = start_step = int(state.step)

    par = Parallel(config, make_train_step(config))
    p_state = par.put_state(state)
    del state
    host_batch = tc.batch_size // jax.process_count()
    batches = _device_batches(
        data.create_input_iter(config, split="train", per_host_batch_size=host_batch,
                               seed=config.seed, start_step=start_step), par)
    reporter = Reporter(workdir, num_steps=tc.num_train_steps, start_step=start_step,
                        batch_size=tc.batch_size, progress_every_s=progress_every_s)
    in_flight = collections.deque()  # (step, metrics) dispatched, not yet known finished

    def finish(upto: int) -> None:
      """Waits for the steps up to `upto`, checks that their loss was finite, reports them."""
      nonlocal finished
      while in_flight and in_flight[0][0] <= upto:
        step, metrics = in_flight.popleft()
        if int(par.get(metrics["nonfinite"])):  # blocks until the step has finished
          raise NonFiniteLossError(
              f"Training stopped: the loss or gradient became NaN/Inf between steps {step - 1} "
              f"and {step}. That update was not applied and nothing after it was saved; the "
              f"last good checkpoint is step {ckpt.latest_step()} in {workdir}/checkpoints. Try "
              f"a lower optim.learning_rate or check the data.")
        finished = step
        if step % tc.log_every == 0 or step == tc.num_train_steps:
          reporter.scalars(step, par.get(metrics))
        elif reporter.progress_due():
          reporter.progress(step, par.get(metrics))

    stopped = None
    for step in range(start_step + 1, tc.num_train_steps + 1):
      batch = next(batches)
      if step == start_step + 1:
        reporter.compiling()  # the first call traces and compiles before it dispatches
      p_state, metrics = par.step(p_state, batch, train_key)
      if step == start_step + 1:
        reporter.compiled()
      in_flight.append((step, metrics))
      finish(step - 2)
      last = step == tc.num_train_steps
      stop = preemption.reached(step) and not last
      if step % tc.checkpoint_every == 0 or last or stop:
        finish(step)
        if held is not None:
          held.check()  # another process took the workdir over: write nothing more
        host = par.get(p_state)
        ckpt.save(step, state_dict(host), meta={"step": step, "data_step": step,
                                               "train_key": np.asarray(train_key).tolist()})
      if stop:
        stopped = step
        break
      if tc.sample_every and (step % tc.sample_every == 0 or last) and jax.process_index() == 0:
        n = min(64, config.sampling.num_samples)
        with reporter.aside(f"step {step}: sampling a grid of {n} EMA samples"):
          ema = par.get(p_state.ema_params[0])
          reporter.samples(step, np.asarray(from_run.sample(ema, sample_key, config=config,
                                                            num_samples=n)))
      if evaluator and (step % tc.eval_every == 0 or last) and jax.process_index() == 0:
        with reporter.aside(f"step {step}: evaluating the EMA parameters"):
          scalars = evaluator(step, par.get(p_state.ema_params[0]))
        reporter.eval_scalars(step, scalars)
        evaluation.write_results(workdir, step, {"training_eval": scalars})
    if stopped is not None:
      ckpt.wait()
      arrival = ("" if preemption.arrived_after is None else
                 f" arrived after step {preemption.arrived_after} had finished")
      logging.warning("%s%s: saved the checkpoint of step %d in %s; stopping.",
                      signal.Signals(preemption.signum).name, arrival, stopped, workdir)
      reporter.summary(stopped, ckpt.latest_step(), signal.Signals(preemption.signum).name)
      raise Interrupted(preemption.signum, stopped, workdir)
    ckpt.wait()
    reporter.summary(tc.num_train_steps, ckpt.latest_step())
    return par.get(p_state)
  finally:
    preemption.restore()
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()
    if reporter is not None:
      reporter.close()
