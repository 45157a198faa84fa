"""--mode=eval: the DDPM paper's metrics for a checkpoint, written to workdir/eval/<step>.json.

- Bits/dim: the full T-term variational bound (`diffusion.bits_per_dim`) of every example of
  config.eval.split (or its first config.eval.bpd_num_examples), its mean with the standard
  error of the mean, the prior term L_T, the decoder term L_0 and the mean of every L_t.
- ODE bits/dim (metric ode_bpd): the exact NLL of the same examples under the model's
  probability-flow ODE (likelihood.py), with its standard error, tolerances and NFE.
- FID and Inception Score of config.eval.num_samples samples (written and resumed as
  --mode=sample writes them), with Inception-v3 features in JAX from config.eval.inception_weights
  or, when unset, pytorch-fid's weights fetched once into the download cache
  (docs/inception_weights.md). The reference statistics are the
  .npz config.eval.fid_reference, or are computed from config.eval.fid_split of the dataset and
  kept in workdir/eval/ for the next evaluation.

Every host evaluates its own part (its block of the split, its sample shards); the per-example
values are gathered, and process 0 writes the results with their protocol beside them
(eval_records: results of different protocols side by side). Without Inception weights
(offline), bits/dim still runs and is written; FID then fails with the sentence that says how
to get the weights.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import (data, diffusion, downloads, eval_records, fid, from_run, generate,
                      inception, likelihood, loading, placement, settings)
from ddpm_jax.errors import UserError
from ddpm_jax.heartbeat import Heartbeat, duration
from ddpm_jax.reporting import Progress

METRICS = settings.METRICS
BPD_STREAM = 0xB1D  # folded into the run's seed: the bound's noise differs from training's
ODE_STREAM = 0x0DE  # the ODE's dequantization and probes


# ----------------------------------------------------------------------------- bits/dim


def _unguided_model_fn(model_settings: settings.ModelSettings):
  """(params, labels) -> model_fn of the run's model without guidance (labels ignored by an
  unconditional model)."""
  model = model_settings.make_model()
  conditional = bool(model_settings.num_classes)
  return lambda params, labels: from_run.guided_model_fn(
      model, params, labels if conditional else None, 0.0)


@functools.lru_cache(maxsize=8)
def _compiled_bpd(model_settings: settings.ModelSettings, d: settings.DiffusionSettings,
                  per_device: int, devices: tuple):
  """bpd(params, x0 [n*b, ...], labels [n*b], keys [n*b]) -> (total, prior, terms [n*b, T])."""
  make_model_fn, sched = _unguided_model_fn(model_settings), d.make_schedule()

  def bpd(params, x0, labels, keys):
    model_fn = make_model_fn(params, labels)
    out = diffusion.bits_per_dim(sched, model_fn, x0, keys, mean_type=d.mean_type,
                                 var_type=d.var_type, clip_denoised=False)
    return out["total_bpd"], out["prior_bpd"], out["terms_bpd"]

  return placement.map_over_devices(bpd, devices, num_batched=3)


def bits_per_dim_batch(config, params, images, labels, index, *, devices=None) -> dict:
  """The bound of one batch on this host's devices (no collectives): per-example numpy arrays
  total_bpd [B], prior_bpd [B], terms_bpd [B, T].

  images: float32 [B, S, S, C] on the uint8 grid in [-1, 1]; labels int [B] (used by
  class-conditional models); index: int [B] global example indices: example i's noise comes
  from fold_in(bpd key, i) alone, so results do not depend on the batch or device count.
  """
  s = settings.Settings.from_config(config)
  total, prior, terms = run_on_examples(
      lambda devices, per_device: _compiled_bpd(s.model, s.diffusion, per_device, devices),
      jax.random.fold_in(jax.random.PRNGKey(config.seed), BPD_STREAM), params, images, labels,
      index, devices)
  return dict(total_bpd=total, prior_bpd=prior, terms_bpd=terms)


def run_on_examples(compiled, key, params, images, labels, index, devices=None) -> tuple:
  """compiled(devices, per_device)(params, images, labels, keys) on this host's devices, the
  batch padded to a whole number per device; example i's key is fold_in(key, index[i]).
  Returns the outputs as numpy arrays of the B examples."""
  devices = tuple(jax.local_devices() if devices is None else devices)
  n = len(images)
  per_device = math.ceil(n / len(devices))
  pad = per_device * len(devices) - n
  run = compiled(devices, per_device)
  index = np.concatenate([np.asarray(index), np.zeros(pad, np.int64)])
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(index))
  images = np.concatenate([np.asarray(images, np.float32),
                           np.zeros((pad,) + images.shape[1:], np.float32)])
  labels = np.concatenate([np.asarray(labels, np.int32), np.zeros(pad, np.int32)])
  batch = placement.batch_sharding(devices)
  params = placement.replicate(params, devices)  # a no-op for params placed there already
  outputs = run(params, *(jax.device_put(a, batch) for a in (images, labels, keys)))
  return tuple(np.asarray(o)[:n] for o in outputs)


def _gather_rows(x: np.ndarray) -> np.ndarray:
  """The rows of every process's `x`, concatenated in process order (x's length may differ)."""
  if jax.process_count() == 1:
    return x
  counts = np.asarray(multihost_utils.process_allgather(np.array([len(x)]))).reshape(-1)
  padded = np.zeros((counts.max(),) + x.shape[1:], x.dtype)
  padded[:len(x)] = x
  everything = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([everything[p, :c] for p, c in enumerate(counts)])


def summarize_bpd(total: np.ndarray, prior: np.ndarray, terms: np.ndarray) -> dict:
  """Mean bits/dim with its standard error (std with ddof=1 over sqrt(N)) and the terms."""
  n = len(total)
  return dict(num_examples=int(n), bpd=float(total.mean()),
              bpd_stderr=float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
              prior_bpd=float(prior.mean()), decoder_bpd=float(terms[:, 0].mean()),
              terms_bpd=[float(v) for v in terms.mean(axis=0)])


def bits_per_dim_on_split(config, params, *, split: Optional[str] = None,
                          num_examples: Optional[int] = None) -> dict:
  """The bound on `split` (default config.eval.split), over every host: see `summarize_bpd`.

  num_examples (default config.eval.bpd_num_examples; 0 = all): the split's first num_examples,
  whatever the number of hosts (data.eval_batches).
  """
  e = config.eval
  split = e.split if split is None else split
  num_examples = e.get("bpd_num_examples", 0) if num_examples is None else num_examples
  if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
    raise UserError(f"eval.bpd_num_examples must be an integer >= 0 (0: the whole split), got "
                     f"{num_examples!r}.")
  num, batches = data.eval_batches(config, split, batch_size=e.batch_size, limit=num_examples)
  params = placement.replicate(params)  # on the devices once, not once per batch
  progress = Progress(f"bits/dim on {split}", num, unit="ex")
  results, seen = [], 0
  for batch in batches:
    results.append(bits_per_dim_batch(config, params, batch["image"], batch["label"],
                                      batch["index"]))
    seen += len(batch["index"])
    progress.update(seen * jax.process_count())
  local = {k: np.concatenate([r[k] for r in results]) if results else
           np.zeros((0,) + ((config.diffusion.num_timesteps,) if k == "terms_bpd" else ()))
           for k in ("total_bpd", "prior_bpd", "terms_bpd")}
  gathered = {k: _gather_rows(v.astype(np.float64)) for k, v in local.items()}
  return dict(split=split, **summarize_bpd(gathered["total_bpd"], gathered["prior_bpd"],
                                           gathered["terms_bpd"]))


# ----------------------------------------------------------------------------- ODE bits/dim


@functools.lru_cache(maxsize=8)
def _compiled_ode_bpd(model_settings: settings.ModelSettings, d: settings.DiffusionSettings,
                      rtol: float, atol: float, devices: tuple):
  """ode(params, x0 [n*b, ...], labels [n*b], keys [n*b]) -> (bpd, prior_bpd, nfe) [n*b]."""
  make_model_fn, sched = _unguided_model_fn(model_settings), d.make_schedule()

  def ode(params, x0, labels, keys):
    out = likelihood.ode_likelihood(sched, make_model_fn(params, labels), x0, keys, mean_type=d.mean_type,
                                    var_type=d.var_type, rtol=rtol, atol=atol)
    return out["bpd"], out["prior_bpd"], jnp.broadcast_to(out["nfe"], out["bpd"].shape)

  return placement.map_over_devices(ode, devices, num_batched=3)


def ode_bits_per_dim_on_split(config, params) -> dict:
  """The probability-flow ODE's bits/dim (likelihood.py: dequantized, Hutchinson) of the first
  config.eval.bpd_num_examples examples of config.eval.split, over every host: the mean with
  its standard error, the prior's share, the solver's tolerances and its NFE (model jvps) per
  batch. Each device's batch is one ODE solve (its step size adapts to the whole batch)."""
  s = settings.Settings.from_config(config)
  e = s.eval
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), ODE_STREAM)
  compiled = lambda devices, _: _compiled_ode_bpd(s.model, s.diffusion, e.ode_rtol, e.ode_atol,
                                                  devices)
  num, batches = data.eval_batches(config, e.split, batch_size=e.batch_size,
                                   limit=e.bpd_num_examples)
  params = placement.replicate(params)
  progress = Progress(f"ODE bits/dim on {e.split}", num, unit="ex")
  parts, seen = [], 0
  for batch in batches:
    parts.append(run_on_examples(compiled, key, params, batch["image"], batch["label"],
                                 batch["index"]))
    seen += len(batch["index"])
    progress.update(seen * jax.process_count())
  bpd, prior, nfe = (_gather_rows(np.concatenate([p[k] for p in parts]).astype(np.float64)
                                  if parts else np.zeros(0)) for k in range(3))
  n = len(bpd)
  return dict(split=e.split, num_examples=int(n), bpd=float(bpd.mean()),
              bpd_stderr=float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
              prior_bpd=float(prior.mean()), rtol=e.ode_rtol, atol=e.ode_atol,
              solver="diffrax.Tsit5", divergence="hutchinson", dequantized=True,
              nfe_mean=float(nfe.mean()), nfe_max=int(nfe.max()))


