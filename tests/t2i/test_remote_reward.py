"""Reward plug-ins: the remote scorer (client + reference server on 127.0.0.1, ephemeral ports, in
threads), weighted combinations (raw / zscore), the user's own ``module:function`` and the parsing of
``--reward``; plus two tiny end-to-end runs: a server failing mid-round (earlier rounds stay committed,
``resume`` regenerates the round bit for bit) and per-component means in metrics.csv.

Select them with ``pytest tests/t2i -k "remote or reward_spec or plugin"``."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pgraft.apps.t2i.remote import RemoteReward, RemoteRewardError, decode_png, encode_png, make_server
from pgraft.apps.t2i.reward_spec import CombinedReward, PluginReward, parse_reward_spec, split_weight
from pgraft.apps.t2i.rewards import checker_reward, make_reward
from pgraft.apps.t2i.world import all_prompts, render_dataset, to_float

ALL = [s.text() for s in all_prompts()]


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def serving(server):
    """Run ``server`` in a daemon thread for the block; shut it down after."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class _Fake(BaseHTTPRequestHandler):
    """A misbehaving third-party reward server: ``server.respond(handler, request)`` answers."""

    def do_POST(self):  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls += 1
        self.server.respond(self, request)

    def log_message(self, *args):
        pass


def fake_server(respond) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    server.daemon_threads, server.calls, server.respond = True, 0, respond
    return server


def reply(handler, status: int, body: bytes | str) -> None:
    body = body.encode() if isinstance(body, str) else body
    with contextlib.suppress(OSError):  # the client may have given up already
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/score"


def images_and_prompts(n: int = 6, size: int = 32):
    """Rendered images (on the 8-bit grid) with half their captions swapped, so the checker says 0 and 1."""
    u8, caps = render_dataset(ALL, n, size, seed=3)
    prompts = [c if i % 2 == 0 else caps[(i + 1) % n] for i, c in enumerate(caps)]
    return to_float(u8), prompts


def smooth_reward(images, prompts):
    """A continuous test reward (all float64 digits matter)."""
    return images.double().mean((1, 2, 3)) * 3.0 + torch.tensor([len(p) for p in prompts], dtype=torch.float64) / 7


# ----------------------------------------------------------------------------- remote: round trip
def test_remote_round_trip_equals_the_local_reward_exactly():
    x, prompts = images_and_prompts()
    local = checker_reward(x, prompts).double()
    assert 0 < local.sum() < len(local)  # both verdicts occur
    with serving(make_server(checker_reward, "127.0.0.1", 0, name="checker")) as server:
        remote = RemoteReward(server.url)
        assert torch.equal(remote(x, prompts), local)
    with serving(make_server(smooth_reward, "127.0.0.1", 0)) as server:
        got = RemoteReward(server.url + "#batch=4")(x, prompts)  # two requests: 4 + 2 images
        assert got.dtype == torch.float64 and torch.equal(got, smooth_reward(x, prompts))
        RemoteReward(server.url).probe()  # the empty batch is answered


def test_remote_png_coding_is_lossless_on_the_8_bit_grid():
    u8 = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(decode_png(encode_png(to_float(u8))), u8)


def test_remote_make_reward_accepts_a_url_with_options(monkeypatch):
    reward = make_reward("http://127.0.0.1:9/score#timeout=5&attempts=2&backoff=0")
    assert isinstance(reward, RemoteReward) and reward.url == "http://127.0.0.1:9/score"
    assert (reward.timeout, reward.attempts, reward.backoff, reward.batch) == (5.0, 2, 0.0, None)
    monkeypatch.setenv("PGRAFT_REWARD_TIMEOUT", "7.5")
    monkeypatch.setenv("PGRAFT_REWARD_ATTEMPTS", "4")
    reward = make_reward("https://example.invalid/r")
    assert (reward.timeout, reward.attempts) == (7.5, 4)
    assert make_reward("https://example.invalid/r#timeout=1").timeout == 1.0  # the URL wins
    with pytest.raises(ValueError, match="unknown option"):
        RemoteReward("http://127.0.0.1:9/#retries=3")
    with pytest.raises(ValueError, match="bad port"):
        RemoteReward("http://127.0.0.1:99999/x")
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RemoteReward("http://127.0.0.1:9/#attempts=0")


