"""CelebA-HQ 256x256: the DDPM paper's 256x256 model (113.7M parameters).

tensorflow-datasets' celeb_a_hq needs a manual download; its 256x256 variant is celeb_a_hq/256.
"""
from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = "celeb_a_hq/256"
  config.data.image_size = 256
  config.data.num_channels = 3

  model = config.model
  model.ch = 128
  model.ch_mult = (1, 1, 2, 2, 4, 4)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.0
  model.out_channels = 3

  # The paper's 256x256 recipe: batch 64, lr 2e-5, no dropout, 0.5M steps.
  config.data.random_flip = True
  config.optim.learning_rate = 2e-5
  config.optim.warmup_steps = 5000
  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  config.training.checkpoint_every = 5000
  config.sampling.batch_size = 64
  config.eval.split = "train"  # celeb_a_hq has only a train split
  return config
