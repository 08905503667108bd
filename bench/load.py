"""Connections under load, on one live server on 127.0.0.1: ``python -m bench.load``.

For ``--ramp-s`` and then ``--seconds``, at once:

* ``--idle`` connections that never send a request (the first ``--slowloris`` of them
  trickle one header byte a second), opened at a steady pace over ``--ramp-s``; each one
  the server closes is opened again, so the server holds that many all along (the count
  never exceeds ``--idle``);
* ``--clients`` threads posting a small TIFF (``--size`` pixels square) to ``/segment``
  back to back on kept-alive connections;
* a probe of ``/healthz`` on a new connection every 0.2 s, as a load balancer would.

Then everything is closed and the server's descriptors and RSS are read again. Reported
(and written to ``--json``): /healthz latency (p50/p99/max), counts per status for each
kind of client, the server's descriptors and RSS before, at peak and after. The exit code
is 0 when every probe answered 200 within ``--healthz-budget-ms``, no client got a 5xx or
an error, and the descriptors came back to where they started; 1 otherwise.

Loopback only, bounded in sockets and time: it stops by itself. The server is started with
``UNET_QUEUE_SIZE`` = ``--clients`` (every posting client may wait its turn: what is
measured is connections, not admission) unless ``--url`` names a running one (``--pid``
then gives its process for the descriptor and RSS figures).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import multiprocessing
import os
import platform
import resource
import selectors
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tifffile

from .serving import running_server

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROBE_EVERY_S = 0.2
PROBE_TIMEOUT_S = 5.0
SLOWLORIS_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 100_000  # never ends in time


# --- the server ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, int]]:
    """``unet-tile serve`` on a free port of 127.0.0.1; yields (url, pid)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNET_")}
    env.update(
        UNET_HOST="127.0.0.1",
        UNET_PORT=str(port),
        UNET_QUEUE_SIZE=str(args.clients),
        UNET_LOG_LEVEL="warning",
        UNET_JOBS_DIR=str(workdir / "jobs"),
        PYTHONUNBUFFERED="1",
    )
    if args.checkpoint is not None:
        env["UNET_CHECKPOINT"] = str(args.checkpoint)
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    log_path = workdir / "server.log"
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    try:
        with running_server(cmd, port, log_path, env=env, cwd=ROOT) as (url, proc):
            yield url, proc.pid
    finally:
        args.server_log_tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""


def _get(url: str, path: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int | str, float]:
    """(status or error name, seconds) of a GET on a new connection."""
    parts = urllib.parse.urlsplit(url)
    t0 = time.perf_counter()
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0
    except OSError as e:
        return type(e).__name__, time.perf_counter() - t0
    finally:
        conn.close()


# --- what the server holds ------------------------------------------------------------------


@dataclass
class Usage:
    """The server process's descriptors and RSS, sampled."""

    pid: int | None
    peak_fds: int = 0
    peak_rss: int = 0

    def now(self) -> tuple[int, int] | None:
        if self.pid is None:
            return None
        try:
            p = psutil.Process(self.pid)
            fds, rss = p.num_fds(), p.memory_info().rss
        except psutil.Error:
            return None
        self.peak_fds, self.peak_rss = max(self.peak_fds, fds), max(self.peak_rss, rss)
        return fds, rss

    def resting(self, seconds: float = 1.5) -> tuple[int, int] | None:
        """The least over ``seconds``: the job worker opens a directory now and then."""
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if (s := self.now()) is not None:
                samples.append(s)
            time.sleep(0.05)
        return (min(f for f, _ in samples), min(r for _, r in samples)) if samples else None


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Idle:
    """``count`` connections that send nothing (or trickle), reopened when the server closes them."""

    host: str
    port: int
    count: int
    slowloris: int
    ramp_s: float
    stop: threading.Event
    opened: int = 0
    closed_by_server: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    responses: Counter[str] = field(default_factory=Counter)  # status lines the server sent them

    def run(self, ready: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        trickle: dict[socket.socket, int] = {}  # slowloris sockets -> bytes of the head sent
        try:
            t0 = time.monotonic()
            for i in range(self.count):  # at a steady pace over ramp_s, as clients arrive
                self._open(sel, trickle, slow=i < self.slowloris)
                if (ahead := t0 + self.ramp_s * (i + 1) / self.count - time.monotonic()) > 0:
                    time.sleep(ahead)
            ready.set()
            next_byte = time.monotonic() + 1
            while not self.stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if data.startswith(b"HTTP/1.1 "):
                        self.responses[data.split(b" ", 2)[1].decode()] += 1
                    if data:
                        continue  # the close follows
                    self.closed_by_server += 1
                    slow = trickle.pop(sock, None) is not None
                    sel.unregister(sock)
                    sock.close()
                    self._open(sel, trickle, slow=slow)
                if time.monotonic() >= next_byte:
                    next_byte += 1
                    for sock, sent in list(trickle.items()):
                        with contextlib.suppress(OSError):
                            sock.send(SLOWLORIS_HEAD[sent : sent + 1])
                            trickle[sock] = sent + 1
        finally:
            ready.set()
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()

    def _open(self, sel: selectors.BaseSelector, trickle: dict[socket.socket, int], slow: bool) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=10)
        except OSError as e:
            self.connect_errors[type(e).__name__] += 1
            time.sleep(0.01)
            return
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        self.opened += 1
        if slow:
            trickle[sock] = 0