# ----------------------------------------------------------------------------- remote: failures
def test_remote_timeout_names_the_url_after_the_bounded_attempts():
    release = threading.Event()

    def slow(handler, request):
        release.wait(5)
        reply(handler, 200, json.dumps({"scores": [0.0] * len(request["images"])}))

    x, prompts = images_and_prompts(2, 8)
    with serving(fake_server(slow)) as server:
        reward = RemoteReward(url_of(server), timeout=0.2, attempts=3, backoff=0.01)
        t0 = time.monotonic()
        with pytest.raises(RemoteRewardError) as err:
            reward(x, prompts)
        elapsed = time.monotonic() - t0
        release.set()
    message = str(err.value)
    assert url_of(server) in message and "timed out after 0.2 s" in message and "(3 attempts)" in message
    assert "\n" not in message
    assert server.calls == 3 and elapsed < 3


def test_remote_malformed_json_is_a_clear_error():
    with serving(fake_server(lambda h, r: reply(h, 200, "<html>oops</html>"))) as server:
        with pytest.raises(RemoteRewardError, match=r"remote reward http://127\.0\.0\.1:\d+/score: the response is not "
                                                    r"JSON: '<html>oops</html>'"):
            RemoteReward(url_of(server), backoff=0)(*images_and_prompts(2, 8))
        assert server.calls == 1  # not retried
    with serving(fake_server(lambda h, r: reply(h, 200, '{"score": [1]}'))) as server:
        with pytest.raises(RemoteRewardError, match=r'not \{"scores": \[\.\.\.\]\} \(got an object with keys'):
            RemoteReward(url_of(server), backoff=0)(*images_and_prompts(2, 8))


def test_remote_wrong_number_of_scores_or_non_finite_scores_are_clear_errors():
    x, prompts = images_and_prompts(3, 8)
    with serving(fake_server(lambda h, r: reply(h, 200, '{"scores": [1.0]}'))) as server:
        with pytest.raises(RemoteRewardError, match=r"/score: 1 scores for 3 images \(need one score per image\)"):
            RemoteReward(url_of(server), backoff=0)(x, prompts)
    with serving(fake_server(lambda h, r: reply(h, 200, '{"scores": [1.0, NaN, 2]}'))) as server:
        with pytest.raises(RemoteRewardError, match=r"score 1 is not finite \(nan\)"):
            RemoteReward(url_of(server), backoff=0)(x, prompts)
    with serving(fake_server(lambda h, r: reply(h, 200, '{"scores": [1.0, "2", 2]}'))) as server:
        with pytest.raises(RemoteRewardError, match=r'score 1 is not a number: "2"'):
            RemoteReward(url_of(server), backoff=0)(x, prompts)


def test_remote_answer_longer_than_any_scores_is_refused_without_reading_it_all():
    """A broken or hostile server cannot make the client read an unbounded answer: at most 1 MiB
    plus 1 KiB a score is read, and a longer answer is one line naming the URL."""
    x, prompts = images_and_prompts(2, 8)
    cap = RemoteReward.max_response_bytes(2)
    padded = '{"scores": [1.0, 2.0]' + " " * (cap + 10) + "}"
    with serving(fake_server(lambda h, r: reply(h, 200, padded))) as server:
        with pytest.raises(RemoteRewardError, match=rf"/score: the answer is longer than the {cap:,} bytes that 2 "
                                                    "scores can take"):
            RemoteReward(url_of(server), backoff=0)(x, prompts)
        assert server.calls == 1  # not retried
    just = '{"scores": [1.0, 2.0]' + " " * (cap - 30) + "}"  # at the cap: still read and parsed
    assert len(just) <= cap
    with serving(fake_server(lambda h, r: reply(h, 200, just))) as server:
        assert RemoteReward(url_of(server), backoff=0)(x, prompts).tolist() == [1.0, 2.0]


