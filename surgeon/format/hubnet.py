"""A deadline for every Hub request: connect, send and the whole answer, whatever timeout the caller passed.

    from surgeon.format.hubnet import install
    install(5.0)          # every huggingface_hub request of this process, snapshot_download's included

Why not httpx's timeout: huggingface_hub 2.4 sends every request through one shared httpx2.Client, but
passes its own timeout to many of them (snapshot_download -> repo_info(timeout=None), downloads with
HF_HUB_DOWNLOAD_TIMEOUT), which overrides the client's; and httpx's timeouts bound one socket operation
each, so a server that sends one byte every 3 s never trips a 5 s read timeout.

How: `install` gives huggingface_hub a client factory (set_client_factory) whose client sends through
DeadlineTransport, an httpx2 transport over httpcore2's connection pool with a network backend that
wraps the standard socket one. Each request starts a Budget in a context variable of the thread that
sends it (and again around each chunk of its answer that the thread reads), and every socket operation
(TCP connect, TLS handshake, each send, each recv) waits at most the time the budget has left, whatever
timeout it was given. The budget is `seconds` plus one second per 64 KiB the request has moved, so a
large shard at any real speed finishes while a silent or trickling server fails within `seconds`: the
request raises httpx2.ConnectTimeout / WriteTimeout / ReadTimeout, which huggingface_hub handles like any
timeout (some calls retry through http_backoff: each retry is a new request with a new budget).

Proxies from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) are honoured as httpx does,
through the same backend. Not covered: xet transfers (hf_xet has its own client), and HTTP/2 (off in
huggingface_hub's client).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import httpcore2
import httpx2
from huggingface_hub import set_client_factory

from surgeon.errors import UsageError

try:  # huggingface_hub's default client: its event hooks (offline mode, request ids) are kept; no public name in 2.4
    from huggingface_hub.utils._http import default_client_factory
except ImportError:  # pragma: no cover - moved in a later release: a plain client
    default_client_factory = None

MIN_RATE = 64 * 1024  # bytes per second a transfer must average beyond the first `seconds`
WRITE_PIECE = 64 * 1024  # a send is cut into pieces, each bounded by the time left
LONGEST = 1e6  # seconds: the most one socket operation is given (a socket refuses a timeout past time_t)


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)
    moved: int = 0

    def left(self) -> float:
        return self.start + self.seconds + self.moved / MIN_RATE - time.monotonic()


_BUDGET: ContextVar[Budget | None] = ContextVar("surgeon_hub_budget", default=None)


def _bounded(timeout: float | None, exc: type[Exception]) -> float | None:
    """The timeout for one socket operation: the caller's, cut to what the request's budget has left."""
    budget = _BUDGET.get()
    if budget is None:
        return timeout
    left = budget.left()
    if left <= 0:
        raise exc("timed out")  # as the socket says it; hub.py and cause() name the deadline
    return min(LONGEST, left if timeout is None else min(timeout, left))


def _count(n: int) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.moved += n


class _Stream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, _bounded(timeout, httpcore2.ReadTimeout))
        _count(len(data))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        for i in range(0, len(view), WRITE_PIECE):
            piece = view[i : i + WRITE_PIECE]
            self._inner.write(piece, _bounded(timeout, httpcore2.WriteTimeout))
            _count(len(piece))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore2.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore2.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _Backend(httpcore2.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore2.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None) -> httpcore2.NetworkStream:
        t = _bounded(timeout, httpcore2.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, t, local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None) -> httpcore2.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, _bounded(timeout, httpcore2.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


_EXC = [  # most specific first: httpcore2's errors as httpx2's, which huggingface_hub catches and retries
    (httpcore2.ConnectTimeout, httpx2.ConnectTimeout), (httpcore2.ReadTimeout, httpx2.ReadTimeout),
    (httpcore2.WriteTimeout, httpx2.WriteTimeout), (httpcore2.PoolTimeout, httpx2.PoolTimeout),
    (httpcore2.ConnectError, httpx2.ConnectError), (httpcore2.ReadError, httpx2.ReadError),
    (httpcore2.WriteError, httpx2.WriteError), (httpcore2.RemoteProtocolError, httpx2.RemoteProtocolError),
    (httpcore2.LocalProtocolError, httpx2.LocalProtocolError), (httpcore2.UnsupportedProtocol, httpx2.UnsupportedProtocol),
    (httpcore2.ProtocolError, httpx2.ProtocolError), (httpcore2.NetworkError, httpx2.NetworkError),
    (httpcore2.TimeoutException, httpx2.TimeoutException),
]


@contextmanager
def _within(budget: Budget) -> Iterator[None]:
    """Run under `budget`, with httpcore2's errors raised as httpx2's."""
    token = _BUDGET.set(budget)
    try:
        yield
    except Exception as e:
        for src, dst in _EXC:
            if isinstance(e, src):
                raise dst(str(e)) from e
        raise
    finally:
        _BUDGET.reset(token)


class _Body(httpx2.SyncByteStream):
    """The answer's body, read under the request's budget (the reader may be another call, later)."""

    def __init__(self, inner, budget: Budget) -> None:
        self._inner, self._budget = inner, budget

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._inner)
        while True:
            with _within(self._budget):
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        with _within(self._budget):
            if hasattr(self._inner, "close"):
                self._inner.close()


class DeadlineTransport(httpx2.BaseTransport):
    """httpx2's HTTP/1.1 transport, with a budget of `seconds` per request (see the module docstring)."""

    def __init__(self, seconds: float, proxy: httpx2.Proxy | None = None) -> None:
        self.seconds = seconds
        via = None
        if proxy is not None:  # what httpx2.HTTPTransport makes of an HTTP(S)_PROXY / ALL_PROXY
            via = httpcore2.Proxy(url=str(proxy.url), auth=proxy.raw_auth, headers=proxy.headers.raw, ssl_context=proxy.ssl_context)
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(), proxy=via, max_connections=None, keepalive_expiry=5.0, network_backend=_Backend()
        )

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        budget = Budget(self.seconds)
        asked = request.extensions.get("timeout") or {}
        most = min(self.seconds, LONGEST)
        timeouts = {k: most if asked.get(k) is None else min(asked[k], most) for k in ("connect", "read", "write", "pool")}
        req = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions={**request.extensions, "timeout": timeouts},
        )
        with _within(budget):
            resp = self._pool.handle_request(req)
        return httpx2.Response(status_code=resp.status, headers=resp.headers, stream=_Body(resp.stream, budget), extensions=resp.extensions)

    def close(self) -> None:
        self._pool.close()


