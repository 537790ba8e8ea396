"""Text-to-image rewards: plain callables ``reward(images, prompts) -> Tensor[B]`` on decoded images
[B, 3, H, W] in [-1, 1].

- ``vqa``: a learned VQA-style scorer, P(yes | image, "does this show '{prompt}'?") — the embedded
  world's VQAScore analogue, used for training. A FiLM-conditioned CNN (text GRU -> per-channel
  scale/shift of each conv block, as in CLEVR VQA models) trained on rendered images with their true
  captions (label 1) and minimally corrupted captions (label 0: a swapped colour, shape, count or
  relation). Being learned, it can be fooled — the gap to the exact checker measures reward hacking.
- ``checker``: the exact programmatic checker as a 0/1 reward (used for evaluation).
- ``clipscore`` / ``itm`` / ``vqascore``: plug-ins for users with local weights (transformers, loaded
  lazily): CLIPScore, BLIP image-text matching, and VQAScore with a local VQA model.
- ``pickscore`` / ``hpsv2`` / ``imagereward`` / ``aesthetic`` / ``clipflant5``: the field's named
  preference and alignment rewards on local weights (:mod:`.named_rewards`).

Beyond these names, :func:`make_reward` takes a reward server URL (:mod:`.remote`), a user's
``module:function``, weighted combinations and JSON files of weights (:mod:`.reward_spec`).

:data:`REWARDS` maps a name to a factory ``make(weights: path | None, device) -> reward``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pgraft.core.errors import UsageError
from pgraft.core.shipped import SHIPPED
from pgraft.core.state import RESTORE_DIR, read_json

from .checker import check
from .named_rewards import NAMED, NAMED_MAX
from .presets import resolve_scorer
from .world import (
    COLORS,
    NUMBERS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    all_prompts,
    parse_prompt,
    render_dataset,
    to_float,
    to_uint8,
)

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


# ----------------------------------------------------------------------------- exact checker
def checker_reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """1.0 if the exact checker finds the prompt satisfied, else 0.0; shape [B]."""
    return check(images, list(prompts)).float()


# ----------------------------------------------------------------------------- caption corruption
_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# the category-specific corruptions (listed twice: drawn twice as often as a shape or colour change)
_CORRUPTIONS = {"counting": ["count"], "position": ["relation", "relation"], "color_attr": ["swap", "swap"]}


def corrupt_prompt(prompt: str, rng: np.random.Generator) -> str:
    """A caption that is *false* for every render of ``prompt`` (renders hold exactly the prompt's
    objects): change a colour, a shape to an absent one, the count, or flip the relation."""
    spec = parse_prompt(prompt)
    o = list(spec.objects)
    absent = [s for s in SHAPES if s not in {x.shape for x in o}]
    choices = ["shape"]
    if any(x.color for x in o):
        choices.append("color")
    choices += _CORRUPTIONS.get(spec.category, [])
    kind = choices[rng.integers(len(choices))]
    relation = spec.relation
    if kind == "shape":
        i = int(rng.integers(len(o)))
        o[i] = ObjectSpec(absent[rng.integers(len(absent))], o[i].color, o[i].count)
    elif kind == "color":
        i = int(rng.choice([j for j, x in enumerate(o) if x.color]))
        used = {x.color for x in o}
        new = [c for c in COLORS if c not in used]
        o[i] = ObjectSpec(o[i].shape, new[rng.integers(len(new))], o[i].count)
    elif kind == "count":
        n = [k for k in NUMBERS if k != o[0].count]
        o[0] = ObjectSpec(o[0].shape, None, int(n[rng.integers(len(n))]))
    elif kind == "relation":
        relation = _FLIP[relation]
    else:  # swap the colours of the two objects (colour attribution)
        o = [ObjectSpec(o[0].shape, o[1].color), ObjectSpec(o[1].shape, o[0].color)]
    return PromptSpec(spec.category, tuple(o), relation).text()


# ----------------------------------------------------------------------------- learned VQA scorer
def vocabulary() -> list[str]:
    """Word vocabulary of the grammar (index 0 = padding, 1 = unknown word)."""
    words = sorted({w for s in all_prompts() for w in s.text().split()})
    return ["<pad>", "<unk>", *words]


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


@dataclass(frozen=True)
class ScorerConfig:
    vocab: tuple[str, ...]
    embed: int = 32
    hidden: int = 64
    channels: tuple[int, ...] = (32, 64, 64)
    max_words: int = 16


class FiLMBlock(nn.Module):
    """conv3x3 -> GroupNorm -> FiLM(gamma, beta from text) -> ReLU, optional 2x downsampling."""

    def __init__(self, c_in: int, c_out: int, text_dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(8, c_out, affine=False)
        self.film = nn.Linear(text_dim, 2 * c_out)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(text).chunk(2, dim=1)
        h = self.norm(self.conv(x))
        return F.relu(h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])


class VQAScorer(nn.Module):
    """logit of P(yes | image, prompt). images [B, 3, H, W] in [-1, 1] (any H, W >= 8), prompts: B strings."""

    def __init__(self, vocab: Sequence[str], embed: int = 32, hidden: int = 64, channels: Sequence[int] = (32, 64, 64),
                 max_words: int = 16) -> None:
        super().__init__()
        self.config = ScorerConfig(tuple(vocab), embed, hidden, tuple(channels), max_words)
        self.index = {w: i for i, w in enumerate(vocab)}
        self.embedding = nn.Embedding(len(vocab), embed, padding_idx=0)
        self.gru = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)
        text_dim = 2 * hidden
        blocks, c_prev = [], 3 + 2  # + 2 coordinate channels: positions need absolute location
        for i, c in enumerate(channels):
            blocks.append(FiLMBlock(c_prev, c, text_dim, stride=2 if i < 2 else 1))
            c_prev = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Linear(2 * c_prev + text_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.config.max_words, dtype=torch.long)
        lengths = []
        for i, p in enumerate(prompts):
            w = [self.index.get(x, 1) for x in _words(p)][: self.config.max_words] or [1]
            ids[i, : len(w)] = torch.tensor(w)
            lengths.append(len(w))
        dev = self.embedding.weight.device
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids.to(dev)), torch.tensor(lengths),
                                                   batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # h [2, B, hidden]
        return torch.cat([h[0], h[1]], dim=1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        text = self.encode_text(prompts)
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([images.float(), xs, ys], dim=1)
        for block in self.blocks:
            x = block(x, text)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return self.head(torch.cat([pooled, text], dim=1)).squeeze(1)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "VQAScorer":
        from safetensors.torch import load_model

        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"no VQA scorer at {directory} (need config.json + model.safetensors); "
                                    "train one with `pgraft t2i train-scorer`")
        model = cls(**json.loads((directory / "config.json").read_text()))
        load_model(model, str(directory / "model.safetensors"))
        return model.eval()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Diffusion-sample-like corruptions so the scorer transfers to generated images: per-image
    Gaussian noise (std up to 0.3), a random 3x3 blur mix and a global brightness jitter."""
    b = images.shape[0]
    std = 0.3 * torch.rand(b, 1, 1, 1, generator=generator)
    noisy = images + std * torch.randn(images.shape, generator=generator)
    blur = F.avg_pool2d(noisy, 3, stride=1, padding=1, count_include_pad=False)
    mix = torch.rand(b, 1, 1, 1, generator=generator) * 0.7
    gain = 1 + 0.2 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return ((1 - mix) * noisy + mix * blur).mul(gain).clamp(-1, 1)