def test_remote_http_errors_and_refused_connections():
    x, prompts = images_and_prompts(2, 8)
    with serving(fake_server(lambda h, r: reply(h, 503, '{"error": "model loading"}'))) as server:
        with pytest.raises(RemoteRewardError, match=r"HTTP 503 Service Unavailable: model loading \(2 attempts\)"):
            RemoteReward(url_of(server), attempts=2, backoff=0)(x, prompts)
        assert server.calls == 2  # 5xx is retried
    with serving(fake_server(lambda h, r: reply(h, 404, "no such route"))) as server:
        with pytest.raises(RemoteRewardError, match=r"/score: HTTP 404 Not Found: no such route$"):
            RemoteReward(url_of(server), attempts=3, backoff=0)(x, prompts)
        assert server.calls == 1  # other 4xx is not
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteRewardError, match=rf"http://127\.0\.0\.1:{port}/x: connection refused .*\(2 attempts\)"):
        RemoteReward(f"http://127.0.0.1:{port}/x", attempts=2, backoff=0)(x, prompts)


def test_remote_reference_server_rejects_bad_requests_and_reports_reward_errors():
    import urllib.error
    import urllib.request

    def broken(images, prompts):
        raise RuntimeError("CUDA out of memory")

    with serving(make_server(checker_reward, "127.0.0.1", 0, name="checker")) as server:
        with urllib.request.urlopen(server.url, timeout=5) as r:  # GET describes the server
            assert json.loads(r.read())["reward"] == "checker"
        for body in (b"not json", b'{"prompts": ["a"], "images": []}', b'{"prompts": ["a"], "images": ["!!"]}'):
            req = urllib.request.Request(server.url, data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=5)
            assert err.value.code == 400 and "error" in json.loads(err.value.read())
    with serving(make_server(broken, "127.0.0.1", 0)) as server:
        with pytest.raises(RemoteRewardError, match=r"HTTP 500 Internal Server Error: RuntimeError: CUDA out of memory"):
            RemoteReward(server.url, attempts=1)(*images_and_prompts(2, 8))


def test_remote_serve_reward_command(monkeypatch, capsys):
    """`pgraft t2i serve-reward` binds 127.0.0.1 by default and serves a local reward name."""
    from pgraft.apps.t2i import cli, remote

    made = []
    real = remote.make_server
    monkeypatch.setattr(remote, "make_server", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    thread = threading.Thread(target=cli.serve_reward_cmd, kwargs=dict(
        reward="checker", reward_weights=None, reward_norm="raw", host="127.0.0.1", port=0, device="cpu", quiet=True),
        daemon=True)
    thread.start()
    for _ in range(500):
        if made:
            break
        time.sleep(0.01)
    server = made[0]
    try:
        assert server.server_address[0] == "127.0.0.1"
        x, prompts = images_and_prompts(4)
        assert torch.equal(RemoteReward(server.url)(x, prompts), checker_reward(x, prompts).double())
    finally:
        server.shutdown()
        thread.join(5)
    assert f"serving reward 'checker' at {server.url}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("item,expected", [
    ("checker:0.5", ("checker", 0.5)),
    ("checker", ("checker", None)),
    ("my_module:my_function", ("my_module:my_function", None)),
    ("my_module:my_function:0.5", ("my_module:my_function", 0.5)),
    ("path/to/file.py:fn:-1", ("path/to/file.py:fn", -1.0)),
    ("vqa:1e-2", ("vqa", 0.01)),
    ("http://host:8000", ("http://host:8000", None)),
    ("http://host:8000:0.5", ("http://host:8000", 0.5)),
    ("http://host:8000/score", ("http://host:8000/score", None)),
    ("https://host/score:2", ("https://host/score", 2.0)),
    ("http://[::1]:8000", ("http://[::1]:8000", None)),
    ("http://[::1]:8000:.5", ("http://[::1]:8000", 0.5)),
    ("checker:inf", ("checker:inf", None)),  # a weight is a decimal number
])
def test_reward_spec_split_weight(item, expected):
    assert split_weight(item) == expected


