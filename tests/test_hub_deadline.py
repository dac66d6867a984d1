"""Every Hub request has a deadline (issue 27, hangs 13-15): a server that never answers, or answers one
byte at a time, fails the command with one line instead of hanging it.

    PYTHONPATH=$PWD python -m pytest tests/test_hub_deadline.py -q

The server is tests/fake_hub.py on 127.0.0.1 with its `stall` fault. The deadline is 2 s and the bounds
are generous (30 s): these check that the command ends, not how fast. Before surgeon.format.hubnet, each of
these waited until the fake hub gave up its stalled request (60 s) or for ever.
"""

from __future__ import annotations

import time

import httpx2
import pytest
from cliutil import one_error_line, run
from fake_hub import FakeHub
from huggingface_hub import get_session, set_client_factory
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
from huggingface_hub.utils._http import default_client_factory
from test_hub import TOKEN, point_client_at

from surgeon.format.hubnet import install

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT

BOUND = 30.0  # seconds: the deadline (2 s) times the few requests a command makes, plus start-up


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub((TOKEN,)) as h:
        point_client_at(monkeypatch, h.endpoint, tmp_path / "hf_home")
        monkeypatch.setenv("SURGEON_HUB_TIMEOUT", "2")
        disable_progress_bars()  # the upload's bars would share the output with the error line
        yield h
    enable_progress_bars()
    set_client_factory(default_client_factory)  # the next tests get huggingface_hub's own client back


@pytest.fixture(scope="module")
def split_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("deadline") / "sp"
    assert run("split", tiny["tiny-llama"], "--rank", "2", "--out", out, "-q").exit_code == 0
    return out


def timed(*args):
    t0 = time.monotonic()
    r = run(*args)
    return r, time.monotonic() - t0


def test_split_of_a_hub_id_from_a_server_that_never_answers(hub, tmp_path):
    """13: snapshot_download's repo_info passes timeout=None, which overrode the client's timeout."""
    hub.stall("GET", "")
    hub.stall("HEAD", "")
    r, took = timed("split", "someorg/notcached", "--rank", "4", "--out", tmp_path / "o", "-q")
    assert took < BOUND and r.exit_code == 1
    msg = one_error_line(r)
    assert "someorg/notcached is not in the local cache" in msg and "no complete answer within 2 s" in msg and "SURGEON_HUB_TIMEOUT" in msg
    assert hub.requests("GET", "/api/models/someorg/notcached")  # it did ask
    assert not (tmp_path / "o").exists()


def test_push_after_create_repo_answered_and_the_next_request_never_does(hub, split_dir):
    """14: push --timeout 5 hung once create-repo had answered."""
    hub.stall("GET", "/api/models/")
    r, took = timed("push", split_dir, "me/x", "--timeout", "2")
    assert took < BOUND and r.exit_code == 1
    msg = one_error_line(r)
    assert "while reading the repo" in msg and "no answer within 2 s" in msg and "run the same command again" in msg
    assert "me/x" in hub.repos  # create_repo was answered


@pytest.mark.parametrize("method, where, step", [("GET", "/api/models/", "reading the repo"), ("POST", "/commit/", "uploading")])
def test_push_to_a_server_that_trickles_one_byte_a_second(hub, split_dir, method, where, step):
    """15: one byte every second never trips a 2 s read timeout; the deadline is per request."""
    hub.stall(method, where, every=1.0)
    r, took = timed("push", split_dir, "me/trickle", "--timeout", "2")
    assert took < BOUND and r.exit_code == 1
    msg = one_error_line(r)
    assert f"while {step}" in msg and "no answer within 2 s" in msg and "run the same command again" in msg


def test_split_of_a_hub_id_whose_file_list_trickles(hub, tiny, tmp_path):
    files = {p.name: p.read_bytes() for p in tiny["tiny-llama"].iterdir() if p.is_file()}
    hub.seed("org/slow", files)
    hub.stall("GET", "/api/models/org/slow", every=1.0)
    r, took = timed("split", "org/slow", "--rank", "4", "--out", tmp_path / "o", "-q")
    assert took < BOUND and r.exit_code == 1
    assert "no complete answer within 2 s" in one_error_line(r)


def test_the_deadline_binds_a_request_sent_with_timeout_none_but_not_a_large_answer_that_flows(hub):
    """What huggingface_hub does itself (timeout=None) is bounded too; a transfer that keeps moving data
    (here 1 MiB in 128 KiB pieces, 4 a second: about 2 s, past the 1 s deadline) is not cut."""
    data = bytes(range(256)) * 4096  # 1 MiB
    oid = hub.seed("org/big", {"blob.bin": data})
    url = f"{hub.endpoint}/org/big/resolve/{oid}/blob.bin"
    install(1.0)
    hub.stall("GET", "/resolve/", every=1.0, times=1)
    t0 = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        get_session().get(url, timeout=None)
    assert time.monotonic() - t0 < BOUND
    hub.stall("GET", "/resolve/", every=0.25, times=1, piece=128 * 1024)
    t0 = time.monotonic()
    got = get_session().get(url, timeout=None)
    assert got.status_code == 200 and got.content == data
    assert time.monotonic() - t0 > 1.0  # it did outlast the deadline, on the bytes it moved


def test_a_proxy_from_the_environment_is_still_used_and_bounded_too(hub, monkeypatch):
    """HTTP_PROXY: the client sends through the proxy (here the fake hub, a forward proxy for an
    endpoint that resolves nowhere), and a proxy that stops answering meets the same deadline."""
    from huggingface_hub import HfApi

    for k in ("NO_PROXY", "ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(k, raising=False)
        monkeypatch.delenv(k.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", hub.endpoint)
    oid = hub.seed("org/p", {"config.json": b"{}"})
    install(2.0)
    assert HfApi(endpoint="http://hub.invalid").model_info("org/p").sha == oid
    assert "http://hub.invalid/api/models/org/p" in hub.requests("GET")  # the absolute form a proxy receives
    hub.stall("GET", "")
    t0 = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        get_session().get("http://hub.invalid/api/models/org/p", timeout=None)
    assert time.monotonic() - t0 < BOUND


@pytest.mark.parametrize("seconds", [1e300, float("inf")])
def test_a_deadline_too_long_for_a_socket_means_no_deadline_not_a_crash(hub, seconds):
    """socket.settimeout refuses more than time_t holds (OverflowError was a traceback)."""
    oid = hub.seed("org/long", {"config.json": b"{}"})
    install(seconds)
    assert get_session().get(f"{hub.endpoint}/api/models/org/long", timeout=None).json()["sha"] == oid
