"""The field's named text-to-image rewards, each a ``reward(images [B, 3, H, W] in [-1, 1], prompts)
-> Tensor[B]`` (float64, CPU, no autograd graph) on local weights, imported lazily:

- ``pickscore`` (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic; score
  ``logit_scale.exp() * cos(image_emb, text_emb)`` (PickScore's model card: the logit of each
  image-prompt pair before the softmax over images).
- ``hpsv2`` (Wu et al. 2023, HPSv2.1): a CLIP ViT-H/14 fine-tuned on HPD v2; score
  ``cos(image_emb, text_emb)`` (HPSv2's ``img_score``: the diagonal of ``image_features @
  text_features.T`` with both L2-normalised by open_clip, no logit scale). The ``hpsv2x`` /
  ``open-clip-torch`` packages would replace torch 2.13 by 2.14 (``pip install --dry-run``), so the
  CLIP is read in the transformers format (``CLIPModel``; open_clip's ViT-H-14 is the same
  network) and preprocessed as open_clip's ``preprocess_val`` (resize the short side, bicubic,
  centre crop, OpenAI mean/std: what ``CLIPProcessor`` does).
- ``imagereward`` (Xu et al. 2023): BLIP's image encoder and image-grounded text encoder, the
  [CLS] state through ImageReward's MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1), standardised by
  ImageReward's constants ``(r - 0.16717362830052426) / 1.0333394966054072``; text padded to 35
  tokens as ImageReward does. ``image-reward`` pins timm 0.6 and pulls torch 2.14, so the BLIP is a
  transformers ``BlipForImageTextRetrieval`` (its ``vision_model`` and ``text_encoder`` are
  BLIP's) plus ``imagereward_head.safetensors`` (the MLP: ``layers.{0,2,4,6,7}``) and
  ``imagereward.json`` (``mean``, ``std``, ``max_length``, ``image_size``).
- ``aesthetic`` (LAION aesthetic predictor v2, "improved-aesthetic-predictor"): the same MLP on the
  L2-normalised CLIP ViT-L/14 image embedding: a CLIP directory plus ``aesthetic_mlp.safetensors``.
- ``clipflant5`` (VQAScore with CLIP-FlanT5, Lin et al. 2024, as t2v-metrics computes it): the
  question ``Does this figure show "{prompt}"? Please answer yes or no.`` in t2v-metrics'
  ``t5_chat`` format (system message, ``USER: <image>\\n{question} ASSISTANT: ``, each text piece
  tokenised on its own so each ends in ``</s>``), the image as CLIP vision patches of the
  second-to-last layer (no CLS) through the ``mlp2x_gelu`` projector spliced in at ``<image>``; the
  score is ``exp(-mean cross-entropy)`` of the answer tokens ``Yes </s>`` under the T5 decoder
  (t2v-metrics' ``lm_prob``: the geometric mean of P("Yes") and P("</s>" | "Yes")). t2v-metrics 3.0
  pins torch 2.5.1 / torchvision 0.20.1, so it is reimplemented; its directory layout here: ``t5/`` (a
  ``T5ForConditionalGeneration`` and its tokenizer), ``vision/`` (a ``CLIPVisionModel`` and its
  ``CLIPImageProcessor``), ``projector.safetensors`` (``0.weight``, ``0.bias``, ``2.weight``,
  ``2.bias``) and ``clipflant5.json`` (``select_layer``, default -2).

Weights are a local directory or a hub id already in the local Hugging Face cache (read with
``local_files_only=True``: nothing is downloaded); anything else is refused in one line that names
the reward and what to pass. No file here is a pickle: every head is a safetensors file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pgraft.core.errors import UsageError
from pgraft.core.state import RESTORE_DIR, read_json

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageReward's standardisation of its MLP output (ImageReward.py), the defaults of imagereward.json
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072

# where each reward's weights live on the hub (told to the user when they are absent)
HUB_HINTS = {
    "pickscore": "yuvalkirstain/PickScore_v1 (with the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    "hpsv2": "a CLIPModel directory made by `pgraft t2i convert-reward hpsv2` from xswu/HPSv2's "
             "HPS_v2.1_compressed.pt",
    "imagereward": "BlipForImageTextRetrieval + imagereward_head.safetensors, made by `pgraft t2i convert-reward "
                   "imagereward` from THUDM/ImageReward's ImageReward.pt",
    "aesthetic": "openai/clip-vit-large-patch14 + the LAION sac+logos+ava1-l14-linearMSE MLP as "
                 "aesthetic_mlp.safetensors (`pgraft t2i convert-reward aesthetic`)",
    "clipflant5": "t5/ + vision/ + projector.safetensors, made by `pgraft t2i convert-reward clipflant5` from "
                  "zhiqiulin/clip-flant5-xl (or -xxl)",
}


# ----------------------------------------------------------------------------- loading
def resolve_weights(weights: str | Path | None, reward: str, needs: Sequence[str] = ()) -> Path:
    """The local directory of ``reward``'s weights: ``weights`` itself when it is a directory, else
    a hub id's snapshot in the local Hugging Face cache (never downloaded). ``needs``: files or
    folders the directory must hold. UsageError (one line) naming the reward otherwise."""
    hint = HUB_HINTS.get(reward, "its weights")
    if weights is None:
        raise UsageError(f"reward {reward!r} needs --reward-weights DIR (a local directory of {hint})")
    path = Path(weights).expanduser()
    if not path.is_dir():
        path = _cached_snapshot(str(weights))
        if path is None:
            raise UsageError(f"reward {reward!r}: {weights} is neither a local directory nor a hub id in the "
                             f"local Hugging Face cache; pass --reward-weights DIR holding {hint}")
    missing = [n for n in needs if not (path / n).exists()]
    if missing:
        raise UsageError(f"reward {reward!r}: {path} lacks {', '.join(missing)} (expected {hint})")
    return path


def check_model_type(directory: Path, reward: str, expected: str) -> None:
    """Refuse (one line) a weights directory whose ``config.json`` is not a transformers
    ``expected`` model (e.g. the shipped VQA scorer given to ``pickscore``)."""
    try:
        found = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        found = None
    if found != expected:
        raise UsageError(f"reward {reward!r}: {directory} does not hold a transformers {expected!r} model "
                         f"(config.json model_type: {found!r}); pass --reward-weights DIR holding "
                         f"{HUB_HINTS.get(reward, 'its weights')}")


def _cached_snapshot(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached / not a valid id: the caller refuses in one line
        return None


def _check_batch(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"reward got {len(images)} images but {len(prompts)} prompts")


def _pil(images: torch.Tensor) -> list:
    """[-1, 1] float images -> PIL RGB images (uint8 rounding, as a saved PNG would be)."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]