def test_reward_spec_items_and_json(tmp_path):
    assert [(c.item, c.weight) for c in parse_reward_spec("checker:0.5, clipscore:0.5")] == \
        [("checker", 0.5), ("clipscore", 0.5)]
    assert [(c.item, c.weight) for c in parse_reward_spec("checker,vqa:2")] == [("checker", None), ("vqa", 2.0)]
    f = tmp_path / "rewards.json"
    f.write_text(json.dumps({"checker": 0.5, "vqa": {"weight": 2, "weights": "runs/x"}}))
    assert [(c.item, c.weight, c.weights) for c in parse_reward_spec(str(f))] == \
        [("checker", 0.5, None), ("vqa", 2.0, "runs/x")]


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown reward 'nope'"),
    ("", "empty --reward"),
    ("checker,,checker", "empty item"),
    (":0.5", "has a weight but no reward"),
    ("missing.json", "does not exist"),
    ("ftp://host/x", "only http:// and https://"),
    ("checker:inf", "the weight after ':' must be a decimal number"),
    ("checker,rewards.json", "must be the whole --reward"),
])
def test_reward_spec_errors(spec, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.json").write_text("{}")
    with pytest.raises(ValueError, match=match):
        make_reward(spec)


def test_reward_spec_bad_json_files(tmp_path):
    cases = {"bad.json": "{not json", "list.json": "[1, 2]", "empty.json": "{}", "str.json": '{"checker": "0.5"}',
             "key.json": '{"checker": {"weight": 1, "dir": "x"}}'}
    matches = {"bad.json": "not valid JSON", "list.json": "non-empty object", "empty.json": "non-empty object",
               "str.json": "must be a finite number", "key.json": "unknown keys"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=matches[name]):
            make_reward(str(tmp_path / name))
    with pytest.raises(ValueError, match="unknown reward normalisation 'minmax'"):
        make_reward("checker", norm="minmax")


# ----------------------------------------------------------------------------- weighted combinations
PLUGIN = '''
import torch

def value(images, prompts):
    """The prompt read as a number."""
    return torch.tensor([float(p) for p in prompts])

def two(images, prompts):
    return [2.0] * len(prompts)  # a plain sequence

def bright(images, prompts):
    """Mean pixel: the plug-in sees images in [0, 1]."""
    return images.mean((1, 2, 3))

def column(images, prompts):
    return torch.zeros(len(prompts), 1)

not_callable = 3
'''


@pytest.fixture
def plugin(tmp_path) -> Path:
    path = tmp_path / "plug.py"
    path.write_text(PLUGIN)
    return path


def test_reward_spec_weighted_sum_is_weights_times_components(plugin):
    x, prompts = torch.zeros(3, 3, 4, 4), ["1", "2", "4"]
    reward = make_reward(f"{plugin}:value:0.5,{plugin}:two:2")
    assert isinstance(reward, CombinedReward)
    assert [(c.label, c.weight) for c in reward.components] == [("plug_value", 0.5), ("plug_two", 2.0)]
    total, metrics = reward.with_metrics(x, prompts)
    assert torch.equal(total, torch.tensor([4.5, 5.0, 6.0], dtype=torch.float64))
    assert metrics == {"reward_plug_value_mean": pytest.approx(7 / 3), "reward_plug_two_mean": 2.0}
    assert torch.equal(reward(x, prompts), total)
    # registered names combine the same way; a repeated label is numbered
    xs, ps = images_and_prompts()
    both = make_reward("checker:0.5,checker:2")
    assert [c.label for c in both.components] == ["checker", "checker_2"]
    assert torch.equal(both(xs, ps), 2.5 * checker_reward(xs, ps).double())
    # an item without a weight counts once; a single weighted item scales
    assert torch.equal(make_reward(f"{plugin}:two,{plugin}:value")(x, prompts),
                       torch.tensor([3.0, 4, 6], dtype=torch.float64))
    assert torch.equal(make_reward(f"{plugin}:value:-3")(x, prompts), torch.tensor([-3.0, -6, -12], dtype=torch.float64))


def test_reward_spec_zscore_standardises_each_component_per_call(plugin):
    x, prompts = torch.zeros(3, 3, 4, 4), ["1", "2", "4"]
    reward = make_reward(f"{plugin}:value:0.5,{plugin}:two:2", norm="zscore")
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    expected = 0.5 * (v - v.mean()) / v.std(unbiased=False)  # the constant component contributes 0
    total, metrics = reward.with_metrics(x, prompts)
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-15)
    assert metrics["reward_plug_value_mean"] == pytest.approx(7 / 3)  # the raw means are logged
    single = make_reward(f"{plugin}:value", norm="zscore")  # one reward, standardised alike
    torch.testing.assert_close(single(x, prompts), expected / 0.5, rtol=0, atol=1e-15)
    assert torch.equal(reward(x[:1], prompts[:1]), torch.zeros(1, dtype=torch.float64))  # one image: 0


