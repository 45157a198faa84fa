"""diffusers' UNet2DModel as DDPM's network, written as a diffusers model folder with its outputs:
the reference that `python -m ddpm_jax.convert --from=diffusers` is checked against.

Runs in the peer's environment (torch and diffusers, benchmarks/requirements-peer.txt):

    python benchmarks/diffusers_fixture.py                         # regenerates tests/fixtures/diffusers_tiny
    python benchmarks/diffusers_fixture.py --model=cifar10 --out=/tmp/ddpm-cifar10-random

--model=tiny: 8x8 grayscale (so the bundled digits can be its data), block_out_channels
(32, 32), one ResNet block per level, DownBlock2D + AttnDownBlock2D / AttnUpBlock2D +
UpBlock2D (the block types of google/ddpm-cifar10-32), a 20-step scheduler; weights stored as
float16 to keep the committed folder small (the outputs are computed in float32 from those same
float16-rounded weights, so the reference is exact for them). --model=cifar10: exactly
google/ddpm-cifar10-32's configuration (35,746,307 parameters), float32 weights, 1000 steps.

Every parameter is perturbed with Gaussian noise after diffusers' random initialisation, so no
tensor is trivially 0 or 1 and a wrongly mapped tensor changes the output.

Writes into --out: model_index.json, unet/{config.json, diffusion_pytorch_model.safetensors},
scheduler/scheduler_config.json (DDPMPipeline.save_pretrained, as on the Hugging Face Hub), and
reference.npz:
    x_t    float32 [N, S, S, C]  inputs, NHWC
    t      int32 [N]             0-based timesteps
    out    float32 [N, S, S, C]  the UNet2DModel's output, NHWC
    betas_<beta_schedule>  float32 [T]  DDPMScheduler(num_train_timesteps=T, ...).betas for the
                                        four beta schedules our converter maps (tiny only)
Compare with our U-Net in our own environment: `python benchmarks/convert_equality.py --src=OUT`.
"""
import argparse
import os
import shutil

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIR = os.path.join(REPO, "tests", "fixtures", "diffusers_tiny")

# The DDPM architecture in UNet2DModel's terms: the original's sinusoidal embedding (no flip,
# shift 1), GroupNorm(32, eps 1e-6), TF-style "SAME" stride-2 downsampling (padding 0 plus the
# asymmetric pad diffusers adds), one attention head per layer.
DDPM_ARCHITECTURE = dict(attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, freq_shift=1,
                         flip_sin_to_cos=False, downsample_padding=0, act_fn="silu")

MODELS = {
    "tiny": dict(
        unet=dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                  block_out_channels=(32, 32),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D")),
        scheduler=dict(num_train_timesteps=20, beta_schedule="linear", variance_type="fixed_large",
                       clip_sample=True),
        dtype=torch.float16, batch=3),
    "cifar10": dict(  # google/ddpm-cifar10-32
        unet=dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
        scheduler=dict(num_train_timesteps=1000, beta_schedule="linear",
                       variance_type="fixed_small", clip_sample=True),
        dtype=torch.float32, batch=4),
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


@torch.no_grad()
def build(spec, seed):
  """A randomly initialised, then perturbed, UNet2DModel whose weights are exactly
  representable in spec["dtype"]."""
  torch.manual_seed(seed)
  model = UNet2DModel(**spec["unet"], **DDPM_ARCHITECTURE).eval()
  for p in model.parameters():
    # Noise of the tensor's own scale (and at least 0.05): GroupNorm scales move off 1 and
    # every bias off 0, yet activations stay O(1) through the whole network.
    scale = 0.3 * float(p.float().pow(2).mean().sqrt()) + 0.05
    p.add_(scale * torch.randn_like(p))
    p.copy_(p.to(spec["dtype"]).float())
  return model


@torch.no_grad()
def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
  parser.add_argument("--out", default=None, help=f"default for tiny: {TINY_DIR}")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  out = args.out or (TINY_DIR if args.model == "tiny" else None)
  if out is None:
    parser.error("--out is required for --model=cifar10 (its weights take 143 MB).")
  spec = MODELS[args.model]
  model = build(spec, args.seed)

  gen = torch.Generator().manual_seed(args.seed + 1)
  cfg = spec["unet"]
  n, size, channels = spec["batch"], cfg["sample_size"], cfg["in_channels"]
  x_t = torch.randn(n, channels, size, size, generator=gen)
  steps = spec["scheduler"]["num_train_timesteps"]
  t = torch.tensor([0, steps // 2, steps - 1] + [1] * (n - 3), dtype=torch.int64)[:n]
  y = model(x_t, t).sample.float()

  if os.path.isdir(out):
    shutil.rmtree(out)
  scheduler = DDPMScheduler(**spec["scheduler"])
  if spec["dtype"] != torch.float32:
    model = model.to(spec["dtype"])  # exact: every weight was rounded to this dtype in build()
  pipe = DDPMPipeline(unet=model, scheduler=scheduler)
  pipe.save_pretrained(out, safe_serialization=True)

  arrays = dict(x_t=x_t.permute(0, 2, 3, 1).numpy(), t=t.numpy().astype(np.int32),
                out=y.permute(0, 2, 3, 1).numpy())
  if args.model == "tiny":
    for name in BETA_SCHEDULES:
      arrays[f"betas_{name}"] = DDPMScheduler(num_train_timesteps=steps,
                                              beta_schedule=name).betas.numpy()
  np.savez(os.path.join(out, "reference.npz"), **arrays)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, output "
        f"|max| {float(y.abs().max()):.3f}, std {float(y.std()):.3f}; wrote {out} "
        f"({total / 1e3:.0f} kB)")


if __name__ == "__main__":
  main()
