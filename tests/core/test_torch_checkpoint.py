"""The pickle-free torch checkpoint reader: equal to ``torch.load(weights_only=True)`` on what torch
writes, and refusing (in one line, before any side effect) what a weights file never contains."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import random
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pgraft.core.errors import UsageError
from pgraft.core.torch_checkpoint import CheckpointFormatError, load_state_dict, read_checkpoint

# ----------------------------------------------------------------------------------------------
# helpers


def _tensors(obj, out=None):
    """Every tensor in ``obj``, in a deterministic walk order."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def assert_same(ours, ref):
    """``ours`` equals ``ref`` exactly: same structure and key order, plain tensors of the same dtype,
    size, stride, storage offset, conj/neg bits and values."""
    if isinstance(ref, torch.Tensor):
        assert type(ours) is torch.Tensor, type(ours)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape and ours.stride() == ref.stride()
        assert ours.storage_offset() == ref.storage_offset()
        assert ours.is_conj() == ref.is_conj() and ours.is_neg() == ref.is_neg()
        if ref.dtype.is_floating_point and ref.dtype.itemsize == 1:  # float8: no torch.equal kernel
            assert torch.equal(ours.float(), ref.float())
        else:
            assert torch.equal(ours, ref)
    elif isinstance(ref, dict):
        assert type(ours) is dict
        assert list(ours) == list(ref)
        for k in ref:
            assert_same(ours[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for a, b in zip(ours, ref):
            assert_same(a, b)
    else:
        assert type(ours) is type(ref) and ours == ref


def _sharing(obj):
    """Which tensors share memory: for each tensor, the index of the first tensor on the same storage."""
    ptrs = [t.untyped_storage().data_ptr() for t in _tensors(obj)]
    return [ptrs.index(p) for p in ptrs]


def _round_trip(obj, path, protocol=2):
    """Read ``obj`` saved with pickle ``protocol``; compare with torch.load of its protocol-2 save
    (torch's weights-only unpickler has no FRAME opcode, so it cannot read protocol 4 itself)."""
    torch.save(obj, path)
    ref = torch.load(path, weights_only=True)
    if protocol != 2:
        path = path.with_suffix(f".p{protocol}.pt")
        torch.save(obj, path, pickle_protocol=protocol)
    ours = read_checkpoint(path)
    assert_same(ours, ref)
    ref_tensors = [t for t in _tensors(ref) if t.untyped_storage().nbytes() > 0]
    ours_tensors = [t for t in _tensors(ours) if t.untyped_storage().nbytes() > 0]
    assert _sharing(ours_tensors) == _sharing(ref_tensors)
    return ours


def _rezip(src, dst, drop=(), replace=None):
    """Copy the zip ``src`` to ``dst`` without the entries ending in ``drop``, with ``replace``
    (suffix -> bytes) substituted."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if any(name.endswith(d) for d in drop):
                continue
            data = next((v for k, v in replace.items() if name.endswith(k)), None)
            zout.writestr(name, zin.read(name) if data is None else data)


def _assert_refused(path, *fragments):
    with pytest.raises(CheckpointFormatError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, UsageError)
    return message


# ----------------------------------------------------------------------------------------------
# round trips against torch.load(weights_only=True)


def _many_dtypes(g):
    x = torch.randn(3, 5, generator=g)
    return {
        "f32": x,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "f64": x.double(),
        "i64": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (4,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-300, 300, (2, 2), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "u16": torch.randint(0, 60000, (3,), generator=g).to(torch.uint16),
        "f8": x.to(torch.float8_e4m3fn),
    }


def _views(g):
    base = torch.randn(4, 6, generator=g)
    return {
        "base": base,
        "t": base.t(),  # non-contiguous, shares base's storage
        "corner": base[1:, 2:],  # storage offset
        "step": base[:, ::2],
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
        "column": base[:, 3],
        "empty": torch.empty(0, 3),
        "empty_view": base[4:],
        "scalar": torch.tensor(2.5),
        "scalar_int": torch.tensor(7),
        "conj": torch.randn(3, generator=g, dtype=torch.complex64).conj(),
        "neg": torch._neg_view(torch.randn(3, generator=g)),
    }


def _containers(g):
    t = torch.randn(2, generator=g)
    return {
        "nested": {"a": {"b": [t, (1, 2.5, "é∂", None, True, False)]}, "c": []},
        "ints": [0, -1, 255, 65536, -(2**31), 2**31, 2**70, -(2**70)],
        "floats": [0.0, -1.5, 1e300, float("inf")],
        "ordered": OrderedDict([("z", 1), ("a", t)]),
        "tuples": ((), (t,), (t, t), (t, t, t), (1, 2, 3, 4)),
        "twice": [t, t],
        "int_keys": {0: {"step": 3}, 1: {"exp_avg": t}},
    }


def _parameters(g):
    p = nn.Parameter(torch.randn(3, generator=g))
    q = nn.Parameter(torch.randn(2, generator=g))
    q.note = "extra attribute"  # saved with _rebuild_parameter_with_state
    return {"p": p, "q": q, "frozen": nn.Parameter(torch.ones(2), requires_grad=False)}


@pytest.mark.parametrize("protocol", [2, 4])  # 4: FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE
@pytest.mark.parametrize("make", [_many_dtypes, _views, _containers, _parameters])
def test_round_trip_equals_torch_load(make, protocol, tmp_path):
    g = torch.Generator().manual_seed(0)
    ours = _round_trip(make(g), tmp_path / "x.pt", protocol)
    assert all(not t.requires_grad for t in _tensors(ours))


def test_views_share_memory_and_repeated_objects_stay_one(tmp_path):
    g = torch.Generator().manual_seed(1)
    ours = _round_trip({**_views(g), "list": _containers(g)["twice"]}, tmp_path / "v.pt")
    assert ours["t"].untyped_storage().data_ptr() == ours["base"].untyped_storage().data_ptr()
    ours["base"][1, 2] = 123.0  # writing the base shows through every view on it
    assert ours["t"][2, 1] == 123.0 and ours["corner"][0, 0] == 123.0
    assert ours["list"][0] is ours["list"][1]


def _small_model():
    return nn.Sequential(
        nn.Transformer(
            d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, batch_first=True
        ),  # fmt: skip
        nn.BatchNorm1d(8),  # num_batches_tracked: a 0-d int64 buffer
    )


def test_state_dict_with_metadata_round_trips_into_a_module(tmp_path):
    torch.manual_seed(0)
    model = _small_model()
    state = model.state_dict()
    assert hasattr(state, "_metadata")  # written by torch.save as a BUILD on the OrderedDict
    path = tmp_path / "sd.pt"
    _round_trip(state, path)
    torch.manual_seed(1)
    fresh = _small_model()
    fresh.load_state_dict(load_state_dict(path), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.slow
@pytest.mark.extra("transformers")
def test_tiny_clip_state_dict_loads_strictly(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    def tiny():
        text = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=8, patch_size=4)  # fmt: skip
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()

    torch.manual_seed(0)
    model = tiny()
    path = tmp_path / "clip.bin"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    fresh = tiny()
    fresh.load_state_dict(load_state_dict(path), strict=True)
    ids = torch.tensor([[0, 5, 7, 1]])
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits_per_image
        b = fresh(input_ids=ids, pixel_values=pixels).logits_per_image
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# load_state_dict: finding the flat mapping


def test_load_state_dict_unwraps_and_strips_module_prefix(tmp_path):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, generator=g), torch.randn(3, generator=g)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 4, "optimizer": {"lr": 0.1}, "state_dict": {"module.x": x, "module.y": y, "n": 5}}, path)
    out = load_state_dict(path)
    assert list(out) == ["x", "y"] and torch.equal(out["x"], x) and torch.equal(out["y"], y)


def test_load_state_dict_keeps_prefix_unless_on_every_key_and_prefers_key(tmp_path):
    t = torch.arange(3.0)
    path = tmp_path / "mixed.pt"
    torch.save({"module.a": t, "b": t}, path)
    assert list(load_state_dict(path)) == ["module.a", "b"]
    torch.save({"model": {"m": t}, "ema": {"e": t}, "step": torch.tensor(9)}, path)
    assert list(load_state_dict(path)) == ["m"]  # the top level has a nested dict: not itself a state dict
    assert list(load_state_dict(path, key="ema")) == ["e"]
    torch.save({"params_ema": {"p": t}, "meta": "x"}, path)
    assert list(load_state_dict(path)) == ["p"]


def test_load_state_dict_refuses_without_a_mapping(tmp_path):
    path = tmp_path / "none.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointFormatError) as info:
        load_state_dict(path, key="weights")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "'weights'" in message and "epoch" in message


# ----------------------------------------------------------------------------------------------
# refusals


class _Payload:
    """An object whose unpickling calls ``fn(*args)``: what a malicious checkpoint contains."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(sentinel):
    return {
        "os.system": (_Payload(os.system, f"touch '{sentinel}'"), f"{os.system.__module__}.system"),
        # pickle protocol 2 (torch.save's default) spells the builtins module __builtin__
        "eval": (_Payload(builtins.eval, f"open({str(sentinel)!r}, 'w').close()"), "__builtin__.eval"),
        "open": (_Payload(builtins.open, str(sentinel), "w"), "io.open"),  # builtins.open is io.open
    }


@pytest.mark.parametrize("kind", ["os.system", "eval", "open"])
def test_malicious_global_is_refused_before_it_runs(kind, tmp_path):
    sentinel = tmp_path / "pwned"
    payload, global_name = _payloads(sentinel)[kind]
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "x": payload}, path)
    message = _assert_refused(path, f"refers to {global_name}", "not loaded")
    assert not sentinel.exists()
    # the payload is live: an ordinary unpickler runs it (so the check above can fail)
    torch.load(path, weights_only=False)
    assert sentinel.exists(), message


