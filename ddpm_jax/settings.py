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
from typing import Optional, Tuple

import numpy as np

from ddpm_jax import diffusion, schedules
from ddpm_jax.config_fields import SectionReader, changeable, fail, is_int, is_number
from ddpm_jax.errors import UserError
from ddpm_jax.edit_settings import EditSettings
from ddpm_jax.unet import UNet

SAMPLERS = ("ancestral", "ddim", "dpm_solver", "heun")
PARALLEL = ("pmap", "shard_map")
DTYPES = ("float32", "bfloat16")
METRICS = ("bpd", "ode_bpd", "fid")
GROUP_NORM_GROUPS = 32  # the U-Net's GroupNorm: every channel count must be a multiple

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
  data_dir: Optional[str] = changeable()  # tfds data_dir; None: tfds' default
  # dataset "folder" / "npz": where the images are (moving them keeps the run's data)
  path: Optional[str] = changeable()
  labels_from: str = "none"  # "subfolders": a folder's first-level subfolders are its classes
  eval_fraction: float = 0.02  # of a folder/npz held out as the "test" split

  section_changeable = False

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """(S, S, C): one image."""
    return (self.image_size, self.image_size, self.num_channels)

  @classmethod
  def read(cls, config) -> "DataSettings":
    r = SectionReader(config, "data")
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
               data_dir=r.text("data_dir", None),
               path=r.text("path", None),
               labels_from=r.choice("labels_from", "none", ("none", "subfolders")),
               eval_fraction=r.float("eval_fraction", 0.02, 0.0, 1.0, high_open=True,
                                     what="the held-out fraction"))


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """config.model: the U-Net's attributes (`make_model`)."""
  ch: int
  ch_mult: Tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: Tuple[int, ...]
  dropout: float
  resamp_with_conv: bool
  out_channels: int
  num_classes: int
  dtype: str = changeable("float32")  # compute dtype only: parameters stay float32
  remat: bool = changeable(False)  # recompute activations: the same parameters and results

  section_changeable = False

  def make_model(self, dtype: Optional[str] = None) -> UNet:
    """The UNet of these settings (computing in `dtype` if given): the one factory of
    training, sampling and evaluation."""
    return UNet(**dict(dataclasses.asdict(self), **({"dtype": dtype} if dtype else {})))

  @classmethod
  def read(cls, config, data: DataSettings, var_type: str) -> "ModelSettings":
    r = SectionReader(config, "model")
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
      raise fail("data.image_size", data.image_size,
                  f"config.model.ch_mult={m.ch_mult} downsamples by {factor}, so the image "
                  f"size must be a multiple of {factor}")
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

  section_changeable = False

  @classmethod
  def read(cls, config) -> "DiffusionSettings":
    r = SectionReader(config, "diffusion")
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

  def make_schedule(self) -> schedules.Schedule:
    """The run's Schedule: the one factory of training, sampling and evaluation."""
    return schedules.Schedule.from_betas(self.betas())


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """config.optim: Adam with linear warmup and global-norm clipping. Fixed."""
  learning_rate: float
  warmup_steps: int
  grad_clip: float  # 0: no clipping
  b1: float
  b2: float
  eps: float

  section_changeable = False

  @classmethod
  def read(cls, config) -> "OptimSettings":
    r = SectionReader(config, "optim")
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
  ema_warmup: bool  # the EMA's decay warms up: min(decay, (1 + k) / (10 + k)) at step k
  num_train_steps: int = changeable()
  log_every: int = changeable()
  checkpoint_every: int = changeable()
  keep_checkpoints: int = changeable()
  sample_every: int = changeable()  # 0: never
  eval_every: int = changeable()  # 0: never

  section_changeable = False

  @classmethod
  def read(cls, config, device_count: Optional[int]) -> "TrainingSettings":
    r = SectionReader(config, "training")
    decay = r.float("ema_decay", 0.9999, 0.0, 1.0, high_open=True, what="an EMA decay")
    extra = r.raw("extra_ema_decays", ())
    if not isinstance(extra, (list, tuple)) or not all(
        is_number(x) and 0.0 <= x < 1.0 for x in extra):
      raise r.fail("extra_ema_decays", extra, "every EMA decay must be a float in [0, 1)")
    t = cls(batch_size=r.int("batch_size", 128, 1, what="the global batch size"),
            ema_decays=(decay,) + tuple(float(x) for x in extra),
            label_dropout=r.float("label_dropout", 0.1, 0.0, 1.0, what="a probability"),
            ema_warmup=r.bool("ema_warmup", False),
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
                   f"the global batch does not divide over the {device_count} devices; use a "
                   f"multiple of {device_count}")
    return t


@dataclasses.dataclass(frozen=True)
class ChainSettings:
  """How one reverse chain is drawn: the compiled sampler's cache key, the sample directory's
  tag and the shards' manifest. A new sampler option is a field here (its check goes in
  SamplingSettings.read; `tag` says how a sample directory's name shows it) and its use in
  sampling's chain."""
  sampler: str
  num_steps: int  # in [1, T]; < T respaces the chain
  eta: float = dataclasses.field(  # DDIM's noise: 0 deterministic, 1 ancestral-like
      metadata={"tag": lambda v, c: f"_eta{v:g}" if c.sampler == "ddim" else ""})
  clip_denoised: bool = dataclasses.field(metadata={"tag": lambda v, c: "" if v else "_noclip"})
  guidance_scale: float = dataclasses.field(  # classifier-free guidance weight w; 0: none
      metadata={"tag": lambda v, c: f"_cfg{v:g}" if v else ""})
  order: int = dataclasses.field(  # DPM-Solver++'s order, 1-3
      default=2, metadata={"tag": lambda v, c: f"_order{v}" if c.sampler == "dpm_solver" else ""})
  # Imagen's dynamic thresholding of every x0 prediction (dpm_solver only): per sample, s = the
  # ratio-quantile of |x0| clipped to [1, max]; x0 -> clip(x0, -s, s) / s.
  thresholding: bool = dataclasses.field(
      default=False, metadata={"tag": lambda v, c: "_thr" if v else ""})
  thresholding_ratio: float = dataclasses.field(
      default=0.995, metadata={"tag": lambda v, c: f"{v:g}" if c.thresholding else ""})
  thresholding_max: float = dataclasses.field(
      default=1.5, metadata={"tag": lambda v, c: f"-{v:g}" if c.thresholding else ""})

  def tag(self) -> str:
    """e.g. "ancestral1000", "ddim100_eta0", "ddim50_eta0_cfg2": the options that matter."""
    out = f"{self.sampler}{self.num_steps}"
    for f in dataclasses.fields(self)[2:]:
      value = getattr(self, f.name)
      out += f.metadata["tag"](value, self) if "tag" in f.metadata else f"_{f.name}{value}"
    return out


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """config.sampling: how samples are drawn (`chain`) and how many, in which batches."""
  chain: ChainSettings
  num_samples: int  # --mode=sample writes this many
  batch_size: int  # per host and compiled call; also the size of the .npz shards

  section_changeable = True

  @classmethod
  def read(cls, config, diffusion_: DiffusionSettings, model: ModelSettings
           ) -> "SamplingSettings":
    r = SectionReader(config, "sampling")
    T = diffusion_.num_timesteps
    chain = ChainSettings(
        sampler=r.choice("sampler", "ancestral", SAMPLERS),
        num_steps=r.int("num_steps", T, 1, T, what=f"the number of steps (the run's "
                        f"num_timesteps is {T})"),
        eta=r.float("eta", 0.0, 0.0, what="eta"),
        clip_denoised=r.bool("clip_denoised", True),
        guidance_scale=r.float("guidance_scale", 0.0, what="the guidance weight"),
        order=r.int("order", 2, 1, 3, what="the DPM-Solver++ order"),
        thresholding=r.bool("thresholding", False),
        thresholding_ratio=r.float("thresholding_ratio", 0.995, 0.0, 1.0, low_open=True,
                                   what="the thresholding quantile"),
        thresholding_max=r.float("thresholding_max", 1.5, 1.0,
                                 what="the thresholding bound (1 is plain clipping)"))
    if chain.thresholding and chain.sampler != "dpm_solver":
      raise r.fail("thresholding", True, f"thresholding is used by the dpm_solver sampler only, "
                   f"not by config.sampling.sampler={chain.sampler!r}; accepted: False, or "
                   "sampler=dpm_solver")
    if chain.guidance_scale and not model.num_classes:
      raise r.fail("guidance_scale", chain.guidance_scale, "guidance needs a class-conditional "
                   "model (config.model.num_classes > 0); accepted: 0")
    return cls(chain=chain,
               num_samples=r.int("num_samples", 64, 1, what="the number of samples"),
               batch_size=r.int("batch_size", 256, 1, what="the sampling batch"))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """config.eval: what --mode=eval and in-training evaluation compute. Changeable."""
  metrics: Tuple[str, ...]
  split: str
  bpd_num_examples: int  # 0: the whole split (bpd and ode_bpd)
  ode_rtol: float  # the ODE solver's tolerances (ode_bpd)
  ode_atol: float
  batch_size: int  # per host, for bits/dim and Inception features
  num_samples: int  # samples for FID/IS
  inception_weights: Optional[str]  # a .pth or .npz; None: downloaded (docs/inception_weights.md)
  fid_reference: Optional[str]  # an .npz with mu, sigma; None: computed from the data
  fid_split: str
  fid_reference_examples: int
  train_bpd_examples: int
  train_fid_samples: int

  section_changeable = True

  @classmethod
  def read(cls, config) -> "EvalSettings":
    r = SectionReader(config, "eval")
    metrics = r.raw("metrics", METRICS)
    if isinstance(metrics, str):
      metrics = (metrics,)
    if not isinstance(metrics, (list, tuple)) or not metrics:
      raise r.fail("metrics", metrics, f"accepted: a non-empty tuple of {', '.join(METRICS)}")
    for m in metrics:
      if m not in METRICS:
        raise r.fail("metrics", tuple(metrics),
                     f"Unknown eval metric {m!r}; accepted: {', '.join(METRICS)}")
    return cls(metrics=tuple(metrics),
               split=r.text("split", "test"),
               bpd_num_examples=r.int("bpd_num_examples", 0, 0,
                                      what="the number of examples (0: all)"),
               ode_rtol=r.float("ode_rtol", 1e-5, 0.0, low_open=True, what="the tolerance"),
               ode_atol=r.float("ode_atol", 1e-5, 0.0, low_open=True, what="the tolerance"),
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
            "eval": EvalSettings, "edit": EditSettings}