def resize_crop_normalize(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_MEAN,
                          std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """[-1, 1] images -> CLIP/BLIP pixel values as torchvision's ``Resize(size, BICUBIC),
    CenterCrop(size), ToTensor(), Normalize(mean, std)`` makes them from a saved image: quantise to
    8 bits, resize the short side to ``size`` (bicubic, antialiased as PIL's), centre crop ``size`` x
    ``size``, subtract ``mean``, divide by ``std``."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from ``get_*_features``; older ones a tensor."""
    return getattr(out, "pooler_output", out)


class AestheticMLP(nn.Module):
    """The MLP head of the LAION aesthetic predictor v2 and of ImageReward (same shape):
    ``d -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts (inert in eval), no activations."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(path: Path, input_size: int) -> AestheticMLP:
    """An :class:`AestheticMLP` from a safetensors file (keys ``layers.N.weight`` as in the originals)."""
    from safetensors.torch import load_file

    head = AestheticMLP(input_size)
    head.load_state_dict(load_file(str(path)))
    return head.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- CLIP-based
class _CLIPPair:
    """A local transformers ``CLIPModel`` + ``CLIPProcessor`` and the L2-normalised embeddings of
    (image, prompt) pairs, computed in batches of ``batch``."""

    what = "CLIP"

    def __init__(self, weights: str | Path | None, reward: str, device: str | torch.device = "cpu",
                 batch: int = 32) -> None:
        from transformers import CLIPModel, CLIPProcessor

        directory = resolve_weights(weights, reward, ["config.json"])
        check_model_type(directory, reward, "clip")
        self.model = CLIPModel.from_pretrained(directory).to(device).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(str(directory))
        self.device, self.batch, self.reward = torch.device(device), batch, reward

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                             return_tensors="pt").to(self.device)
        return F.normalize(_features(self.model.get_text_features(**ids)).float(), dim=-1)

    def cosines(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        out = [(self.image_embeds(images[i:i + self.batch]) * self.text_embeds(prompts[i:i + self.batch])).sum(-1)
               for i in range(0, len(prompts), self.batch)]
        return torch.cat(out) if out else torch.zeros(0)


class PickScoreReward(_CLIPPair):
    """PickScore: ``logit_scale.exp() * cos(image_emb, text_emb)`` (bounded by ``logit_scale.exp()``)."""

    def __init__(self, weights: str | Path | None = "yuvalkirstain/PickScore_v1", device: str | torch.device = "cpu",
                 batch: int = 32) -> None:
        super().__init__(weights, "pickscore", device, batch)
        self.scale = float(self.model.logit_scale.exp())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.scale * self.cosines(images, prompts)).cpu().double()


class HPSv2Reward(_CLIPPair):
    """HPSv2.1: ``cos(image_emb, text_emb)`` of the HPS-tuned CLIP ViT-H/14, in [-1, 1]."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch: int = 32) -> None:
        super().__init__(weights, "hpsv2", device, batch)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.cosines(images, prompts).cpu().double()


class AestheticReward(_CLIPPair):
    """LAION aesthetic predictor v2: ``MLP(image_emb / |image_emb|)`` (the prompt is not used)."""

    HEAD = "aesthetic_mlp.safetensors"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch: int = 32) -> None:
        super().__init__(weights, "aesthetic", device, batch)
        directory = resolve_weights(weights, "aesthetic", [self.HEAD])
        self.head = load_head(directory / self.HEAD, self.model.config.projection_dim).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        out = [self.head(self.image_embeds(images[i:i + self.batch])).squeeze(-1)
               for i in range(0, len(prompts), self.batch)]
        return (torch.cat(out) if out else torch.zeros(0)).cpu().double()