@dataclass
class Poster:
    """One client posting the TIFF back to back on a kept-alive connection."""

    host: str
    port: int
    body: bytes
    stop: threading.Event
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)

    def run(self) -> None:
        conn: HTTPConnection | None = None
        while not self.stop.is_set():
            if conn is None:
                conn = HTTPConnection(self.host, self.port, timeout=300)
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/segment", body=self.body, headers={"content-type": "image/tiff"})
                response = conn.getresponse()
                response.read()
            except OSError as e:
                self.statuses[type(e).__name__] += 1
                conn.close()
                conn = None
                continue
            self.statuses[str(response.status)] += 1
            self.seconds.append(time.perf_counter() - t0)
            if response.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def _probe(url: str, start: Any, stop: Any, results: Any) -> None:
    """``/healthz`` on a new connection every 0.2 s from ``start`` to ``stop``; sends [(t, status, ms)].

    Runs in a process of its own, so that the load's threads in this one (GIL) do not
    delay it: what it measures is the server.
    """
    start.wait()
    t0 = next_probe = time.monotonic()
    probes = []
    while not stop.is_set():
        status, seconds = _get(url, "/healthz")
        probes.append((round(time.monotonic() - t0, 2), str(status), 1000 * seconds))
        next_probe += PROBE_EVERY_S
        stop.wait(max(0.0, next_probe - time.monotonic()))
    results.send(probes)


