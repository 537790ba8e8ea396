"""Remote rewards: score images on a reward server over HTTP(S) (``--reward http://HOST:PORT/PATH``), as
Flow-GRPO's reward servers do, and a minimal reference server (``pgraft t2i serve-reward``).

Wire format (JSON, UTF-8), one POST per batch of images::

    request   POST http://HOST:PORT/PATH   Content-Type: application/json
              {"prompts": ["a photo of a red circle", ...],          # B strings
               "images":  ["iVBORw0KGgo...", ...]}                    # B base64 PNGs (8-bit RGB, standard
                                                                      #   alphabet with padding)
    response  200  {"scores": [0.93, ...]}                            # B finite numbers, in request order

Any other status is a failure; a JSON body ``{"error": "..."}`` (what the reference server sends) is
quoted in the error message. An empty batch (``"prompts": [], "images": []``) must be answered with
``{"scores": []}``: a cheap liveness probe (:meth:`RemoteReward.probe`). ``GET`` on the reference
server returns ``{"reward": NAME, "request": ..., "response": ...}``.

Images travel as lossless 8-bit PNGs: the server scores exactly ``to_uint8(images)``, so for images
already on the 8-bit grid (``to_float`` of uint8, as decoded samples are after quantisation) a remote
reward returns exactly what the same reward computes locally.

Client settings (:class:`RemoteReward`): ``timeout`` per attempt (seconds, per socket operation as
``urllib`` counts it: connecting, then each read; default 60), ``attempts`` (default 3) with exponential
backoff (``backoff`` x 1, 2, 4, ... seconds between attempts; default 1 s), and ``batch`` (most images
per request; default: the whole chunk the caller passes). From the command line they go in the URL's
fragment, which is never sent to the server -- ``--reward 'http://host:8000/score#timeout=120&attempts=5'``
-- or in the environment (``PGRAFT_REWARD_TIMEOUT``, ``PGRAFT_REWARD_ATTEMPTS``; the fragment wins).
The environment does not enter a run's config.json, so it is the way to lengthen a timeout on
``--resume`` (which refuses a changed ``--reward``). Timeouts, refused or dropped connections, HTTP 429
and 5xx are retried; other 4xx statuses and malformed responses (not JSON, no ``scores`` list, a wrong
number of scores, a non-finite score) fail at once. Every failure raises :class:`RemoteRewardError`
with a one-line message naming the URL and the problem (the CLI prints it and exits with status 1).
HTTP(S) proxies in the environment apply as for ``urllib``, except to loopback hosts.

A failing server loses no finished round. The round loop (:func:`pgraft.core.trainer.run_graft`)
samples a round chunk by chunk and scores each chunk right after sampling it, before any selection,
store write, fine-tuning or checkpoint of that round; a round commits only when its checkpoint is
written (``checkpoints/latest.json``, :mod:`pgraft.core.rundir`). A remote failure in round r therefore
leaves rounds 0..r-1 committed and nothing of round r on disk: the candidates sampled so far in round r
are lost, and ``--resume`` (once the server is back) reloads round r-1's checkpoint and samples round r
again from the same per-chunk seeds ``(seed, round, chunk)``, so it regenerates those candidates bit for
bit (same device and software; bitwise reproducible kernels) and the finished run equals an uninterrupted
one. The same holds for the final evaluation after the last round (it is redone on resume before
``head/`` is written). A failure during round 0 of a new run leaves no checkpoint: rerun with
``--resume`` (or without it: nothing was committed).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import torch

from pgraft.core.errors import RewardError

from .world import to_float, to_uint8

DEFAULT_TIMEOUT = 60.0
DEFAULT_ATTEMPTS = 3
DEFAULT_BACKOFF = 1.0
TIMEOUT_ENV = "PGRAFT_REWARD_TIMEOUT"
ATTEMPTS_ENV = "PGRAFT_REWARD_ATTEMPTS"

REQUEST_SCHEMA = {"prompts": "[B strings]", "images": "[B base64-encoded 8-bit RGB PNGs]"}
RESPONSE_SCHEMA = {"scores": "[B finite numbers, in request order]"}


class RemoteRewardError(RewardError):
    """A remote reward call failed; the message is one line naming the URL and the problem."""


def is_url(spec: str) -> bool:
    return spec.lower().startswith(("http://", "https://"))


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- PNG coding
def encode_png(image: torch.Tensor) -> str:
    """One image [3, H, W] in [-1, 1] -> base64 (ASCII) of its 8-bit RGB PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> torch.Tensor:
    """base64 PNG (any mode PIL reads; converted to RGB) -> uint8 [3, H, W]."""
    import numpy as np
    from PIL import Image

    data = base64.b64decode(text, validate=True)
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------- client
def _options(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its fragment, and the fragment's ``key=value&...`` client options."""
    base, _, fragment = url.partition("#")
    options = dict(urllib.parse.parse_qsl(fragment, keep_blank_values=True, strict_parsing=False)) if fragment else {}
    unknown = sorted(set(options) - {"timeout", "attempts", "backoff", "batch"})
    if unknown:
        raise ValueError(f"remote reward {base}: unknown option(s) {', '.join(unknown)} after '#' "
                         "(known: timeout, attempts, backoff, batch)")
    return base, options


def _number(url: str, name: str, value: Any, kind: type, minimum: float) -> float | int:
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"remote reward {url}: {name} must be a{'n integer' if kind is int else ' number'}, "
                         f"got {value!r}") from None
    if not (math.isfinite(out) and out >= minimum):
        raise ValueError(f"remote reward {url}: {name} must be >= {minimum}, got {value!r}")
    return out


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteReward:
    """``reward(images, prompts) -> Tensor[B]`` (float64) scored by a reward server (module docstring).

    ``url``: ``http(s)://HOST[:PORT]/PATH``, optionally with ``#timeout=S&attempts=N&backoff=S&batch=N``;
    arguments given here override the fragment, which overrides the environment and the defaults."""

    def __init__(self, url: str, timeout: float | None = None, attempts: int | None = None,
                 backoff: float | None = None, batch: int | None = None) -> None:
        if not is_url(url):
            raise ValueError(f"remote reward {url!r}: need an http:// or https:// URL")
        self.url, opts = _options(url)
        parts = urllib.parse.urlsplit(self.url)
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as err:
            raise ValueError(f"remote reward {self.url}: bad port ({err})") from None
        if not parts.hostname:
            raise ValueError(f"remote reward {self.url}: the URL names no host")
        env_timeout, env_attempts = os.environ.get(TIMEOUT_ENV), os.environ.get(ATTEMPTS_ENV)
        timeout = timeout if timeout is not None else opts.get("timeout", env_timeout or DEFAULT_TIMEOUT)
        attempts = attempts if attempts is not None else opts.get("attempts", env_attempts or DEFAULT_ATTEMPTS)
        backoff = backoff if backoff is not None else opts.get("backoff", DEFAULT_BACKOFF)
        batch = batch if batch is not None else opts.get("batch")
        self.timeout = float(_number(self.url, "timeout", timeout, float, 1e-3))
        self.attempts = int(_number(self.url, "attempts", attempts, int, 1))
        self.backoff = float(_number(self.url, "backoff", backoff, float, 0.0))
        self.batch = None if batch is None else int(_number(self.url, "batch", batch, int, 1))
        handlers = [urllib.request.ProxyHandler({})] if _loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return (f"RemoteReward({self.url!r}, timeout={self.timeout:g}, attempts={self.attempts}, "
                f"backoff={self.backoff:g}, batch={self.batch})")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [str(p) for p in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"remote reward {self.url}: {len(images)} images but {len(prompts)} prompts")
        step = self.batch or max(1, len(prompts))
        scores: list[float] = []
        for i in range(0, len(prompts), step):
            part = prompts[i:i + step]
            payload = {"prompts": part, "images": [encode_png(x) for x in images[i:i + step]]}
            scores += self._post(payload, len(part))
        return torch.tensor(scores, dtype=torch.float64)

    def probe(self) -> None:
        """POST an empty batch: raises :class:`RemoteRewardError` unless the server answers ``{"scores": []}``."""
        self._post({"prompts": [], "images": []}, 0)

    # ------------------------------------------------------------------ one request, with retries
    @staticmethod
    def max_response_bytes(n: int) -> int:
        """The longest answer read for ``n`` scores: 1 MiB plus 1 KiB a score (a number in JSON is
        at most a few dozen bytes; a hostile or broken server cannot make the client read more)."""
        return (1 << 20) + 1024 * n

    def _fail(self, problem: str) -> RemoteRewardError:
        return RemoteRewardError(f"remote reward {self.url}: {problem}")

    def _post(self, payload: dict[str, Any], n: int) -> list[float]:
        body = json.dumps(payload).encode("utf-8")
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "Accept": "application/json"})
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read(self.max_response_bytes(n) + 1)  # never more than an answer can need
                if len(raw) > self.max_response_bytes(n):
                    raise self._fail(f"the answer is longer than the {self.max_response_bytes(n):,} bytes that "
                                     f"{n} scores can take; is this a reward server?")
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code} {err.reason}{self._error_detail(err)}"
                if err.code == 429 or err.code >= 500:
                    last = problem
                    continue
                raise self._fail(problem) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                last = self._transport_problem(err)
                continue
            return self._scores(raw, n)
        tries = f"{self.attempts} attempt{'s' if self.attempts > 1 else ''}"
        raise self._fail(f"{last} ({tries})")

    @staticmethod
    def _error_detail(err: urllib.error.HTTPError) -> str:
        try:
            text = err.read().decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the status alone is still a good message
            return ""
        try:
            data = json.loads(text)
            if isinstance(data, dict) and "error" in data:
                text = str(data["error"])
        except ValueError:
            pass
        return f": {_one_line(text)}" if text.strip() else ""

    def _transport_problem(self, err: BaseException) -> str:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
            return (f"timed out after {self.timeout:g} s (raise it with #timeout=SECONDS in the URL or "
                    f"{TIMEOUT_ENV})")
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is the reward server running?)"
        if isinstance(reason, socket.gaierror):
            return f"cannot resolve the host ({_one_line(reason)})"
        if isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected, ConnectionAbortedError)):
            return "the server closed the connection without an answer"
        return f"{type(reason).__name__}: {_one_line(reason)}"

    def _scores(self, raw: bytes, n: int) -> list[float]:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self._fail(f"the response is not JSON: {_one_line(raw.decode('utf-8', 'replace'), 80)!r}") from None
        if not isinstance(data, dict) or not isinstance(data.get("scores"), list):
            got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
            raise self._fail(f'the response is not {{"scores": [...]}} (got {got})')
        scores = data["scores"]
        if len(scores) != n:
            raise self._fail(f"{len(scores)} scores for {n} images (need one score per image)")
        out = []
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise self._fail(f"score {i} is not a number: {_one_line(json.dumps(s), 40)}")
            if not math.isfinite(s):
                raise self._fail(f"score {i} is not finite ({s})")
            out.append(float(s))
        return out


# ----------------------------------------------------------------------------- reference server
class RewardServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` scoring POSTed batches (module docstring) with ``reward``
    (a local ``RewardFn`` on images in [-1, 1]); one batch is scored at a time (the reward need not
    be thread-safe), requests are read and answered concurrently. Any path is served."""

    daemon_threads = True

    def __init__(self, reward: Callable[[torch.Tensor, Sequence[str]], Any], host: str = "127.0.0.1",
                 port: int = 8000, name: str = "reward", quiet: bool = True) -> None:
        self.reward, self.name, self.quiet = reward, name, quiet
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._send(200, {"reward": self.server.name, "request": REQUEST_SCHEMA, "response": RESPONSE_SCHEMA})

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, {"error": "need a Content-Length header"})
            return
        try:
            request = json.loads(self.rfile.read(length).decode("utf-8"))
            prompts, images = request["prompts"], request["images"]
            if not (isinstance(prompts, list) and isinstance(images, list) and len(prompts) == len(images)
                    and all(isinstance(p, str) for p in prompts) and all(isinstance(s, str) for s in images)):
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self._send(400, {"error": 'expected {"prompts": [B strings], "images": [B base64 PNGs]}'})
            return
        try:
            x = [decode_png(s) for s in images]
        except (ValueError, binascii.Error, OSError) as err:
            self._send(400, {"error": f"an image is not a base64 PNG ({_one_line(err, 80)})"})
            return
        if len({tuple(t.shape) for t in x}) > 1:
            self._send(400, {"error": "images of one request must have one size"})
            return
        if not x:
            self._send(200, {"scores": []})
            return
        try:
            with self.server.lock:
                scores = torch.as_tensor(self.server.reward(to_float(torch.stack(x)), prompts), dtype=torch.float64)
            scores = scores.detach().cpu().reshape(-1).tolist()
            if len(scores) != len(prompts) or not all(math.isfinite(s) for s in scores):
                raise ValueError(f"the reward returned {len(scores)} scores for {len(prompts)} images"
                                 if len(scores) != len(prompts) else "the reward returned a non-finite score")
        except Exception as err:  # noqa: BLE001 - reported to the client, logged here
            self._send(500, {"error": f"{type(err).__name__}: {_one_line(err)}"})
            if not self.server.quiet:
                print(f"reward error: {type(err).__name__}: {err}", file=sys.stderr)
            return
        self._send(200, {"scores": scores})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(reward: Callable[[torch.Tensor, Sequence[str]], Any], host: str = "127.0.0.1", port: int = 8000,
                name: str = "reward", quiet: bool = True) -> RewardServer:
    """A bound, not yet serving :class:`RewardServer` (``port=0``: a free port, see ``.url``); run it
    with ``serve_forever()`` (e.g. in a thread), stop with ``shutdown()`` + ``server_close()``."""
    return RewardServer(reward, host, port, name, quiet)


__all__ = ["RemoteReward", "RemoteRewardError", "RewardServer", "make_server", "encode_png", "decode_png", "is_url",
           "REQUEST_SCHEMA", "RESPONSE_SCHEMA"]
