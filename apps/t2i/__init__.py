"""Text-to-image app: GRAFT / P-GRAFT for text-conditioned diffusion.

Two faces, one code path (:class:`pgraft.apps.t2i.model.T2IPipeline`):

- the embedded compositional world (``world.py``): coloured shapes on a 32x32 canvas, captioned by
  a GenEval-style grammar, an exact checker (``checker.py``) and a learned VQA-style reward
  (``rewards.py``);
- the real path: ``--model PATH`` loads a local diffusers Stable Diffusion directory (latent space,
  CLIP text encoder, DDIM schedule table), LoRA on the UNet attention, P-GRAFT split; a
  flow-matching ``StableDiffusion3Pipeline`` directory (SD3 / SD3.5) is detected from its
  model_index.json and runs through ``flow_pipeline.py`` (Euler / Flow-GRPO SDE on the scheduler's
  shifted sigmas, linear-flow loss, LoRA on the transformer attention).

Typical session (CPU)::

    pgraft t2i pretrain --out runs/t2i/base            # <= 45 min on 2 cores (preset "default")
    pgraft t2i train-scorer --out runs/t2i/scorer      # ~3 min
    pgraft t2i evaluate --model runs/t2i/base --prompts heldout
    pgraft t2i train --out runs/t2i/pgraft --prompts heldout --t 0.25 --rounds 4
    pgraft t2i evaluate --run runs/t2i/pgraft --prompts heldout
    pgraft t2i sample runs/t2i/pgraft
"""

# `--anchor` of `pgraft t2i train` and benchmarks/t2i.py: without it, self-training on the model's own
# samples drifts down round after round (README, t2i section)
DEFAULT_ANCHOR = 5.0
