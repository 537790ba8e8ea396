"""Pipeline-family adapters of the flow-matching text-to-image app (see :mod:`.base` for the interface):
one per diffusers pipeline class, chosen by ``model_index.json``'s ``_class_name``."""

from __future__ import annotations

from .base import TRANSFORMER_ATTENTION, FlowFamily, PromptEmbedding, pack_latents, stack_embeddings, unpack_latents
from .flux import FluxFamily
from .qwen_image import QwenImageFamily
from .sana import SanaFamily
from .sd3 import SD3Family

# family name -> adapter; the UNet / DDIM Stable Diffusion path ("sd") and the embedded world ("world")
# are the app's other two kinds (apps/t2i/model.py)
FAMILIES: dict[str, FlowFamily] = {f.name: f for f in (SD3Family(), FluxFamily(), QwenImageFamily(), SanaFamily())}
# model_index.json class -> family name
FLOW_CLASSES: dict[str, str] = {f.pipeline_class: f.name for f in FAMILIES.values()}
# the UNet pipelines read as DDIM Stable Diffusion checkpoints
UNET_CLASSES = ("StableDiffusionPipeline",)


def family(name: str) -> FlowFamily:
    """The adapter of family ``name`` (``sd3``, ``flux``, ``qwen_image``, ``sana``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown pipeline family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def supported_classes() -> list[str]:
    return [*UNET_CLASSES, *FLOW_CLASSES]


__all__ = ["FAMILIES", "FLOW_CLASSES", "TRANSFORMER_ATTENTION", "UNET_CLASSES", "FlowFamily", "PromptEmbedding",
           "family", "pack_latents", "stack_embeddings", "supported_classes", "unpack_latents"]
