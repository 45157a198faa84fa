"""CIFAR-10 32x32: the DDPM paper's CIFAR-10 model (35.7M parameters)."""
from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.num_channels = 3

  model = config.model
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.out_channels = 3

  # The paper's recipe (Ho et al., appendix B): the rest is configs/default.py's.
  config.data.random_flip = True
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0
  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.ema_decay = 0.9999
  config.eval.split = "test"
  return config
