"""``pgraft t2i convert-reward``: the reference checkpoints of hpsv2, aesthetic, imagereward and clipflant5,
saved by torch.save in their original layouts from tiny seeded models, become directories the
named rewards load, and the loaded rewards compute what the originals compute:

- hpsv2: a small independent re-implementation of open_clip's ViT CLIP (OpenAI-CLIP layout:
  nn.MultiheadAttention's packed in_proj, ln_pre / ln_post, class_embedding, proj, a causal text
  mask, pooling at the argmax token) gives the same image and text embeddings and cosines as the
  converted transformers CLIPModel / HPSv2Reward;
- aesthetic: the converted MLP equals LAION's nn.Sequential on random inputs, and the reward is
  that MLP on the normalised embedding of the copied CLIP;
- imagereward: the key set of ImageReward.pt (written out from BLIP's vit.py / med.py and
  ImageReward.py) maps onto BlipForImageTextRetrieval exactly, and HF -> original names ->
  converted reproduces the HF model's scores;
- clipflant5: a tiny CLIP-T5 saved as t2v-metrics holds it (two torch.save shards, FlanT5's own
  lm_head, the tower with or without its weights) scores as the reward's code on the in-memory modules;
- refusals are one line naming the bad input.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipForImageTextRetrieval, CLIPModel  # imported at collection: seconds of import
from typer.testing import CliRunner

from pgraft.apps.t2i.cli import app
from pgraft.apps.t2i.convert_rewards import (
    BLIPSpec,
    blip_to_hf,
    check_state,
    mlp_head,
    openclip_to_hf,
    read_checkpoint,
)
from pgraft.apps.t2i.named_rewards import _pil, load_head
from pgraft.apps.t2i.rewards import make_reward
from pgraft.apps.t2i.world import all_prompts, render_dataset, to_float
from pgraft.core.errors import UsageError
from pgraft.core.torch_checkpoint import CheckpointFormatError

ALL = [s.text() for s in all_prompts()]


def _pairs(n: int, seed: int, size: int = 32):
    images, caps = render_dataset(ALL, n, size, seed=seed)
    return to_float(images), caps


def _convert(*args: str):
    return CliRunner().invoke(app, ["convert-reward", *map(str, args)], env={"COLUMNS": "400"})


def _ok(res) -> None:
    assert res.exit_code == 0, res.output + repr(res.exception)


def _refused(res, *phrases: str) -> str:
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output + repr(res.exception)
    # one message: click's usage errors frame it with a "Usage:" line, a "Try" line and a box
    body = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith(("Usage:", "Try ", "╭", "╰"))]
    assert len(body) == 1, res.output
    for p in phrases:
        assert p in text, text
    return text


def _spread(module: nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Weights N(0, 1/fan_in) (biases and norms N(·, 0.1)), so every layer visibly shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                base = 1.0 if name.endswith("weight") and ("ln" in name or "norm" in name.lower()) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- hpsv2: open_clip ViT reference
class RefBlock(nn.Module):
    """open_clip's ResidualAttentionBlock: pre-LN, nn.MultiheadAttention (packed in_proj), GELU MLP."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # x [L, B, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(width, heads, mlp) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class RefVisual(nn.Module):
    """open_clip's VisionTransformer (no attention pooling): conv patches, class token, ln_pre,
    transformer, ln_post of the class token, ``@ proj``."""

    def __init__(self, image: int, patch: int, width: int, layers: int, heads: int, embed: int) -> None:
        super().__init__()
        grid = image // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads, 4 * width)
        self.proj = nn.Parameter(torch.randn(width, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid², width]
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class RefOpenCLIP(nn.Module):
    """open_clip's CLIP with a ViT tower; the text is pooled at ``ids.argmax(-1)`` (the EOT token)."""

    def __init__(self, vocab: int, context: int = 24, t_width: int = 128, v_width: int = 160, embed: int = 24,
                 layers: int = 2) -> None:
        super().__init__()
        # open_clip ViT-H-14's head widths: vision 80, text 64 (here 2 heads each)
        self.visual = RefVisual(16, 8, v_width, layers, v_width // 80, embed)
        self.transformer = RefTransformer(t_width, layers, t_width // 64, 4 * t_width)
        self.token_embedding = nn.Embedding(vocab, t_width)
        self.positional_embedding = nn.Parameter(torch.randn(context, t_width))
        self.ln_final = nn.LayerNorm(t_width)
        self.text_projection = nn.Parameter(torch.randn(t_width, embed))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        x = self.transformer(x.transpose(0, 1), self.attn_mask[:n, :n]).transpose(0, 1)
        x = self.ln_final(x)
        return x[torch.arange(len(x)), ids.argmax(-1)] @ self.text_projection


def _clip_tokenizer(directory, eos_last: bool = True):
    """A tiny CLIP BPE tokenizer; with ``eos_last`` its <|endoftext|> is moved to the largest id (as in
    CLIP's own 49407), which open_clip's argmax pooling relies on."""
    from transformers import CLIPTokenizer

    from pgraft.apps.t2i.model import train_tokenizer

    train_tokenizer(ALL, directory)
    if eos_last:
        vocab = json.loads((directory / "vocab.json").read_text())
        last = max(vocab, key=vocab.get)
        vocab["<|endoftext|>"], vocab[last] = vocab[last], vocab["<|endoftext|>"]
        (directory / "vocab.json").write_text(json.dumps(vocab))
    tok = CLIPTokenizer.from_pretrained(str(directory))
    tok.save_pretrained(str(directory))  # tokenizer_config.json, as a hub snapshot has
    return tok


@pytest.fixture(scope="module")
def hps_source(tmp_path_factory):
    """(reference model, HPS-style checkpoint path {"state_dict": ...}, tokenizer directory)."""
    root = tmp_path_factory.mktemp("hps")
    tok = _clip_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    ref = RefOpenCLIP(len(tok)).eval()
    _spread(ref, 1, skip=("logit_scale",))
    torch.save({"state_dict": ref.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return ref, root / "HPS_v2.1_compressed.pt", root / "tokenizer"


def test_hpsv2_conversion_equals_the_open_clip_reference(hps_source, tmp_path):
    ref, src, tok_dir = hps_source
    out = tmp_path / "hps"
    res = _convert("hpsv2", src, "--out", out, "--tokenizer", tok_dir)
    _ok(res)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")) == []
    reward = make_reward("hpsv2", out)
    reward.batch = 2
    images, caps = _pairs(5, seed=3)
    scores = reward(images, caps)
    pixels = reward.processor(images=_pil(images), return_tensors="pt")["pixel_values"]
    ids = reward.processor(text=caps, padding=True, return_tensors="pt")
    assert ids.input_ids.shape[1] < 24 and (ids.input_ids == len(reward.processor.tokenizer) - 1).any(-1).all()
    model = CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        img_ref, txt_ref = ref.encode_image(pixels), ref.encode_text(ids.input_ids)
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**ids)
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    torch.testing.assert_close(img, img_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, txt_ref, atol=1e-5, rtol=1e-5)
    expected = (F.normalize(img_ref, dim=-1) * F.normalize(txt_ref, dim=-1)).sum(-1)
    torch.testing.assert_close(scores, expected.double(), atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3 and not torch.allclose(reward(images, caps[::-1]), scores)
    assert model.logit_scale.item() == pytest.approx(4.6052, abs=1e-6)
    # open_clip's preprocess_val: short side to 16, bicubic, centre crop, OpenAI mean/std
    proc = reward.processor.image_processor
    assert proc.crop_size == {"height": 16, "width": 16} and proc.resample == 3
    assert proc.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_openclip_mapping_splits_in_proj_and_transposes_projections(hps_source):
    from transformers import CLIPConfig

    ref, _, _ = hps_source
    sd = ref.state_dict()
    conv = openclip_to_hf(sd)
    w = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = (conv.state[f"vision_model.encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), w)
    assert torch.equal(conv.state["text_projection.weight"], sd["text_projection"].T)
    assert conv.config["vision_config"]["num_attention_heads"] == 2 and conv.config["vision_config"]["image_size"] == 16
    assert conv.config["text_config"]["num_attention_heads"] == 2 and conv.config["text_config"]["hidden_act"] == "gelu"
    check_state(CLIPModel, CLIPConfig(**conv.config), conv.state, "tiny")  # no missing / unexpected keys, shapes
    # a saved causal-mask buffer (older open_clip) is dropped; an unknown key is refused
    assert openclip_to_hf({**sd, "attn_mask": torch.zeros(2, 2)}).state.keys() == conv.state.keys()
    with pytest.raises(UsageError, match="does not map: visual.ls_1.gamma"):
        openclip_to_hf({**sd, "visual.ls_1.gamma": torch.ones(3)})


def test_hpsv2_refuses_a_tokenizer_whose_eos_is_not_its_largest_id(hps_source, tmp_path):
    _, src, _ = hps_source
    _clip_tokenizer(tmp_path / "tok", eos_last=False)
    res = _convert("hpsv2", src, "--out", tmp_path / "o", "--tokenizer", tmp_path / "tok")
    _refused(res, "end-of-text id 1 is not its largest id")
    res = _convert("hpsv2", src, "--out", tmp_path / "o")
    _refused(res, "needs --tokenizer DIR")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- aesthetic
class LaionMLP(nn.Module):
    """improved-aesthetic-predictor's MLP (simple_inference.py), its layers as saved."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny transformers CLIP directory (safetensors) plus a stray pickle that must not be copied."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    d = tmp_path_factory.mktemp("clipL")
    tok = _clip_tokenizer(d)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tok).save_pretrained(d)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8), projection_dim=12)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"not copied")
    return d


def test_aesthetic_conversion_equals_the_original_mlp(tiny_clip_dir, tmp_path):
    torch.manual_seed(7)
    original = LaionMLP(12).eval()
    _spread(original, 8)
    torch.save(original.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    linked = tmp_path / "linked"  # a hub-cache-like snapshot: its files are symlinks
    linked.mkdir()
    for f in tiny_clip_dir.iterdir():
        os.symlink(f, linked / f.name)
    out = tmp_path / "aesthetic"
    _ok(_convert("aesthetic", tmp_path / "sac+logos+ava1-l14-linearMSE.pth", "--out", out, "--clip", linked))
    assert not (out / "pytorch_model.bin").exists()
    assert all(not p.is_symlink() for p in out.iterdir()) and (out / "model.safetensors").is_file()
    head = load_head(out / "aesthetic_mlp.safetensors", 12)
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(head(x), original(x), atol=0, rtol=0)
    reward = make_reward("aesthetic", out)
    images, caps = _pairs(4, seed=5)
    r = reward(images, caps)
    model = CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        pix = reward.processor(images=_pil(images), return_tensors="pt")["pixel_values"]
        e = model.get_image_features(pixel_values=pix)
        expected = original(F.normalize(getattr(e, "pooler_output", e), dim=-1))[:, 0]
    torch.testing.assert_close(r, expected.double(), atol=1e-5, rtol=1e-5)
    assert r.std() > 1e-3


def test_aesthetic_refuses_a_clip_of_another_width_and_a_head_of_other_shapes(tiny_clip_dir, tmp_path):
    torch.save(LaionMLP(16).state_dict(), tmp_path / "mlp16.pth")
    _refused(_convert("aesthetic", tmp_path / "mlp16.pth", "--out", tmp_path / "o", "--clip", tiny_clip_dir),
             "takes 16-d embeddings", "makes 12-d ones")
    sd = LaionMLP(12).state_dict()
    sd["layers.2.weight"] = torch.zeros(100, 1024)
    with pytest.raises(UsageError, match="does not have the shapes") as err:
        mlp_head(sd)
    assert "\n" not in str(err.value)
    _refused(_convert("aesthetic", tmp_path / "mlp16.pth", "--out", tmp_path / "o"), "needs --clip DIR")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- imagereward
V_LAYERS, T_LAYERS = 2, 2


def imagereward_keys() -> set[str]:
    """The keys of ImageReward.pt for a BLIP with ``V_LAYERS`` ViT blocks and ``T_LAYERS`` BERT layers,
    written out from the reference code: ImageReward.py (``self.blip``, ``self.mlp.layers``: Linear at
    0, 2, 4, 6, 7), blip_pretrain.py (``visual_encoder``, ``text_encoder`` = med.BertModel without
    pooler, ``vision_proj``, ``text_proj``), vit.py (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) and med.py
    (BertEmbeddings without token types, its persistent ``position_ids`` buffer; BertLayer with
    ``crossattention``)."""
    wb = ("weight", "bias")
    keys = {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed"}
    keys |= {f"blip.visual_encoder.{m}.{p}" for m in ("patch_embed.proj", "norm") for p in wb}
    keys |= {f"blip.visual_encoder.blocks.{i}.{m}.{p}" for i in range(V_LAYERS)
             for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in wb}
    t = "blip.text_encoder"
    keys |= {f"{t}.embeddings.word_embeddings.weight", f"{t}.embeddings.position_embeddings.weight",
             f"{t}.embeddings.position_ids"} | {f"{t}.embeddings.LayerNorm.{p}" for p in wb}
    for i in range(T_LAYERS):
        for att in ("attention", "crossattention"):
            keys |= {f"{t}.encoder.layer.{i}.{att}.self.{m}.{p}" for m in ("query", "key", "value") for p in wb}
            keys |= {f"{t}.encoder.layer.{i}.{att}.output.{m}.{p}" for m in ("dense", "LayerNorm") for p in wb}
        keys |= {f"{t}.encoder.layer.{i}.{m}.{p}" for m in ("intermediate.dense", "output.dense", "output.LayerNorm")
                 for p in wb}
    keys |= {f"blip.{m}.{p}" for m in ("vision_proj", "text_proj") for p in wb}
    keys |= {f"mlp.layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in wb}
    return keys


# the test's own inverse mapping, transformers names -> BLIP's vit.py names
HF_TO_VIT = [("vision_model.embeddings.class_embedding", "cls_token"),
             ("vision_model.embeddings.position_embedding", "pos_embed"),
             ("vision_model.embeddings.patch_embedding.", "patch_embed.proj."),
             ("vision_model.post_layernorm.", "norm."), ("vision_model.encoder.layers.", "blocks."),
             (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), (".self_attn.qkv.", ".attn.qkv."),
             (".self_attn.projection.", ".attn.proj.")]


def to_imagereward_names(hf: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in hf.items():
        if k.startswith("itm_head."):
            continue  # ImageReward's BLIP has no ITM head
        if k.startswith("vision_model."):
            name = k
            for a, b in HF_TO_VIT:
                name = name.replace(a, b)
            out["blip.visual_encoder." + name] = v
        else:
            out["blip." + k] = v
    n = hf["text_encoder.embeddings.position_embeddings.weight"].shape[0]
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(n).expand(1, -1)  # med.py saves this buffer
    out.update({"mlp." + k: v for k, v in head.items()})
    return out


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A tiny BLIP retrieval model with BLIP's ViT epsilon (1e-6), its tokenizer and an ImageReward head:
    the transformers directory the reward loads, and the same weights under ImageReward.pt's names."""
    from safetensors.torch import save_file
    from transformers import BertTokenizerFast, BlipConfig

    d = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for p in ALL for w in p.lower().split()})
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(d))
    # text: 48 wide with 2 heads (24-wide: told by --med-config); vision: 128 wide, BLIP's 64-wide heads
    cfg = BlipConfig(text_config=dict(vocab_size=len(words) + 2, hidden_size=48, intermediate_size=64,
                                      num_hidden_layers=T_LAYERS, num_attention_heads=2, encoder_hidden_size=128,
                                      max_position_embeddings=40, pad_token_id=0, sep_token_id=3, bos_token_id=2),
                     vision_config=dict(hidden_size=128, intermediate_size=64, num_hidden_layers=V_LAYERS,
                                        num_attention_heads=2, image_size=16, patch_size=8, layer_norm_eps=1e-6),
                     projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(5)
    blip = BlipForImageTextRetrieval(cfg).eval()
    _spread(blip, 6, skip=("embeddings",))
    blip.save_pretrained(d)
    torch.manual_seed(6)
    head = LaionMLP(48)
    _spread(head, 7)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(d / "imagereward_head.safetensors"))
    original = to_imagereward_names(blip.state_dict(), head.state_dict())
    torch.save(original, d / "ImageReward.pt")
    (d / "med_config.json").write_text(json.dumps({"num_attention_heads": 2, "layer_norm_eps": 1e-12,
                                                   "hidden_act": "gelu", "hidden_size": 48, "vocab_size": 30524}))
    return d, blip, original


def test_imagereward_keys_map_onto_blip_retrieval_exactly(tiny_blip):
    from transformers import BlipConfig

    d, blip, original = tiny_blip
    assert set(original) == imagereward_keys()
    conv = blip_to_hf(read_checkpoint(d / "ImageReward.pt"), BLIPSpec(text={"num_attention_heads": 2}))
    assert conv.filled == ("itm_head.weight", "itm_head.bias")
    expected = blip.state_dict()
    assert set(conv.state) == set(expected)
    for k, v in expected.items():
        if k not in conv.filled:
            assert torch.equal(conv.state[k], v), k
    cfg = BlipConfig(**conv.config)
    check_state(BlipForImageTextRetrieval, cfg, conv.state, "tiny")
    assert (cfg.vision_config.num_attention_heads, cfg.vision_config.layer_norm_eps, cfg.vision_config.image_size) \
        == (2, 1e-6, 16)
    assert (cfg.text_config.num_attention_heads, cfg.text_config.encoder_hidden_size) == (2, 128)
    with pytest.raises(UsageError, match="lacks blip.visual_encoder.blocks.1.attn.qkv.weight"):
        blip_to_hf({k: v for k, v in original.items() if k != "blip.visual_encoder.blocks.1.attn.qkv.weight"})


def test_imagereward_round_trip_reproduces_the_models_scores(tiny_blip, tmp_path):
    d, _, _ = tiny_blip
    out = tmp_path / "ir"
    _ok(_convert("imagereward", d / "ImageReward.pt", "--out", out, "--tokenizer", d, "--med-config",
                 d / "med_config.json"))
    meta = json.loads((out / "imagereward.json").read_text())
    assert meta["mean"] == 0.16717362830052426 and meta["std"] == 1.0333394966054072
    assert (meta["max_length"], meta["image_size"]) == (35, 16)
    converted, reference = make_reward("imagereward", out), make_reward("imagereward", d)
    images, caps = _pairs(5, seed=6)
    r = converted(images, caps)
    torch.testing.assert_close(r, reference(images, caps), atol=1e-6, rtol=1e-6)
    assert r.std() > 1e-3 and not torch.allclose(converted(images, caps[1:] + caps[:1]), r)
    # BLIP's init_tokenizer tokens are added, after the words: a prompt tokenises as before
    assert {"[DEC]", "[ENC]"} <= set(converted.tokenizer.get_vocab())
    assert converted.tokenizer(caps).input_ids == reference.tokenizer(caps).input_ids


# ----------------------------------------------------------------------------- refusals
class _Payload:
    """Pickles as a call of ``os.getcwd`` (harmless): a global no weights file names."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_refusals_are_one_line_naming_the_input(hps_source, tmp_path):
    _, hps, tok = hps_source
    _refused(_convert("pickscore", hps, "--out", tmp_path / "o"), "NAME", "unknown reward 'pickscore'")
    _refused(_convert("hpsv2", tmp_path / "missing.pt", "--out", tmp_path / "o", "--tokenizer", tok),
             "missing.pt is not a file")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointFormatError, match="refers to posix.getcwd|refers to os.getcwd") as err:
        read_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(err.value)
    _refused(_convert("hpsv2", tmp_path / "evil.pt", "--out", tmp_path / "o", "--tokenizer", tok), "evil.pt",
             "getcwd")
    torch.save(LaionMLP(12).state_dict(), tmp_path / "mlp.pth")
    _refused(_convert("hpsv2", tmp_path / "mlp.pth", "--out", tmp_path / "o", "--tokenizer", tok),
             "lacks visual.conv1.weight: not an open_clip ViT checkpoint")
    _refused(_convert("imagereward", tmp_path / "mlp.pth", "--out", tmp_path / "o", "--tokenizer", tok),
             "lacks blip.visual_encoder.patch_embed.proj.weight: not an ImageReward / BLIP checkpoint")
    _refused(_convert("hpsv2", hps, "--out", tmp_path / "o", "--tokenizer", tok, "--dtype", "int8"),
             "--dtype", "unknown dtype 'int8'")
    _refused(_convert("clipflant5", hps, "--out", tmp_path / "o", "--tokenizer", tok), "is not a directory",
             "clip-flant5")
    assert not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    _refused(_convert("hpsv2", hps, "--out", tmp_path / "full", "--tokenizer", tok), "is not an empty directory")


# ----------------------------------------------------------------------------- clipflant5
def _t5_tokenizer(directory):
    """A word-level BPE tokenizer ending every encoding with </s> as T5's does (<pad> 0, </s> 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pgraft.apps.t2i.named_rewards import SYSTEM_MSG, CLIPFlanT5Reward

    texts = [SYSTEM_MSG + " USER: "] * 5 + [CLIPFlanT5Reward.QUESTION.format(p) + " ASSISTANT: " for p in ALL]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts + ["Yes No"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


CLIP_T5_CONFIG = {"model_type": "clip_t5", "architectures": ["CLIPT5ForConditionalGeneration"], "d_model": 32,
                  "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 1, "num_heads": 2,
                  "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "pad_token_id": 0,
                  "eos_token_id": 1, "decoder_start_token_id": 0, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                  "mm_hidden_size": 16, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                  "mm_vision_select_feature": "patch", "use_mm_proj": True, "image_aspect_ratio": "pad",
                  "transformers_version": "4.31.0"}


@pytest.fixture(scope="module")
def clip_t5_source(tmp_path_factory):
    """(in-memory reference reward, snapshot directory with two torch.save shards, tokenizer dir, CLIP dir)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor, T5Config, T5ForConditionalGeneration

    from pgraft.apps.t2i.named_rewards import CLIPFlanT5Reward

    root = tmp_path_factory.mktemp("clipt5")
    tok = _t5_tokenizer(root / "flan-t5")
    # --clip: the mm_vision_tower, a CLIPModel directory with its image processor
    clip_tok = _clip_tokenizer(root / "clip336")
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=32),
                                vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                                   num_attention_heads=2, image_size=16, patch_size=8),
                                projection_dim=8)).eval()
    _spread(clip, 11)
    clip.save_pretrained(root / "clip336")
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=processor, tokenizer=clip_tok).save_pretrained(root / "clip336")
    # the CLIP-T5 as t2v-metrics holds it: FlanT5 with its own lm_head, the tower, the mlp2x_gelu projector
    t5_fields = {k: v for k, v in CLIP_T5_CONFIG.items() if not k.startswith("mm_") and k not in
                 ("model_type", "architectures", "use_mm_proj", "image_aspect_ratio", "transformers_version")}
    torch.manual_seed(12)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), **t5_fields)).eval()
    t5.lm_head.weight = nn.Parameter(torch.randn(len(tok), 32) / 32 ** 0.5)  # FlanT5 does not tie it
    _spread(t5, 13, skip=("lm_head",))
    projector = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32)).eval()
    _spread(projector, 14)
    sd = dict(t5.state_dict())
    sd["embed_tokens.weight"] = sd["shared.weight"]  # CLIPT5ForConditionalGeneration.embed_tokens
    sd.update({"vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
               for k, v in clip.state_dict().items() if k.startswith("vision_model.")})
    sd.update({"mm_projector." + k: v for k, v in projector.state_dict().items()})
    snap = root / "clip-flant5"
    snap.mkdir()
    keys = sorted(sd)
    torch.save({k: sd[k] for k in keys[: len(keys) // 2]}, snap / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[len(keys) // 2:]}, snap / "pytorch_model-00002-of-00002.bin")
    (snap / "config.json").write_text(json.dumps({**CLIP_T5_CONFIG, "vocab_size": len(tok)}))
    # the reference: the reward's own scoring code on the in-memory modules
    ref = CLIPFlanT5Reward.__new__(CLIPFlanT5Reward)
    ref.select_layer, ref.t5, ref.tokenizer, ref.projector = -2, t5, tok, projector
    ref.vision, ref.image_processor = clip.vision_model, processor
    ref.device, ref.batch = torch.device("cpu"), 8
    return ref, snap, root / "flan-t5", root / "clip336"


def test_clipflant5_conversion_reproduces_the_models_scores(clip_t5_source, tmp_path):
    import shutil

    from transformers import T5ForConditionalGeneration

    ref, snap, tok, clip = clip_t5_source
    out = tmp_path / "cf"
    _ok(_convert("clipflant5", snap, "--out", out, "--tokenizer", tok, "--clip", clip))
    assert sorted(p.name for p in out.iterdir()) == ["clipflant5.json", "projector.safetensors", "t5", "vision"]
    assert json.loads((out / "clipflant5.json").read_text())["select_layer"] == -2
    t5 = T5ForConditionalGeneration.from_pretrained(out / "t5")
    assert not t5.config.scale_decoder_outputs and not torch.equal(t5.lm_head.weight, t5.shared.weight)
    reward = make_reward("clipflant5", out)
    reward.batch = 2
    images, caps = _pairs(5, seed=7)
    r = reward(images, caps)
    torch.testing.assert_close(r, ref(images, caps), atol=1e-6, rtol=1e-5)
    assert r.std() > 1e-4 and torch.all((r > 0) & (r < 1))
    # shards without the frozen tower: it comes from --clip, with the same scores
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(snap / "config.json", bare / "config.json")
    sd = {}
    for shard in sorted(snap.glob("*.bin")):
        sd.update(read_checkpoint(shard))
    torch.save({k: v for k, v in sd.items() if not k.startswith("vision_tower.")}, bare / "pytorch_model.bin")
    _ok(_convert("clipflant5", bare, "--out", tmp_path / "cf2", "--tokenizer", tok, "--clip", clip))
    torch.testing.assert_close(make_reward("clipflant5", tmp_path / "cf2")(images, caps), r, atol=1e-6, rtol=1e-6)


def test_clip_t5_split_keeps_the_tokenizers_rows_and_refuses_other_layouts(clip_t5_source):
    from pgraft.apps.t2i.convert_rewards import split_clip_t5, t5_config_dict

    ref, snap, _, _ = clip_t5_source
    sd = {}
    for shard in sorted(snap.glob("*.bin")):
        sd.update(read_checkpoint(shard))
    n = sd["shared.weight"].shape[0]
    t5, vision, projector = split_clip_t5(sd, vocab=n - 3)  # t2v-metrics' resize_token_embeddings(len(tokenizer))
    assert torch.equal(t5["shared.weight"], sd["shared.weight"][: n - 3])
    assert torch.equal(t5["lm_head.weight"], sd["lm_head.weight"][: n - 3])
    assert not any(k.startswith(("vision_tower", "mm_projector")) or k.endswith("embed_tokens.weight") for k in t5)
    assert torch.equal(vision["embeddings.patch_embedding.weight"], ref.vision.embeddings.patch_embedding.weight)
    assert sorted(projector) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    cfg = t5_config_dict({**CLIP_T5_CONFIG, "vocab_size": n}, n - 3)
    assert cfg["model_type"] == "t5" and cfg["vocab_size"] == n - 3 and cfg["tie_word_embeddings"] is False
    assert not any(k.startswith("mm_") for k in cfg)
    with pytest.raises(UsageError, match="more than the"):
        split_clip_t5(sd, vocab=n + 1)
    with pytest.raises(UsageError, match="lacks mm_projector.0.weight"):
        split_clip_t5({k: v for k, v in sd.items() if not k.startswith("mm_projector.")})
