"""Read PyTorch checkpoint files (``torch.save``'s zip format) without ever unpickling them.

Reward models published as ``.pt`` / ``.pth`` / ``pytorch_model*.bin`` files are pickles, and loading a
pickle runs whatever code it names. This module never hands the bytes to :mod:`pickle` or
:func:`torch.load`. A ``torch.save`` file is a zip archive holding

* ``<prefix>/data.pkl``: the object's structure as a pickle; here it is only *parsed* with
  :func:`pickletools.genops` (which decodes opcodes without executing anything) and evaluated by a
  small stack machine that knows a whitelist of opcodes and of global names (``OrderedDict`` and
  torch's own tensor-rebuild functions and storage/dtype names);
* ``<prefix>/data/<key>``: the raw bytes of each storage, referred to from the pickle by a
  persistent id ``("storage", storage_type, key, location, numel)``;
* ``<prefix>/byteorder`` (optional): ``little`` or ``big``.

Tensors are rebuilt on the CPU with the saved dtype, storage offset, size and stride; tensors that
share a storage in the file share memory here too, as with ``torch.load``. Anything outside the
whitelist (``os.system``, ``builtins.eval``, an unknown opcode) is refused with one line naming it,
before anything it names could run: nothing named in the file is ever imported or called.
"""

from __future__ import annotations

import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UsageError

__all__ = ["CheckpointFormatError", "read_checkpoint", "load_state_dict", "STATE_DICT_KEYS"]

#: Keys under which training scripts commonly nest the weights, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model", "module", "params_ema")


class CheckpointFormatError(UsageError):
    """A checkpoint file this reader refuses; the message (one line) names the file and the reason."""


class _Refused(Exception):
    """Internal: a reason to refuse, completed with the file's name by :func:`read_checkpoint`."""


# ----------------------------------------------------------------------------------------------
# What a weights file may name


@dataclass(frozen=True)
class _StorageType:
    """A storage class named by the pickle (``torch.FloatStorage``, ``torch.storage.UntypedStorage``)."""

    name: str
    dtype: torch.dtype  # torch.uint8 for an untyped storage (its numel counts bytes)


@dataclass(frozen=True)
class _Callable:
    """A whitelisted global that REDUCE may call: our own re-implementation, never the named function."""

    name: str
    fn: Callable[..., Any]


@dataclass(frozen=True)
class _Storage:
    """A storage read from the archive: its bytes (a 1-d uint8 tensor) and the dtype it was saved as."""

    key: str
    data: torch.Tensor
    dtype: torch.dtype


class _OrderedDict(dict):
    """A dict built by ``collections.OrderedDict()`` in the pickle, so BUILD may set its ``_metadata``.
    Converted to a plain dict before the result is returned."""


