"""CelebA 64x64: the CelebA model of the DDIM paper (Song et al. 2021), 78.7M parameters."""
from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.data.num_channels = 3

  model = config.model
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2, 4)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.out_channels = 3
  return config
