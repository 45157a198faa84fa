"""Converts a released DDPM model into a ddpm_jax run directory.

    python -m ddpm_jax.convert --from=diffusers --src=DIR --workdir=RUN [--config=configs/cifar10.py]

DIR is a diffusers model folder, e.g. `huggingface-cli download google/ddpm-cifar10-32
--local-dir DIR`: unet/config.json, unet/diffusion_pytorch_model.safetensors and
scheduler/scheduler_config.json. The weights are read with safetensors' NumPy API (no torch).

RUN becomes a normal run: config.json and the checkpoint of step 0, whose parameters and EMA
parameters are the converted weights (Adam's moments zero). `ddpm_jax.load(RUN)`,
`python main.py --workdir=RUN --mode=sample` / `--mode=eval` use it as they use any run, and
`python main.py --config=... --workdir=RUN` fine-tunes from it.

The config: without --config it is inferred: the dataset config of the source's image size and
channels (32x32x3: configs/cifar10.py, 256x256x3: configs/celebahq.py, 8x8x1:
configs/digits.py; otherwise configs/default.py with data.image_size and data.num_channels set)
with config.model, config.diffusion, sampling.clip_denoised and sampling.num_steps (the whole
chain) taken from the source. With --config (and any --config.* overrides) the config is used
as given, and every field the weights determine (model widths, levels, blocks, attention, output
channels, image size and channels, beta schedule, timesteps, prediction type, a learned variance)
must equal the source's; sampling choices stay the config's, including which of the two fixed
variances (fixedlarge or fixedsmall) to sample with, since an eps-, x0- or v-model's weights do
not depend on it. The scheduler's inference-only fields (timestep_spacing, steps_offset) are
ignored: our sampler settings choose the timesteps.

Everything is checked before anything is written; a mistake raises UserError with one sentence.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import traverse_util
from ml_collections import config_flags

from ddpm_jax import checkpoint, config_files, diffusers_mapping as dm, rundir, settings, train
from ddpm_jax.errors import MissingFileError, UserError

USER_ERROR_STATUS = 2  # as main.py's: a user's mistake, one sentence on stderr

UNET_CONFIG = os.path.join("unet", "config.json")
WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")
TORCH_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.bin")
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")

# (image size, channels) -> the dataset config an inferred run starts from.
DATASET_CONFIGS = {(32, 3): "cifar10", (256, 3): "celebahq", (8, 1): "digits"}
# config.model fields the weights determine (dropout, dtype and remat do not change them).
MODEL_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resamp_with_conv",
                "out_channels", "num_classes")


def bin_command(src: str) -> str:
  """The command that rewrites a torch .bin state dict as safetensors (in an environment with
  torch and safetensors); clone() breaks shared storage, which safetensors refuses."""
  src_bin = os.path.join(src, TORCH_WEIGHTS)
  dst = os.path.join(src, WEIGHTS)
  return ("python -c \"import torch, safetensors.torch as st; "
          f"sd = torch.load('{src_bin}', map_location='cpu'); "
          f"st.save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, '{dst}')\"")


def _read_json(path: str, what: str) -> Dict[str, Any]:
  try:
    with open(path) as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e}); it should be the {what}.") from e
  if not isinstance(value, dict):
    raise UserError(f"{path} holds a JSON {type(value).__name__}, not the {what} object.")
  return value


def read_source(src: str) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
  """(unet config, scheduler config, weights path) of the diffusers folder `src`."""
  if not os.path.isdir(src):
    raise MissingFileError(f"--src={src} is not a directory; pass a downloaded diffusers model "
                           "folder (e.g. huggingface-cli download google/ddpm-cifar10-32 "
                           "--local-dir DIR).")
  for rel in (UNET_CONFIG, SCHEDULER_CONFIG):
    if not os.path.isfile(os.path.join(src, rel)):
      raise MissingFileError(f"--src={src} has no {rel}; a diffusers DDPM folder holds "
                             f"{UNET_CONFIG}, {WEIGHTS} and {SCHEDULER_CONFIG}.")
  weights = os.path.join(src, WEIGHTS)
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(src, TORCH_WEIGHTS)):
      raise UserError(f"--src={src} has its weights as {TORCH_WEIGHTS}, a torch pickle we read "
                      f"without torch only as safetensors; convert it first with `"
                      f"{bin_command(src)}`.")
    raise MissingFileError(f"--src={src} has no {WEIGHTS}; a diffusers DDPM folder holds "
                           f"{UNET_CONFIG}, {WEIGHTS} and {SCHEDULER_CONFIG}.")
  return (_read_json(os.path.join(src, UNET_CONFIG), "UNet2DModel config"),
          _read_json(os.path.join(src, SCHEDULER_CONFIG), "DDPMScheduler config"), weights)


def read_tensors(path: str) -> Dict[str, np.ndarray]:
  """The safetensors file at `path` as NumPy arrays (safetensors' NumPy API: no torch)."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel  (only the converter needs it)
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (the library raises several kinds)
    raise UserError(f"Cannot read {path} as safetensors of float32/float16 tensors "
                    f"({type(e).__name__}: {e}); download it again, or save the model with "
                    "safe_serialization=True in float32.") from e


def _base_config(size: int, channels: int) -> ml_collections.ConfigDict:
  name = DATASET_CONFIGS.get((size, channels))
  if name:
    logging.info("Starting from configs/%s.py (the source's images are %dx%dx%d).", name, size,
                 size, channels)
    return config_files.shipped_config(name)
  config = config_files.shipped_config("default")
  config.data.image_size, config.data.num_channels = size, channels
  logging.warning("No dataset config has %dx%dx%d images: starting from configs/default.py; set "
                  "data.dataset before training or evaluating on data.", size, size, channels)
  return config


def _show(value) -> str:
  return repr(tuple(value) if isinstance(value, list) else value)


def build_config(unet_cfg: Dict[str, Any], sched_cfg: Dict[str, Any], src: str,
                 config: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The run's config from the source's two configs and the optional --config; UserError when
  --config disagrees with the weights or nothing gives the image size."""
  model, attn_levels, size, channels = dm.model_from_unet_config(
      unet_cfg, os.path.join(src, UNET_CONFIG))
  diffusion = dm.diffusion_from_scheduler_config(sched_cfg, os.path.join(src, SCHEDULER_CONFIG))
  clip = diffusion.pop("clip_denoised")
  learned = diffusion["var_type"] == "learned_range"
  if (model["out_channels"] == 2 * channels) != learned:
    raise UserError(
        f"{os.path.join(src, UNET_CONFIG)} has out_channels={model['out_channels']} for "
        f"in_channels={channels} but {os.path.join(src, SCHEDULER_CONFIG)} has variance_type "
        f"{sched_cfg.get('variance_type', 'fixed_small')!r}; a learned_range variance needs "
        "twice the input channels out, a fixed variance as many as in.")
  if config is None:
    if size is None:
      raise UserError(f"{os.path.join(src, UNET_CONFIG)} gives no sample_size; pass the config "
                      "of the model's dataset, e.g. --config=configs/cifar10.py.")
    config = _base_config(size, channels)
    config.model.update(model, attn_resolutions=dm.attn_resolutions(attn_levels, size))
    config.diffusion.update(diffusion)
    config.sampling.clip_denoised = clip
    config.sampling.num_steps = diffusion["num_timesteps"]
    return config

  image_size = size if size is not None else config.data.image_size
  want = {f"model.{k}": model[k] for k in MODEL_FIELDS if k != "attn_resolutions"}
  want["model.attn_resolutions"] = dm.attn_resolutions(attn_levels, image_size)
  want["data.image_size"], want["data.num_channels"] = image_size, channels
  for k in ("beta_schedule", "num_timesteps", "mean_type"):
    want[f"diffusion.{k}"] = diffusion[k]
  if diffusion["beta_schedule"] != "cosine":  # cosine ignores beta_start/beta_end
    want["diffusion.beta_start"] = diffusion["beta_start"]
    want["diffusion.beta_end"] = diffusion["beta_end"]
  if learned or config.diffusion.var_type == "learned_range":
    want["diffusion.var_type"] = diffusion["var_type"]
  wrong = []
  for key, value in want.items():
    section, field = key.split(".")
    have = config[section][field]
    same = (np.isclose(have, value, rtol=1e-6) if isinstance(value, float)
            else _show(have) == _show(value))
    if not same:
      wrong.append(f"config.{key}={_show(have)} where the source has {_show(value)}")
  if wrong:
    raise UserError(f"--config does not describe the model in {src} ({'; '.join(wrong)}); pass "
                    "the matching dataset config, override those fields, or leave --config out "
                    "to infer it.")
  if config.diffusion.var_type != diffusion["var_type"]:
    logging.info("Sampling with config.diffusion.var_type=%s (the scheduler says %s; the "
                 "weights do not depend on the fixed variance).", config.diffusion.var_type,
                 diffusion["var_type"])
  return config


def check_workdir(workdir: str) -> None:
  """UserError unless `workdir` is new or holds no run (no config.json, no checkpoints/)."""
  root = epath.Path(workdir)
  if root.exists() and not root.is_dir():
    raise UserError(f"--workdir={workdir} is a file; pass a new directory for the converted run.")
  taken = [n for n in (rundir.CONFIG_FILE, checkpoint.CHECKPOINT_DIR) if (root / n).exists()]
  if taken:
    raise UserError(f"--workdir={workdir} already holds a run ({' and '.join(taken)}); pass a "
                    "new directory for the converted run, so that no run is overwritten.")


def convert_params(tensors: Dict[str, np.ndarray], config, weights_path: str) -> Any:
  """Our U-Net's parameter tree (nested dicts of float32 NumPy arrays) from diffusers tensors."""
  abstract = jax.eval_shape(lambda k: train.init_params(config, k), jax.random.PRNGKey(0))
  shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
  flat = dm.params_from_tensors(tensors, shapes, len(config.model.ch_mult), weights_path)
  return traverse_util.unflatten_dict(flat)


def _initial_state(config, params) -> train.TrainState:
  """The state training would resume from: step 0, params and every EMA tree the converted
  weights, Adam's moments zero, nothing non-finite."""
  return train.TrainState(
      step=np.zeros((), np.int32), params=params,
      ema_params=tuple(params for _ in train.ema_decays(config)),
      opt_state=jax.device_get(jax.jit(train.make_optimizer(config).init)(params)),
      nonfinite_steps=np.zeros((), np.int32))


def convert(src: str, workdir: str, config: Optional[ml_collections.ConfigDict] = None
            ) -> ml_collections.ConfigDict:
  """Writes the run directory `workdir` from the diffusers folder `src`; returns its config."""
  unet_cfg, sched_cfg, weights_path = read_source(src)
  config = build_config(unet_cfg, sched_cfg, src, config)
  check_workdir(workdir)
  params = convert_params(read_tensors(weights_path), config, weights_path)
  # A run that could not resume (bad settings, a batch that does not divide) is refused now.
  settings.validate(config, device_count=jax.device_count())
  state = _initial_state(config, params)
  # The checkpoint first, config.json last: a crash in between leaves no config.json, so the
  # directory is not mistaken for a complete run (and check_workdir names what to remove).
  with checkpoint.Checkpointer(workdir, keep=config.training.keep_checkpoints) as ckpt:
    ckpt.save(0, train.state_dict(state), meta={"step": 0, "data_step": 0,
                                                "converted_from": os.path.abspath(src)})
  rundir.write_or_check_config(workdir, config)
  return config


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing this
  module beside main.py defines no flag twice."""
  flags.DEFINE_enum("from", "diffusers", ["diffusers"], "The source's format: a diffusers "
                    "model folder (UNet2DModel + DDPMScheduler).")
  flags.DEFINE_string("src", None, "The downloaded model folder.")
  flags.DEFINE_string("workdir", None, "The new run directory to write.")
  config_flags.DEFINE_config_file("config", None, "The dataset config of the model, e.g. "
                                  "configs/cifar10.py (default: inferred from the source).",
                                  lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}", exitcode=USER_ERROR_STATUS)
  if not FLAGS.src or not FLAGS.workdir:
    raise app.UsageError("--src and --workdir are required.", exitcode=USER_ERROR_STATUS)
  try:
    config = convert(FLAGS.src, FLAGS.workdir, FLAGS.config)
  except UserError as e:
    print(e, file=sys.stderr)  # the sentence alone, no traceback: the user's mistake
    sys.exit(USER_ERROR_STATUS)
  m = config.model
  print(f"Converted {FLAGS.src} into {FLAGS.workdir} (step 0): ch={m.ch}, "
        f"ch_mult={tuple(m.ch_mult)}, attn_resolutions={tuple(m.attn_resolutions)}, "
        f"{config.data.image_size}x{config.data.image_size}x{config.data.num_channels}, "
        f"{config.diffusion.num_timesteps} steps, mean_type={config.diffusion.mean_type}, "
        f"var_type={config.diffusion.var_type}.")


if __name__ == "__main__":
  define_flags()
  # --config=cifar10 (or configs/cifar10.py outside a checkout) names the shipped config.
  app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(
      config_files.with_resolved_config(argv)))