def test_reward_spec_json_file_equals_the_comma_list(plugin, tmp_path):
    f = tmp_path / "rewards.json"
    f.write_text(json.dumps({f"{plugin}:value": 0.5, f"{plugin}:two": {"weight": 2}}))
    x, prompts = torch.zeros(3, 3, 4, 4), ["1", "2", "4"]
    assert torch.equal(make_reward(str(f))(x, prompts), make_reward(f"{plugin}:value:0.5,{plugin}:two:2")(x, prompts))


def test_reward_spec_json_gives_each_component_its_weights_directory(tmp_path, monkeypatch):
    from pgraft.apps.t2i import rewards

    seen = {}
    monkeypatch.setitem(rewards.REWARDS, "probe_a", lambda weights=None, device="cpu": seen.setdefault("a", weights))
    monkeypatch.setitem(rewards.REWARDS, "probe_b", lambda weights=None, device="cpu": seen.setdefault("b", weights))
    f = tmp_path / "rewards.json"
    f.write_text(json.dumps({"probe_a": {"weight": 1, "weights": "dir/a"}, "probe_b": 1}))
    make_reward(str(f), weights="shared")
    assert seen == {"a": "dir/a", "b": "shared"}


# ----------------------------------------------------------------------------- user functions
def test_plugin_from_a_file_sees_images_in_0_1_and_may_return_a_sequence(plugin):
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    reward = make_reward(f"{plugin}:bright")
    assert isinstance(reward, PluginReward)
    assert torch.equal(reward(images, ["a", "b", "c"]), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(make_reward(f"{plugin}:two")(images, ["a", "b", "c"]),
                       torch.full((3,), 2.0, dtype=torch.float64))


def test_plugin_from_an_importable_module(tmp_path, monkeypatch):
    (tmp_path / "pgraft_test_user_reward.py").write_text(
        "class Scorer:\n    @staticmethod\n    def score(images, prompts):\n        return [len(p) for p in prompts]\n"
        "def score(images, prompts):\n    return [float(len(p)) for p in prompts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.zeros(2, 3, 4, 4)
    assert make_reward("pgraft_test_user_reward:score")(x, ["ab", "abc"]).tolist() == [2.0, 3.0]
    assert make_reward("pgraft_test_user_reward:Scorer.score")(x, ["ab", "abc"]).tolist() == [2.0, 3.0]


def test_plugin_errors_are_clear(plugin, tmp_path):
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "raises.py").write_text("import no_such_dependency_xyz\n")
    cases = [
        ("no_such_module_xyz:fn", r"reward 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz' "
                                  r"\(ModuleNotFoundError"),
        (f"{tmp_path}/broken.py:f", r"importing .*broken\.py failed \(SyntaxError"),
        (f"{tmp_path}/raises.py:f", r"importing .*raises\.py failed \(ModuleNotFoundError: No module named "
                                    r"'no_such_dependency_xyz'\)"),
        (f"{tmp_path}/absent.py:f", r"no file .*absent\.py"),
        (f"{plugin}:nope", r"has no attribute 'nope'"),
        (f"{plugin}:not_callable", r"not_callable is a int, not a callable"),
        ("bad-name:fn", r"is not a module name"),
    ]
    for spec, match in cases:
        with pytest.raises(ValueError, match=match):
            make_reward(spec)
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\) for 2 images; need one score per image"):
        make_reward(f"{plugin}:column")(torch.zeros(2, 3, 4, 4), ["a", "b"])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def untrained_world(tmp_path_factory) -> Path:
    """An embedded-world pipeline with random weights (no pretraining: these tests check plumbing)."""
    from pgraft.apps.t2i.model import build_world_pipeline
    from pgraft.apps.t2i.prompts import load_prompts

    d = tmp_path_factory.mktemp("world")
    build_world_pipeline("tiny", load_prompts("heldout").prompts, d / "tokenizer").save(d / "base")
    return d / "base"


def _graft(**kw):
    from pgraft.core.grs import GRSConfig
    from pgraft.core.trainer import GraftConfig

    base = dict(rounds=2, groups=2, group_size=2, grs=GRSConfig(rule="topk", k=1), split=0.25, train_steps=1,
                batch_size=2, lr=1e-2, lora_rank=0, sample_batch_size=2, seed=0, final_eval=False)
    return GraftConfig(**{**base, **kw})


