"""What one server holds, whatever its clients do (:mod:`service.connections`), on real servers.

Small limits (a cap of 4 connections, 1 s timeouts, a lowered descriptor limit) stand in
for the thousands of sockets they guard against, so each test needs tens of sockets, not
thousands; ``python -m bench.load`` is the full-size run.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from service.connections import HEALTH_RESERVE, RateLimitFilter

from .conftest import Server

CAP = 4


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def request(path: str, close: bool = False) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, lower-case headers, body) read off ``sock``; its body by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_after(sock: socket.socket, timeout: float = 30) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock``, and what it sent until then."""
    sock.settimeout(timeout)
    t0, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return time.monotonic() - t0, data


def server_fds(server: Server) -> int:
    return int(psutil.Process(server.pid).num_fds())


def resting_fds(server: Server) -> int:
    """The server's descriptor count at rest: the least over 1.5 s (its job worker opens a directory every second)."""
    samples = []
    for _ in range(30):
        samples.append(server_fds(server))
        time.sleep(0.05)
    return min(samples)


def wait_for_fds(server: Server, expected: int, timeout: float = 15) -> int:
    """Poll the server's descriptor count until it is ``expected`` (or ``timeout`` passes); return it."""
    end = time.monotonic() + timeout
    while (n := server_fds(server)) != expected and time.monotonic() < end:
        time.sleep(0.05)
    return n


def assert_json_detail(headers: dict[str, str], body: bytes) -> str:
    assert headers["content-type"] == "application/json", headers
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and detail
    return detail


@pytest.fixture(scope="module")
def capped(launch: Callable[..., Server], small_checkpoint: Path) -> Server:
    return launch(small_checkpoint, max_connections=str(CAP), header_timeout_s="60", keepalive_timeout_s="60")


@pytest.fixture(scope="module")
def quick(launch: Callable[..., Server], small_checkpoint: Path) -> Server:
    """Default cap, 1 s header and keep-alive timeouts."""
    return launch(small_checkpoint, header_timeout_s="1", keepalive_timeout_s="1")


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def test_connections_past_the_cap_get_an_immediate_json_503_and_healthz_still_answers(
    capped: Server, sockets: list[socket.socket]
) -> None:
    base = resting_fds(capped)
    sockets += [connect(capped) for _ in range(CAP)]  # idle: the cap is full
    assert wait_for_fds(capped, base + CAP) == base + CAP

    # the health reserve: a probe gets through, any other route is refused in JSON
    probe = connect(capped)
    probe.sendall(request("/healthz", close=True))
    status, _, body = read_response(probe)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    probe.close()
    other = connect(capped)
    other.sendall(request("/model", close=True))
    status, headers, body = read_response(other)
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert "UNET_MAX_CONNECTIONS" in assert_json_detail(headers, body)
    other.close()

    # fill the reserve with kept-alive probes; past it, the answer comes before a byte is sent
    assert wait_for_fds(capped, base + CAP) == base + CAP
    for _ in range(HEALTH_RESERVE):
        s = connect(capped)
        sockets.append(s)
        s.sendall(request("/readyz"))
        assert read_response(s)[0] == 200
    late = connect(capped)
    sockets.append(late)
    seconds, data = closed_after(late, timeout=10)
    status, headers, body = read_response_bytes(data)
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert "at most 4" in assert_json_detail(headers, body)
    assert seconds < 10

    # a probe on a kept-alive connection inside the cap answers all along; once they go, all is back
    sockets[0].sendall(request("/healthz"))
    assert read_response(sockets[0])[0] == 200
    for s in sockets:
        s.close()
    sockets.clear()
    assert wait_for_fds(capped, base) == base
    assert capped.get("/model").status_code == 200


def read_response_bytes(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body[: int(headers["content-length"])]


@pytest.mark.parametrize("after_a_response", [False, True], ids=["fresh", "after-a-response"])
def test_a_connection_trickling_its_request_head_is_closed_after_the_header_timeout(
    quick: Server, sockets: list[socket.socket], after_a_response: bool
) -> None:
    s = connect(quick)
    sockets.append(s)
    if after_a_response:
        s.sendall(request("/healthz"))
        assert read_response(s)[0] == 200
    s.settimeout(0.2)
    t0, data = time.monotonic(), b""
    trickle = iter(request("/healthz").replace(b"\r\nHost: x", b"\r\nHost: x" + b"\r\nX-Slow: 1" * 500))
    while time.monotonic() - t0 < 20:  # one byte every 0.2 s: the head would take minutes
        try:
            s.send(bytes([next(trickle)]))
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    seconds = time.monotonic() - t0
    assert 0.9 < seconds < 10, seconds
    status, headers, body = read_response_bytes(data)
    assert status == 408
    assert "UNET_HEADER_TIMEOUT_S" in assert_json_detail(headers, body)


def test_an_idle_connection_is_closed_after_its_timeout_without_a_response(
    quick: Server, sockets: list[socket.socket]
) -> None:
    silent = connect(quick)  # never sends a byte: closed by the header timeout
    sockets.append(silent)
    seconds, data = closed_after(silent)
    assert data == b"" and 0.9 < seconds < 10, (seconds, data)

    kept = connect(quick)  # one response, then idle: closed by the keep-alive timeout
    sockets.append(kept)
    kept.sendall(request("/healthz"))
    assert read_response(kept)[0] == 200
    seconds, data = closed_after(kept)
    assert data == b"" and 0.9 < seconds < 10, (seconds, data)


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n", 431, "larger than"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431, "larger than"),
        (b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\nabc", 400, "Content-Length"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "invalid HTTP request"),
    ],
    ids=["1MB-header", "20kB-header-in-one-read", "bad-content-length", "malformed-header"],
)
def test_requests_uvicorn_refuses_get_a_json_4xx(
    quick: Server, sockets: list[socket.socket], raw: bytes, status: int, says: str
) -> None:
    s = connect(quick)
    sockets.append(s)
    s.sendall(raw)  # the whole request is read (and dropped) after the answer: no reset loses it
    got, headers, body = read_response(s)
    assert got == status
    assert says in assert_json_detail(headers, body)
    assert headers["connection"] == "close"
    assert closed_after(s)[1] == b""