@dataclass(frozen=True)
class ScorerTrainConfig:
    prompts: str = "all"
    image_size: int = 32
    n_images: int = 8000
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    easy_fraction: float = 0.3


def train_scorer(cfg: ScorerTrainConfig, out: str | Path, prompts: Sequence[str] | None = None,
                 show_progress: bool = True) -> tuple[VQAScorer, dict[str, float]]:
    """Train the VQA scorer with binary cross-entropy on (image, caption, label) triples: the true
    caption (label 1, half of each batch), a minimally corrupted caption (label 0, 30%) and a
    random caption of the set labelled by the exact checker (20%). Curriculum: during the first
    ``easy_fraction`` of training all negatives are random captions — with only minimal
    corruptions the loss plateaus at log 2 for hundreds of steps (measured), the easy pairs
    first ground the words in the image. The learning rate warms up over 5% of ``steps`` and
    decays by a cosine; a fixed step budget (not wall time) keeps the reward reproducible
    (3000 steps: ~3 min on one idle core). Returns the model and metrics on fresh renders."""
    from pgraft.core.progress import progress_bar

    from .prompts import load_prompts

    prompts = list(prompts) if prompts is not None else load_prompts(cfg.prompts).prompts
    torch.manual_seed(cfg.seed)
    images, captions = render_dataset(prompts, cfg.n_images, cfg.image_size, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    corrupted = [corrupt_prompt(c, rng) for c in captions]
    random_caps = [prompts[i] for i in rng.integers(len(prompts), size=len(captions))]
    random_labels = check(to_float(images), random_caps).float()
    model = VQAScorer(vocabulary())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, losses, step = time.time(), [], 0
    with progress_bar(cfg.steps, "VQA scorer", show_progress) as advance:
        for step in range(cfg.steps):
            progress = step / cfg.steps
            for group in opt.param_groups:  # linear warmup over 5%, cosine decay to 5%
                group["lr"] = cfg.lr * min(1.0, progress / 0.05) * (0.05 + 0.475 * (1 + math.cos(math.pi * progress)))
            idx = torch.randint(len(captions), (cfg.batch_size,), generator=gen)
            kind = torch.rand(cfg.batch_size, generator=gen)
            text, label = [], torch.empty(cfg.batch_size)
            hard = 0.0 if progress < cfg.easy_fraction else 0.3  # curriculum: random captions first
            for j, (i, u) in enumerate(zip(idx.tolist(), kind.tolist())):
                if u < 0.5:
                    text.append(captions[i])
                    label[j] = 1.0
                elif u < 0.5 + hard:
                    text.append(corrupted[i])
                    label[j] = 0.0
                else:
                    text.append(random_caps[i])
                    label[j] = random_labels[i]
            x = augment(to_float(images[idx]), gen)
            loss = F.binary_cross_entropy_with_logits(model(x, text), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            advance(1, loss=loss.item())
    model.eval()
    metrics = evaluate_scorer(model, prompts, cfg.image_size, seed=cfg.seed + 1)
    metrics.update(steps=cfg.steps, seconds=time.time() - t0, final_loss=float(np.mean(losses[-50:])))
    model.save(out)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return model, metrics


@torch.no_grad()
def evaluate_scorer(model: VQAScorer, prompts: Sequence[str], image_size: int, n: int = 512, seed: int = 1) -> dict[str, float]:
    """Accuracy (threshold 0.5) on fresh renders with true and with corrupted captions."""
    images, captions = render_dataset(list(prompts), n, image_size, seed)
    x = to_float(images)
    rng = np.random.default_rng(seed)
    p_true = torch.sigmoid(model(x, captions))
    p_false = torch.sigmoid(model(x, [corrupt_prompt(c, rng) for c in captions]))
    return {"acc_true": float((p_true > 0.5).float().mean()), "acc_corrupted": float((p_false < 0.5).float().mean()),
            "mean_p_true": float(p_true.mean()), "mean_p_corrupted": float(p_false.mean())}


class LearnedVQAReward:
    """``reward(images, prompts) = P(yes)`` of a trained :class:`VQAScorer`; shape [B], in (0, 1)."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu", batch: int = 256) -> None:
        self.model = VQAScorer.load(directory).to(device).requires_grad_(False)
        self.device, self.batch = torch.device(device), batch

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = [torch.sigmoid(self.model(images[i:i + self.batch].to(self.device), list(prompts[i:i + self.batch])))
               for i in range(0, len(prompts), self.batch)]
        return torch.cat(out).cpu().double()


# ----------------------------------------------------------------------------- plug-ins with local weights
def _local_dir(directory: str | Path, reward: str, what: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{reward} needs a local {what} directory; {directory} does not exist")
    return directory


def _check_batch(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"reward got {len(images)} images but {len(prompts)} prompts")


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy())


def _pil_batches(images: torch.Tensor, prompts: Sequence[str], batch: int):
    """(PIL images, prompts) chunks of at most ``batch`` for a transformers processor."""
    _check_batch(images, prompts)
    for i in range(0, len(prompts), batch):
        yield [_to_pil(x) for x in images[i:i + batch]], list(prompts[i:i + batch])


class CLIPScoreReward:
    """CLIPScore (Hessel et al. 2021): 2.5 * max(cos(image, text), 0) with a local ``CLIPModel``.

    ``directory`` must hold a transformers CLIP checkpoint (``CLIPModel.from_pretrained``) and its
    processor; images are resized to the model's resolution and normalised with its mean/std.
    """

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPTokenizer

        directory = _local_dir(directory, "CLIPScore", "CLIP")
        self.model = CLIPModel.from_pretrained(directory).to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(directory))
        self.device = torch.device(device)
        vis = self.model.config.vision_config
        self.size = vis.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        proc = directory / "preprocessor_config.json"
        if proc.is_file():
            cfg = read_json(proc, fix=RESTORE_DIR)
            self.mean = torch.tensor(cfg.get("image_mean", self.mean.flatten().tolist())).view(1, 3, 1, 1)
            self.std = torch.tensor(cfg.get("image_std", self.std.flatten().tolist())).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        x = F.interpolate((images.float().cpu() + 1) / 2, size=(self.size, self.size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.device)
        ids = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=x)
        txt = self.model.get_text_features(**ids)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = F.cosine_similarity(img, txt, dim=-1)
        return (2.5 * cos.clamp_min(0)).cpu().double()


class ITMReward:
    """Image-text matching: P(match | image, prompt) from the ITM head of a local BLIP retrieval
    checkpoint (``BlipForImageTextRetrieval`` + its ``BlipProcessor``, e.g. blip-itm-base-coco):
    softmax of the head's two logits (no match, match), second entry."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu", batch: int = 32) -> None:
        from transformers import AutoProcessor, BlipForImageTextRetrieval

        directory = _local_dir(directory, "The ITM reward", "BLIP image-text-retrieval")
        self.processor = AutoProcessor.from_pretrained(str(directory))
        self.model = BlipForImageTextRetrieval.from_pretrained(directory).to(device).eval().requires_grad_(False)
        self.device, self.batch = torch.device(device), batch

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for pil, texts in _pil_batches(images, prompts, self.batch):
            inputs = self.processor(images=pil, text=texts, return_tensors="pt", padding=True).to(self.device)
            logits = self.model(**inputs, use_itm_head=True).itm_score.float()
            out.append(torch.softmax(logits, dim=-1)[:, 1])
        return torch.cat(out).cpu().double()


class VQAScoreReward:
    """VQAScore (Lin et al. 2024): P("Yes" | image, "Does this figure show '{prompt}'? Please answer
    yes or no.") under a local decoder-only image-text-to-text model (``AutoProcessor`` +
    ``AutoModelForImageTextToText``: LLaVA, Qwen2-VL, ...), the probability over the whole
    vocabulary of "Yes" as the first answer token.

    The question is wrapped in the processor's chat template (image first, then the question,
    then the assistant prefix) when it has one, else written after the processor's image token. The
    answer token is the one the chat template puts first in an assistant turn "Yes" (" Yes" and
    "Yes" are different tokens in most vocabularies)."""

    QUESTION = "Does this figure show '{}'? Please answer yes or no."
    ANSWER = "Yes"

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu", batch: int = 8) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        directory = _local_dir(directory, "VQAScore", "VQA model")
        self.processor = AutoProcessor.from_pretrained(str(directory))
        self.model = AutoModelForImageTextToText.from_pretrained(directory).to(device).eval().requires_grad_(False)
        if self.model.config.get_text_config().is_encoder_decoder:
            raise ValueError(f"VQAScore here scores decoder-only models; {directory} holds an encoder-decoder one")
        self.device, self.batch = torch.device(device), batch
        self.answer_id = self._answer_token()

    def _chat(self, question: str, answer: str | None = None) -> str:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)

    def text(self, prompt: str) -> str:
        """The model's input text for ``prompt`` (image placeholder included)."""
        question = self.QUESTION.format(prompt)
        if getattr(self.processor, "chat_template", None):
            return self._chat(question)
        return f"{getattr(self.processor, 'image_token', '')}{question}"

    def _answer_token(self) -> int:
        tok = self.processor.tokenizer
        if getattr(self.processor, "chat_template", None):
            prompt = tok(self._chat("q"), add_special_tokens=False).input_ids
            full = tok(self._chat("q", self.ANSWER), add_special_tokens=False).input_ids
            if len(full) > len(prompt) and full[:len(prompt)] == prompt:
                return full[len(prompt)]
        return tok(self.ANSWER, add_special_tokens=False).input_ids[0]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for pil, texts in _pil_batches(images, prompts, self.batch):
            inputs = self.processor(images=pil, text=[self.text(p) for p in texts], return_tensors="pt",
                                    padding=True).to(self.device)
            logits = self.model(**inputs).logits.float()
            mask = inputs["attention_mask"]
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last attended position, either padding side
            next_token = logits[torch.arange(len(last)), last]
            out.append(torch.softmax(next_token, dim=-1)[:, self.answer_id])
        return torch.cat(out).cpu().double()


def _need(weights: str | Path | None, name: str) -> str | Path:
    if weights is None:
        raise ValueError(f"reward {name!r} needs --reward-weights PATH (a local model directory)")
    return weights


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "vqa": lambda weights=None, device="cpu": LearnedVQAReward(_need(weights, "vqa"), device),
    "checker": lambda weights=None, device="cpu": checker_reward,
    "clipscore": lambda weights=None, device="cpu": CLIPScoreReward(_need(weights, "clipscore"), device),
    "itm": lambda weights=None, device="cpu": ITMReward(_need(weights, "itm"), device),
    "vqascore": lambda weights=None, device="cpu": VQAScoreReward(_need(weights, "vqascore"), device),
    **NAMED,  # pickscore, hpsv2, imagereward, aesthetic, clipflant5 (.named_rewards)
}


