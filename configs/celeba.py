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

  # The DDIM paper's CelebA recipe (batch 128, lr 2e-4, EMA 0.9999, clip 1.0).
  config.data.random_flip = True
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.training.batch_size = 128
  config.training.num_train_steps = 500_000
  config.eval.split = "test"
  return config
