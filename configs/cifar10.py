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
  return config
