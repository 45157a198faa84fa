"""Your own small dataset (32x32 or 64x64): the preset to start from, with the recipe that the
digits ablations picked (BENCHMARKS.md, "Ablations on digits") rather than the paper's.

    python main.py --config=configs/small.py --workdir=/path/to/run \
        --config.data.dataset=folder --config.data.path=/path/to/images   # or a tfds name
    python main.py --config=configs/small.py --workdir=... --config.data.image_size=64

A 9M-parameter U-Net (the paper's CIFAR-10 network at half the width; four levels, so 32x32
runs at 32, 16, 8, 4 and 64x64 at 64, 32, 16, 8, with attention at 16x16 in both). What differs
from the paper (configs/cifar10.py):
- v-prediction (Salimans & Ho, 2022) on the cosine schedule (Nichol & Dhariwal, 2021) instead of
  eps on the linear schedule: clean backgrounds within the first thousand steps;
- no dropout: it made no measurable difference on digits and costs random numbers every step
  (raise model.dropout if the loss on held-out data rises while the training loss falls);
- an EMA with warm-up (training.ema_warmup): min(0.9999, (1 + k) / (10 + k)) at step k, so
  samples are usable after a few thousand steps and still average 10,000 steps in long runs;
- a shorter lr warm-up (1,000 steps) and batch 64.
"""
from configs import default


def get_config():
  config = default.get_config()

  config.data.dataset = "cifar10"  # set yours: a tfds name, "folder" or "npz" (data.path)
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.random_flip = True

  model = config.model
  model.ch = 64
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.0
  model.out_channels = 3

  config.diffusion.mean_type = "v"
  config.diffusion.beta_schedule = "cosine"

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1000
  config.training.batch_size = 64
  config.training.num_train_steps = 200_000
  config.training.ema_decay = 0.9999
  config.training.ema_warmup = True
  config.training.checkpoint_every = 5000
  config.training.sample_every = 10_000
  config.sampling.sampler = "ddim"  # the grids written during training: 100 DDIM steps
  config.sampling.num_steps = 100
  config.eval.split = "test"
  return config
