"""pgraft: GRAFT / P-GRAFT reward fine-tuning and inverse noise correction for diffusion and flow models."""

__version__ = "0.1.0"