# ----------------------------------------------------------------------------- FID / IS


def inception_weights_path(config) -> str:
  """config.eval.inception_weights, or when unset pytorch-fid's weights from the download cache
  (fetched and verified on first use: ddpm_jax.downloads); a UserError when that fails."""
  path = config.eval.get("inception_weights")
  return path if path else downloads.fetch(downloads.INCEPTION_WEIGHTS)


def load_inception(config):
  """The Inception variables (see `inception_weights_path`) on all local devices, or one clear
  error."""
  return placement.replicate(inception.load_inception_params(inception_weights_path(config)))


def _features(variables, images_uint8, batch_size: int):
  """Inception (pool, logits) of uint8 images; padded to whole batches of `batch_size` so that
  every call, whatever its number of images, reuses one compiled network."""
  n = len(images_uint8)
  pad = -n % batch_size
  images = np.concatenate([images_uint8, np.zeros((pad,) + images_uint8.shape[1:], np.uint8)])
  pool, logits = fid.inception_features(variables, images.astype(np.float32) / 127.5 - 1.0,
                                        batch_size=batch_size)
  return pool[:n], logits[:n]


def reference_statistics(config, workdir: str, variables, *, all_hosts: bool = True):
  """(mu, sigma) of the real data: config.eval.fid_reference if set, else computed from
  config.eval.fid_split (its first fid_reference_examples examples) and cached in
  workdir/eval/. all_hosts=False computes on this host alone (no collectives)."""
  e = config.eval
  if e.get("fid_reference"):
    return fid.load_statistics(e.fid_reference)
  d = config.data
  limit = int(e.fid_reference_examples)
  name = f"fid_reference_{d.dataset.replace('/', '_')}_{e.fid_split}_{d.image_size}_{limit}.npz"
  path = epath.Path(workdir) / "eval" / name
  if path.exists():
    return fid.load_statistics(os.fspath(path))
  hosts = {} if all_hosts else dict(process_index=0, process_count=1)
  size, batches = data.eval_batches(config, e.fid_split, batch_size=e.batch_size, limit=limit,
                                    **hosts)
  progress = Progress(f"FID reference ({e.fid_split})", size, unit="img")
  pools, seen = [], 0
  for batch in batches:
    pixels = np.round((batch["image"] + 1.0) * 127.5).astype(np.uint8)
    pools.append(_features(variables, pixels, e.batch_size)[0])
    seen += len(pixels)
    progress.update(seen * (jax.process_count() if all_hosts else 1))
  pool = np.concatenate(pools)
  if all_hosts:
    pool = _gather_rows(pool.astype(np.float32))
  mu, sigma = fid.feature_statistics(pool)
  if jax.process_index() == 0:
    fid.save_statistics(os.fspath(path), mu, sigma)
  return mu, sigma


