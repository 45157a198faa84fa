"""Sampling and evaluation for users: load -> sample, --mode=sample shards, bits/dim, FID/IS.

A smoke run (6 training steps of configs/smoke.py on 8 CPU devices) is trained once per module;
everything else reads it. References are independent: the scan samplers called directly with
per-sample keys, the bound's own terms, NumPy's standard error, a manual guidance formula.
"""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import downloads, evaluation, from_run, generate, rundir, sampling, settings, train
from ddpm_jax.errors import UserError
from tests.test_checkpoint import damage
from tests.test_loop import smoke_config

CPU = jax.local_devices()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A trained smoke workdir (checkpoints at steps 3 and 6, in-training bits/dim at both)."""
  workdir = str(tmp_path_factory.mktemp("evaluation") / "run")
  train.train_and_evaluate(smoke_config(**{"training.sample_every": 0,
                                           "training.eval_every": 3}), workdir)
  return workdir


def arrays_equal(a, b):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def chain_inputs(params, config, key, n):
  """(model_fn, schedule, per-sample keys fold_in(key, i)) as sample() builds them."""
  model = settings.Settings.from_config(config).model.make_model()
  model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
  keys = None if key is None else jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))
  return model_fn, settings.Settings.from_config(config).diffusion.make_schedule(), keys


def equals_the_loop(got, want):
  """sample()'s output against a loop's unclipped x_0: sample() clips to [-1, 1]."""
  np.testing.assert_allclose(np.asarray(got), np.clip(np.asarray(want), -1, 1), atol=1e-5)


def same_samples(a, b):
  """Equal up to float rounding: a different per-device batch may round convolutions
  differently (1e-7), while every sample's noise is identical."""
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- load + sample


def test_round_trip_same_samples_on_1_and_8_devices(run):
  params, config = ddpm_jax.load(run)
  key = jax.random.PRNGKey(7)
  eight = ddpm_jax.sample(params, key, config=config, num_samples=11)  # 2 calls, the last padded
  one = ddpm_jax.sample(params, key, config=config, num_samples=11, devices=CPU[:1])
  three = ddpm_jax.sample(params, key, config=config, num_samples=11, devices=CPU[:3])
  assert eight.shape == (11, 8, 8, 1) and eight.dtype == jnp.float32
  assert float(eight.min()) >= -1.0 and float(eight.max()) <= 1.0
  same_samples(eight, one)
  same_samples(eight, three)
  # Sample i depends on (key, i) only: a later slice drawn on its own is the same.
  same_samples(eight[5:], ddpm_jax.sample(params, key, config=config, num_samples=6,
                                          first_index=5))
  assert not np.allclose(np.asarray(eight[0]), np.asarray(eight[1]))


@pytest.mark.parametrize("sampler,steps", [("ancestral", 20), ("ancestral", 7), ("ddim", 5),
                                           ("heun", 4)])
def test_sample_is_the_scan_sampler_with_per_sample_keys(run, sampler, steps):
  """sample() == the documented loops on the model, with keys fold_in(key, i)."""
  params, config = ddpm_jax.load(run)
  key = jax.random.PRNGKey(3)
  got = ddpm_jax.sample(params, key, config=config, num_samples=4, sampler=sampler,
                        num_steps=steps)
  model_fn, sched, keys = chain_inputs(params, config, key, 4)
  if sampler == "ddim":
    want = ddpm_jax.ddim_sample_loop(sched, model_fn, (4, 8, 8, 1), keys, num_steps=steps)
  elif sampler == "heun":
    want = ddpm_jax.heun_sample_loop(sched, model_fn, (4, 8, 8, 1), keys, num_steps=steps)
  else:
    want = ddpm_jax.p_sample_loop(sched, model_fn, (4, 8, 8, 1), keys,
                                  num_steps=None if steps == 20 else steps)
  equals_the_loop(got, want)


