"""LSUN church_outdoor 256x256: the DDPM paper's LSUN model (the CelebA-HQ network).

tensorflow-datasets' lsun/church_outdoor; images are centre-cropped and resized to 256.
"""
from configs import celebahq


def get_config():
  config = celebahq.get_config()
  config.data.dataset = "lsun/church_outdoor"
  config.training.num_train_steps = 1_200_000  # the paper's church run
  config.eval.split = "validation"  # LSUN has train and validation splits
  return config