# ----------------------------------------------------------------------------- ImageReward
class ImageRewardReward:
    """ImageReward: ``(MLP(BLIP_text_encoder([CLS] prompt | image)[CLS]) - mean) / std``."""

    HEAD, META = "imagereward_head.safetensors", "imagereward.json"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch: int = 16) -> None:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        directory = resolve_weights(weights, "imagereward", ["config.json", self.HEAD])
        check_model_type(directory, "imagereward", "blip")
        meta = read_json(directory / self.META, fix=RESTORE_DIR) if (directory / self.META).is_file() else {}
        self.mean, self.std = float(meta.get("mean", IMAGEREWARD_MEAN)), float(meta.get("std", IMAGEREWARD_STD))
        self.max_length = int(meta.get("max_length", 35))
        blip = BlipForImageTextRetrieval.from_pretrained(directory).eval().requires_grad_(False)
        self.vision, self.text = blip.vision_model.to(device), blip.text_encoder.to(device)
        self.size = int(meta.get("image_size", blip.config.vision_config.image_size))
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.head = load_head(directory / self.HEAD, blip.config.text_config.hidden_size).to(device)
        self.device, self.batch = torch.device(device), batch

    def cls_features(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's [CLS] state of each (image, prompt) pair, [B, hidden]."""
        pixels = resize_crop_normalize(images, self.size).to(self.device)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                        encoder_hidden_states=image_embeds, encoder_attention_mask=atts)
        return out.last_hidden_state[:, 0, :].float()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        out = [self.head(self.cls_features(images[i:i + self.batch], prompts[i:i + self.batch])).squeeze(-1)
               for i in range(0, len(prompts), self.batch)]
        r = torch.cat(out) if out else torch.zeros(0)
        return ((r - self.mean) / self.std).cpu().double()


# ----------------------------------------------------------------------------- CLIP-FlanT5 VQAScore
SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
IMAGE_INDEX = -200  # the placeholder id t2v-metrics splices the image patches in at