def test_stack_global_outside_whitelist_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil4.pt"
    with zipfile.ZipFile(path, "w") as z:  # protocol 4 names the global with STACK_GLOBAL
        z.writestr("archive/data.pkl", pickle.dumps([_payloads(sentinel)["eval"][0]], protocol=4))
    _assert_refused(path, "refers to builtins.eval, which a weights file never needs; not loaded")
    assert not sentinel.exists()


def test_opcode_outside_whitelist_is_refused(tmp_path):
    path = tmp_path / "proto0.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=0))  # MARK + DICT, text opcodes
    _assert_refused(path, "opcode", "not loaded")


def test_non_zip_and_zip_without_data_pkl_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    _assert_refused(legacy, "not a zip archive")
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    _assert_refused(text, "not a zip archive")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.md", "no pickle here")
    _assert_refused(other, "without a <folder>/data.pkl")
    _assert_refused(tmp_path / "missing.pt", "does not exist")


def test_missing_truncated_and_big_endian_storages_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(10.0)}, good)
    missing, short, big = tmp_path / "missing.pt", tmp_path / "short.pt", tmp_path / "big.pt"
    _rezip(good, missing, drop=("/data/0",))
    _assert_refused(missing, "lacks the storage entry", "data/0")
    _rezip(good, short, replace={"/data/0": bytes(12)})
    _assert_refused(short, "truncated storage", "12 bytes, 40 expected")
    _rezip(good, big, replace={"/byteorder": b"big"})
    _assert_refused(big, "byte order big")


