"""config.edit: what `--mode=edit` and the run-level edits (`ddpm_jax.inpaint`, `edit`,
`invert`, `interpolate`) do, read and checked once into a frozen `EditSettings`.

A run's config.json from before the section existed reads as the defaults. The chain's
other options (eta, order, clip_denoised, guidance_scale, thresholding, batch_size) are
config.sampling's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ddpm_jax.config_fields import SectionReader

TASKS = ("inpaint", "edit", "invert", "interpolate")
# inpaint: repaint (RePaint with jumps), ancestral (replacement), ddim, dpm_solver (replacement);
# edit (SDEdit): ancestral, ddim, dpm_solver (repaint, the default, means ddim there); invert
# and interpolate always use DDIM (eta 0).
EDIT_SAMPLERS = ("repaint", "ancestral", "ddim", "dpm_solver")
# A named mask names the region to FILL; the rest of the image is kept.
NAMED_MASKS = ("center", "left-half", "right-half", "top-half", "bottom-half")


@dataclasses.dataclass(frozen=True)
class EditSettings:
  """config.edit, checked. Changeable between the runs of one workdir (it edits, never trains)."""
  task: str
  input: Optional[str]  # a folder of images (any size is refused: they must be the run's)
  masks: Optional[str]  # a folder of masks named as the images (white = keep), or unset
  mask: str  # a named mask (NAMED_MASKS), used where `masks` is unset
  strength: float  # SDEdit: 0 keeps the image, 1 samples anew
  sampler: str
  num_steps: int  # config 0 reads as min(100, num_timesteps)
  jump_length: int  # RePaint
  jump_n_sample: int  # RePaint; 1 is plain replacement
  num: int  # interpolate: images along the path, both ends included

  section_changeable = True

  @classmethod
  def read(cls, config, num_timesteps: int) -> "EditSettings":
    if config.get("edit") is None:  # a run's config.json from before the section existed
      config = {"edit": {}}
    r = SectionReader(config, "edit")
    T = num_timesteps
    s = cls(task=r.choice("task", "inpaint", TASKS),
            input=r.text("input", None),
            masks=r.text("masks", None),
            mask=r.choice("mask", "center", NAMED_MASKS),
            strength=r.float("strength", 0.5, 0.0, 1.0, what="the SDEdit strength"),
            sampler=r.choice("sampler", "repaint", EDIT_SAMPLERS),
            num_steps=r.int("num_steps", 0, 0, T, what=f"the number of steps (0: "
                            f"min(100, T); the run's num_timesteps T is {T})") or min(100, T),
            jump_length=r.int("jump_length", 10, 1, what="RePaint's jump length"),
            jump_n_sample=r.int("jump_n_sample", 10, 1, what="RePaint's resampling count"),
            num=r.int("num", 8, 2, what="the number of interpolated images"))
    if s.sampler == "repaint" and s.task == "edit":  # the default is inpainting's
      s = dataclasses.replace(s, sampler="ddim")
    if (s.task == "inpaint" and s.sampler == "repaint" and s.jump_n_sample > 1
        and s.jump_length >= s.num_steps):
      raise r.fail("jump_length", s.jump_length, f"a RePaint jump must fit in the chain of "
                   f"config.edit.num_steps={s.num_steps} steps; accepted: an integer below it")
    return s
