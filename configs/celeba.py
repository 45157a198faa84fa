"""CelebA 64x64: the CelebA model of the DDIM paper (Song et al. 2021), 78.7M parameters.

The CIFAR-10 network with a fifth level (ch_mult (1, 2, 2, 2, 4)) and the same recipe (batch 128,
lr 2e-4, 5,000 warmup steps, EMA 0.9999, clip 1.0, dropout 0.1), as the DDIM paper trains it.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.dataset = "celeb_a"
  config.data.image_size = 64
  config.model.ch_mult = (1, 2, 2, 2, 4)
  config.training.num_train_steps = 500_000
  return config