_TYPED_STORAGES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# dtypes that ``_rebuild_tensor_v3`` may name (torch writes v3 for dtypes without a typed storage class)
_DTYPE_NAMES = (
    "float32", "float16", "bfloat16", "float64", "complex64", "complex128", "int64", "int32", "int16",
    "int8", "uint8", "bool", "uint16", "uint32", "uint64",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip

_OPCODES = frozenset(
    "PROTO FRAME EMPTY_DICT EMPTY_LIST EMPTY_TUPLE MARK TUPLE TUPLE1 TUPLE2 TUPLE3 SETITEM SETITEMS APPEND "
    "APPENDS BINUNICODE SHORT_BINUNICODE BINUNICODE8 BININT BININT1 BININT2 LONG1 BINFLOAT NEWTRUE NEWFALSE "
    "NONE BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET GLOBAL STACK_GLOBAL REDUCE BINPERSID BUILD STOP".split()
)


def _short(text: object, limit: int = 80) -> str:
    """``text`` made safe for a one-line message: escaped, no newlines, at most ``limit`` characters."""
    s = str(text).encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _is_trivial_state(state: Any) -> bool:
    """Whether a BUILD / parameter state sets nothing (None, ``{}``, or a pair of those)."""
    if isinstance(state, tuple) and len(state) == 2:
        return all(_is_trivial_state(s) for s in state)
    return state is None or (isinstance(state, dict) and not state)


# ----------------------------------------------------------------------------------------------
# Tensor rebuilding (our own versions of torch._utils' functions, called with validated arguments)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise _Refused(f"has a tensor {what} that is not a tuple of non-negative ints: {_short(value)}")
    return value


def _tensor_on(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype) -> torch.Tensor:
    """The view ``(offset, size, stride)``, in elements of ``dtype``, of ``storage``'s bytes, after
    checking that it lies inside them (so no view can read past a storage)."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"rebuilds a tensor from {_short(type(storage).__name__)} instead of a storage")
    if type(offset) is not int or offset < 0:
        raise _Refused(f"has a tensor storage offset that is not a non-negative int: {_short(offset)}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Refused(f"has a tensor of size {size} with a stride of another length {stride}")
    extent = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    available = storage.data.numel() // dtype.itemsize
    if extent > available:
        raise _Refused(
            f"has a tensor (offset {offset}, size {size}, stride {stride}) reaching past the end of storage "
            f"{_short(storage.key)} ({available} elements of {dtype})"
        )
    tensor = torch.empty((0,), dtype=dtype)
    return tensor.set_(storage.data.untyped_storage(), offset, size, stride)


def _apply_metadata(tensor: torch.Tensor, metadata: Any) -> torch.Tensor:
    """Set the conj / neg bits torch records in a tensor's metadata (a dict of bools); nothing else."""
    if metadata is None or (isinstance(metadata, dict) and not metadata):
        return tensor
    if not isinstance(metadata, dict) or not all(
        k in ("conj", "neg") and isinstance(v, bool) for k, v in metadata.items()
    ):
        raise _Refused(f"has tensor metadata other than conj/neg bits: {_short(metadata)}")
    torch._utils.set_tensor_metadata(tensor, dict(metadata))
    return tensor


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2``: a tensor of the storage's own dtype. ``requires_grad`` and
    hooks are dropped: what comes back is plain data (``requires_grad=False``)."""
    dtype = storage.dtype if isinstance(storage, _Storage) else torch.uint8
    return _apply_metadata(_tensor_on(storage, offset, size, stride, dtype), metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """``torch._utils._rebuild_tensor_v3``: like v2 with an explicit dtype (over an untyped storage)."""
    if not isinstance(dtype, torch.dtype):
        raise _Refused(f"rebuilds a tensor with dtype {_short(dtype)}, which is not a torch dtype")
    return _apply_metadata(_tensor_on(storage, offset, size, stride, dtype), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """``torch._utils._rebuild_parameter``: the parameter's data, as a plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise _Refused(f"rebuilds a parameter from {_short(type(data).__name__)} instead of a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """``torch._utils._rebuild_parameter_with_state``: the data as a plain tensor. The state (Python
    attributes set on the parameter) has been parsed as inert data by then and is dropped with the
    parameter class."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _ordered_dict(*args):
    """``collections.OrderedDict()`` (or ``OrderedDict([(k, v), ...])``), as a dict."""
    if not args:
        return _OrderedDict()
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return _OrderedDict(args[0])
    raise _Refused(f"calls collections.OrderedDict with arguments {_short(args)}")


def _globals() -> dict[str, Any]:
    """Every global name a weights file may refer to, mapped to what the stack machine pushes."""
    names: dict[str, Any] = {
        "collections.OrderedDict": _Callable("collections.OrderedDict", _ordered_dict),
        "torch._utils._rebuild_tensor_v2": _Callable("_rebuild_tensor_v2", _rebuild_tensor_v2),
        "torch._utils._rebuild_tensor_v3": _Callable("_rebuild_tensor_v3", _rebuild_tensor_v3),
        "torch._utils._rebuild_parameter": _Callable("_rebuild_parameter", _rebuild_parameter),
        "torch._utils._rebuild_parameter_with_state": _Callable(
            "_rebuild_parameter_with_state", _rebuild_parameter_with_state
        ),
        "torch.storage.UntypedStorage": _StorageType("UntypedStorage", torch.uint8),
        "torch.UntypedStorage": _StorageType("UntypedStorage", torch.uint8),
    }
    names.update({f"torch.{n}": _StorageType(n, d) for n, d in _TYPED_STORAGES.items()})
    names.update({f"torch.{n}": getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)})
    return names


_GLOBALS = _globals()


# ----------------------------------------------------------------------------------------------
# The archive and the stack machine


def _find_prefix(names: list[str]) -> str:
    """The archive's record folder: the one top-level folder holding ``data.pkl``."""
    prefixes = sorted({n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1})
    if not prefixes:
        raise _Refused("is a zip archive without a <folder>/data.pkl record, so not a torch.save file")
    if len(prefixes) > 1:
        raise _Refused(f"holds several data.pkl records ({', '.join(_short(p, 30) for p in prefixes)})")
    return prefixes[0]


