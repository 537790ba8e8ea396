"""The field's named rewards (pickscore, hpsv2, imagereward, aesthetic, clipflant5) on tiny random
models built from configs, saved with save_pretrained and loaded back through make_reward: each
score equals its formula computed by hand one pair at a time, batching and padding change nothing,
no autograd graph is kept, and absent weights are refused in one line naming the reward."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgraft.apps.t2i.named_rewards import (
    IMAGE_INDEX,
    SYSTEM_MSG,
    AestheticMLP,
    CLIPFlanT5Reward,
    resize_crop_normalize,
)
from pgraft.apps.t2i.rewards import REWARD_MAX, REWARDS, available_rewards, make_reward
from pgraft.apps.t2i.world import all_prompts, render_dataset, to_float
from pgraft.core.errors import UsageError

ALL = [s.text() for s in all_prompts()]


def _pairs(n: int, seed: int, size: int = 32):
    images, caps = render_dataset(ALL, n, size, seed=seed)
    return to_float(images), caps


def _grad_probe(module: torch.nn.Module) -> list[bool]:
    """Records torch.is_grad_enabled() at each forward of ``module``."""
    seen: list[bool] = []
    module.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    return seen


def _spread_head(input_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A random aesthetic/ImageReward MLP whose output varies visibly with its input (weights
    N(0, 1.5^2 / fan_in): the default init shrinks the signal through five layers to ~1e-6)."""
    torch.manual_seed(seed)
    head = AestheticMLP(input_size)
    for m in head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=1.5 / m.in_features ** 0.5)
    return head.state_dict()


def _refused_in_one_line(name: str, path) -> None:
    with pytest.raises(UsageError, match=f"reward '{name}'") as err:
        make_reward(name, path)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- tiny CLIP (+ aesthetic head)
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pgraft.apps.t2i.model import train_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tok = train_tokenizer(ALL, d)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tok).save_pretrained(d)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8), projection_dim=16,
                     logit_scale_init_value=2.0)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    from safetensors.torch import save_file

    save_file(_spread_head(16, 1), str(d / "aesthetic_mlp.safetensors"))
    return d


def _clip_by_hand(d, images, caps):
    """Normalised CLIP embeddings of each pair, one pair at a time (no text padding)."""
    from transformers import CLIPModel, CLIPProcessor

    from pgraft.apps.t2i.named_rewards import _pil

    model, proc = CLIPModel.from_pretrained(d).eval(), CLIPProcessor.from_pretrained(str(d))
    img, txt = [], []
    with torch.no_grad():
        for x, c in zip(images, caps):
            pix = proc(images=_pil(x[None]), return_tensors="pt")["pixel_values"]
            ids = proc(text=[c], return_tensors="pt")
            i = model.get_image_features(pixel_values=pix)
            t = model.get_text_features(**ids)
            img.append(F.normalize(getattr(i, "pooler_output", i), dim=-1)[0])
            txt.append(F.normalize(getattr(t, "pooler_output", t), dim=-1)[0])
    return model, torch.stack(img), torch.stack(txt)


def test_pickscore_is_scaled_cosine_per_pair(tiny_clip):
    reward = make_reward("pickscore", tiny_clip)
    reward.batch = 3  # 7 pairs: two full batches and a partial one, captions of different lengths padded together
    seen = _grad_probe(reward.model.vision_model)
    images, caps = _pairs(7, seed=0)
    r = reward(images, caps)
    model, img, txt = _clip_by_hand(tiny_clip, images, caps)
    expected = model.logit_scale.exp() * (img * txt).sum(-1)
    assert model.logit_scale.exp().item() == pytest.approx(float(torch.tensor(2.0).exp()))
    torch.testing.assert_close(r, expected.double(), atol=1e-5, rtol=1e-5)
    assert r.dtype == torch.float64 and not r.requires_grad and seen and not any(seen)
    reward.batch = 1
    torch.testing.assert_close(reward(images, caps), r, atol=1e-5, rtol=1e-5)
    assert torch.all(r.abs() <= reward.scale + 1e-9) and REWARD_MAX["pickscore"] == 100.0
    swapped = reward(images, caps[1:] + caps[:1])
    assert not torch.allclose(r, swapped)


def test_hpsv2_is_the_cosine_per_pair(tiny_clip):
    reward = make_reward("hpsv2", tiny_clip)
    reward.batch = 4
    seen = _grad_probe(reward.model.vision_model)
    images, caps = _pairs(6, seed=1)
    r = reward(images, caps)
    _, img, txt = _clip_by_hand(tiny_clip, images, caps)
    torch.testing.assert_close(r, (img * txt).sum(-1).double(), atol=1e-6, rtol=1e-6)
    assert not r.requires_grad and not any(seen) and torch.all(r.abs() <= 1)
    reward.batch = 1
    torch.testing.assert_close(reward(images, caps), r, atol=1e-5, rtol=1e-5)


