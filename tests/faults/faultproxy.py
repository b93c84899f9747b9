"""A fault-injecting HTTP proxy on loopback, placed in front of a real S3 server.

Clients talk to ``proxy.endpoint_url`` instead of the server's. Every request
is forwarded on its own upstream connection: the proxy adds ``Connection:
close`` to the request head (an unsigned header, so SigV4 signatures stay
valid), which makes each TCP connection carry exactly one request and lets the
proxy decide per request, without parsing bodies, whether to

- pass it through unchanged,
- answer an HTTP error itself (``503 SlowDown`` / ``ServiceUnavailable``),
- delay it (added latency), or
- cut the connection with a TCP reset after N relayed bytes.

Decisions come from one ``random.Random(seed)``, so a run injects a seeded
fraction of faults (which request gets one still depends on thread timing).
Everything injected is counted. Only the standard library is used.

    with FaultProxy(upstream_url) as proxy:
        proxy.set_faults(Faults(status_prob=0.2, seed=1))
        ... use proxy.endpoint_url ...
        proxy.stats()["status_injected"]
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

HEAD_LIMIT = 64 << 10  # a request head larger than this is refused (never seen from S3 clients)
IDLE_LIMIT_S = 30.0  # an exchange where neither side sends anything for this long is dropped

STATUS_BODIES = {
    503: (
        "Service Unavailable",
        "<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
        "<Message>Please reduce your request rate.</Message></Error>",
    ),
    500: (
        "Internal Server Error",
        "<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>InternalError</Code>"
        "<Message>We encountered an internal error. Please try again.</Message></Error>",
    ),
}


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What to inject, per request. All probabilities are in [0, 1].

    ``reset_prob``: cut the connection with a TCP reset once
    ``reset_after_bytes`` bytes of the exchange (request body and response
    together, after the request head) have been relayed; a pair ``(lo, hi)``
    draws the cut point uniformly per faulted request. ``status_prob``: answer
    ``status`` (503 ``SlowDown`` by default) without contacting the server.
    ``latency_s``: wait this long before forwarding every request.
    ``after_requests``: let this many requests through untouched first (counted
    from ``set_faults``), e.g. for storage that fails in the middle of a job.
    """

    reset_prob: float = 0.0
    reset_after_bytes: int | tuple[int, int] = 0
    status_prob: float = 0.0
    status: int = 503
    latency_s: float = 0.0
    after_requests: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("reset_prob", "status_prob"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        if self.reset_prob + self.status_prob > 1:
            raise ValueError("reset_prob + status_prob must be <= 1")
        if self.status not in STATUS_BODIES:
            raise ValueError(f"status must be one of {sorted(STATUS_BODIES)}, got {self.status}")
        lo, hi = self._cut_range()
        if not 0 <= lo <= hi:
            raise ValueError(f"reset_after_bytes must be >= 0 (or lo <= hi), got {lo, hi}")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")
        if self.after_requests < 0:
            raise ValueError(f"after_requests must be >= 0, got {self.after_requests}")

    def _cut_range(self) -> tuple[int, int]:
        r = self.reset_after_bytes
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))


PASS = Faults()

COUNTERS = (
    "connections",
    "requests",
    "reset_injected",
    "status_injected",
    "delayed",
    "bytes_up",
    "bytes_down",
    "upstream_errors",
)