def test_ddim_eta0_is_deterministic_and_respacing_with_T_steps_is_the_full_chain(run):
  params, config = ddpm_jax.load(run)
  key = jax.random.PRNGKey(5)
  a = ddpm_jax.sample(params, key, config=config, num_samples=4, sampler="ddim", num_steps=10)
  b = ddpm_jax.sample(params, key, config=config, num_samples=4, sampler="ddim", num_steps=10,
                      devices=CPU[:2])
  same_samples(a, b)
  arrays_equal(a, ddpm_jax.sample(params, key, config=config, num_samples=4, sampler="ddim",
                                  num_steps=10))
  # eta = 0: x_0 is a function of x_T alone, so the per-step noise keys do not matter.
  model_fn, sched, keys = chain_inputs(params, config, key, 4)
  x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (8, 8, 1)))(keys)
  other = jax.vmap(lambda k: jax.random.fold_in(k, 99))(keys)  # other step keys, same x_T...
  x = x_T
  kept = ddpm_jax.space_timesteps(20, 10)
  sched_r = ddpm_jax.respace(sched, kept)
  for i in reversed(range(10)):  # ...through the one-step function, with a Python loop
    t = jnp.full((4,), i, jnp.int32)
    x = sampling._ddim_step(sched_r, lambda x, t: model_fn(x, jnp.asarray(kept)[t]), x, t,
                            jax.vmap(jax.random.fold_in, (0, None))(other, i), eta=0.0,
                            mean_type="eps", var_type="fixedlarge", clip_denoised=True)
  equals_the_loop(a, x)
  full = ddpm_jax.sample(params, key, config=config, num_samples=4, num_steps=20)
  sched_T = ddpm_jax.respace(sched, ddpm_jax.space_timesteps(20, 20))
  assert sched_T is sched  # T kept steps: the chain is the full one, not a recomputed copy
  want = ddpm_jax.p_sample_loop(sched, model_fn, (4, 8, 8, 1), keys)  # the full chain
  equals_the_loop(full, want)


def test_bfloat16_sampling_is_close_to_float32(run):
  params, config = ddpm_jax.load(run)
  key = jax.random.PRNGKey(1)
  f32 = ddpm_jax.sample(params, key, config=config, num_samples=4, sampler="ddim", num_steps=5)
  bf16 = ddpm_jax.sample(params, key, config=config, num_samples=4, sampler="ddim", num_steps=5,
                         dtype="bfloat16")
  assert bf16.dtype == jnp.float32
  assert 0 < float(jnp.abs(f32 - bf16).max()) < 0.1


def test_class_conditional_labels_and_guidance():
  config = smoke_config(**{"model.num_classes": 3})
  params = train.init_params(config, jax.random.PRNGKey(0))
  # Move the label embedding away from zero so labels matter.
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
  model = settings.Settings.from_config(config).model.make_model()
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
  t = jnp.array([0, 5, 19])
  y = jnp.array([0, 1, 2])
  w = 1.5
  cond = model.apply({"params": params}, x, t, y=y)
  uncond = model.apply({"params": params}, x, t, y=jnp.full((3,), 3))
  guided = from_run.guided_model_fn(model, params, y, w)(x, t)
  np.testing.assert_allclose(np.asarray(guided), np.asarray((1 + w) * cond - w * uncond),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(from_run.guided_model_fn(model, params, y, 0.0)(x, t)),
                             np.asarray(cond), rtol=1e-6)

  key = jax.random.PRNGKey(2)
  drawn = from_run.sample_labels(config, key, np.arange(6))
  assert drawn.shape == (6,) and drawn.min() >= 0 and drawn.max() < 3
  a = ddpm_jax.sample(params, key, config=config, num_samples=6, guidance_scale=w)
  b = ddpm_jax.sample(params, key, config=config, num_samples=6, guidance_scale=w, labels=drawn)
  arrays_equal(a, b)  # labels=None draws exactly sample_labels' labels
  c = ddpm_jax.sample(params, key, config=config, num_samples=6, guidance_scale=w, labels=2)
  assert not np.allclose(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match=r"labels must be one int or 6 ints in \[0, 3\]"):
    ddpm_jax.sample(params, key, config=config, num_samples=6, labels=[0, 1])


def test_sample_bad_input(run):
  params, config = ddpm_jax.load(run)
  key = jax.random.PRNGKey(0)
  cases = [
      (dict(config=None), r"needs the run's config: pass config=.*ddpm_jax.load\(workdir\)"),
      (dict(sampler="euler"), r"Unknown sampler 'euler'; accepted: ancestral, ddim"),
      (dict(num_steps=21), r"num_steps must be an integer in \[1, 20\].*got 21"),
      (dict(num_steps=0), r"num_steps must be an integer in \[1, 20\].*got 0"),
      (dict(num_samples=0), r"num_samples must be an integer >= 1, got 0"),
      (dict(eta=-1.0), r"eta must be >= 0"),
      (dict(guidance_scale=2.0), r"guidance_scale=2.0 needs a class-conditional model"),
      (dict(labels=[1, 2]), r"labels were given for an unconditional model"),
      (dict(dtype="float16"), r"Unknown dtype 'float16'; accepted: float32, bfloat16"),
  ]
  for kwargs, message in cases:
    kwargs = dict(dict(config=config, num_samples=2), **kwargs)
    with pytest.raises(ValueError, match=message):
      ddpm_jax.sample(params, key, **kwargs)
  other = smoke_config(**{"model.ch": 64})
  with pytest.raises(ValueError, match=r"The params do not fit the config's model \(.*has shape"):
    ddpm_jax.sample(params, key, config=other, num_samples=2)


