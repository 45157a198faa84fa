"""The config as typed, frozen, validated settings: one check of every value, at the boundary.

`Settings.from_config(config)` turns an ml_collections config (configs/*.py with command-line
overrides, or a run's config.json) into one frozen dataclass per section. Every value is
checked against its range and every name against its accepted set; the first bad value raises
`errors.UserError` with one sentence such as

    config.training.ema_decay=1.5: an EMA decay must be a float in [0, 1).

main.py and the entry points (training, --mode=sample, --mode=eval) call it before anything is
written to the workdir, so a bad value never reaches config.json.

Each field also says whether it may change between the runs of one workdir (`is_changeable`):
a section is fixed (it decides what is trained or what a checkpoint means: model, diffusion,
data, optim, training, seed) or changeable (how to sample, evaluate and map over devices:
sampling, eval, parallel). A fixed section may name fields that are changeable, because they
change how the same run is computed or reported, never its result: the compute dtype and
rematerialisation of the model, where the data live, and the training schedule's length and
intervals. A field that a section does not list takes its section's rule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import numpy as np

from ddpm_jax import diffusion, schedules
from ddpm_jax.errors import UserError

SAMPLERS = ("ancestral", "ddim")
PARALLEL = ("pmap", "shard_map")
DTYPES = ("float32", "bfloat16")
METRICS = ("bpd", "fid")
GROUP_NORM_GROUPS = 32  # the U-Net's GroupNorm: every channel count must be a multiple

_CHANGEABLE = {"changeable": True}


def _changeable(default: Any = dataclasses.MISSING):
  """A field of a fixed section that may still change between the runs of one workdir."""
  return dataclasses.field(default=default, metadata=_CHANGEABLE)


# ----------------------------------------------------------------------------- reading


def _show(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def _fail(path: str, value: Any, accepted: str) -> UserError:
  return UserError(f"config.{path}={_show(value)}: {accepted}.")


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


class _Reader:
  """Reads and checks the fields of one config section; a missing field takes its default."""

  def __init__(self, config: Any, section: Optional[str]):
    self.prefix = f"{section}." if section else ""
    node = config if section is None else config.get(section)
    if node is None or not hasattr(node, "get"):
      raise UserError(f"config.{section} is missing or not a section; start the config from "
                      "configs/default.py.")
    self.node = node

  def raw(self, key: str, default: Any) -> Any:
    value = self.node.get(key, default)
    return default if value is None and default is not None else value

  def fail(self, key: str, value: Any, accepted: str) -> UserError:
    return _fail(self.prefix + key, value, accepted)

  def int(self, key: str, default: int, low: int = 0, high: Optional[int] = None,
          what: str = "") -> int:
    v = self.raw(key, default)
    if not _is_int(v) or v < low or (high is not None and v > high):
      rng = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
      raise self.fail(key, v, f"{what or 'the value'} must be {rng}")
    return int(v)

  def float(self, key: str, default: float, low: float = -math.inf, high: float = math.inf, *,
            low_open: bool = False, high_open: bool = False, what: str = "") -> float:
    v = self.raw(key, default)
    ok = _is_number(v) and math.isfinite(v) and (v > low if low_open else v >= low) and (
        v < high if high_open else v <= high)
    if not ok:
      lo = "(" if low_open else "["
      hi = ")" if high_open else "]"
      if high == math.inf:
        rng = f"a finite number {'>' if low_open else '>='} {low:g}"
      else:
        rng = f"a number in {lo}{low:g}, {high:g}{hi}"
      raise self.fail(key, v, f"{what or 'the value'} must be {rng}")
    return float(v)

  def bool(self, key: str, default: bool) -> bool:
    v = self.raw(key, default)
    if not isinstance(v, (bool, np.bool_)):
      raise self.fail(key, v, "accepted: True or False")
    return bool(v)

  def choice(self, key: str, default: str, accepted) -> str:
    v = self.raw(key, default)
    if v not in accepted:
      raise self.fail(key, v, f"accepted: {', '.join(map(repr, accepted))}")
    return v

  def text(self, key: str, default: Optional[str]) -> Optional[str]:
    """A string, or None where the default is None (an optional path)."""
    v = self.node.get(key, default)
    if v is None and default is None:
      return None
    if not isinstance(v, str) or not v:
      raise self.fail(key, v, "a non-empty string is accepted")
    return v

  def ints(self, key: str, default: Tuple[int, ...], low: int = 0, what: str = "",
           nonempty: bool = False) -> Tuple[int, ...]:
    v = self.raw(key, default)
    if isinstance(v, (list, tuple)) and all(_is_int(x) and x >= low for x in v) and (
        v or not nonempty):
      return tuple(int(x) for x in v)
    raise self.fail(key, tuple(v) if isinstance(v, list) else v,
                    f"{what or 'the value'} must be a {'non-empty ' if nonempty else ''}tuple of "
                    f"integers >= {low}")


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """config.data: which images, at which size. Fixed, except where they are read from."""
  dataset: str
  image_size: int  # S: images are [S, S, C]
  num_channels: int  # C
  random_flip: bool
  pad_to_size: bool  # zero-pad smaller fixed-size images to S instead of resizing
  shuffle_buffer_size: int  # encoded records in the shuffle buffer
  data_dir: Optional[str] = _changeable()  # tfds data_dir; None: tfds' default

  changeable = False

  @classmethod
  def read(cls, config) -> "DataSettings":
    r = _Reader(config, "data")
    dataset = r.raw("dataset", None)
    if not isinstance(dataset, str) or not dataset:
      raise r.fail("dataset", dataset, "a dataset name is accepted (a tfds name or 'digits')")
    return cls(dataset=dataset,
               image_size=r.int("image_size", 32, 1, what="the image size"),
               num_channels=r.int("num_channels", 3, 1, what="the number of channels"),
               random_flip=r.bool("random_flip", True),
               pad_to_size=r.bool("pad_to_size", False),
               shuffle_buffer_size=r.int("shuffle_buffer_size", 50_000, 1,
                                         what="the shuffle buffer"),
               data_dir=r.text("data_dir", None))


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """config.model: the U-Net's attributes, `UNet(**dataclasses.asdict(model))`."""
  ch: int
  ch_mult: Tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: Tuple[int, ...]
  dropout: float
  resamp_with_conv: bool
  out_channels: int
  num_classes: int
  dtype: str = _changeable("float32")  # compute dtype only: parameters stay float32
  remat: bool = _changeable(False)  # recompute activations: the same parameters and results

  changeable = False

  @classmethod
  def read(cls, config, data: DataSettings, var_type: str) -> "ModelSettings":
    r = _Reader(config, "model")
    m = cls(ch=r.int("ch", 128, 1, what="the base channel count"),
            ch_mult=r.ints("ch_mult", (1, 2, 2, 2), 1, what="the channel multipliers",
                           nonempty=True),
            num_res_blocks=r.int("num_res_blocks", 2, 1, what="the number of residual blocks"),
            attn_resolutions=r.ints("attn_resolutions", (16,), 1,
                                    what="the attention resolutions"),
            dropout=r.float("dropout", 0.1, 0.0, 1.0, high_open=True, what="dropout"),
            resamp_with_conv=r.bool("resamp_with_conv", True),
            out_channels=r.int("out_channels", 3, 1, what="the output channel count"),
            num_classes=r.int("num_classes", 0, 0, what="the number of classes (0: none)"),
            dtype=r.choice("dtype", "float32", DTYPES),
            remat=r.bool("remat", False))
    widths = sorted({m.ch * k for k in (1,) + m.ch_mult})
    if any(w % GROUP_NORM_GROUPS for w in widths):
      raise r.fail("ch", m.ch, f"with ch_mult={m.ch_mult} the channel counts {widths} must all "
                   f"be multiples of {GROUP_NORM_GROUPS} (GroupNorm's groups)")
    factor = 2 ** (len(m.ch_mult) - 1)
    if data.image_size % factor:
      raise _fail("data.image_size", data.image_size,
                  f"the {len(m.ch_mult) - 1} downsamplings of config.model.ch_mult={m.ch_mult} "
                  f"need a multiple of {factor}")
    occurring = tuple(data.image_size // 2 ** i for i in range(len(m.ch_mult)))
    for res in m.attn_resolutions:
      if res not in occurring:
        raise r.fail("attn_resolutions", m.attn_resolutions,
                     f"every entry must be a resolution of the network, one of {occurring}")
    want = data.num_channels * (2 if var_type == "learned_range" else 1)
    if m.out_channels != want:
      raise r.fail("out_channels", m.out_channels,
                   f"config.data.num_channels={data.num_channels} with config.diffusion."
                   f"var_type={var_type!r} needs {want}")
    return m


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """config.diffusion: the forward process and what the model predicts. Fixed."""
  beta_schedule: str
  beta_start: float
  beta_end: float
  num_timesteps: int  # T
  mean_type: str
  var_type: str
  loss_type: str
  min_snr_gamma: float  # > 0: weight L_simple by min(SNR, gamma); 0: no weight

  changeable = False

  @classmethod
  def read(cls, config) -> "DiffusionSettings":
    r = _Reader(config, "diffusion")
    d = cls(beta_schedule=r.choice("beta_schedule", "linear", schedules.BETA_SCHEDULES),
            beta_start=r.float("beta_start", 1e-4, 0.0, 1.0, low_open=True, what="beta_start"),
            beta_end=r.float("beta_end", 0.02, 0.0, 1.0, low_open=True, what="beta_end"),
            num_timesteps=r.int("num_timesteps", 1000, 1, what="the number of timesteps"),
            mean_type=r.choice("mean_type", "eps", diffusion.MEAN_TYPES),
            var_type=r.choice("var_type", "fixedlarge", diffusion.VAR_TYPES),
            loss_type=r.choice("loss_type", "mse", diffusion.LOSS_TYPES),
            min_snr_gamma=r.float("min_snr_gamma", 0.0, 0.0, what="min_snr_gamma"))
    try:
      d.betas()
    except ValueError as e:  # a schedule's own check, e.g. betas outside (0, 1]
      raise r.fail("beta_end", d.beta_end, f"with beta_start={d.beta_start:g} and beta_schedule="
                   f"{d.beta_schedule!r} the betas are not a diffusion ({e.args[0]})") from e
    return d

  def betas(self) -> np.ndarray:
    """The float64 betas [T] of this schedule."""
    return schedules.get_beta_schedule(self.beta_schedule, self.num_timesteps,
                                       beta_start=self.beta_start, beta_end=self.beta_end)


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """config.optim: Adam with linear warmup and global-norm clipping. Fixed."""
  learning_rate: float
  warmup_steps: int
  grad_clip: float  # 0: no clipping
  b1: float
  b2: float
  eps: float

  changeable = False

  @classmethod
  def read(cls, config) -> "OptimSettings":
    r = _Reader(config, "optim")
    return cls(learning_rate=r.float("learning_rate", 2e-4, 0.0, low_open=True,
                                     what="the learning rate"),
               warmup_steps=r.int("warmup_steps", 0, 0, what="the warmup length"),
               grad_clip=r.float("grad_clip", 1.0, 0.0, what="the clipping norm (0: none)"),
               b1=r.float("b1", 0.9, 0.0, 1.0, high_open=True, what="Adam's b1"),
               b2=r.float("b2", 0.999, 0.0, 1.0, high_open=True, what="Adam's b2"),
               eps=r.float("eps", 1e-8, 0.0, low_open=True, what="Adam's eps"))


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
  """config.training: what each step averages (fixed) and how long and how often (changeable)."""
  batch_size: int  # global, over every device of every host
  ema_decays: Tuple[float, ...]  # (ema_decay, *extra_ema_decays): the first is sampled from
  label_dropout: float  # P(null label) for classifier-free guidance
  num_train_steps: int = _changeable()
  log_every: int = _changeable()
  checkpoint_every: int = _changeable()
  keep_checkpoints: int = _changeable()
  sample_every: int = _changeable()  # 0: never
  eval_every: int = _changeable()  # 0: never

  changeable = False

  @classmethod
  def read(cls, config, device_count: Optional[int]) -> "TrainingSettings":
    r = _Reader(config, "training")
    decay = r.float("ema_decay", 0.9999, 0.0, 1.0, high_open=True, what="an EMA decay")
    extra = r.raw("extra_ema_decays", ())
    if not isinstance(extra, (list, tuple)) or not all(
        _is_number(x) and 0.0 <= x < 1.0 for x in extra):
      raise r.fail("extra_ema_decays", extra, "every EMA decay must be a float in [0, 1)")
    t = cls(batch_size=r.int("batch_size", 128, 1, what="the global batch size"),
            ema_decays=(decay,) + tuple(float(x) for x in extra),
            label_dropout=r.float("label_dropout", 0.1, 0.0, 1.0, what="a probability"),
            num_train_steps=r.int("num_train_steps", 0, 0, what="the number of steps"),
            log_every=r.int("log_every", 100, 1, what="the logging interval"),
            checkpoint_every=r.int("checkpoint_every", 10_000, 1,
                                   what="the checkpoint interval"),
            keep_checkpoints=r.int("keep_checkpoints", 3, 1,
                                   what="the number of checkpoints kept"),
            sample_every=r.int("sample_every", 0, 0, what="the sample interval (0: never)"),
            eval_every=r.int("eval_every", 0, 0, what="the evaluation interval (0: never)"))
    if device_count and t.batch_size % device_count:
      raise r.fail("batch_size", t.batch_size,
                   f"the global batch must divide over the {device_count} devices; use a "
                   f"multiple of {device_count}")
    return t


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """config.sampling: how samples are drawn. Changeable."""
  sampler: str
  num_steps: int  # in [1, T]; < T respaces the chain
  eta: float  # DDIM's noise: 0 deterministic, 1 ancestral-like
  clip_denoised: bool
  guidance_scale: float  # classifier-free guidance weight w; 0: none
  num_samples: int  # --mode=sample writes this many
  batch_size: int  # per host and compiled call; also the size of the .npz shards

  changeable = True

  @classmethod
  def read(cls, config, diffusion_: DiffusionSettings, model: ModelSettings
           ) -> "SamplingSettings":
    r = _Reader(config, "sampling")
    T = diffusion_.num_timesteps
    s = cls(sampler=r.choice("sampler", "ancestral", SAMPLERS),
            num_steps=r.int("num_steps", T, 1, T, what=f"the number of steps (the run's "
                            f"num_timesteps is {T})"),
            eta=r.float("eta", 0.0, 0.0, what="eta"),
            clip_denoised=r.bool("clip_denoised", True),
            guidance_scale=r.float("guidance_scale", 0.0, what="the guidance weight"),
            num_samples=r.int("num_samples", 64, 1, what="the number of samples"),
            batch_size=r.int("batch_size", 256, 1, what="the sampling batch"))
    if s.guidance_scale and not model.num_classes:
      raise r.fail("guidance_scale", s.guidance_scale, "guidance needs a class-conditional "
                   "model (config.model.num_classes > 0); accepted: 0")
    return s


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """config.eval: what --mode=eval and in-training evaluation compute. Changeable."""
  metrics: Tuple[str, ...]
  split: str
  bpd_num_examples: int  # 0: the whole split
  batch_size: int  # per host, for bits/dim and Inception features
  num_samples: int  # samples for FID/IS
  inception_weights: Optional[str]  # a local .npz (docs/inception_weights.md)
  fid_reference: Optional[str]  # an .npz with mu, sigma; None: computed from the data
  fid_split: str
  fid_reference_examples: int
  train_bpd_examples: int
  train_fid_samples: int

  changeable = True

  @classmethod
  def read(cls, config) -> "EvalSettings":
    r = _Reader(config, "eval")
    metrics = r.raw("metrics", METRICS)
    if isinstance(metrics, str):
      metrics = (metrics,)
    if not isinstance(metrics, (list, tuple)) or not metrics or any(
        m not in METRICS for m in metrics):
      raise r.fail("metrics", metrics, f"accepted: a non-empty tuple of {', '.join(METRICS)}")
    return cls(metrics=tuple(metrics),
               split=r.text("split", "test"),
               bpd_num_examples=r.int("bpd_num_examples", 0, 0,
                                      what="the number of examples (0: all)"),
               batch_size=r.int("batch_size", 128, 1, what="the evaluation batch"),
               num_samples=r.int("num_samples", 50_000, 2, what="the number of FID samples"),
               inception_weights=r.text("inception_weights", None),
               fid_reference=r.text("fid_reference", None),
               fid_split=r.text("fid_split", "train"),
               fid_reference_examples=r.int("fid_reference_examples", 50_000, 2,
                                            what="the number of reference examples"),
               train_bpd_examples=r.int("train_bpd_examples", 64, 0,
                                        what="the number of examples"),
               train_fid_samples=r.int("train_fid_samples", 0, 0,
                                       what="the number of samples (0: none)"))


SECTIONS = {"data": DataSettings, "model": ModelSettings, "diffusion": DiffusionSettings,
            "optim": OptimSettings, "training": TrainingSettings, "sampling": SamplingSettings,
            "eval": EvalSettings}
TOP_LEVEL_CHANGEABLE = {"seed": False, "parallel": True}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every section of a run's config, validated. `device_count`, if given, is checked against
  training.batch_size."""
  seed: int
  parallel: str
  data: DataSettings
  model: ModelSettings
  diffusion: DiffusionSettings
  optim: OptimSettings
  training: TrainingSettings
  sampling: SamplingSettings
  eval: EvalSettings

  @classmethod
  def from_config(cls, config, *, device_count: Optional[int] = None) -> "Settings":
    """Checks every field of `config`; raises UserError naming the first bad one."""
    top = _Reader(config, None)
    seed = top.raw("seed", 0)
    if not _is_int(seed):
      raise top.fail("seed", seed, "an integer is accepted")
    parallel = top.choice("parallel", "pmap", PARALLEL)
    data = DataSettings.read(config)
    diff = DiffusionSettings.read(config)
    model = ModelSettings.read(config, data, diff.var_type)
    return cls(seed=int(seed), parallel=parallel, data=data, model=model, diffusion=diff,
               optim=OptimSettings.read(config),
               training=TrainingSettings.read(config, device_count),
               sampling=SamplingSettings.read(config, diff, model),
               eval=EvalSettings.read(config))


def is_changeable(key: str) -> bool:
  """Whether the dotted config field `key` (e.g. "training.log_every") may differ between the
  runs of one workdir: its field's rule if the section declares it, else its section's."""
  section, _, name = key.partition(".")
  if not name:
    return TOP_LEVEL_CHANGEABLE.get(section, False)
  cls = SECTIONS.get(section)
  if cls is None:
    return False
  for f in dataclasses.fields(cls):
    if f.name == name.split(".")[0]:
      return bool(f.metadata.get("changeable", cls.changeable))
  return cls.changeable


def validate(config, *, device_count: Optional[int] = None) -> Settings:
  """`Settings.from_config`: the entry points' one call before anything is written."""
  return Settings.from_config(config, device_count=device_count)


def check_dataset(config, split: str) -> int:
  """data.check_dataset (the dataset is prepared and fits config.data; returns the split's
  size), its refusals as UserError: each is a sentence about the user's data or config."""
  from ddpm_jax import data  # pylint: disable=import-outside-toplevel  (TensorFlow, on use)
  try:
    return data.check_dataset(config, split)
  except (ValueError, FileNotFoundError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(" ".join(str(e).split())) from e