class FaultProxy:
    """A thread-based TCP/HTTP proxy from 127.0.0.1:<free port> to UPSTREAM_URL."""

    def __init__(self, upstream_url: str, faults: Faults = PASS) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._faults = faults
        self._rng = random.Random(faults.seed)
        self._seen = 0  # requests since the faults were set
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.port = 0

    # -- control ----------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_faults(self, faults: Faults) -> None:
        """Inject FAULTS from the next request on (the RNG restarts from its seed)."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)
            self._seen = 0

    def set_upstream(self, upstream_url: str) -> None:
        """Forward new connections to another server (one restarted on a new port)."""
        parts = urlsplit(upstream_url)
        with self._lock:
            self.upstream = (parts.hostname, parts.port)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (requests seen, faults injected, bytes relayed)."""
        with self._lock:
            return dict(self._counts)

    def reset_stats(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(COUNTERS, 0)

    def _add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def start(self) -> FaultProxy:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)  # so the accept loop notices stop()
        self.port = self._listener.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for t in list(self._threads):
            t.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- relaying ---------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._add("connections")
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            t.start()
            # Finished handler threads are dropped so a long run does not keep them all.
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _decide(self) -> tuple[str, int, Faults]:
        with self._lock:
            faults = self._faults
            self._seen += 1
            if self._seen <= faults.after_requests:
                return "pass", 0, PASS
            u = self._rng.random()
            if u < faults.reset_prob:
                lo, hi = faults._cut_range()
                return "reset", self._rng.randint(lo, hi), faults
            if u < faults.reset_prob + faults.status_prob:
                return "status", 0, faults
            return "pass", 0, faults

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(30)
            head, rest = _read_head(client)
            if head is None:
                return
            self._add("requests")
            action, cut, faults = self._decide()
            if faults.latency_s:
                self._add("delayed")
                if self._stopping.wait(faults.latency_s):
                    return
            if action == "status":
                self._add("status_injected")
                _send_status(client, head, faults.status)
                return
            with self._lock:
                target = self.upstream
            try:
                upstream = socket.create_connection(target, timeout=10)
            except OSError:
                # The server is down: the client sees what it would see without
                # the proxy, a connection that closes at once.
                self._add("upstream_errors")
                _reset(client)
                return
            upstream.sendall(_with_connection_close(head))
            self._pump(client, upstream, rest, cut if action == "reset" else None)
        except OSError:
            pass
        finally:
            if upstream is not None:
                upstream.close()
            client.close()

    def _pump(
        self, client: socket.socket, upstream: socket.socket, rest: bytes, cut: int | None
    ) -> None:
        relayed = 0

        def budget(n: int) -> int:
            return n if cut is None else max(0, min(n, cut - relayed))

        pending_up = rest
        open_up = True
        idle_s = 0.0
        while True:
            if cut is not None and relayed >= cut:
                self._add("reset_injected")
                _reset(client)
                return
            if pending_up:
                n = budget(len(pending_up))
                upstream.sendall(pending_up[:n])
                self._add("bytes_up", n)
                relayed += n
                pending_up = pending_up[n:]
                continue
            watch = [upstream] + ([client] if open_up else [])
            readable, _, _ = select.select(watch, [], [], 0.5)
            if not readable:
                idle_s += 0.5
                if idle_s >= IDLE_LIMIT_S or self._stopping.is_set():
                    return  # nothing moves: give up on this exchange
                continue
            idle_s = 0.0
            if client in readable:
                data = client.recv(1 << 16)
                if not data:
                    open_up = False
                    continue
                pending_up = data
            if upstream in readable:
                data = upstream.recv(1 << 16)
                if not data:
                    return  # the server finished its response (Connection: close)
                n = budget(len(data))
                client.sendall(data[:n])
                self._add("bytes_down", n)
                relayed += n


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """The request head (through the blank line) and any body bytes read with it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1 << 16)
        if not data:
            return None, b""
        buf += data
        if len(buf) > HEAD_LIMIT:
            return None, b""
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _with_connection_close(head: bytes) -> bytes:
    lines = head[:-4].split(b"\r\n")
    kept = [ln for ln in lines if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


def _send_status(client: socket.socket, head: bytes, status: int) -> None:
    """Answer STATUS with an S3 error body and close. A request body still on its
    way is left unread: the client either waits for ``100 Continue`` (which never
    comes; it reads this answer instead) or sees the answer when its send fails."""
    reason, body = STATUS_BODIES[status]
    is_head = head.split(b" ", 1)[0].upper() == b"HEAD"
    payload = b"" if is_head else body.encode()
    client.sendall(
        (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body.encode())}\r\nRetry-After: 0\r\nConnection: close\r\n\r\n"
        ).encode()
        + payload
    )
    # Let the client read the answer before the socket goes away.
    client.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 2
    client.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not client.recv(1 << 16):
                break
        except (TimeoutError, OSError):
            break


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
