"""A tiny run for tests: the digits data, a 2-level model and 20 timesteps; seconds on a CPU."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.num_channels = 1
  config.data.random_flip = True  # exercises the flip path (digits.py turns it off)

  model = config.model
  model.ch = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.dropout = 0.1
  model.out_channels = 1

  config.diffusion.num_timesteps = 20

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2

  training = config.training
  training.batch_size = 8
  training.num_train_steps = 6
  training.ema_decay = 0.9
  training.log_every = 2
  training.checkpoint_every = 3
  training.keep_checkpoints = 2
  training.sample_every = 6

  config.sampling.num_steps = 20
  config.sampling.num_samples = 4
  config.sampling.batch_size = 4
  return config