class DeadlineClient(httpx2.Client):
    """huggingface_hub's client (its event hooks, redirects followed), every request through a
    DeadlineTransport: the direct one and one per proxy the environment names. httpx builds them in
    _init_transport and _init_proxy_transport; passing transport= instead would make it ignore
    the environment's proxies."""

    def __init__(self, seconds: float, event_hooks: dict | None = None) -> None:
        self.seconds = seconds
        super().__init__(event_hooks=event_hooks, follow_redirects=True, timeout=seconds)

    def _init_transport(self, *args, **kwargs) -> httpx2.BaseTransport:
        return DeadlineTransport(self.seconds)

    def _init_proxy_transport(self, proxy: httpx2.Proxy, *args, **kwargs) -> httpx2.BaseTransport:
        return DeadlineTransport(self.seconds, proxy)


def install(seconds: float) -> None:
    """Make every huggingface_hub request of this process carry a deadline of `seconds` (plus transfer time)."""
    global _INSTALLED
    _INSTALLED = seconds
    hooks = _hub_event_hooks()
    set_client_factory(lambda: DeadlineClient(seconds, hooks))  # closes the current shared client; the next call makes one


_INSTALLED: float | None = None


_NETWORK = (httpx2.TransportError, httpcore2.TimeoutException, httpcore2.NetworkError)


def is_network_error(e: BaseException) -> bool:
    return isinstance(e, _NETWORK)


def cause(e: BaseException) -> str:
    """One line naming a network failure (the first one in e's chain of causes), and the deadline when it was one."""
    while e.__cause__ is not None and not isinstance(e, _NETWORK):
        e = e.__cause__
    text = " ".join(f"{type(e).__name__}: {e}".split())
    if isinstance(e, (httpx2.TimeoutException, httpcore2.TimeoutException)) and _INSTALLED is not None:
        text += f"; no complete answer within {_INSTALLED:g} s"
    return text


def _hub_event_hooks() -> dict:
    """The event hooks huggingface_hub's default client carries (offline mode, request ids)."""
    if default_client_factory is None:
        return {}
    base = default_client_factory()
    try:
        return {k: list(v) for k, v in base.event_hooks.items()}
    finally:
        base.close()


TIMEOUT_ENV = "SURGEON_HUB_TIMEOUT"  # seconds any one Hub request may wait for an answer
DEFAULT_TIMEOUT = 60.0


def request_timeout(seconds: float | None = None) -> float:
    """Give every huggingface_hub request of this process a deadline: connect, send and the whole answer
    within `seconds` (plus one second per 64 KiB moved), whatever timeout huggingface_hub passes itself
    (surgeon.format.hubnet says how). Returns the deadline set."""
    import os

    raw = seconds if seconds is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    try:
        t = float(raw)
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set it like {TIMEOUT_ENV}=60.") from None
    if not t > 0:
        raise UsageError(f"the Hub timeout must be a positive number of seconds, not {raw!r}.")
    global _TIMEOUT
    _TIMEOUT = t
    install(t)
    return t


_TIMEOUT = DEFAULT_TIMEOUT


def current_timeout() -> float:
    """The per-request deadline in force (the last one `request_timeout` set)."""
    return _TIMEOUT