class CLIPFlanT5Reward:
    """VQAScore of CLIP-FlanT5 (t2v-metrics ``clip-flant5-*``): ``exp(-mean CE("Yes </s>" | image, question))``."""

    QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
    ANSWER = "Yes"
    META = "clipflant5.json"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch: int = 8) -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, T5ForConditionalGeneration

        directory = resolve_weights(weights, "clipflant5", ["t5", "vision", "projector.safetensors"])
        check_model_type(directory / "t5", "clipflant5", "t5")
        check_model_type(directory / "vision", "clipflant5", "clip_vision_model")
        meta = read_json(directory / self.META, fix=RESTORE_DIR) if (directory / self.META).is_file() else {}
        self.select_layer = int(meta.get("select_layer", -2))
        self.t5 = T5ForConditionalGeneration.from_pretrained(directory / "t5").to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory / "t5"))
        self.vision = CLIPVisionModel.from_pretrained(directory / "vision").to(device).eval().requires_grad_(False)
        self.image_processor = CLIPImageProcessor.from_pretrained(str(directory / "vision"))
        d_vision, d_model = self.vision.config.hidden_size, self.t5.config.d_model
        self.projector = nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.projector.load_state_dict(load_file(str(directory / "projector.safetensors")))
        self.projector.to(device).eval().requires_grad_(False)
        self.device, self.batch = torch.device(device), batch

    def question(self, prompt: str) -> str:
        """The encoder text of ``prompt`` (t2v-metrics' ``t5_chat`` format)."""
        return f"{SYSTEM_MSG} USER: {IMAGE_TOKEN}\n{self.QUESTION.format(prompt)} ASSISTANT: "

    def token_ids(self, text: str) -> list[int]:
        """Each piece around ``<image>`` tokenised on its own (so each ends in ``</s>``), joined by
        the placeholder :data:`IMAGE_INDEX` (t2v-metrics' ``t5_tokenizer_image_token``)."""
        pieces = [self.tokenizer(p).input_ids for p in text.split(IMAGE_TOKEN)]
        out: list[int] = []
        for i, p in enumerate(pieces):
            if i:
                out.append(IMAGE_INDEX)
            out.extend(p)
        return out

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Pad to a square with the processor's mean colour (t2v-metrics ``expand2square``), then
        the CLIP image processor."""
        from PIL import Image

        pils = []
        fill = tuple(int(m * 255) for m in self.image_processor.image_mean)
        for im in _pil(images):
            w, h = im.size
            if w != h:
                side = max(w, h)
                square = Image.new(im.mode, (side, side), fill)
                square.paste(im, ((side - w) // 2, (side - h) // 2))
                im = square
            pils.append(im)
        return self.image_processor(pils, return_tensors="pt")["pixel_values"].to(self.device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP patch features of layer ``select_layer`` (CLS dropped), [B, P, d_model]."""
        hidden = self.vision(pixel_values=self.pixel_values(images), output_hidden_states=True).hidden_states
        return self.projector(hidden[self.select_layer][:, 1:])

    def encoder_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [B, L, d], attention_mask [B, L]): text embeddings with the image features
        in place of the placeholder, right-padded (masked) to the longest."""
        feats = self.image_features(images)
        embed = self.t5.get_input_embeddings()
        rows = []
        for f, p in zip(feats, prompts):
            ids = torch.tensor(self.token_ids(self.question(p)), device=self.device)
            at = int((ids == IMAGE_INDEX).nonzero()[0, 0])
            rows.append(torch.cat([embed(ids[:at]), f.to(embed.weight.dtype), embed(ids[at + 1:])]))
        length = max(len(r) for r in rows)
        x = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            x[i, :len(r)], mask[i, :len(r)] = r, 1
        return x, mask

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x, mask = self.encoder_inputs(images, prompts)
        answer = torch.tensor(self.tokenizer(self.ANSWER).input_ids, device=self.device)
        labels = answer.repeat(len(prompts), 1)
        logits = self.t5(inputs_embeds=x, attention_mask=mask, labels=labels).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
        return (-nll).exp()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        out = [self._score(images[i:i + self.batch], prompts[i:i + self.batch])
               for i in range(0, len(prompts), self.batch)]
        return (torch.cat(out) if out else torch.zeros(0)).cpu().double()


# name -> factory(weights, device): the registry entries of :data:`.rewards.REWARDS`
NAMED: dict[str, Callable[..., RewardFn]] = {
    "pickscore": lambda weights=None, device="cpu": PickScoreReward(weights or "yuvalkirstain/PickScore_v1", device),
    "hpsv2": lambda weights=None, device="cpu": HPSv2Reward(weights, device),
    "imagereward": lambda weights=None, device="cpu": ImageRewardReward(weights, device),
    "aesthetic": lambda weights=None, device="cpu": AestheticReward(weights, device),
    "clipflant5": lambda weights=None, device="cpu": CLIPFlanT5Reward(weights, device),
}

# True upper bounds known before sampling: PickScore's logit scale is clamped to ln(100) in CLIP
# training, so logit_scale.exp() * cos <= 100; HPSv2 is a cosine (<= 1); CLIP-FlanT5 VQAScore a
# probability (<= 1). ImageReward and the aesthetic score are unbounded MLP outputs: no entry.
NAMED_MAX: dict[str, float] = {"pickscore": 100.0, "hpsv2": 1.0, "clipflant5": 1.0}

__all__ = ["NAMED", "NAMED_MAX", "PickScoreReward", "HPSv2Reward", "AestheticReward", "ImageRewardReward",
           "CLIPFlanT5Reward", "AestheticMLP", "resolve_weights", "check_model_type", "resize_crop_normalize"]
