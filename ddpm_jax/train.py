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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import checkpoint, data, diffusion, evaluation, sampling
from ddpm_jax.reporting import Reporter
from ddpm_jax.unet import UNet

PARALLEL = ("pmap", "shard_map")
AXIS = "batch"


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
  return UNet(**config.model).init({"params": key}, x, t, train=False)["params"]


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


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def make_train_step(config) -> Callable:
  """The pure step `train_step(state, batch, key) -> (state, metrics)` for one device's shard.

  batch: {"image": float32 [b, S, S, C] in [-1, 1], "label": int32 [b]} (b = per-device batch).
  key: the run's training key (the same every step; the step number is folded in here).
  Must run under a mapping with axis name "batch" (see `Parallel`).
  """
  model = UNet(**config.model)
  sched = sampling.schedule_from_config(config)
  tx = make_optimizer(config)
  lr_fn = learning_rate_fn(config)
  decays = ema_decays(config)
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
    ema = tuple(ema_update(e, params, decay) for e, decay in zip(state.ema_params, decays))

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
  """Where state and batches live for one mapping of the step, and the mapped step itself.

  pmap: state replicated with a leading device axis; a host batch [B_host, ...] is split into
  [local devices, B_host / local devices, ...]. shard_map: state is one replicated global array
  on a 1-D mesh of all devices; the batch is a global array sharded along its first axis.
  """

  def __init__(self, config, step_fn: Callable, devices=None):
    """devices: all devices by default; a subset (single process only) e.g. for tests."""
    if config.parallel not in PARALLEL:
      raise ValueError(f"Unknown parallel mapping {config.parallel!r}; accepted: "
                       f"{', '.join(PARALLEL)}.")
    self.kind = config.parallel
    devices = list(jax.devices() if devices is None else devices)
    self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
    if self.kind == "pmap":
      self.step = jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,),
                           devices=devices if len(devices) < jax.device_count() else None)
      # pmap's inputs: a leading axis over this host's devices, one slice per device.
      self.local_sharding = NamedSharding(Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))
    else:
      self.mesh = Mesh(np.array(devices), (AXIS,))
      # check_vma=False: per-device code as under pmap. (With it on, the gradient of the
      # replicated parameters would arrive already summed over devices, before our pmean.)
      mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P(AXIS), P()),
                             out_specs=(P(), P()), check_vma=False)
      self.step = jax.jit(mapped, donate_argnums=(0,))

  def put_state(self, state):
    """A host state onto the devices. Every leaf gets its own buffer (EMA trees start as the
    parameters themselves, and donated buffers must not be shared)."""
    if self.kind == "pmap":
      n = len(self.local_devices)
      stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n),
                                       jax.device_get(state))
      return jax.device_put(stacked, self.local_sharding)
    own = jax.tree_util.tree_map(np.array, jax.device_get(state))
    return jax.device_put(own, NamedSharding(self.mesh, P()))

  def put_batch(self, batch):
    """A host's batch (NumPy, leading axis B_host) onto the devices."""
    if self.kind == "pmap":
      n = len(self.local_devices)
      return jax.device_put(
          jax.tree_util.tree_map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch),
          self.local_sharding)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  def get(self, tree):
    """Replicated device values (state or metrics) as host NumPy, one copy.

    Read from this host's first device buffer: no computation, so no host waits on another.
    """
    def first(x):
      data = np.asarray(x.addressable_shards[0].data)
      return data[0] if self.kind == "pmap" else data  # pmap: the shard keeps its device axis
    return jax.tree_util.tree_map(first, tree)


def check_batch_size(config) -> int:
  """The per-device batch; the global batch must split evenly over every device of every host."""
  global_batch = config.training.batch_size
  devices = jax.device_count()
  if global_batch < 1 or global_batch % devices:
    raise ValueError(
        f"training.batch_size={global_batch} (global) does not divide over the {devices} devices "
        f"({jax.process_count()} processes x {jax.local_device_count()} local); use a multiple of "
        f"{devices}.")
  return global_batch // devices


def state_dict(state: TrainState) -> dict:
  return flax.serialization.to_state_dict(state)