def test_remote_failure_mid_round_keeps_checkpoints_and_resume_is_bit_for_bit(untrained_world, tmp_path):
    from pgraft.apps.t2i.train import T2IConfig, train_t2i

    calls = {"n": 0, "fail_at": None}

    def flaky(images, prompts):  # a continuous reward that fails on request number `fail_at`
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("server crashed")
        return smooth_reward(images, prompts)

    with serving(make_server(flaky, "127.0.0.1", 0)) as server:
        app = T2IConfig(model=str(untrained_world), prompts="heldout", reward=server.url + "#attempts=1",
                        reward_weights=None, n_steps=3)
        # full fine-tuning (lora_rank=0): LoRA adapters would start from torch's global RNG, which differs
        # between two fresh runs in one process (not between processes, nor on resume: it loads them)
        train_t2i(app, _graft(), tmp_path / "clean", show_progress=False)  # 2 rounds x 2 chunks: 4 requests
        assert calls["n"] == 4
        calls.update(n=0, fail_at=4)  # the second chunk of round 1
        with pytest.raises(RemoteRewardError, match=r"HTTP 500 .*RuntimeError: server crashed \(1 attempt\)"):
            train_t2i(app, _graft(), tmp_path / "flaky", show_progress=False)
        run = tmp_path / "flaky"
        assert json.loads((run / "checkpoints" / "latest.json").read_text()) == {"round": 0}
        assert sorted(p.name for p in (run / "store").glob("*.safetensors")) == ["round_0000.safetensors"]
        assert pd.read_csv(run / "metrics.csv")["round"].tolist() == [0]
        calls.update(fail_at=None)
        train_t2i(app, _graft(), run, resume=True, show_progress=False)
    for name in ("store/round_0000.safetensors", "store/round_0001.safetensors", "store/round_0001.parquet"):
        assert (run / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    clean, resumed = (pd.read_csv(d / "metrics.csv").drop(columns="seconds") for d in (tmp_path / "clean", run))
    pd.testing.assert_frame_equal(resumed, clean)
    a, b = (load_file(str(d / "checkpoints" / "round_0001" / "weights.safetensors")) for d in (tmp_path / "clean", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reward_spec_weighted_components_are_logged_in_metrics(untrained_world, plugin, tmp_path):
    from pgraft.apps.t2i.train import T2IConfig, train_t2i

    app = T2IConfig(model=str(untrained_world), prompts="heldout", reward=f"checker:0.5,{plugin}:bright:2",
                    reward_weights=None, n_steps=3)
    _, table = train_t2i(app, _graft(rounds=1), tmp_path / "run", show_progress=False)
    row = table.iloc[0]
    assert row["reward_mean"] == pytest.approx(0.5 * row["reward_checker_mean"] + 2 * row["reward_plug_bright_mean"])
    assert 0 < row["reward_plug_bright_mean"] < 1
    assert "reward_norm" not in json.loads((tmp_path / "run" / "config.json").read_text())["app"]["t2i"]
    zs = T2IConfig(**{**app.__dict__, "reward_norm": "zscore"})
    _, table = train_t2i(zs, _graft(rounds=1), tmp_path / "zs", show_progress=False)
    assert json.loads((tmp_path / "zs" / "config.json").read_text())["app"]["t2i"]["reward_norm"] == "zscore"
    assert table.iloc[0]["reward_mean"] == pytest.approx(0.0, abs=1e-12)  # z-scores average 0 in every chunk


def test_remote_cli_failure_is_one_line(untrained_world, tmp_path):
    from typer.testing import CliRunner

    from pgraft.cli import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    res = CliRunner().invoke(app, ["t2i", "train", "--out", str(tmp_path / "r"), "--model", str(untrained_world),
                                   "--prompts", "heldout", "--reward", url + "#attempts=1", "--rounds", "1",
                                   "--groups", "2", "--m", "2", "--k", "1", "--train-steps", "1", "--batch-size", "2",
                                   "--n-steps", "3", "--lora", "2", "--quiet"])
    assert res.exit_code == 1, res.output
    assert f"remote reward {url}: connection refused" in res.output
    res = CliRunner().invoke(app, ["t2i", "train", "--out", str(tmp_path / "r2"), "--model", str(untrained_world),
                                   "--reward", "checker", "--reward-norm", "minmax", "--quiet"])
    assert res.exit_code == 2 and "must be raw or zscore" in res.output
