"""scikit-learn's 8x8 grayscale digits: a 1.0M-parameter model for quick runs on a CPU.

One forward+backward pass at batch 128 takes about 0.3 s on 2 CPU cores, so some 2,000 training
steps fit in ten minutes.
"""
from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.num_channels = 1
  config.data.random_flip = False  # a mirrored digit is not a digit

  model = config.model
  model.ch = 32
  model.ch_mult = (1, 2)  # 8x8 -> 4x4
  model.num_res_blocks = 2
  model.attn_resolutions = (4,)
  model.dropout = 0.0  # no measurable effect on samples here, and no dropout masks to draw
  model.out_channels = 1

  # The small-data recipe (see BENCHMARKS.md, "Ablations on digits"), not the paper's: predict v
  # (Salimans & Ho, 2022) on the cosine schedule (Nichol & Dhariwal, 2021). With the paper's
  # eps a short run leaves grey, speckled backgrounds.
  config.diffusion.mean_type = "v"
  config.diffusion.beta_schedule = "cosine"

  # About ten minutes on a 2-core CPU: a short warmup and a faster rate. The EMA warms up
  # (training.ema_warmup: its decay is min(0.999, (1 + k) / (10 + k)) at step k), so it averages
  # about the last 10% of the steps so far: with a fixed 0.999 the EMA of a 2,000-step run would
  # still remember the initialisation and sample noise.
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 200
  config.training.batch_size = 128
  config.training.num_train_steps = 2000
  config.training.ema_decay = 0.999
  config.training.ema_warmup = True
  config.training.log_every = 50
  config.training.checkpoint_every = 500
  config.training.sample_every = 1000
  config.sampling.num_samples = 64
  config.eval.split = "test"
  return config