def fid_and_inception_score(config, workdir: str, params, step: int, variables) -> dict:
  """FID against the reference statistics and Inception Score of config.eval.num_samples
  samples, which are written as --mode=sample writes them (and reused if already there)."""
  e = config.eval
  n = int(e.num_samples)
  if n < 2:
    raise UserError(f"eval.num_samples must be >= 2 for FID, got {n}.")
  directory = generate.generate(config, workdir, num_samples=n, step=step, params=params)
  shard_size = int(json.loads((directory / generate.MANIFEST).read_text())["shard_size"])
  pc, pi = jax.process_count(), jax.process_index()
  shards = list(range(pi, math.ceil(n / shard_size), pc))
  images, _ = generate.read_samples(directory, n, shards=shards)
  with Heartbeat(lambda s: f"Inception features of {len(images)} samples ... {duration(s)} so far",
                 active=jax.process_index() == 0):
    pool, logits = _features(variables, images, e.batch_size)
  index = np.concatenate([np.arange(k * shard_size, min((k + 1) * shard_size, n))
                          for k in shards]) if shards else np.zeros(0, np.int64)
  order = np.argsort(_gather_rows(index))
  pool = _gather_rows(pool.astype(np.float32))[order]
  logits = _gather_rows(logits.astype(np.float32))[order]
  mu, sigma = fid.feature_statistics(pool)
  ref_mu, ref_sigma = reference_statistics(config, workdir, variables)
  is_mean, is_std = fid.inception_score(logits, splits=min(10, n))
  return dict(num_samples=n, samples=os.fspath(directory),
              fid=fid.frechet_distance(mu, sigma, ref_mu, ref_sigma),
              inception_score=is_mean, inception_score_std=is_std,
              reference=e.get("fid_reference") or f"{config.data.dataset}:{e.fid_split}")