class _StorageReader:
    """Reads each ``<prefix>/data/<key>`` entry once, so tensors on one storage share its memory."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str) -> None:
        self.archive, self.prefix = archive, prefix
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"has a persistent id that is not a storage reference: {_short(pid)}")
        _, storage_type, key, _location, numel = pid  # everything is loaded to the CPU
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"has a storage of type {_short(storage_type)}, not a torch storage class")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Refused(f"has a malformed storage reference {_short(pid)}")
        nbytes = numel * storage_type.dtype.itemsize
        data = self.cache.get(key)
        if data is None:
            data = self.cache[key] = self._read(key, nbytes)
        elif data.numel() < nbytes:
            raise _Refused(f"refers to storage {_short(key)} with two different sizes")
        return _Storage(key, data[:nbytes], storage_type.dtype)

    def _read(self, key: str, nbytes: int) -> torch.Tensor:
        name = f"{self.prefix}/data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise _Refused(f"lacks the storage entry {_short(name)}") from None
        if info.file_size < nbytes:
            raise _Refused(f"has a truncated storage {_short(name)}: {info.file_size} bytes, {nbytes} expected")
        data = torch.empty(nbytes, dtype=torch.uint8)
        view, filled = memoryview(data.numpy()), 0
        with self.archive.open(info) as entry:
            while filled < nbytes:
                got = entry.readinto(view[filled:])
                if not got:
                    raise _Refused(f"has a truncated storage {_short(name)}: {filled} bytes, {nbytes} expected")
                filled += got
        return data


def _run_pickle(data: bytes, persistent_load: Callable[[Any], Any]) -> Any:
    """Evaluate the pickle ``data`` with whitelisted opcodes only; return the object STOP leaves."""
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if name not in _OPCODES:
            raise _Refused(f"uses pickle opcode {name} (at byte {pos}), which a weights file never needs; not loaded")
        if name in ("PROTO", "FRAME"):
            continue
        elif name == "STOP":
            return stack.pop()
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            items = pop_mark()  # before reading `stack`: pop_mark rebinds it
            stack.append(tuple(items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise IndexError("stack underflow")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            _dict_target(stack[-1])[key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            target = _dict_target(stack[-1])
            for i in range(0, len(items) - 1, 2):
                target[items[i]] = items[i + 1]
        elif name == "APPEND":
            value = stack.pop()
            _list_target(stack[-1]).append(value)
        elif name == "APPENDS":
            items = pop_mark()
            _list_target(stack[-1]).extend(items)
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BININT", "BININT1", "BININT2", "LONG1",
                      "BINFLOAT"):  # fmt: skip
            stack.append(arg)
        elif name == "NEWTRUE":
            stack.append(True)
        elif name == "NEWFALSE":
            stack.append(False)
        elif name == "NONE":
            stack.append(None)
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
            else:
                attr, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise _Refused(f"names a global with non-string parts {_short((module, attr))}")
            qualified = f"{module}.{attr}"
            if qualified not in _GLOBALS:
                raise _Refused(f"refers to {_short(qualified)}, which a weights file never needs; not loaded")
            stack.append(_GLOBALS[qualified])
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not isinstance(fn, _Callable) or not isinstance(args, tuple):
                raise _Refused(f"calls {_short(fn)}, which is not a function a weights file may call")
            stack.append(fn.fn(*args))
        elif name == "BINPERSID":
            stack.append(persistent_load(stack.pop()))
        elif name == "BUILD":
            state = stack.pop()
            target = stack[-1]
            # state_dict() attaches its `_metadata` (module versions) to the OrderedDict; we return a dict
            if not (isinstance(target, _OrderedDict) and isinstance(state, dict)) and not _is_trivial_state(state):
                raise _Refused(f"sets state on a {_short(type(target).__name__)}, which a weights file never does")
    raise _Refused("has a data.pkl that ends without STOP")


def _dict_target(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise _Refused(f"sets an item on a {_short(type(obj).__name__)}, not a dict")
    return obj


def _list_target(obj: Any) -> list:
    if not isinstance(obj, list):
        raise _Refused(f"appends to a {_short(type(obj).__name__)}, not a list")
    return obj


_LEAF_TYPES = (str, int, float, bool, type(None), torch.Tensor, torch.dtype)


def _plain(obj: Any) -> Any:
    """``obj`` with each OrderedDict turned into a dict, after checking it holds only returnable values
    (no storage, storage class or function left over from a malformed pickle). Shared and cyclic
    containers keep their sharing (the copy is memoised by identity)."""
    copies: dict[int, Any] = {}

    def convert(x: Any) -> Any:
        if isinstance(x, _LEAF_TYPES):
            return x
        if id(x) in copies:
            return copies[id(x)]
        if isinstance(x, dict):
            out: Any = copies.setdefault(id(x), {})
            for k, v in x.items():
                out[convert(k)] = convert(v)
            return out
        if isinstance(x, list):
            out = copies.setdefault(id(x), [])
            out.extend(convert(v) for v in x)
            return out
        if isinstance(x, tuple):
            return tuple(convert(v) for v in x)
        raise _Refused(f"holds a bare {_short(type(x).__name__.lstrip('_'))}, which is not data this reader returns")

    return convert(obj)


def read_checkpoint(path: str | Path) -> Any:
    """The object saved with ``torch.save`` at ``path``, read without unpickling.

    Returns dicts (an ``OrderedDict`` comes back as a dict), lists, tuples, str, int, float, bool,
    None and CPU ``torch.Tensor`` (an ``nn.Parameter`` comes back as its data; ``requires_grad`` is
    False). Tensors keep the saved dtype, storage offset, size and stride, and tensors that shared a
    storage when saved share memory. Raises :class:`CheckpointFormatError` (one line naming ``path``)
    for a file that is not a zip archive (``torch.save`` before torch 1.6, or not a torch file), a
    big-endian file, a pickle naming anything outside the whitelist, or a missing / truncated storage.
    """
    try:
        try:
            archive = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise _Refused("does not exist") from None
        except IsADirectoryError:
            raise _Refused("is a directory, not a file") from None
        except zipfile.BadZipFile:
            raise _Refused(
                "is not a zip archive: a torch.save file from before torch 1.6 (re-save it with a recent torch) "
                "or not a torch checkpoint"
            ) from None
        with archive:
            names = archive.namelist()
            prefix = _find_prefix(names)
            if f"{prefix}/byteorder" in names:
                order = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                if order != "little":
                    raise _Refused(f"was saved with byte order {_short(order)}; only little-endian files are read")
            try:
                # RuntimeError covers RecursionError (absurdly deep nesting) and torch refusing a view
                return _plain(_run_pickle(archive.read(f"{prefix}/data.pkl"), _StorageReader(archive, prefix)))
            except (IndexError, KeyError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as exc:
                raise _Refused(f"has a malformed data.pkl ({_short(type(exc).__name__)}: {_short(exc)})") from None
    except _Refused as refusal:
        raise CheckpointFormatError(f"checkpoint {_short(path, 200)} {refusal}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:  # a corrupt entry found while reading it
        raise CheckpointFormatError(f"checkpoint {_short(path, 200)} cannot be read: {_short(exc)}") from None


def _is_flat_state_dict(obj: Any) -> bool:
    """A str -> tensor mapping: str keys, at least one tensor value, and no nested containers (plain
    scalars among the tensors are allowed, and dropped by :func:`load_state_dict`)."""
    return (
        isinstance(obj, dict)
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and not any(isinstance(v, (dict, list, tuple)) for v in obj.values())
    )


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict saved at ``path`` (read with :func:`read_checkpoint`).

    That is the saved object itself if it is a str -> tensor mapping, else the first of ``obj[key]``,
    ``obj["state_dict"]``, ``obj["model"]``, ``obj["module"]``, ``obj["params_ema"]`` that is one.
    Non-tensor entries are dropped, and a ``module.`` prefix on every name (a ``DataParallel`` save)
    is stripped. Raises :class:`CheckpointFormatError` if no such mapping is found.
    """
    obj = read_checkpoint(path)
    found = obj if _is_flat_state_dict(obj) else None
    if found is None and isinstance(obj, dict):
        keys = ((key,) if key is not None else ()) + STATE_DICT_KEYS
        found = next((obj[k] for k in keys if _is_flat_state_dict(obj.get(k))), None)
    if found is None:
        tried = ", ".join(repr(k) for k in ((key,) if key is not None else ()) + STATE_DICT_KEYS)
        top = ", ".join(_short(k, 30) for k in list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointFormatError(
            f"checkpoint {_short(path, 200)} holds no name -> tensor mapping at the top or under {tried} "
            f"(top level: {top})"
        )
    tensors = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors
