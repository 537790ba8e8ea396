"""pgraft's reward-server wire format, standalone (stdlib ``http.server`` + numpy + Pillow only).

The servers under ``servers/`` run in their own environments (mmdet 2.x wants torch 1.x and Python
<= 3.10; PaddleOCR brings paddle and no torch), so they cannot import ``pgraft`` (whose
``pgraft.apps.t2i.remote`` imports torch 2). This file restates the server half of that module's
protocol in ~100 lines; ``tests/t2i/test_suite_servers.py`` drives it with pgraft's own client
(:class:`pgraft.apps.t2i.remote.RemoteReward`), so any drift between the two fails there.

    request   POST /ANY-PATH  {"prompts": [B strings], "images": [B base64 8-bit PNGs]}
    response  200 {"scores": [B finite numbers]}   (an empty batch: {"scores": []}, the liveness probe)
              4xx/5xx {"error": "one line"}        (400: the request or a prompt cannot be scored)
    GET       {"reward": NAME, "request": ..., "response": ...}

Python 3.8 compatible (mmdet 2.x environments).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, List, Sequence

REQUEST_SCHEMA = {"prompts": "[B strings]", "images": "[B base64-encoded 8-bit RGB PNGs]"}
RESPONSE_SCHEMA = {"scores": "[B finite numbers, in request order]"}

# score(images: B uint8 arrays [H, W, 3] (RGB), prompts: B strings) -> B floats
ScoreFn = Callable[[List[Any], List[str]], Sequence[float]]


class BadRequest(ValueError):
    """The request (or one of its prompts) cannot be scored: answered 400 with this one-line message."""


def one_line(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_png(text: str):
    """base64 PNG -> uint8 array [H, W, 3] (RGB)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def parse_request(body: bytes):
    """(prompts, images) of a POST body; :class:`BadRequest` when it is not the wire format."""
    try:
        request = json.loads(body.decode("utf-8"))
        prompts, images = request["prompts"], request["images"]
        if not (isinstance(prompts, list) and isinstance(images, list) and len(prompts) == len(images)
                and all(isinstance(p, str) for p in prompts) and all(isinstance(s, str) for s in images)):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadRequest('expected {"prompts": [B strings], "images": [B base64 PNGs]}') from None
    try:
        arrays = [decode_png(s) for s in images]
    except (ValueError, binascii.Error, OSError) as err:
        raise BadRequest(f"an image is not a base64 PNG ({one_line(err, 80)})") from None
    return prompts, arrays


def checked_scores(scores: Sequence[float], n: int) -> List[float]:
    """``scores`` as B finite floats, else ValueError (a server bug, answered 500)."""
    out = [float(s) for s in scores]
    if len(out) != n:
        raise ValueError(f"the reward returned {len(out)} scores for {n} images")
    if not all(math.isfinite(s) for s in out):
        raise ValueError("the reward returned a non-finite score")
    return out


class RewardHTTPServer(ThreadingHTTPServer):
    """Scores POSTed batches with ``score`` one batch at a time (models need not be thread-safe)."""

    daemon_threads = True

    def __init__(self, score: ScoreFn, host: str, port: int, name: str, quiet: bool = True) -> None:
        self.score, self.name, self.quiet = score, name, quiet
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict) -> None:
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
            prompts, images = parse_request(self.rfile.read(length))
            if not prompts:
                self._send(200, {"scores": []})
                return
            with self.server.lock:
                scores = checked_scores(self.server.score(images, prompts), len(prompts))
        except BadRequest as err:
            self._send(400, {"error": str(err)})
            return
        except Exception as err:  # noqa: BLE001 - reported to the client, logged here
            self._send(500, {"error": f"{type(err).__name__}: {one_line(err)}"})
            print(f"reward error: {type(err).__name__}: {err}", file=sys.stderr)
            return
        self._send(200, {"scores": scores})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if not self.server.quiet:
            super().log_message(format, *args)


def add_server_arguments(parser) -> None:
    """``--host``, ``--port`` and ``--quiet`` of every server script."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface; there is no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed)")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does: the socket is closed


def serve(score: ScoreFn, host: str, port: int, name: str, quiet: bool = True) -> None:
    """Listen on ``host:port``, print ``serving NAME at URL`` (one line, stderr) and serve until Ctrl-C
    or SIGTERM."""
    import signal

    try:
        server = RewardHTTPServer(score, host, port, name, quiet)
    except (OSError, OverflowError) as err:
        sys.exit(f"error: cannot listen on {host}:{port} ({getattr(err, 'strerror', None) or err})")
    signal.signal(signal.SIGTERM, _stop)
    print(f"serving {name} at {server.url} (pgraft: --reward {server.url})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
