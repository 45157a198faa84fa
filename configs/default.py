"""Defaults shared by every dataset config (the schema of docs/design.md).

Each dataset file starts with `config = default.get_config()` and overrides what differs.
Every field can be overridden on the command line, e.g. `--config.training.batch_size=256`.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "cifar10"
  # tfds data_dir; unset uses tfds' default (~/tensorflow_datasets).
  data.data_dir = config_dict.placeholder(str)
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  # Read by data.py; declared so that the command line can set them.
  data.pad_to_size = False  # True: zero-pad smaller fixed-size images (MNIST 28 -> 32)
  data.shuffle_buffer_size = 50_000  # encoded records in the shuffle buffer
  # Your own images (docs/data.md): dataset "folder" (every image under path) or "npz" (a file).
  data.path = config_dict.placeholder(str)  # the folder or .npz; local or gs://
  data.labels_from = "none"  # "subfolders": a folder's first-level subfolders are the classes
  data.eval_fraction = 0.02  # of a folder/npz held out as the "test" split, chosen by name
  data.class_names = ()  # set by ddpm_jax.load from the run's classes.json; not an input

  # The U-Net of Ho et al. (2020): UNet(**config.model).
  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.out_channels = 3  # C, or 2C for diffusion.var_type = "learned_range".
  model.num_classes = 0  # > 0 makes a class-conditional model.
  model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32.
  model.remat = False  # recompute block activations in the backward pass: less memory, more FLOPs

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = "linear"
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.num_timesteps = 1000
  diffusion.mean_type = "eps"  # eps | x0 | v
  diffusion.var_type = "fixedlarge"  # fixedlarge | fixedsmall | learned_range
  diffusion.loss_type = "mse"  # mse | kl | hybrid
  diffusion.min_snr_gamma = 0.0  # > 0 weights L_simple by min(SNR, gamma) (Hang et al., 2023)

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4
  optim.warmup_steps = 5000
  optim.grad_clip = 1.0
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global, over all devices and hosts
  training.num_train_steps = 800_000
  training.ema_decay = 0.9999  # the EMA that sampling and evaluation use
  training.extra_ema_decays = ()  # more EMAs to keep, e.g. (0.999,)
  # EMA warm-up (diffusers' EMAModel): update k uses min(decay, (1 + k) / (10 + k)), 0 at k = 0,
  # so short runs sample from recent weights; off keeps the paper's fixed decay.
  training.ema_warmup = False
  training.label_dropout = 0.1  # class-conditional models: P(null label), for guidance
  training.log_every = 100
  training.checkpoint_every = 10_000
  training.keep_checkpoints = 3
  training.sample_every = 50_000
  training.eval_every = 0  # > 0: bits/dim of a held-out batch (and FID, see eval.*) every N steps

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ancestral"  # ancestral | ddim | dpm_solver | heun
  sampling.num_steps = 1000  # < num_timesteps respaces the chain
  sampling.eta = 0.0
  sampling.clip_denoised = True
  sampling.guidance_scale = 0.0  # classifier-free guidance weight w (class-conditional models)
  sampling.num_samples = 64  # --mode=sample writes this many
  sampling.batch_size = 256  # per host and compiled call; also the size of the .npz shards
  # DPM-Solver++ (sampler=dpm_solver): its order (1-3), and Imagen's dynamic thresholding of
  # every x0 prediction (per sample: s = the ratio-quantile of |x0| in [1, max]; x0 -> clip / s).
  sampling.order = 2
  sampling.thresholding = False
  sampling.thresholding_ratio = 0.995
  sampling.thresholding_max = 1.5

  # --mode=edit and ddpm_jax.inpaint/edit/invert/interpolate (ddpm_jax/edit_settings.py); the
  # chain's other options (eta, order, clip_denoised, guidance, batch_size) are config.sampling's.
  config.edit = edit = ml_collections.ConfigDict()
  edit.task = "inpaint"  # inpaint | edit (SDEdit) | invert (DDIM) | interpolate
  edit.input = config_dict.placeholder(str)  # a folder of images of the run's size
  # masks named as the images (any extension): white keeps, black is filled
  edit.masks = config_dict.placeholder(str)
  # without masks, this region is filled: center | left-half | right-half | top-half | bottom-half
  edit.mask = "center"
  edit.strength = 0.5  # SDEdit: 0 keeps the image, 1 samples anew
  # inpaint: repaint | ancestral | ddim | dpm_solver; edit: the last three (repaint: ddim)
  edit.sampler = "repaint"
  edit.num_steps = 0  # of the chain, <= num_timesteps; 0: min(100, num_timesteps)
  edit.jump_length = 10  # RePaint's jumps (Lugmayr et al., 2022); jump_n_sample=1: replace
  edit.jump_n_sample = 10
  edit.num = 8  # interpolate: images along the path between the first two inputs

  config.eval = evaluation = ml_collections.ConfigDict()
  # --mode=eval: "bpd" (the bound), "ode_bpd" (the probability-flow ODE's exact NLL), "fid"
  # (FID and IS)
  evaluation.metrics = ("bpd", "fid")
  evaluation.split = "test"  # bits/dim split
  evaluation.bpd_num_examples = 0  # 0: the whole split (bpd and ode_bpd)
  evaluation.ode_rtol = 1e-5  # ode_bpd: the adaptive solver's tolerances (score_sde's)
  evaluation.ode_atol = 1e-5
  evaluation.batch_size = 128  # per host, for bits/dim and Inception features
  evaluation.num_samples = 50_000  # samples for FID/IS (written as in --mode=sample)
  # pytorch-fid's .pth (or an .npz); unset: downloaded once into ~/.cache/ddpm_jax or
  # $DDPM_JAX_CACHE (docs/inception_weights.md)
  evaluation.inception_weights = config_dict.placeholder(str)
  evaluation.fid_reference = config_dict.placeholder(str)  # .npz of mu, sigma; unset: the data
  evaluation.fid_split = "train"  # the data split of computed reference statistics
  evaluation.fid_reference_examples = 50_000  # at most this many examples of fid_split
  # In-training evaluation (training.eval_every > 0) on EMA params, off by default:
  evaluation.train_bpd_examples = 64  # bits/dim of the first N examples of eval.split
  evaluation.train_fid_samples = 0  # > 0: also FID/IS of N samples (needs inception_weights)

  config.parallel = "pmap"  # pmap | shard_map
  # When JAX runs on the CPU: make it this many XLA devices and train data-parallel over them
  # (faster on small images: XLA:CPU runs one device's ops largely one after another). 0: about
  # 2 per core, keeping >= 8 examples per device, unless XLA_FLAGS or JAX_NUM_CPU_DEVICES sets a
  # count. No effect where JAX finds a GPU or TPU.
  config.cpu_devices = 0
  return config