def test_a_workdir_without_checkpoint_is_one_clear_error(tmp_path):
  workdir = str(tmp_path / "untrained")
  rundir.write_or_check_config(workdir, smoke_config())
  for call in (lambda: ddpm_jax.load(workdir), lambda: generate.generate(smoke_config(), workdir),
               lambda: evaluation.evaluate(smoke_config(), workdir)):
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*train first with `python "
                                                r"main.py"):
      call()


# ----------------------------------------------------------------------------- --mode=sample


def _shards(directory):
  return sorted(f for f in os.listdir(directory) if f.startswith("shard_"))


def test_sample_mode_writes_shards_and_resumes_without_recomputing(run, tmp_path, monkeypatch):
  config = smoke_config(**{"sampling.num_samples": 10, "sampling.batch_size": 4})
  directory = generate.generate(config, run)
  assert os.path.basename(directory) == "00000006_ancestral20"
  assert _shards(directory) == ["shard_000000.npz", "shard_000001.npz", "shard_000002.npz"]
  images, labels = generate.read_samples(directory, 10)
  assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8 and labels is None
  assert os.path.exists(os.path.join(directory, "grid.png"))
  params, _ = ddpm_jax.load(run)
  want = ddpm_jax.sample(params, generate.sample_key(config), config=config, num_samples=10)
  arrays_equal(images, np.round((np.asarray(want) + 1) * 127.5).astype(np.uint8))

  # Resume: a lost shard is recomputed, the others are kept untouched.
  mtimes = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in _shards(directory)}
  os.remove(os.path.join(directory, "shard_000001.npz"))
  calls = []
  real_sample = from_run.sample
  monkeypatch.setattr(from_run, "sample", lambda *a, **k: calls.append(k) or real_sample(*a, **k))
  generate.generate(config, run)
  assert [c["first_index"] for c in calls] == [4]
  for f in ("shard_000000.npz", "shard_000002.npz"):
    assert os.stat(os.path.join(directory, f)).st_mtime_ns == mtimes[f]
  arrays_equal(generate.read_samples(directory, 10)[0], images)
  # More samples later: only the new shards are computed.
  calls.clear()
  generate.generate(smoke_config(**{"sampling.num_samples": 14, "sampling.batch_size": 4}), run)
  assert [c["first_index"] for c in calls] == [8, 12]  # shard 2 grew from 2 to 4 samples
  arrays_equal(generate.read_samples(directory, 14)[0][:10], images)


def test_sample_mode_on_two_hosts_equals_one_host(run, tmp_path):
  """Host p of 2 writes shards k % 2 == p into the same directory; together: the 1-host set."""
  one = str(tmp_path / "one")
  two = str(tmp_path / "two")
  for workdir in (one, two):
    os.makedirs(workdir)
    os.symlink(os.path.join(run, "checkpoints"), os.path.join(workdir, "checkpoints"))
    os.symlink(os.path.join(run, "config.json"), os.path.join(workdir, "config.json"))
  config = smoke_config(**{"sampling.num_samples": 10, "sampling.batch_size": 4,
                           "sampling.sampler": "ddim", "sampling.num_steps": 5})
  d1 = generate.generate(config, one)
  d2 = generate.generate(config, two, process_index=1, process_count=2)
  assert _shards(d2) == ["shard_000001.npz"]
  generate.generate(config, two, process_index=0, process_count=2)
  assert _shards(d2) == _shards(d1)
  arrays_equal(generate.read_samples(d2, 10)[0], generate.read_samples(d1, 10)[0])


def test_main_sample_mode_uses_the_runs_config(run, main_py):
  before = sorted(os.listdir(os.path.join(run, "eval")))
  status, log = main_py(f"--workdir={run}", "--mode=sample", "--step=3")
  assert status == 0, log[-3000:]
  directory = os.path.join(run, "samples", "00000003_ancestral20")
  assert len(generate.read_samples(directory, 4)[0]) == 4  # config.json: 4 samples
  assert "sampling 00000003_ancestral20 4/4" in log  # the progress line
  # A --config whose model differs from the run's is refused, nothing written.
  status, log = main_py("--config=configs/smoke.py", "--config.model.ch=64", f"--workdir={run}",
                        "--mode=eval")
  assert status == 2
  assert "model.ch: 32 in the run, 64 now" in log
  assert sorted(os.listdir(os.path.join(run, "eval"))) == before


def test_sample_and_eval_modes_fall_back_from_a_damaged_latest_checkpoint(run, tmp_path, caplog):
  """--mode=sample and --mode=eval (what main.py calls) on a copy of the run whose step 6 is
  damaged: both use step 3, after one warning naming step 6, which is moved aside."""
  config = smoke_config(**{"eval.metrics": ("bpd",), "eval.bpd_num_examples": 4,
                           "eval.batch_size": 4})
  caplog.set_level(logging.WARNING)
  for how, call in (("truncated", lambda w: generate.generate(config, w)),
                    ("no_metadata", lambda w: evaluation.evaluate(config, w))):
    workdir = str(tmp_path / how)
    shutil.copytree(run, workdir)
    damage(workdir, 6, how)
    with pytest.raises(UserError, match=r"Checkpoint step 6 in .* is damaged"):
      generate.generate(config, workdir, step=6)
    caplog.clear()
    call(workdir)
    warnings = [r.getMessage() for r in caplog.records if " is damaged " in r.getMessage()]
    assert len(warnings) == 1 and "Checkpoint step 6 in" in warnings[0], warnings
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))[0].startswith("6-")
  # (the copied run may hold other tests' sample directories too)
  assert "00000003_ancestral20" in os.listdir(os.path.join(tmp_path, "truncated", "samples"))
  with open(os.path.join(tmp_path, "no_metadata", "eval", "00000003.json")) as f:
    (bpd,) = json.load(f)["bpd"].values()  # one protocol
    assert bpd["num_examples"] == 4


# ----------------------------------------------------------------------------- bits/dim, FID


def test_in_training_evaluation_writes_bits_per_dim(run):
  """training.eval_every=3: bits/dim of the held-out batch (64 test digits) of the EMA params."""
  params, config = ddpm_jax.load(run, step=3)
  with open(os.path.join(run, "eval", "00000003.json")) as f:
    logged = json.load(f)["training_eval"]["eval/bpd"]
  batch = next(ddpm_jax.data.eval_batches(config, "test", batch_size=64)[1])
  want = evaluation.bits_per_dim_batch(config, params, batch["image"], batch["label"],
                                       np.arange(64))["total_bpd"].mean()
  assert logged == pytest.approx(float(want), rel=1e-5)
  assert os.path.exists(os.path.join(run, "eval", "00000006.json"))
  events = os.listdir(os.path.join(run, "tensorboard"))
  assert events and all(os.path.getsize(os.path.join(run, "tensorboard", e)) for e in events)


def test_bits_per_dim_is_finite_sums_its_terms_and_ignores_the_device_count(run):
  params, config = ddpm_jax.load(run)
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)) / 127.5 - 1.0
  labels, index = np.zeros(5, np.int32), np.arange(5)
  eight = evaluation.bits_per_dim_batch(config, params, images, labels, index)
  one = evaluation.bits_per_dim_batch(config, params, images, labels, index, devices=CPU[:1])
  assert eight["terms_bpd"].shape == (5, 20)
  assert np.all(np.isfinite(eight["total_bpd"])) and np.all(eight["terms_bpd"] > 0)
  np.testing.assert_allclose(eight["total_bpd"],
                             eight["terms_bpd"].sum(axis=1) + eight["prior_bpd"], rtol=1e-5)
  np.testing.assert_allclose(eight["total_bpd"], one["total_bpd"], rtol=1e-6)
  # Example i's estimate depends on (seed, i) only: the same image at index 9 vs 0 differs.
  other = evaluation.bits_per_dim_batch(config, params, images[:1], labels[:1], [9])
  assert other["total_bpd"][0] != eight["total_bpd"][0]


def test_eval_mode_bits_per_dim_json_and_offline_weights(run, tmp_path, monkeypatch):
  """Without config.eval.inception_weights the weights are fetched; offline, bits/dim is still
  written and FID fails with one sentence naming the address, the cache and the flag."""
  with socket.socket() as s:  # an address where nothing listens: offline
    s.bind(("127.0.0.1", 0))
    mirror = f"http://127.0.0.1:{s.getsockname()[1]}"
  monkeypatch.setenv(downloads.MIRROR_ENV, mirror)
  monkeypatch.setenv(downloads.CACHE_ENV, str(tmp_path / "cache"))
  config = smoke_config(**{"eval.bpd_num_examples": 10, "eval.batch_size": 4})
  with pytest.raises(UserError) as e:
    evaluation.evaluate(config, run)
  assert str(e.value).startswith(
      f"Could not download {mirror}/pt_inception-2015-12-05-6726825d.pth into "
      f"{tmp_path / 'cache'} (ConnectionError): copy pt_inception-2015-12-05-6726825d.pth there "
      "from a machine with internet, or pass --config.eval.inception_weights=")
  # Bits/dim was computed and written before the FID error, with its protocol beside it.
  with open(os.path.join(run, "eval", "00000006.json")) as f:
    entries = json.load(f)["bpd"]
  (key, result), = entries.items()
  assert key.startswith("test-n10-") and result["protocol"]["num_examples"] == 10
  assert result["protocol"]["split"] == "test" and result["protocol"]["ema_decay"] > 0
  assert result["num_examples"] == 10 and result["split"] == "test"
  assert len(result["terms_bpd"]) == 20 and np.isfinite(result["bpd"])
  params, _ = ddpm_jax.load(run)
  test = smoke_config()
  batch = next(ddpm_jax.data.eval_batches(test, "test", batch_size=10)[1])
  per_example = evaluation.bits_per_dim_batch(test, params, batch["image"], batch["label"],
                                              np.arange(10))["total_bpd"]
  assert result["bpd"] == pytest.approx(per_example.mean(), rel=1e-5)
  assert result["bpd_stderr"] == pytest.approx(per_example.std(ddof=1) / np.sqrt(10), rel=1e-4)
  assert result["terms_bpd"][0] == pytest.approx(result["decoder_bpd"])

  missing = smoke_config(**{"eval.inception_weights": "/nonexistent/inception.npz",
                            "eval.metrics": ("fid",)})
  with pytest.raises(FileNotFoundError, match=r"'/nonexistent/inception.npz' does not exist: "
                                              r"point config.eval.inception_weights at "
                                              r".*docs/inception_weights.md"):
    evaluation.evaluate(missing, run)
  # A rerun of the same protocol replaces its entry, with a note; another one goes beside it.
  evaluation.evaluate(smoke_config(**{"eval.metrics": ("bpd",), "eval.bpd_num_examples": 10,
                                      "eval.batch_size": 4}), run)
  evaluation.evaluate(smoke_config(**{"eval.metrics": ("bpd",), "eval.bpd_num_examples": 4,
                                      "eval.batch_size": 4}), run)
  with open(os.path.join(run, "eval", "00000006.json")) as f:
    entries = json.load(f)["bpd"]
  assert sorted(entries) == sorted([key, next(k for k in entries if k.startswith("test-n4-"))])
  assert entries[key]["note"].startswith("replaces the result of the same protocol written at")
  assert entries[key]["bpd"] == pytest.approx(result["bpd"], rel=1e-6)
  with pytest.raises(ValueError, match=r"Unknown eval metric 'nll'; accepted: bpd, ode_bpd, fid"):
    evaluation.evaluate(smoke_config(**{"eval.metrics": ("nll",)}), run)


def test_eval_mode_ode_bits_per_dim(run):
  config = smoke_config(**{"eval.metrics": ("ode_bpd",), "eval.bpd_num_examples": 4,
                           "eval.batch_size": 4, "eval.ode_rtol": 1e-4})
  evaluation.evaluate(config, run)
  with open(os.path.join(run, "eval", "00000006.json")) as f:
    (key, result), = json.load(f)["ode_bpd"].items()
  assert key.startswith("test-n4-ode-") and result["protocol"]["rtol"] == 1e-4
  assert result["num_examples"] == 4 and (result["rtol"], result["atol"]) == (1e-4, 1e-5)
  assert result["nfe_max"] >= result["nfe_mean"] > 6 and np.isfinite(result["bpd_stderr"])
  # The same examples and keys through ddpm_jax.ode_likelihood in one batch (the evaluation
  # solves each device's share on its own: equal up to the solver's tolerance).
  params, _ = ddpm_jax.load(run)
  batch = next(ddpm_jax.data.eval_batches(config, "test", batch_size=4)[1])
  model_fn, sched, _ = chain_inputs(params, config, None, 0)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), evaluation.ODE_STREAM)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(4))
  want = ddpm_jax.ode_likelihood(sched, model_fn, jnp.asarray(batch["image"]), keys, rtol=1e-4)
  assert result["bpd"] == pytest.approx(float(want["bpd"].mean()), rel=2e-3)
  assert result["prior_bpd"] == pytest.approx(float(want["prior_bpd"].mean()), rel=2e-3)


def test_eval_mode_fid_and_inception_score(run, weights_file, caplog):
  config = smoke_config(**{"eval.metrics": ("fid",), "eval.inception_weights": weights_file,
                           "eval.num_samples": 4, "eval.fid_reference_examples": 6,
                           # batch 2: the network test_fid.py compiles already
                           "eval.fid_split": "train", "eval.batch_size": 2,
                           "sampling.sampler": "ddim", "sampling.num_steps": 4})
  with caplog.at_level(logging.WARNING):
    results = evaluation.evaluate(config, run, step=3)
  (key, r), = results["fid"].items()
  assert key.startswith("00000003_ddim4_eta0-n4-")
  assert r["num_samples"] == 4 and np.isfinite(r["fid"]) and r["fid"] > 0
  assert r["inception_score"] >= 1.0
  p = r["protocol"]
  assert p["num_samples"] == 4 and p["sampling"]["sampler"] == "ddim"
  assert p["sampling"]["num_steps"] == 4 and p["sampling"]["eta"] == 0.0
  assert p["reference"] == dict(dataset="digits", split="train", max_examples=6, image_size=8)
  assert p["inception_weights_sha256"] == evaluation.eval_records.sha256_of_file(weights_file)
  assert p["ema_decay"] > 0 and "bilinear" in p["resize"] and p["package"].startswith("ddpm_jax")
  warnings = [m for m in caplog.messages if "differs from the DDPM paper" in m]
  assert warnings == ["FID/IS protocol differs from the DDPM paper's (50,000 samples, train "
                      "statistics, EMA): 4 samples instead of 50,000."]
  with open(os.path.join(run, "eval", "00000003.json")) as f:
    assert json.load(f)["fid"][key]["fid"] == pytest.approx(r["fid"])
  cached = os.path.join(run, "eval", "fid_reference_digits_train_8_6.npz")
  assert os.path.exists(cached)
  # The samples are the ones --mode=sample writes; FID recomputed from them independently.
  variables = ddpm_jax.inception.load_inception_params(weights_file)
  images, _ = generate.read_samples(os.path.join(run, "samples", "00000003_ddim4_eta0"), 4)
  pool, _ = ddpm_jax.fid.inception_features(variables, images / 127.5 - 1.0, batch_size=2)
  mu, sigma = ddpm_jax.fid.feature_statistics(pool)
  ref = ddpm_jax.fid.load_statistics(cached)
  assert r["fid"] == pytest.approx(ddpm_jax.fid.frechet_distance(mu, sigma, *ref), rel=1e-6)
  # Reference statistics from an .npz (e.g. pytorch-fid's): the same file gives the same FID.
  config.eval.fid_reference = cached
  (other, again), = evaluation.evaluate(config, run, step=3)["fid"].items()
  assert again["fid"] == pytest.approx(r["fid"], rel=1e-9) and again["reference"] == cached
  assert again["protocol"]["reference"] == dict(
      file=cached, sha256=evaluation.eval_records.sha256_of_file(cached))
  with open(os.path.join(run, "eval", "00000003.json")) as f:
    assert sorted(json.load(f)["fid"]) == sorted([key, other])  # side by side
  # In-training FID/IS (eval.train_fid_samples > 0) on the same network and reference.
  config.eval.train_fid_samples, config.eval.train_bpd_examples = 2, 0
  params, _ = ddpm_jax.load(run, step=3)
  scalars = evaluation.TrainingEvaluator(config, run)(3, params)
  assert set(scalars) == {"eval/fid", "eval/inception_score"}
  assert np.isfinite(scalars["eval/fid"]) and scalars["eval/inception_score"] >= 1.0
  with pytest.raises(FileNotFoundError,
                     match="does not exist: point config.eval.inception_weights"):
    config.eval.inception_weights = "/nonexistent.npz"  # refused before training starts
    evaluation.TrainingEvaluator(config, run)