def _sample(usage: Usage, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        usage.now()


# --- the run ------------------------------------------------------------------------------------


def _raise_own_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed <= hard or (hard == resource.RLIM_INFINITY and soft < needed):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


def _tiff(size: int) -> bytes:
    buf = io.BytesIO()  # the content does not change the work: every image of a size has the same tiles
    tifffile.imwrite(buf, np.random.default_rng(0).integers(0, 4096, (size, size), dtype=np.uint16))
    return buf.getvalue()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def run(args: argparse.Namespace, url: str, pid: int | None) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", int(parts.port or 80)
    body = _tiff(args.size)
    usage = Usage(pid)
    # warm up: the first requests allocate what every later one reuses
    for _ in range(2):
        conn = HTTPConnection(host, port, timeout=300)
        conn.request("POST", "/segment", body=body, headers={"content-type": "image/tiff"})
        conn.getresponse().read()
        conn.close()
    before = usage.resting()

    # the probe first (in its own process), then the idle connections, then the posting clients
    mp = multiprocessing.get_context("spawn")
    probe_start, probe_stop = mp.Event(), mp.Event()
    probe_results, probe_sender = mp.Pipe(duplex=False)
    probe = mp.Process(target=_probe, args=(url, probe_start, probe_stop, probe_sender), daemon=True)
    probe.start()
    stop = threading.Event()
    idle = Idle(host, port, args.idle, min(args.slowloris, args.idle), args.ramp_s, stop)
    posters = [Poster(host, port, body, stop) for _ in range(args.clients)]
    ready = threading.Event()
    threads = [threading.Thread(target=_sample, args=(usage, stop), name="sample", daemon=True)]
    threads.append(threading.Thread(target=idle.run, args=(ready,), name="idle", daemon=True))
    threads += [threading.Thread(target=p.run, name=f"post-{i}", daemon=True) for i, p in enumerate(posters)]
    probe_start.set()
    t_open = time.monotonic()
    for t in threads:
        t.start()
    ready.wait()
    open_s = time.monotonic() - t_open
    time.sleep(args.seconds)
    held = usage.now()
    stop.set()
    probe_stop.set()
    probes: list[tuple[float, str, float]] = probe_results.recv() if probe_results.poll(30) else []
    probe.join(10)
    for t in threads:
        t.join(timeout=320)  # a poster finishes its request (the server's time limit is 300 s)

    # back to rest: the server closes its side as soon as it sees ours close
    end = time.monotonic() + 30
    after = usage.resting(0.5)
    while before is not None and after is not None and after[0] > before[0] and time.monotonic() < end:
        after = usage.resting(0.5)
    client_statuses = sum((p.statuses for p in posters), Counter[str]())
    client_seconds = [s for p in posters for s in p.seconds]
    probe_ms = [ms for _, _, ms in probes]
    result: dict[str, Any] = {
        "healthz": {
            "probes": len(probe_ms),
            "statuses": dict(Counter(status for _, status, _ in probes)),
            "p50_ms": _round(_percentile(probe_ms, 50)),
            "p99_ms": _round(_percentile(probe_ms, 99)),
            "max_ms": _round(max(probe_ms, default=None)),
            "over_budget": sum(ms > args.healthz_budget_ms for ms in probe_ms),
            "slowest": [[t, status, round(ms, 1)] for t, status, ms in sorted(probes, key=lambda p: -p[2])[:10]],
        },
        "clients": {
            "requests": sum(client_statuses.values()),
            "statuses": dict(client_statuses),
            "p50_s": _round(_percentile(client_seconds, 50), 3),
            "max_s": _round(max(client_seconds, default=None), 3),
        },
        "idle": {
            "held": args.idle,
            "slowloris": idle.slowloris,
            "opened_s": round(open_s, 2),
            "opened": idle.opened,
            "closed_by_server": idle.closed_by_server,
            "responses": dict(idle.responses),
            "connect_errors": dict(idle.connect_errors),
        },
        "server": {
            "pid": pid,
            "fds_before": before and before[0],
            "fds_under_load": held and held[0],
            "fds_peak": usage.peak_fds or None,
            "fds_after": after and after[0],
            "rss_before_mb": _mb(before and before[1]),
            "rss_peak_mb": _mb(usage.peak_rss or None),
            "rss_after_mb": _mb(after and after[1]),
        },
    }
    result["checks"] = _checks(args, result)
    return result


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _checks(args: argparse.Namespace, r: dict[str, Any]) -> dict[str, bool]:
    health, clients, server = r["healthz"], r["clients"], r["server"]
    checks = {
        f"every /healthz probe 200 within {args.healthz_budget_ms:g} ms": health["probes"] > 0
        and health["statuses"] == {"200": health["probes"]}
        and health["over_budget"] == 0,
        "no 5xx or error for the posting clients": clients["requests"] > 0
        and all(s.isdigit() and int(s) < 500 for s in clients["statuses"]),
    }
    if server["fds_before"] is not None and server["fds_after"] is not None:
        checks["server descriptors back to their starting level"] = server["fds_after"] <= server["fds_before"]
    return checks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=int, default=5000, help="idle connections held all along (default 5000)")
    p.add_argument("--ramp-s", type=float, default=5.0, help="the idle connections open over this (default 5 s)")
    p.add_argument("--slowloris", type=int, default=0, help="of those, how many trickle one header byte a second")
    p.add_argument("--clients", type=int, default=50, help="threads posting the TIFF back to back (default 50)")
    p.add_argument("--seconds", type=float, default=60, help="how long the load lasts (default 60)")
    p.add_argument("--size", type=int, default=128, help="side of the square TIFF posted, pixels (default 128)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to serve (default: the demo model)")
    p.add_argument("--url", default=None, help="a running server on the loopback instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="with --url: its process, for descriptors and RSS")
    p.add_argument("--server-env", action="append", default=[], metavar="UNET_X=V", help="extra server setting")
    p.add_argument("--healthz-budget-ms", type=float, default=100.0, help="most a probe may take (default 100)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "load.json", help="report file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (0 <= args.idle <= 20000 and 1 <= args.clients <= 500 and 0 < args.seconds <= 600):
        print("bench.load: error: expected --idle 0..20000, --clients 1..500, --seconds up to 600", file=sys.stderr)
        return 2
    if args.url is not None and urllib.parse.urlsplit(args.url).hostname not in LOOPBACK:
        print(f"bench.load: error: loopback only, got --url {args.url}", file=sys.stderr)
        return 2
    needed = args.idle + args.clients + 256
    if (limit := _raise_own_limit(needed)) < needed:
        print(f"bench.load: error: {needed} descriptors needed, RLIMIT_NOFILE allows {limit}", file=sys.stderr)
        return 2
    args.server_log_tail = ""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="unet-load-") as tmp:
        if args.url is not None:
            result = run(args, args.url.rstrip("/"), args.pid)
        else:
            with _server(args, Path(tmp)) as (url, pid):
                result = run(args, url, pid)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "wall_s": round(time.monotonic() - started, 1),
        **result,
        "server_log_tail": args.server_log_tail,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    h, c, i, s = result["healthz"], result["clients"], result["idle"], result["server"]
    print(
        f"| /healthz | {h['probes']} probes {h['statuses']} | p50 {h['p50_ms']} ms | p99 {h['p99_ms']} ms |"
        f" max {h['max_ms']} ms |"
    )
    print(f"| clients | {c['requests']} requests {c['statuses']} | p50 {c['p50_s']} s | max {c['max_s']} s |")
    print(
        f"| idle | {i['held']} held, {i['opened']} opened, {i['closed_by_server']} closed by the server |"
        f" responses {i['responses']} | connect errors {i['connect_errors']} |"
    )
    print(
        f"| server fds | before {s['fds_before']} | under load {s['fds_under_load']} | peak {s['fds_peak']} |"
        f" after {s['fds_after']} |"
    )
    print(f"| server RSS MB | before {s['rss_before_mb']} | peak {s['rss_peak_mb']} | after {s['rss_after_mb']} |")
    for name, ok in result["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"report: {args.json}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