def state_from_dict(template: TrainState, tree: dict) -> TrainState:
  return flax.serialization.from_state_dict(template, tree)


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """Notices SIGTERM (a TPU preemption, `kill`) so the loop can checkpoint and stop cleanly.

  One process: our own signal handler. Several: jax.distributed's preemption notifier, whose
  sync point makes every process stop after the same step.
  """

  def __init__(self):
    self.requested = False
    self.multiprocess = jax.process_count() > 1
    if not self.multiprocess:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; every process must call it every step."""
    if self.multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if not self.multiprocess:
      signal.signal(signal.SIGTERM, self._previous)


def _device_batches(iterator, par: Parallel, ahead: int = 2):
  """Host batches placed on the devices `ahead` steps early (transfers overlap the compute)."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(par.put_batch({k: batch[k] for k in ("image", "label")}))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains config's model in workdir, resuming from its latest checkpoint; returns the state.

  Checkpoints every training.checkpoint_every steps, at the end, and on SIGTERM; logs every
  training.log_every steps; writes an EMA sample grid every training.sample_every steps.
  A non-finite loss stops the run with FloatingPointError; the bad update is never applied,
  so no checkpoint holds it.
  """
  tc = config.training
  # Refuse bad settings before anything is written to the workdir.
  check_batch_size(config)
  if config.parallel not in PARALLEL:
    raise ValueError(f"Unknown parallel mapping {config.parallel!r}; accepted: "
                     f"{', '.join(PARALLEL)}.")
  data.check_dataset(config, "train")
  evaluator = None
  if tc.get("eval_every", 0):  # built first: missing Inception weights stop the run at once
    evaluator = evaluation.TrainingEvaluator(config, workdir)
  config = checkpoint.write_or_check_config(workdir, config)
  if names := data.class_names(config):  # a folder labelled by subfolders: load() returns them
    checkpoint.write_class_names(workdir, names)
  init_key, train_key, sample_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)

  ckpt = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
  if ckpt.latest_step() is not None:
    # Resuming needs only the state's structure: no initialisation to compile and run.
    template = jax.eval_shape(lambda k: create_train_state(config, k), init_key)
    tree, _ = ckpt.restore(target=state_dict(template))
    state = state_from_dict(template, tree)
    logging.info("Resuming from the checkpoint of step %d in %s.", int(state.step), workdir)
  else:
    state = create_train_state(config, init_key)
  start_step = int(state.step)

  par = Parallel(config, make_train_step(config))
  p_state = par.put_state(state)
  del state
  host_batch = tc.batch_size // jax.process_count()
  batches = _device_batches(
      data.create_input_iter(config, split="train", per_host_batch_size=host_batch,
                             seed=config.seed, start_step=start_step), par)
  reporter = Reporter(workdir, num_steps=tc.num_train_steps, start_step=start_step,
                      batch_size=tc.batch_size)
  preemption = _Preemption()
  checked_step = start_step

  def check_finite(step):
    nonlocal checked_step
    if int(par.get(p_state.nonfinite_steps)):
      raise FloatingPointError(
          f"Training stopped: the loss or gradient became NaN/Inf between steps {checked_step} "
          f"and {step}. Those updates were not applied and nothing after them was saved; the "
          f"last good checkpoint is step {ckpt.latest_step()} in {workdir}/checkpoints. Try a "
          f"lower optim.learning_rate or check the data.")
    checked_step = step

  try:
    for step in range(start_step + 1, tc.num_train_steps + 1):
      p_state, metrics = par.step(p_state, next(batches), train_key)
      last = step == tc.num_train_steps
      if step % tc.log_every == 0 or last:
        check_finite(step)
        reporter.scalars(step, par.get(metrics))
      stop = preemption.reached(step)
      if step % tc.checkpoint_every == 0 or last or stop:
        check_finite(step)
        host = par.get(p_state)
        ckpt.save(step, state_dict(host), meta={"step": step, "data_step": step,
                                               "train_key": np.asarray(train_key).tolist()})
      if tc.sample_every and (step % tc.sample_every == 0 or last) and jax.process_index() == 0:
        ema = par.get(p_state.ema_params[0])
        n = min(64, config.sampling.num_samples)
        reporter.samples(step, np.asarray(sampling.sample(ema, sample_key, config=config,
                                                          num_samples=n)))
      if evaluator and (step % tc.eval_every == 0 or last) and jax.process_index() == 0:
        scalars = evaluator(step, par.get(p_state.ema_params[0]))
        reporter.eval_scalars(step, scalars)
        evaluation.write_results(workdir, step, {"training_eval": scalars})
      if stop:
        logging.warning("SIGTERM: saved the checkpoint of step %d in %s; stopping.", step,
                        workdir)
        break
    return par.get(p_state)
  finally:
    preemption.restore()
    ckpt.wait()
    ckpt.close()
    reporter.close()