def test_aesthetic_is_the_mlp_of_the_normalised_image_embedding(tiny_clip):
    from safetensors.torch import load_file

    reward = make_reward("aesthetic", tiny_clip)
    reward.batch = 2
    images, caps = _pairs(5, seed=2)
    r = reward(images, caps)
    _, img, _ = _clip_by_hand(tiny_clip, images, caps)
    w = load_file(str(tiny_clip / "aesthetic_mlp.safetensors"))
    h = img
    for k in (0, 2, 4, 6, 7):  # dropouts are inert: five affine maps, no activation
        h = h @ w[f"layers.{k}.weight"].T + w[f"layers.{k}.bias"]
    torch.testing.assert_close(r, h[:, 0].double(), atol=1e-5, rtol=1e-5)
    assert r.std() > 1e-3  # the scores do depend on the image
    torch.testing.assert_close(reward(images, caps[::-1]), r)  # the prompt plays no part
    reward.batch = 5
    torch.testing.assert_close(reward(images, caps), r, atol=1e-5, rtol=1e-5)
    assert not r.requires_grad and "aesthetic" not in REWARD_MAX


def _vqa_scorer_dir(tmp_path):
    """A directory of the app's own VQA scorer (config.json + model.safetensors, no model_type)."""
    from pgraft.apps.t2i.rewards import VQAScorer, vocabulary

    return VQAScorer(vocabulary()).save(tmp_path / "scorer")


def test_pickscore_hpsv2_aesthetic_imagereward_clipflant5_refuse_missing_weights(tiny_clip, tmp_path):
    for name in ("pickscore", "hpsv2", "aesthetic", "imagereward", "clipflant5"):
        _refused_in_one_line(name, tmp_path / "missing")
    for name in ("hpsv2", "aesthetic", "imagereward", "clipflant5"):
        with pytest.raises(UsageError, match="needs --reward-weights"):
            make_reward(name)
    with pytest.raises(UsageError, match="does not hold a transformers 'clip' model") as err:
        make_reward("pickscore", _vqa_scorer_dir(tmp_path))
    assert "\n" not in str(err.value)
    bare = tmp_path / "clip_without_head"
    shutil.copytree(tiny_clip, bare)
    (bare / "aesthetic_mlp.safetensors").unlink()
    with pytest.raises(UsageError, match="lacks aesthetic_mlp.safetensors"):
        make_reward("aesthetic", bare)


def test_available_rewards_builds_pickscore_and_skips_absent_hpsv2(tiny_clip, tmp_path):
    got = available_rewards({"pickscore": tiny_clip, "hpsv2": tmp_path / "missing", "checker": None})
    assert set(got) == {"pickscore", "checker"}
    with pytest.raises(UsageError, match="missing"):
        available_rewards({"hpsv2": tmp_path / "missing"}, skip_missing=False)
    with pytest.raises(UsageError, match="unknown reward"):
        available_rewards({"nope": None})
    with pytest.raises(UsageError, match="does not hold a transformers 'clip' model"):  # present but unusable
        available_rewards({"pickscore": _vqa_scorer_dir(tmp_path)})
    assert {"pickscore", "hpsv2", "imagereward", "aesthetic", "clipflant5"} <= set(REWARDS)


# ----------------------------------------------------------------------------- ImageReward on a tiny BLIP
@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """A tiny BLIP retrieval model (its vision model and image-grounded text encoder are ImageReward's
    BLIP) with an ImageReward head; weights N(0, 1/fan_in) so the [CLS] state varies over pairs
    (BLIP's init, std 0.02, leaves it nearly constant)."""
    import json

    from safetensors.torch import save_file
    from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval

    d = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for p in ALL for w in p.lower().split()})
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    tok.save_pretrained(str(d))
    cfg = BlipConfig(text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=32,
                                      pad_token_id=0, sep_token_id=3, bos_token_id=2),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=16, patch_size=8), projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(5)
    blip = BlipForImageTextRetrieval(cfg)
    with torch.no_grad():
        for name, p in blip.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    blip.save_pretrained(d)
    save_file(_spread_head(32, 2), str(d / "imagereward_head.safetensors"))
    # the tiny BERT has 32 positions: pad to 24 (ImageReward pads to 35 on its 512-position BERT)
    (d / "imagereward.json").write_text(json.dumps({"max_length": 24}))
    return d