# ----------------------------------------------------------------------------- results


def results_path(workdir: str, step: int) -> epath.Path:
  return eval_records.path(workdir, step)


def write_results(workdir: str, step: int, results: dict) -> epath.Path:
  """Merges `results` into workdir/eval/<step>.json (process 0; atomic rename)."""
  return eval_records.merge(workdir, step, lambda merged: merged.update(results))


def evaluate(config, workdir: str, *, step: Optional[int] = None) -> dict:
  """--mode=eval: config.eval.metrics of checkpoint `step` (default the latest) of the run.

  Writes workdir/eval/<step>.json and returns the results. Bits/dim is computed and written
  before FID, so missing Inception weights (reported as one clear error at the end) never
  cost the bound.
  """
  settings.validate(config)
  metrics = tuple(config.eval.get("metrics", METRICS))
  for m in metrics:
    diffusion.check_choice("eval metric", m, METRICS)
  if not metrics:
    raise UserError(f"config.eval.metrics is empty; accepted: any of {', '.join(METRICS)}.")
  step, params, _ = loading.load_with_step(workdir, step=step)
  from_run.check_params(params, config)
  variables, weights_error, weights_sha256 = None, None, None
  if "fid" in metrics:
    try:
      weights = inception_weights_path(config)
      variables = placement.replicate(inception.load_inception_params(weights))
      weights_sha256 = eval_records.sha256_of_file(weights)
    except UserError as e:  # offline, a missing or refused file: after bits/dim, if asked
      if not {"bpd", "ode_bpd"} & set(metrics):
        raise
      weights_error = e
      logging.warning("%s Computing bits/dim only.", e)
  results = {}
  if "bpd" in metrics:
    r = results["bpd"] = bits_per_dim_on_split(config, params)
    protocol = eval_records.bpd_protocol(config, split=r["split"], num_examples=r["num_examples"])
    key = eval_records.key(f"{r['split']}-n{r['num_examples']}", protocol)
    note = eval_records.record(workdir, step, "bpd", key, r, protocol)
    logging.info("Step %d: %.4f +- %.4f bits/dim on %s (%d examples); written to %s as %r%s.",
                 step, r["bpd"], r["bpd_stderr"], r["split"], r["num_examples"],
                 results_path(workdir, step), key, f" ({note})" if note else "")
  if "ode_bpd" in metrics:
    r = results["ode_bpd"] = ode_bits_per_dim_on_split(config, params)
    protocol = dict(eval_records.bpd_protocol(config, split=r["split"],
                                              num_examples=r["num_examples"]),
                    estimator="probability-flow ODE", rtol=r["rtol"], atol=r["atol"])
    key = eval_records.key(f"{r['split']}-n{r['num_examples']}-ode", protocol)
    note = eval_records.record(workdir, step, "ode_bpd", key, r, protocol)
    logging.info("Step %d: %.4f +- %.4f bits/dim (probability-flow ODE, %.0f NFE) on %s (%d "
                 "examples); written to %s as %r%s.", step, r["bpd"], r["bpd_stderr"],
                 r["nfe_mean"], r["split"], r["num_examples"], results_path(workdir, step), key,
                 f" ({note})" if note else "")
  if weights_error is not None:
    raise weights_error
  if "fid" in metrics:
    r = fid_and_inception_score(config, workdir, params, step, variables)
    protocol = eval_records.fid_protocol(config, num_samples=r["num_samples"],
                                         weights_sha256=weights_sha256)
    key = eval_records.key(f"{generate.sample_dir(workdir, config, step).name}"
                           f"-n{r['num_samples']}", protocol)
    results["fid"] = {key: dict(r, protocol=protocol)}
    note = eval_records.record(workdir, step, "fid", key, r, protocol)
    logging.info("Step %d: FID %.3f, IS %.3f +- %.3f (%d samples, %s); written as %r%s.", step,
                 r["fid"], r["inception_score"], r["inception_score_std"], r["num_samples"],
                 r["samples"], key, f" ({note})" if note else "")
    differences = eval_records.paper_differences(protocol)
    if differences:
      logging.warning("FID/IS protocol differs from the DDPM paper's (50,000 samples, train "
                      "statistics, EMA): %s.", "; ".join(differences))
  return results