def test_view_past_its_storage_is_refused(tmp_path):
    """A hand-written pickle whose tensor claims 100 floats over a 4-float storage."""

    class _Storage:
        pass

    storage = _Storage()

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is storage else None

    bad = _Payload(torch._utils._rebuild_tensor_v2, storage, 0, (100,), (1,), False, OrderedDict())
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"w": bad})
    path = tmp_path / "oob.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/data/0", bytes(16))
    _assert_refused(path, "reaching past the end of storage 0")


def test_reader_never_unpickles(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(4)
    path = tmp_path / "x.pt"
    obj = {**_views(g), "sd": nn.Linear(3, 2).state_dict()}
    torch.save(obj, path)
    ref = torch.load(path, weights_only=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reader unpickled")

    for name in ("Unpickler", "_Unpickler", "load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert_same(read_checkpoint(path), ref)


def test_corrupted_pickles_are_refused_in_one_line_or_read(tmp_path):
    """Seeded fuzzing of data.pkl (byte flips, truncations, deep nesting): the reader either returns
    or raises CheckpointFormatError, never another exception."""
    rng = random.Random(0)
    good = tmp_path / "good.pt"
    torch.save({"sd": nn.Linear(3, 2).state_dict(), "meta": [1, "a", (2.5, None)]}, good)
    with zipfile.ZipFile(good) as z:
        pkl = z.read("good/data.pkl")
    variants = [pkl[:cut] for cut in range(0, len(pkl), 7)]
    for _ in range(150):
        data = bytearray(pkl)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        variants.append(bytes(data))
    variants.append(b"\x80\x02" + b"(" * 50_000 + b")" + b"t" * 50_000 + b".")  # 50k nested tuples
    outcomes = {"read": 0, "refused": 0}
    path = tmp_path / "bad.pt"
    for data in variants:
        _rezip(good, path, replace={"/data.pkl": data})
        try:
            read_checkpoint(path)
            outcomes["read"] += 1
        except CheckpointFormatError as err:
            assert "\n" not in str(err)
            outcomes["refused"] += 1
    assert outcomes["refused"] > len(variants) // 2  # most corruptions are caught, none escapes as a crash