def test_a_body_that_arrives_with_its_head_does_not_count_as_head(quick: Server, sockets: list[socket.socket]) -> None:
    body = b"x" * 100_000  # not a TIFF: the app's own 415, not a 431 for the head
    s = connect(quick)
    sockets.append(s)
    s.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    got, headers, body_out = read_response(s)
    assert got == 415, body_out
    assert "not a TIFF" in assert_json_detail(headers, body_out)


def test_server_descriptors_return_to_their_starting_level_after_many_connections(
    quick: Server, sockets: list[socket.socket]
) -> None:
    assert quick.get("/healthz").status_code == 200
    base = resting_fds(quick)
    for i in range(300):
        s = connect(quick)
        sockets.append(s)
        if i % 3 == 0:
            s.sendall(request("/healthz"))
        elif i % 3 == 1:
            s.sendall(b"GET /heal")  # half a head
    for s in sockets[::3]:
        assert read_response(s)[0] == 200
    assert server_fds(quick) > base
    for s in sockets:
        s.close()
    assert wait_for_fds(quick, base) == base


def test_out_of_descriptors_healthz_recovers_without_waiting_for_timeouts_and_the_log_stays_small(
    launch: Callable[..., Server], small_checkpoint: Path, sockets: list[socket.socket]
) -> None:
    # a cap the process cannot reach: the descriptor limit is lowered after the start
    server = launch(small_checkpoint, header_timeout_s="60", keepalive_timeout_s="60")
    proc = psutil.Process(server.pid)
    limit = server_fds(server) + 100
    proc.rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
    log_size = server.log.stat().st_size
    start = time.monotonic()
    for _ in range(4 * limit):  # without waiting for them to be accepted
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", server.port))
        sockets.append(s)
    time.sleep(0.5)  # the server runs out of descriptors

    t0 = time.monotonic()
    r = httpx.get(server.url + "/healthz", timeout=45)
    seconds = time.monotonic() - t0
    assert r.status_code == 200
    assert seconds < 30, seconds  # idle connections were closed, not left to their 60 s timeout
    for s in sockets:
        s.close()
    sockets.clear()
    time.sleep(1)
    assert server.get("/readyz").status_code == 200

    grown = server.log.stat().st_size - log_size
    text = server.log_text()
    assert grown < 64 * 1024, grown  # uvicorn alone: a traceback for each of thousands of retries
    logged = text.count("socket.accept() out of system resource")
    assert 1 <= logged <= 2 + (time.monotonic() - start) / 10, logged  # one line per 10 s
    assert "Too many open files" in text


def test_rate_limit_filter_lets_one_record_per_kind_and_interval_through_and_counts_the_rest() -> None:
    limiter = RateLimitFilter(["socket.accept() out of system resource"], interval_s=3600)
    try:
        raise OSError(24, "Too many open files")
    except OSError as e:
        error = e

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, (), (OSError, error, None))

    first = record("socket.accept() out of system resource\nsocket: <fd=7>")
    assert limiter.filter(first)
    assert first.getMessage() == "socket.accept() out of system resource: [Errno 24] Too many open files"
    assert first.exc_info is None  # one line, no traceback
    assert not any(limiter.filter(record("socket.accept() out of system resource")) for _ in range(1000))
    other = record("something else")
    assert limiter.filter(other) and other.exc_info is not None  # other records pass untouched

    limiter.interval_s = 0
    later = record("socket.accept() out of system resource")
    assert limiter.filter(later)
    assert "(1000 more like it" in later.getMessage()


GC_PROBE = """
import asyncio, gc, json, socket, sys
import uvicorn
from service.connections import ConnectionLimits, protocol_class

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

SENDS = (b"", b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n", b"GET / HT", b"bad request\\r\\n\\r\\n")

async def round_of(server, port, send, n):
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for s in socks:
        s.sendall(send)
    while len(server.server_state.connections) < n:
        await asyncio.sleep(0.01)
    while server.server_state.connections:  # closed by the server (timeouts, a 4xx) ...
        await asyncio.sleep(0.05)
    for s in socks:
        s.close()

async def main(port):
    limits = ConnectionLimits(max_connections=500, header_timeout_s=0.3, keepalive_timeout_s=0.3, retry_after_s=1)
    config = uvicorn.Config(app, port=port, http=protocol_class(limits), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    for send in SENDS:  # warm up: first-use caches (imports, loggers) are not per-connection garbage
        await round_of(server, port, send, 1)
    garbage = []
    for send in SENDS:
        gc.collect()
        await round_of(server, port, send, 50)
        garbage.append(gc.collect())
    server.should_exit = True
    await serving
    return garbage

gc.disable()
print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
"""


def test_closed_connections_are_freed_at_once_not_left_to_the_cyclic_collector() -> None:
    """No reference cycle per connection: thousands of them would make each full collection a stall.

    Measured in a fresh interpreter with the collector off: threads that earlier tests leave
    in this process (zarr's loop, distributed's offload thread, tqdm's monitor) make garbage
    of their own, which is not what is measured here.
    """
    import subprocess
    import sys

    from .conftest import free_port

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", GC_PROBE, str(free_port())],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 0, 0, 0]  # 50 connections of each kind