# ----------------------------------------------------------------------------- during training


class TrainingEvaluator:
  """In-training evaluation (training.eval_every > 0) of the EMA params, on this host alone:
  bits/dim of the first eval.train_bpd_examples examples of eval.split (the same held-out batch
  every time) and, with eval.train_fid_samples > 0, FID/IS of that many samples against the
  reference statistics. Built before training, so missing weights stop the run at once."""

  def __init__(self, config, workdir: str):
    e = config.eval
    self.config, self.workdir = config, workdir
    n = int(e.train_bpd_examples)
    self.batch = None
    if n > 0:
      _, batches = data.eval_batches(config, e.split, batch_size=n, limit=n, process_index=0,
                                     process_count=1)
      parts = list(batches)
      self.batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    self.num_fid = int(e.train_fid_samples)
    self.variables = load_inception(config) if self.num_fid > 0 else None
    self.reference = None

  def __call__(self, step: int, params) -> dict:
    """Scalars {"eval/bpd": ..., "eval/fid": ..., "eval/inception_score": ...} of `params`."""
    out = {}
    if self.batch is not None:
      b = self.batch
      r = bits_per_dim_batch(self.config, params, b["image"], b["label"], b["index"])
      out["eval/bpd"] = float(r["total_bpd"].mean())
    if self.num_fid:
      if self.reference is None:
        self.reference = reference_statistics(self.config, self.workdir, self.variables,
                                              all_hosts=False)
      images = from_run.sample(params, generate.sample_key(self.config), config=self.config,
                               num_samples=self.num_fid)
      pool, logits = fid.inception_features(self.variables, np.asarray(images),
                                            batch_size=self.config.eval.batch_size)
      mu, sigma = fid.feature_statistics(pool)
      out["eval/fid"] = fid.frechet_distance(mu, sigma, *self.reference)
      out["eval/inception_score"] = fid.inception_score(logits, splits=1)[0]
    return out