def test_imagereward_is_the_standardised_mlp_of_the_cls_state(tiny_imagereward):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    reward = make_reward("imagereward", tiny_imagereward)
    reward.batch = 2
    seen = _grad_probe(reward.text)
    images, caps = _pairs(5, seed=4)
    r = reward(images, caps)
    blip = BlipForImageTextRetrieval.from_pretrained(tiny_imagereward).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_imagereward))
    head = AestheticMLP(32).eval()
    head.load_state_dict(load_file(str(tiny_imagereward / "imagereward_head.safetensors")))
    expected = []
    with torch.no_grad():
        for x, c in zip(images, caps):  # one pair, no text padding
            emb = blip.vision_model(pixel_values=resize_crop_normalize(x[None], 16)).last_hidden_state
            ids = tok([c], return_tensors="pt")
            out = blip.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                                    encoder_hidden_states=emb,
                                    encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long))
            expected.append((head(out.last_hidden_state[:, 0]).item() - 0.16717362830052426) / 1.0333394966054072)
    torch.testing.assert_close(r, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert r.std() > 1e-3
    assert not r.requires_grad and seen and not any(seen) and "imagereward" not in REWARD_MAX
    assert reward.tokenizer(caps[:1]).input_ids[0].count(reward.tokenizer.unk_token_id) == 0
    assert not torch.allclose(reward(images, caps[1:] + caps[:1]), r)


def test_imagereward_resize_crop_normalize_matches_its_definition():
    x = torch.rand(2, 3, 20, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = resize_crop_normalize(x, 10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    u8 = ((x + 1) * 127.5).round() / 255  # the 8-bit image a PIL pipeline starts from
    ref = F.interpolate(u8, size=(10, 20), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    torch.testing.assert_close(out, (ref[..., 5:15] - 0.5) / 0.5)
    # against PIL's own bicubic resize of the 8-bit image (what ImageReward's torchvision transform runs)
    from PIL import Image

    from pgraft.apps.t2i.named_rewards import _pil

    pil = _pil(x[:1])[0].resize((20, 10), Image.BICUBIC)
    want = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()[None, :, :, 5:15] / 255
    assert (out[:1] * 0.5 + 0.5 - want).abs().max() < 0.02  # PIL rounds its result to 8 bits


# ----------------------------------------------------------------------------- CLIP-FlanT5 on a tiny T5 + CLIP tower
def _t5_tokenizer(texts, directory):
    """A word-level BPE tokenizer that ends every encoding with </s>, as T5's does (ids: <pad> 0, </s> 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


@pytest.fixture(scope="module")
def tiny_clipflant5(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("clipflant5")
    texts = [SYSTEM_MSG + " USER: " for _ in range(5)] + [CLIPFlanT5Reward.QUESTION.format(p) + " ASSISTANT: "
                                                           for p in ALL] + ["Yes No"] * 20
    tok = _t5_tokenizer(texts, d / "t5")
    torch.manual_seed(3)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_decoder_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                        decoder_start_token_id=0)).save_pretrained(d / "t5")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=16, patch_size=8)).save_pretrained(d / "vision")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(d / "vision")
    proj = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    save_file(proj.state_dict(), str(d / "projector.safetensors"))
    return d


def test_clipflant5_is_t2v_metrics_lm_prob_of_yes(tiny_clipflant5):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, T5ForConditionalGeneration

    from pgraft.apps.t2i.named_rewards import _pil

    reward = make_reward("clipflant5", tiny_clipflant5)
    reward.batch = 3  # prompts of different lengths padded together
    seen = _grad_probe(reward.t5)
    images, caps = _pairs(5, seed=5)
    r = reward(images, caps)
    assert r.shape == (5,) and torch.all((r > 0) & (r < 1)) and not r.requires_grad and not any(seen)

    d = tiny_clipflant5
    tok = AutoTokenizer.from_pretrained(str(d / "t5"))
    t5 = T5ForConditionalGeneration.from_pretrained(d / "t5").eval()
    vision, proc = CLIPVisionModel.from_pretrained(d / "vision").eval(), CLIPImageProcessor.from_pretrained(str(d / "vision"))
    proj = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    proj.load_state_dict(load_file(str(d / "projector.safetensors")))
    q = 'Does this figure show "{}"? Please answer yes or no.'
    labels = torch.tensor([tok("Yes").input_ids])
    assert labels[0, -1].item() == 1  # "Yes" then </s>
    expected = []
    with torch.no_grad():
        for x, c in zip(images, caps):  # t2v-metrics, one pair: pieces around <image> tokenised alone
            before = tok(SYSTEM_MSG + " USER: ").input_ids
            after = tok("\n" + q.format(c) + " ASSISTANT: ").input_ids
            assert reward.token_ids(reward.question(c)) == before + [IMAGE_INDEX] + after
            patches = vision(pixel_values=proc(_pil(x[None]), return_tensors="pt")["pixel_values"],
                             output_hidden_states=True).hidden_states[-2][:, 1:]
            emb = t5.get_input_embeddings()
            seq = torch.cat([emb(torch.tensor(before)), proj(patches[0]), emb(torch.tensor(after))])[None]
            logits = t5(inputs_embeds=seq, labels=labels).logits
            expected.append((-torch.nn.CrossEntropyLoss()(logits[0], labels[0])).exp().item())
    torch.testing.assert_close(r, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    reward.batch = 5
    torch.testing.assert_close(reward(images, caps), r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reward(images, caps[1:] + caps[:1]), r)
    assert REWARD_MAX["clipflant5"] == 1.0


@pytest.mark.skipif(not os.environ.get("T2V_METRICS_SRC"), reason=(
    "reference check against t2v-metrics' own CLIP-T5 code; t2v-metrics 3.0 pins torch 2.5.1, so it is not "
    "installed: `pip download --no-deps t2v-metrics==3.0`, unzip it and set T2V_METRICS_SRC to the unzipped folder"))
def test_clipflant5_equals_t2v_metrics_own_model_code(tiny_clipflant5, monkeypatch):
    """Our score equals t2v-metrics 3.0's CLIPT5ForConditionalGeneration (its source, imported as is)
    driven as its CLIPT5Model.forward drives it (t5_chat, padded batch, lm_prob)."""
    import ast
    import sys
    from pathlib import Path

    from transformers import CLIPImageProcessor, T5Config, T5ForConditionalGeneration

    from pgraft.apps.t2i.named_rewards import _pil

    root = Path(os.environ["T2V_METRICS_SRC"]) / "t2v_metrics" / "models" / "vqascore_models"
    monkeypatch.syspath_prepend(str(root / "clip_t5"))
    sys.modules.pop("model", None)
    from model import CLIPT5ForConditionalGeneration  # t2v-metrics' class

    def functions(path: Path, names: set[str], ns: dict) -> dict:
        src = path.read_text()  # pieces of t2v-metrics' modules whose imports (cv2, ...) are absent here
        for node in ast.parse(src).body:
            target = node.name if isinstance(node, ast.FunctionDef) else getattr(
                getattr(node, "targets", [None])[0], "id", None)
            if target in names:
                exec(ast.get_source_segment(src, node), ns)
        return ns

    ns = functions(root / "mm_utils.py", {"t5_tokenizer_image_token"}, {"torch": torch, "IMAGE_TOKEN_INDEX": -200})
    ns = functions(root / "clip_t5_model.py", {"format_question", "format_answer", "default_question_template",
                                               "default_answer_template"},
                   {**ns, "SYSTEM_MSG": SYSTEM_MSG, "DEFAULT_IMAGE_TOKEN": "<image>"})
    d = tiny_clipflant5
    t5 = T5ForConditionalGeneration.from_pretrained(d / "t5")
    cfg = T5Config(**t5.config.to_dict())
    cfg.mm_vision_tower, cfg.mm_vision_select_layer, cfg.mm_vision_select_feature = str(d / "vision"), -2, "patch"
    cfg.mm_projector_type, cfg.mm_hidden_size = "mlp2x_gelu", 16
    ref = CLIPT5ForConditionalGeneration(cfg)
    ref.load_state_dict(t5.state_dict(), strict=False)
    from safetensors.torch import load_file

    ref.mm_projector.load_state_dict(load_file(str(d / "projector.safetensors")))
    ref.eval()

    reward = make_reward("clipflant5", d)
    reward.batch = 4
    images, caps = _pairs(6, seed=7)
    r = reward(images, caps)
    tok = reward.tokenizer
    questions = [ns["format_question"](ns["default_question_template"].format(t), conversation_style="t5_chat")
                 for t in caps]
    answers = [ns["format_answer"](ns["default_answer_template"].format(t)) for t in caps]
    proc = CLIPImageProcessor.from_pretrained(str(d / "vision"))
    pixels = torch.stack([proc.preprocess(im, return_tensors="pt")["pixel_values"][0] for im in _pil(images)])
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad([ns["t5_tokenizer_image_token"](q, tok, return_tensors="pt") for q in questions],
                    batch_first=True, padding_value=tok.pad_token_id)
    labels = pad([ns["t5_tokenizer_image_token"](a, tok, return_tensors="pt") for a in answers], batch_first=True,
                 padding_value=-100)
    with torch.no_grad():
        out = ref(input_ids=input_ids, attention_mask=input_ids.ne(tok.pad_token_id),
                  decoder_attention_mask=labels.ne(-100), labels=labels, images=pixels, return_dict=True)
    lm_prob = torch.stack([(-torch.nn.CrossEntropyLoss()(out.logits[k], labels[k])).exp() for k in range(6)])
    torch.testing.assert_close(r, lm_prob.double(), atol=1e-7, rtol=1e-5)