# A true upper bound of each named reward, known before sampling (``--rule rs``'s default
# --reward-max): vqa is a sigmoid, itm and vqascore softmax probabilities, checker 0 or 1, and
# clipscore 2.5 * max(cos, 0) with cos <= 1; the named rewards' bounds are argued in
# .named_rewards.NAMED_MAX (pickscore 100, hpsv2 1, clipflant5 1; imagereward and aesthetic: none).
REWARD_MAX: dict[str, float] = {"vqa": 1.0, "checker": 1.0, "itm": 1.0, "vqascore": 1.0, "clipscore": 2.5,
                                **NAMED_MAX}


def available_rewards(weights: dict[str, str | Path | None], device: str | torch.device = "cpu",
                      skip_missing: bool = True) -> dict[str, RewardFn]:
    """The rewards of :data:`REWARDS` named in ``weights`` (name -> weights directory or hub id in the
    local cache, None for rewards that need none, e.g. ``checker``), built once each: e.g. to score
    the same images with every reward available. ``skip_missing``: leave out a reward whose
    weights are absent (not found, or None for a reward that needs them) instead of raising; weights
    that are present but unusable, and unknown names, are always refused."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise UsageError(f"unknown reward(s) {unknown}; choose from {sorted(REWARDS)}")
    out: dict[str, RewardFn] = {}
    for name, path in weights.items():
        absent = path is None or not Path(path).expanduser().exists()
        try:
            out[name] = REWARDS[name](path, device)
        except (UsageError, FileNotFoundError, ValueError):
            if not (skip_missing and absent):
                raise
    return out


def declared_max(name: str, norm: str = "raw") -> float | None:
    """The upper bound of the ``--reward`` specification ``name`` when it is one named reward
    taken raw (:data:`REWARD_MAX`), else None (servers, user functions, weighted sums: unknown)."""
    return REWARD_MAX.get(name) if norm == "raw" else None


def make_reward(name: str, weights: str | Path | None = None, device: str | torch.device = "cpu",
                norm: str = "raw", nonfinite: float | None = None) -> RewardFn:
    """The reward of a ``--reward`` specification: a name of :data:`REWARDS` (``weights``: its weights
    directory), a reward server URL, a user's ``module:function``, a weighted list
    ``name:w,name:w`` or a JSON file of weights, combined by ``norm`` (``raw`` or ``zscore``); see
    :mod:`.reward_spec`. ValueError (one line) on a bad specification. ``nonfinite``: what a
    non-finite score of a component counts as (None: refused, :mod:`pgraft.core.rewards`)."""
    if weights is not None and str(weights) == SHIPPED:  # the shipped learned scorer (verified)
        weights = resolve_scorer(weights)
    if name in REWARDS and norm == "raw":
        return REWARDS[name](weights, device)
    from .reward_spec import build_reward

    return build_reward(name, weights, device, norm, nonfinite)


__all__ = ["REWARDS", "REWARD_MAX", "available_rewards", "declared_max", "make_reward", "checker_reward", "corrupt_prompt", "VQAScorer", "train_scorer",
           "LearnedVQAReward", "CLIPScoreReward", "ITMReward", "VQAScoreReward", "ScorerTrainConfig"]