TOP_LEVEL_CHANGEABLE = {"seed": False, "parallel": True, "cpu_devices": True}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every section of a run's config, validated. `device_count`, if given, is checked against
  training.batch_size."""
  seed: int
  parallel: str
  cpu_devices: int  # 0: automatic (placement.set_cpu_devices)
  data: DataSettings
  model: ModelSettings
  diffusion: DiffusionSettings
  optim: OptimSettings
  training: TrainingSettings
  sampling: SamplingSettings
  eval: EvalSettings
  edit: EditSettings

  @classmethod
  def from_config(cls, config, *, device_count: Optional[int] = None) -> "Settings":
    """Checks every field of `config`; raises UserError naming the first bad one."""
    top = SectionReader(config, None)
    seed = top.raw("seed", 0)
    if not is_int(seed):
      raise top.fail("seed", seed, "an integer is accepted")
    parallel = top.choice("parallel", "pmap", PARALLEL)
    cpu_devices = top.int("cpu_devices", 0, 0, what="the number of CPU devices (0: automatic)")
    data = DataSettings.read(config)
    diff = DiffusionSettings.read(config)
    model = ModelSettings.read(config, data, diff.var_type)
    return cls(seed=int(seed), parallel=parallel, cpu_devices=cpu_devices, data=data, model=model, diffusion=diff,
               optim=OptimSettings.read(config),
               training=TrainingSettings.read(config, device_count),
               sampling=SamplingSettings.read(config, diff, model),
               eval=EvalSettings.read(config),
               edit=EditSettings.read(config, diff.num_timesteps))


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
      return bool(f.metadata.get("changeable", cls.section_changeable))
  return cls.section_changeable


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
