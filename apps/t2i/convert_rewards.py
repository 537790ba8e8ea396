"""Converters from the reference checkpoints of the named rewards to the directories
:mod:`.named_rewards` loads (issue 31: each reward loads from a directory of safetensors and JSON;
the project never unpickles):

- ``hpsv2``: HPSv2.1's ``HPS_v2.1_compressed.pt`` (an open_clip ViT-H/14 state dict under
  ``state_dict``) -> a transformers ``CLIPModel`` directory (config.json + model.safetensors) with a
  ``CLIPProcessor``: the tokenizer of ``--tokenizer`` and open_clip's ``preprocess_val`` as a
  ``CLIPImageProcessor`` (short side to the image size, bicubic, centre crop, OpenAI mean/std).
- ``aesthetic``: LAION's ``sac+logos+ava1-l14-linearMSE.pth`` (the MLP's state dict) ->
  ``aesthetic_mlp.safetensors`` next to a copy of the ``--clip`` CLIP ViT-L/14 directory.
- ``imagereward``: THUDM's ``ImageReward.pt`` (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
  ``blip.{vision,text}_proj.*``, ``mlp.layers.*``) -> a ``BlipForImageTextRetrieval`` directory,
  ``imagereward_head.safetensors`` and ``imagereward.json``.
- ``clipflant5``: the zhiqiulin/clip-flant5-* directory (t2v-metrics' ``CLIPT5ForConditionalGeneration``
  shards) -> ``t5/`` (T5ForConditionalGeneration + the ``--tokenizer``), ``vision/`` (the CLIP
  vision tower + the ``--clip`` image processor), ``projector.safetensors``, ``clipflant5.json``.

Each mapping is a pure function of a state dict (``*_to_hf``) returning a :class:`Converted`: the
transformers config kwargs, the renamed tensors, and the keys it filled itself. The network sizes
are read from the tensor shapes; what shapes do not tell (attention heads, activation, layer-norm
epsilon) comes from the reference code's constants (:class:`OpenCLIPSpec`, :class:`BLIPSpec`).
Checkpoints are read with :func:`pgraft.core.torch_checkpoint.load_state_dict` (which never
unpickles) or, for ``.safetensors`` files, with safetensors. Every refusal is one
:class:`~pgraft.core.errors.UsageError` line naming the bad input.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgraft.core.errors import UsageError
from pgraft.core.state import read_json

from .named_rewards import IMAGEREWARD_MEAN, IMAGEREWARD_STD, OPENAI_MEAN, OPENAI_STD, AestheticMLP

# ImageReward.py's standardisation constants and text length (``ImageReward.__init__``, ``score``)
IMAGEREWARD_MAX_LENGTH = 35

# weight files of other frameworks or pickles: never copied into a converted directory
_NOT_COPIED = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".pkl", ".pickle", ".ot")


@dataclass(frozen=True)
class Converted:
    """A converted checkpoint: ``config`` (kwargs of the transformers config class), ``state`` (the
    transformers state dict) and ``filled`` (keys absent from the original, written as zeros)."""

    config: dict
    state: dict[str, torch.Tensor]
    filled: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpenCLIPSpec:
    """What an open_clip ViT state dict does not tell: head widths (ViT-H-14.json: vision
    ``head_width`` 80, text 64 -> 16 heads each), GELU (not QuickGELU) and nn.LayerNorm's 1e-5."""

    vision_head_width: int = 80
    text_head_width: int = 64
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class BLIPSpec:
    """What a BLIP state dict does not tell: BLIP's ViTs (base and large) have 64-wide heads and
    LayerNorm eps 1e-6 (``vit.py``); its BERT (``med_config.json``) 64-wide heads, eps 1e-12, GELU.
    ``text`` overrides the text config with ``med_config.json``'s own values when given."""

    vision_head_width: int = 64
    vision_layer_norm_eps: float = 1e-6
    text_head_width: int = 64
    text_layer_norm_eps: float = 1e-12
    text: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading
def read_checkpoint(src: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``src``: a ``.safetensors`` file, or a torch checkpoint read without
    unpickling (:func:`pgraft.core.torch_checkpoint.load_state_dict`: the state dict at the top or
    under ``state_dict`` / ``model`` / ...). A leading ``module.`` is stripped. UsageError (one
    line) when ``src`` is not a readable file."""
    src = Path(src).expanduser()
    if not src.is_file():
        raise UsageError(f"{src} is not a file (give the reference checkpoint)")
    if src.suffix != ".safetensors":
        from pgraft.core.torch_checkpoint import load_state_dict

        return load_state_dict(src)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(src))
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{src} is not a readable safetensors file ({err})") from None
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _need(sd: dict, keys, src: str, what: str) -> None:
    for k in keys:
        if k not in sd:
            raise UsageError(f"{src} lacks {k}: not {what}")


def _count(sd: dict, prefix: str) -> int:
    """Number of blocks ``prefix.N.`` in ``sd`` (0 when none)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _leftovers(sd: dict, used: set[str], src: str, what: str) -> None:
    rest = sorted(set(sd) - used)
    if rest:
        shown = ", ".join(rest[:3]) + (f" and {len(rest) - 3} more" if len(rest) > 3 else "")
        raise UsageError(f"{src} has keys the {what} converter does not map: {shown}")


def _heads(width: int, head_width: int, where: str) -> int:
    if width % head_width:
        raise UsageError(f"{where} width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def _grid_size(positions: int, patch: int, where: str) -> int:
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise UsageError(f"{where} has {positions} positions: not 1 + a square grid of patches")
    return side * patch


# ----------------------------------------------------------------------------- open_clip -> CLIPModel
def _openclip_block(sd: dict, src: str, dst: str, out: dict, used: set) -> None:
    """One open_clip ``ResidualAttentionBlock`` (nn.MultiheadAttention's packed ``in_proj``) ->
    one transformers ``CLIPEncoderLayer`` (separate q/k/v projections)."""
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for a, b in names.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]
            used.add(f"{src}.{a}.{p}")
    for p in ("weight", "bias"):
        q, k, v = sd[f"{src}.attn.in_proj_{p}"].chunk(3, dim=0)
        out[f"{dst}.self_attn.q_proj.{p}"], out[f"{dst}.self_attn.k_proj.{p}"] = q, k
        out[f"{dst}.self_attn.v_proj.{p}"] = v
        used.add(f"{src}.attn.in_proj_{p}")


def openclip_to_hf(sd: dict[str, torch.Tensor], spec: OpenCLIPSpec = OpenCLIPSpec(), src: str = "the checkpoint",
                   token_ids: dict | None = None) -> Converted:
    """An open_clip ViT CLIP state dict (``visual.*``, ``transformer.*``, ``token_embedding``,
    ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``) -> the
    ``CLIPConfig`` kwargs and state dict of the same network as a transformers ``CLIPModel``
    (open_clip's ``proj`` / ``text_projection`` are ``x @ P``: the transformers Linear weights
    are their transposes). ``token_ids``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``
    of the text config (the tokenizer's)."""
    sd = {k: v for k, v in sd.items() if k != "attn_mask"}  # open_clip's causal mask buffer (older versions save it)
    what = "an open_clip ViT checkpoint"
    _need(sd, ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
               "visual.ln_pre.weight", "visual.ln_post.weight", "token_embedding.weight", "positional_embedding",
               "ln_final.weight", "text_projection", "logit_scale", "visual.transformer.resblocks.0.attn.in_proj_weight",
               "transformer.resblocks.0.attn.in_proj_weight"], src, what)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(a: str, b: str, f: Callable = lambda t: t) -> None:
        out[b] = f(sd[a])
        used.add(a)

    conv = sd["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    v_layers = _count(sd, "visual.transformer.resblocks")
    image_size = _grid_size(sd["visual.positional_embedding"].shape[0], patch, f"{src}'s visual.positional_embedding")
    embed_dim = sd["visual.proj"].shape[1]
    t_width = sd["token_embedding.weight"].shape[1]
    t_layers = _count(sd, "transformer.resblocks")
    if sd["text_projection"].shape != (t_width, embed_dim):
        raise UsageError(f"{src}'s text_projection is {tuple(sd['text_projection'].shape)}, expected "
                         f"({t_width}, {embed_dim}) from token_embedding and visual.proj")
    take("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    take("visual.class_embedding", "vision_model.embeddings.class_embedding")
    take("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    for p in ("weight", "bias"):
        take(f"visual.ln_pre.{p}", f"vision_model.pre_layrnorm.{p}")
        take(f"visual.ln_post.{p}", f"vision_model.post_layernorm.{p}")
        take(f"ln_final.{p}", f"text_model.final_layer_norm.{p}")
    take("visual.proj", "visual_projection.weight", lambda t: t.T)
    take("text_projection", "text_projection.weight", lambda t: t.T)
    take("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    take("positional_embedding", "text_model.embeddings.position_embedding.weight")
    take("logit_scale", "logit_scale")
    try:
        for i in range(v_layers):
            _openclip_block(sd, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", out, used)
        for i in range(t_layers):
            _openclip_block(sd, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", out, used)
    except KeyError as err:
        raise UsageError(f"{src} lacks {err.args[0]}: not {what}") from None
    _leftovers(sd, used, src, "open_clip")
    common = {"hidden_act": spec.hidden_act, "layer_norm_eps": spec.layer_norm_eps, "projection_dim": embed_dim}
    text = {**common, "vocab_size": sd["token_embedding.weight"].shape[0], "hidden_size": t_width,
            "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], "num_hidden_layers": t_layers,
            "num_attention_heads": _heads(t_width, spec.text_head_width, f"{src}'s text"),
            "max_position_embeddings": sd["positional_embedding"].shape[0], **(token_ids or {})}
    vision = {**common, "hidden_size": v_width, "num_hidden_layers": v_layers, "patch_size": patch,
              "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
              "num_attention_heads": _heads(v_width, spec.vision_head_width, f"{src}'s visual"), "image_size": image_size}
    config = {"text_config": text, "vision_config": vision, "projection_dim": embed_dim,
              "logit_scale_init_value": float(sd["logit_scale"])}
    return Converted(config, out)


# ----------------------------------------------------------------------------- aesthetic / ImageReward MLP
HEAD_LAYERS = (0, 2, 4, 6, 7)  # the Linear layers of the Sequential (1, 3, 5 are dropouts)


def mlp_head(sd: dict[str, torch.Tensor], prefix: str = "", src: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The aesthetic / ImageReward MLP ``{prefix}layers.{0,2,4,6,7}.{weight,bias}`` -> the
    ``layers.N.*`` state dict of :class:`~.named_rewards.AestheticMLP`, checked by loading it."""
    keys = [f"{prefix}layers.{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias")]
    _need(sd, keys, src, "the aesthetic / ImageReward MLP (layers.0 ... layers.7)")
    head = {k.removeprefix(prefix): sd[k] for k in keys}
    try:
        AestheticMLP(head["layers.0.weight"].shape[1]).load_state_dict(head)
    except RuntimeError as err:
        raise UsageError(f"{src}'s MLP does not have the shapes d -> 1024 -> 128 -> 64 -> 16 -> 1 "
                         f"({str(err).splitlines()[-1].strip()})") from None
    return head


# ----------------------------------------------------------------------------- ImageReward (BLIP) -> BlipForImageTextRetrieval
_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def blip_to_hf(sd: dict[str, torch.Tensor], spec: BLIPSpec = BLIPSpec(), src: str = "the checkpoint",
               prefix: str = "blip.", token_ids: dict | None = None) -> Converted:
    """ImageReward's BLIP (``{prefix}visual_encoder.*``: BLIP's timm-style ViT; ``{prefix}text_encoder.*``:
    BLIP's ``med.py`` BertModel, the same names as transformers' ``BlipTextModel``;
    ``{prefix}{vision,text}_proj``) -> the ``BlipConfig`` kwargs and state dict of a
    ``BlipForImageTextRetrieval``. ImageReward has no ITM head: ``itm_head.*`` is filled with
    zeros (the reward never calls it)."""
    vit, txt = prefix + "visual_encoder", prefix + "text_encoder"
    what = "an ImageReward / BLIP checkpoint"
    _need(sd, [f"{vit}.patch_embed.proj.weight", f"{vit}.cls_token", f"{vit}.pos_embed", f"{vit}.norm.weight",
               f"{txt}.embeddings.word_embeddings.weight", f"{txt}.embeddings.position_embeddings.weight",
               f"{txt}.encoder.layer.0.crossattention.self.key.weight", f"{prefix}vision_proj.weight",
               f"{prefix}text_proj.weight"], src, what)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(a: str, b: str) -> None:
        if a not in sd:
            raise UsageError(f"{src} lacks {a}: not {what}")
        out[b] = sd[a]
        used.add(a)

    conv = sd[f"{vit}.patch_embed.proj.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    v_layers = _count(sd, f"{vit}.blocks")
    for p in ("weight", "bias"):
        take(f"{vit}.patch_embed.proj.{p}", f"vision_model.embeddings.patch_embedding.{p}")
        take(f"{vit}.norm.{p}", f"vision_model.post_layernorm.{p}")
        take(f"{prefix}vision_proj.{p}", f"vision_proj.{p}")
        take(f"{prefix}text_proj.{p}", f"text_proj.{p}")
        for i in range(v_layers):
            for a, b in _VIT_BLOCK.items():
                take(f"{vit}.blocks.{i}.{a}.{p}", f"vision_model.encoder.layers.{i}.{b}.{p}")
    take(f"{vit}.cls_token", "vision_model.embeddings.class_embedding")
    take(f"{vit}.pos_embed", "vision_model.embeddings.position_embedding")
    # med.py's BertModel and transformers' BlipTextModel share their parameter names
    for k in sd:
        if k.startswith(txt + ".") and not k.endswith("embeddings.position_ids"):  # a buffer, not a weight
            take(k, "text_encoder." + k.removeprefix(txt + "."))
        elif k.startswith(txt + "."):
            used.add(k)
    used |= {k for k in sd if k.startswith("mlp.layers.")}  # the reward head: see :func:`mlp_head`
    _leftovers(sd, used, src, "ImageReward")
    t_width = sd[f"{txt}.embeddings.word_embeddings.weight"].shape[1]
    t_layers = _count(sd, f"{txt}.encoder.layer")
    filled = ("itm_head.weight", "itm_head.bias")
    out["itm_head.weight"] = torch.zeros(2, t_width, dtype=sd[f"{prefix}text_proj.weight"].dtype)
    out["itm_head.bias"] = torch.zeros(2, dtype=sd[f"{prefix}text_proj.weight"].dtype)
    vision = {"hidden_size": v_width, "intermediate_size": sd[f"{vit}.blocks.0.mlp.fc1.weight"].shape[0],
              "num_hidden_layers": v_layers, "patch_size": patch, "hidden_act": "gelu",
              "num_attention_heads": _heads(v_width, spec.vision_head_width, f"{src}'s visual_encoder"),
              "image_size": _grid_size(sd[f"{vit}.pos_embed"].shape[1], patch, f"{src}'s pos_embed"),
              "layer_norm_eps": spec.vision_layer_norm_eps}
    text = {"vocab_size": sd[f"{txt}.embeddings.word_embeddings.weight"].shape[0], "hidden_size": t_width,
            "encoder_hidden_size": sd[f"{txt}.encoder.layer.0.crossattention.self.key.weight"].shape[1],
            "intermediate_size": sd[f"{txt}.encoder.layer.0.intermediate.dense.weight"].shape[0],
            "num_hidden_layers": t_layers, "hidden_act": spec.text.get("hidden_act", "gelu"),
            "max_position_embeddings": sd[f"{txt}.embeddings.position_embeddings.weight"].shape[0],
            "num_attention_heads": spec.text.get("num_attention_heads") or _heads(t_width, spec.text_head_width,
                                                                                  f"{src}'s text_encoder"),
            "layer_norm_eps": spec.text.get("layer_norm_eps", spec.text_layer_norm_eps),
            **{k: spec.text[k] for k in ("pad_token_id",) if k in spec.text}, **(token_ids or {})}
    if text["encoder_hidden_size"] != v_width:
        raise UsageError(f"{src}'s text encoder attends to width {text['encoder_hidden_size']}, its ViT is {v_width} wide")
    proj = sd[f"{prefix}vision_proj.weight"].shape[0]
    config = {"text_config": text, "vision_config": vision, "image_text_hidden_size": proj, "projection_dim": proj}
    return Converted(config, out, filled)


def med_config_spec(path: str | Path | None) -> BLIPSpec:
    """:class:`BLIPSpec` with the text values of ImageReward's ``med_config.json`` (None: BLIP's)."""
    if path is None:
        return BLIPSpec()
    path = Path(path).expanduser()
    try:
        med = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--med-config {path} is not a readable JSON file ({err})") from None
    if not isinstance(med, dict):
        raise UsageError(f"--med-config {path} is not a JSON object")
    keys = ("num_attention_heads", "layer_norm_eps", "hidden_act", "pad_token_id")
    return BLIPSpec(text={k: med[k] for k in keys if k in med})


# ----------------------------------------------------------------------------- checking and writing
def check_state(model_cls, config, state: dict[str, torch.Tensor], what: str, tied: tuple[str, ...] = ()) -> None:
    """Refuse (one line) a state dict that is not exactly ``model_cls(config)``'s: missing or
    unexpected keys, or a shape that differs (the model is built on the meta device: no memory).
    ``tied``: keys that may be absent because the model ties them to another."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in state or k not in tied}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise UsageError(f"{what}: the converted weights miss {missing[:3]} and have unexpected {extra[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise UsageError(f"{what}: {k} is {tuple(state[k].shape)}, the model expects {shape}")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file transformers' ``from_pretrained`` reads (``format: pt`` metadata)."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def prepare_out(out: str | Path) -> Path:
    """``out`` created empty; refused (one line) when it exists and holds anything."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not an empty directory; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _local_dir(path: str | Path | None, flag: str, what: str) -> Path:
    """A local directory, or a hub id's snapshot already in the local Hugging Face cache."""
    from .named_rewards import _cached_snapshot

    if path is None:
        raise UsageError(f"needs {flag} DIR ({what})")
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    cached = _cached_snapshot(str(path))
    if cached is None:
        raise UsageError(f"{flag} {path} is neither a local directory nor a hub id in the local Hugging Face "
                         f"cache ({what})")
    return cached


def load_tokenizer(path: str | Path | None, what: str):
    """The transformers tokenizer of ``--tokenizer`` (a local directory or a cached hub id)."""
    from transformers import AutoTokenizer

    directory = _local_dir(path, "--tokenizer", what)
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"--tokenizer {directory} holds no transformers tokenizer ({what}): "
                         f"{str(err).splitlines()[0]}") from None


def _check_vocab(tokenizer, vocab_size: int, src: Path) -> None:
    if len(tokenizer) > vocab_size:
        raise UsageError(f"--tokenizer has {len(tokenizer)} tokens, more than the {vocab_size} rows of {src}'s "
                         f"token embedding: not this model's tokenizer")


# ----------------------------------------------------------------------------- the three commands
HPS_TOKENIZER = "a transformers CLIP tokenizer, e.g. a laion/CLIP-ViT-H-14-laion2B-s32B-b79K snapshot"


def convert_hpsv2(src: str | Path, out: str | Path, tokenizer: str | Path | None, dtype: str = "float32",
                  spec: OpenCLIPSpec = OpenCLIPSpec()) -> Path:
    """HPSv2.1's open_clip ViT-H/14 checkpoint -> a ``CLIPModel`` + ``CLIPProcessor`` directory that
    ``hpsv2`` loads. The text pooling: open_clip takes the state at the largest token id (``argmax``),
    transformers at the first ``eos_token_id``; they agree when end-of-text is the tokenizer's
    largest id (49407 in CLIP's BPE), which is checked."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    src = Path(src).expanduser()
    tok = load_tokenizer(tokenizer, HPS_TOKENIZER)
    eos = tok.eos_token_id
    if eos is None or eos != max(tok.get_vocab().values()):
        raise UsageError(f"--tokenizer: its end-of-text id {eos} is not its largest id ({len(tok) - 1}); open_clip "
                         f"pools the text at the largest id, so this is not the model's CLIP tokenizer")
    ids = {"eos_token_id": eos, "bos_token_id": tok.bos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos}
    converted = openclip_to_hf(read_checkpoint(src), spec, str(src), ids)
    _check_vocab(tok, converted.config["text_config"]["vocab_size"], src)
    config = CLIPConfig(**converted.config)
    check_state(CLIPModel, config, converted.state, f"hpsv2 {src}")
    out = prepare_out(out)
    size = config.vision_config.image_size
    # open_clip's preprocess_val: Resize(size, bicubic) on the short side, CenterCrop(size), OpenAI mean/std
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                resample=3, image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(out))
    config.save_pretrained(str(out))
    save_weights(_cast(converted.state, dtype), out / "model.safetensors")
    return out


def copy_model_dir(directory: Path, out: Path) -> list[str]:
    """Copy the regular files of a transformers model directory into ``out``, following symlinks
    (a Hugging Face cache snapshot links to its blobs) and leaving out pickles and other
    frameworks' weights; the names copied."""
    copied = []
    for f in sorted(directory.iterdir()):
        if f.is_file() and not f.name.endswith(_NOT_COPIED) and not f.name.startswith("."):
            shutil.copyfile(f, out / f.name)
            copied.append(f.name)
    return copied


def convert_aesthetic(src: str | Path, out: str | Path, clip: str | Path | None) -> Path:
    """LAION's aesthetic MLP (``layers.N.*``) -> ``aesthetic_mlp.safetensors`` in a copy of the
    ``--clip`` CLIP ViT-L/14 directory (its safetensors weights, config and processor files)."""
    from .named_rewards import check_model_type

    src = Path(src).expanduser()
    what = "a transformers CLIP ViT-L/14 with safetensors weights, e.g. an openai/clip-vit-large-patch14 snapshot"
    clip_dir = _local_dir(clip, "--clip", what)
    head = mlp_head(read_checkpoint(src), src=str(src))
    try:
        check_model_type(clip_dir, "aesthetic", "clip")
    except UsageError:
        raise UsageError(f"--clip {clip_dir} does not hold a transformers CLIP model ({what})") from None
    if not any(clip_dir.glob("model*.safetensors")):
        raise UsageError(f"--clip {clip_dir} has no model*.safetensors weights ({what})")
    projection = json.loads((clip_dir / "config.json").read_text()).get("projection_dim", 512)
    if head["layers.0.weight"].shape[1] != projection:
        raise UsageError(f"{src}'s MLP takes {head['layers.0.weight'].shape[1]}-d embeddings, --clip {clip_dir} "
                         f"makes {projection}-d ones")
    out = prepare_out(out)
    copy_model_dir(clip_dir, out)
    save_weights(_cast(head, "float32"), out / "aesthetic_mlp.safetensors")
    return out


IR_TOKENIZER = "a BERT tokenizer, e.g. a bert-base-uncased or Salesforce/blip-itm-large-coco snapshot"


def convert_imagereward(src: str | Path, out: str | Path, tokenizer: str | Path | None,
                        med_config: str | Path | None = None, dtype: str = "float32") -> Path:
    """ImageReward.pt -> ``BlipForImageTextRetrieval`` directory + ``imagereward_head.safetensors`` +
    ``imagereward.json`` (ImageReward's mean/std, 35 text tokens, the ViT's image size). The
    tokenizer gains BLIP's ``[DEC]`` / ``[ENC]`` tokens when it lacks them (``init_tokenizer``)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    src = Path(src).expanduser()
    spec = med_config_spec(med_config)
    tok = load_tokenizer(tokenizer, IR_TOKENIZER)
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    sd = read_checkpoint(src)
    ids = {"pad_token_id": tok.pad_token_id, "sep_token_id": tok.sep_token_id,
           "bos_token_id": tok.convert_tokens_to_ids("[DEC]")}
    converted = blip_to_hf(sd, spec, str(src), token_ids={k: v for k, v in ids.items() if v is not None})
    head = mlp_head(sd, "mlp.", str(src))
    width = converted.config["text_config"]["hidden_size"]
    if head["layers.0.weight"].shape[1] != width:
        raise UsageError(f"{src}'s MLP takes {head['layers.0.weight'].shape[1]}-d features, its text encoder "
                         f"makes {width}-d ones")
    _check_vocab(tok, converted.config["text_config"]["vocab_size"], src)
    config = BlipConfig(**converted.config)
    check_state(BlipForImageTextRetrieval, config, converted.state, f"imagereward {src}")
    out = prepare_out(out)
    tok.save_pretrained(str(out))
    config.save_pretrained(str(out))
    save_weights(_cast(converted.state, dtype), out / "model.safetensors")
    save_weights(_cast(head, "float32"), out / "imagereward_head.safetensors")
    meta = {"mean": IMAGEREWARD_MEAN, "std": IMAGEREWARD_STD, "max_length": IMAGEREWARD_MAX_LENGTH,
            "image_size": config.vision_config.image_size, "source": src.name}
    (out / "imagereward.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- CLIP-FlanT5 -> t5/ + vision/ + projector
CLIP_T5_TOKENIZER = "the T5 tokenizer t2v-metrics pairs with it: a google/flan-t5-xl (or -xxl) snapshot"
CLIP_T5_VISION = "the model's mm_vision_tower: an openai/clip-vit-large-patch14-336 snapshot"
_TOWER = "vision_tower.vision_tower."  # CLIPT5ForConditionalGeneration.vision_tower (a CLIPVisionTower) .vision_tower
_T5_ALIASES = ("embed_tokens.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # = shared.weight


def split_clip_t5(sd: dict[str, torch.Tensor], vocab: int | None = None, src: str = "the checkpoint"
                  ) -> tuple[dict, dict, dict]:
    """A ``CLIPT5ForConditionalGeneration`` state dict (t2v-metrics' ``clip_t5.py``: the T5 keys,
    ``embed_tokens`` (an alias of ``shared``), ``vision_tower.vision_tower.vision_model.*``,
    ``mm_projector.{0,2}.*``) -> (T5 state, CLIP vision state in transformers' ``CLIPVisionModel``
    names, possibly empty when the shards do not hold the frozen tower, projector state).
    ``vocab``: keep the first ``vocab`` rows of ``shared`` / ``lm_head``, as t2v-metrics'
    ``resize_token_embeddings(len(tokenizer))`` does."""
    _need(sd, ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "mm_projector.0.weight",
               "mm_projector.2.weight"], src, "a CLIP-FlanT5 (t2v-metrics clip_t5) checkpoint")
    projector = {k.removeprefix("mm_projector."): v for k, v in sd.items() if k.startswith("mm_projector.")}
    if sorted(projector) != ["0.bias", "0.weight", "2.bias", "2.weight"]:
        raise UsageError(f"{src}'s mm_projector has {sorted(projector)}: not the mlp2x_gelu projector")
    vision = {}
    for k, v in sd.items():
        if k.startswith(_TOWER):
            vision[k.removeprefix(_TOWER).removeprefix("vision_model.")] = v
    t5 = {k: v for k, v in sd.items() if not k.startswith((_TOWER, "mm_projector.")) and k not in _T5_ALIASES}
    if vocab is not None:
        rows = t5["shared.weight"].shape[0]
        if vocab > rows:
            raise UsageError(f"--tokenizer has {vocab} tokens, more than the {rows} rows of {src}'s embedding: not "
                             f"this model's tokenizer")
        t5 = {k: (v[:vocab] if k in ("shared.weight", "lm_head.weight") else v) for k, v in t5.items()}
    return t5, vision, projector


def t5_config_dict(src_config: dict, vocab: int) -> dict:
    """The ``clip_t5`` config.json as a plain T5 one: the T5 fields kept (``tie_word_embeddings``
    included: False for FlanT5, whose ``lm_head`` is its own), the LLaVA ``mm_*`` fields dropped."""
    from transformers import T5Config

    known = set(T5Config().to_dict()) | {"decoder_start_token_id", "tie_word_embeddings"}
    known -= {"_name_or_path", "transformers_version", "architectures", "model_type", "scale_decoder_outputs"}
    out = {k: v for k, v in src_config.items() if k in known}
    return {**out, "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": vocab}


def _shards(src: Path) -> list[Path]:
    found = sorted(src.glob("pytorch_model*.bin")) or sorted(src.glob("model*.safetensors"))
    if not found:
        raise UsageError(f"{src} holds no pytorch_model*.bin or model*.safetensors shards (give the directory of "
                         f"zhiqiulin/clip-flant5-xl or -xxl)")
    return found


def convert_clipflant5(src: str | Path, out: str | Path, tokenizer: str | Path | None, clip: str | Path | None,
                       dtype: str = "float32") -> Path:
    """zhiqiulin/clip-flant5-* (a directory: config.json + shards) -> ``t5/`` (T5ForConditionalGeneration
    + the ``--tokenizer``), ``vision/`` (CLIPVisionModel + the ``--clip`` image processor; the weights
    from the shards, else from ``--clip``), ``projector.safetensors`` and ``clipflant5.json``
    (``select_layer`` = ``mm_vision_select_layer``)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    src = Path(src).expanduser()
    if not src.is_dir() or not (src / "config.json").is_file():
        raise UsageError(f"{src} is not a directory with config.json (give the clip-flant5 snapshot directory)")
    try:
        config = json.loads((src / "config.json").read_text())
    except ValueError as err:
        raise UsageError(f"{src / 'config.json'} is not JSON ({err})") from None
    if config.get("model_type") != "clip_t5":
        raise UsageError(f"{src / 'config.json'} has model_type {config.get('model_type')!r}, not 'clip_t5'")
    for key, value in (("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature", "patch")):
        if config.get(key, value) != value:
            raise UsageError(f"{src / 'config.json'} has {key} {config[key]!r}; only {value!r} is implemented")
    tok = load_tokenizer(tokenizer, CLIP_T5_TOKENIZER)
    clip_dir = _local_dir(clip, "--clip", CLIP_T5_VISION)
    clip_config = read_json(clip_dir / "config.json", fix="give --clip a transformers CLIP vision model directory") \
        if (clip_dir / "config.json").is_file() else {}
    kind = clip_config.get("model_type")
    if kind not in ("clip", "clip_vision_model"):
        raise UsageError(f"--clip {clip_dir} does not hold a transformers CLIP model ({CLIP_T5_VISION})")
    vision_config = (CLIPConfig.from_pretrained(str(clip_dir)).vision_config if kind == "clip"
                     else CLIPVisionConfig.from_pretrained(str(clip_dir)))
    sd: dict[str, torch.Tensor] = {}
    for shard in _shards(src):
        sd.update(read_checkpoint(shard))
    t5, vision, projector = split_clip_t5(sd, len(tok), str(src))
    if not vision:  # the frozen tower is not in the shards: t2v-metrics loads it from mm_vision_tower
        weights = sorted(clip_dir.glob("model*.safetensors"))
        if not weights:
            raise UsageError(f"{src} lacks the vision tower and --clip {clip_dir} has no model*.safetensors")
        for w in weights:
            vision.update({k.removeprefix("vision_model."): v for k, v in read_checkpoint(w).items()
                           if k.startswith("vision_model.") or kind == "clip_vision_model"})
    t5_dict = t5_config_dict(config, len(tok))
    t5_cfg = T5Config(**t5_dict)
    tied = _T5_ALIASES[1:] + (("lm_head.weight",) if t5_dict.get("tie_word_embeddings", True) else ())
    if not t5_dict.get("tie_word_embeddings", True) and "lm_head.weight" not in t5:
        raise UsageError(f"{src} lacks lm_head.weight, which FlanT5 (tie_word_embeddings false) does not share")
    check_state(T5ForConditionalGeneration, t5_cfg, t5, f"clipflant5 {src} (T5)", tied=tied)
    check_state(CLIPVisionModel, vision_config, vision, f"clipflant5 {src} (vision tower)")
    d_model, width = t5_cfg.d_model, vision_config.hidden_size
    if projector["0.weight"].shape != (d_model, width) or projector["2.weight"].shape != (d_model, d_model):
        raise UsageError(f"{src}'s mm_projector is {tuple(projector['0.weight'].shape)} then "
                         f"{tuple(projector['2.weight'].shape)}; expected ({d_model}, {width}) then ({d_model}, {d_model})")
    out = prepare_out(out)
    (out / "t5").mkdir()
    (out / "vision").mkdir()
    (out / "t5" / "config.json").write_text(json.dumps(t5_dict, indent=2) + "\n")
    tok.save_pretrained(str(out / "t5"))
    save_weights(_cast(t5, dtype), out / "t5" / "model.safetensors")
    vision_config.save_pretrained(str(out / "vision"))
    CLIPImageProcessor.from_pretrained(str(clip_dir)).save_pretrained(str(out / "vision"))
    save_weights(_cast(vision, dtype), out / "vision" / "model.safetensors")
    save_weights(_cast(projector, "float32"), out / "projector.safetensors")
    meta = {"select_layer": int(config.get("mm_vision_select_layer", -2)), "source": src.name}
    (out / "clipflant5.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class ConvertOptions:
    """The inputs a conversion may need besides the checkpoint: ``clip`` (aesthetic: the CLIP
    directory), ``tokenizer`` (hpsv2, imagereward), ``med_config`` (imagereward, optional) and
    ``dtype`` of the written weights (float32, float16 or bfloat16)."""

    clip: str | Path | None = None
    tokenizer: str | Path | None = None
    med_config: str | Path | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class Converter:
    """One reward's conversion: what its source is (a file, or a directory when ``directory``),
    and ``run(src, out, options) -> out``."""

    source: str
    run: Callable[[Path, Path, ConvertOptions], Path]
    directory: bool = False


CONVERTERS: dict[str, Converter] = {
    "hpsv2": Converter("HPS_v2.1_compressed.pt of xswu/HPSv2 (an open_clip ViT-H/14); needs --tokenizer",
                       lambda src, out, o: convert_hpsv2(src, out, o.tokenizer, o.dtype)),
    "aesthetic": Converter("sac+logos+ava1-l14-linearMSE.pth of LAION's improved-aesthetic-predictor; needs --clip",
                           lambda src, out, o: convert_aesthetic(src, out, o.clip)),
    "imagereward": Converter("ImageReward.pt of THUDM/ImageReward; needs --tokenizer, optional --med-config",
                             lambda src, out, o: convert_imagereward(src, out, o.tokenizer, o.med_config, o.dtype)),
    "clipflant5": Converter("the directory of zhiqiulin/clip-flant5-xl or -xxl (config.json + pytorch_model-*.bin); "
                            "needs --tokenizer and --clip",
                            lambda src, out, o: convert_clipflant5(src, out, o.tokenizer, o.clip, o.dtype),
                            directory=True),
}


def convert_reward(name: str, src: str | Path, out: str | Path, options: ConvertOptions = ConvertOptions()) -> Path:
    """Convert reward ``name``'s reference checkpoint ``src`` into the directory ``out`` that
    ``--reward NAME --reward-weights OUT`` loads; returns ``out``."""
    if name not in CONVERTERS:
        raise UsageError(f"unknown reward {name!r} to convert; choose one of {sorted(CONVERTERS)}")
    if options.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {options.dtype!r}; choose one of {sorted(DTYPES)}")
    src, converter = Path(src).expanduser(), CONVERTERS[name]
    if not (src.is_dir() if converter.directory else src.is_file()):
        kind = "directory" if converter.directory else "file"
        raise UsageError(f"{src} is not a {kind} (give {name}'s reference checkpoint: {converter.source})")
    return converter.run(src, Path(out).expanduser(), options)


__all__ = ["CONVERTERS", "ConvertOptions", "Converter", "Converted", "OpenCLIPSpec", "BLIPSpec", "read_checkpoint", "openclip_to_hf", "blip_to_hf",
           "mlp_head", "med_config_spec", "check_state", "convert_hpsv2", "convert_aesthetic", "convert_imagereward",
           "split_clip_t5", "t5_config_dict", "convert_clipflant5", "convert_reward"]
