"""A lean I/O loop driving proton's engine directly: sockets, transports, timers, wake-ups.

Proton's Python ``Container`` wraps every engine event in Python objects and walks
a chain of handlers for each; at a few thousand messages a second that machinery
costs more than the agent's own work. This loop instead polls sockets, feeds the
transports, and asks the application to look at a connection's endpoints and its
work list (deliveries with something to do) once per read. Everything here runs
on one thread, the reactor thread; ``call_soon_threadsafe`` is the only entry
from other threads.
"""
from __future__ import annotations

import collections
import errno
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from proton import SSL, Connection, SSLDomain, Transport

from busagent.bus.tls import client_mechanisms

log = structlog.get_logger("busagent.bus")
READ_CHUNK = 1 << 16
# Bytes taken from one socket before the application looks at its connection again. Proton
# keeps a settled delivery's buffer, at the largest size it reached, for reuse within the
# connection: letting whole big messages pile up in deliveries between two looks would pin
# that much memory per delivery for the connection's life. The application reads what has
# come of a message each time (busagent.bus.server), so a delivery holds at most this much.
READ_BUDGET = 1 << 17
CONNECT_TIMEOUT = 5.0  # seconds for a TCP connect to a broker before the next URL is tried


@dataclass(eq=False)
class Link:
    """One socket bound to one proton transport and connection."""

    connection: Connection
    transport: Transport | None = None
    sock: socket.socket | None = None
    server: bool = False
    url: str | None = None  # client connections: the URL connected to
    urls: tuple[str, ...] = ()
    attempt: int = 0
    factory: Callable[[], Connection] | None = None  # client connections: a fresh Connection per attempt
    backoff_cap: float = 10.0
    connected: bool = False
    closing: bool = False
    tick_deadline: float = 0.0
    app: dict[str, Any] = field(default_factory=dict)  # the application's per-connection state


class Application:
    """What the loop calls back (all on the reactor thread)."""

    def configure_server_transport(self, transport: Transport, conn: Connection) -> None: ...
    def process(self, link: Link) -> None: ...
    def connection_lost(self, link: Link, reason: str) -> None: ...
    def connected(self, link: Link) -> None: ...


class _Dialing:
    """Selector tag of a client socket whose non-blocking connect is under way."""

    __slots__ = ("link", "sock", "host")

    def __init__(self, link: Link, sock: socket.socket, host: str) -> None:
        self.link, self.sock, self.host = link, sock, host


def parse_url(url: str) -> tuple[str, str, int, str | None, str | None]:
    """``amqp[s]://[user:pass@]host[:port]`` -> (scheme, host, port, user, password)."""
    parts = urlsplit(url if "://" in url else f"amqp://{url}")
    scheme = parts.scheme or "amqp"
    port = parts.port or (5671 if scheme == "amqps" else 5672)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return scheme, parts.hostname or "127.0.0.1", port, user, password


def backoff(initial: float = 0.2, factor: float = 2.0, cap: float = 10.0) -> Iterator[float]:
    """Delays between reconnection attempts: 0, initial, doubled up to ``cap``."""
    yield 0.0
    delay = initial
    while True:
        yield delay
        delay = min(cap, delay * factor)


class Engine:
    """The reactor: one thread, every proton object of the agent lives here."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.sel = selectors.DefaultSelector()
        self.links: dict[int, Link] = {}
        self.listeners: dict[int, socket.socket] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._stopping = False
        self._dialing: set[_Dialing] = set()
        self.thread: threading.Thread | None = None
        self.ssl_client: SSLDomain | None = None  # amqps:// URLs (built by busagent.bus.tls)
        self.ssl_server: SSLDomain | None = None  # the listener serves TLS only when set
        self.client_certificate = False  # ssl_client presents a certificate (SASL EXTERNAL possible)
        self.credentials: Any = None  # (user, Secret) for SASL PLAIN when the URL names no user

    # -- cross-thread --------------------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the reactor thread soon (any thread)."""
        self._calls.append(fn)
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``delay`` seconds (reactor thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_ids), fn))

    # -- sockets -------------------------------------------------------------------------
    def listen(self, host: str, port: int) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        self.listeners[sock.fileno()] = sock
        self.sel.register(sock, selectors.EVENT_READ, "listen")
        return sock.getsockname()[:2]

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the others
                log.warning("accept failed", error=str(exc))
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection()
            transport = Transport(Transport.SERVER)
            if self.ssl_server is not None:
                SSL(transport, self.ssl_server)
            link = Link(conn, transport, sock, server=True, connected=True)
            self.app.configure_server_transport(transport, conn)
            transport.bind(conn)
            self._register(link)

    def connect(self, factory: Callable[[], Connection], urls: tuple[str, ...], backoff_cap: float = 10.0) -> Link:
        """Open a client connection with reconnection over ``urls`` (failover, capped backoff).

        ``factory`` makes the (opened) Connection for each attempt: a reconnection starts from
        a fresh one, so that nothing of the lost one (sessions, links, deliveries) is attached
        or sent again behind the application's back. ``link.connection`` is the current one.
        """
        link = Link(None, urls=urls, factory=factory, backoff_cap=backoff_cap)
        link.app["backoff"] = backoff(cap=backoff_cap)
        self._dial(link)
        return link

    def reset_backoff(self, link: Link) -> None:
        """The connection is up (the peer answered): the next loss starts the delays afresh."""
        link.app["backoff"] = backoff(cap=link.backoff_cap)

    def _dial(self, link: Link) -> None:
        """Start a non-blocking connect to the next URL (a dead or black-holed one never stalls the loop)."""
        if self._stopping or link.closing:
            return
        url = link.urls[link.attempt % len(link.urls)]
        link.attempt += 1
        link.url = url
        _scheme, host, port, _user, _password = parse_url(url)
        sock = None
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            err = sock.connect_ex(address)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._retry(link, f"connect to {host}:{port} failed: {exc}")
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry(link, f"connect to {host}:{port} failed: {os.strerror(err)}")
            return
        dialing = _Dialing(link, sock, host)
        self._dialing.add(dialing)
        self.sel.register(sock, selectors.EVENT_WRITE, dialing)
        self.call_later(CONNECT_TIMEOUT, lambda: self._dial_timeout(dialing))

    def _dial_timeout(self, dialing: _Dialing) -> None:
        if dialing in self._dialing:
            self._dial_failed(dialing, f"connect timed out after {CONNECT_TIMEOUT:g} s")

    def _dial_failed(self, dialing: _Dialing, reason: str) -> None:
        self._dialing.discard(dialing)
        self.sel.unregister(dialing.sock)
        dialing.sock.close()
        self._retry(dialing.link, reason)

    def _dialed(self, dialing: _Dialing) -> None:
        """The socket is writable: connected (or refused)."""
        err = dialing.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._dial_failed(dialing, f"connect to {_redact(dialing.link.url)} failed: {os.strerror(err)}")
            return
        self._dialing.discard(dialing)
        self.sel.unregister(dialing.sock)
        link, sock = dialing.link, dialing.sock
        if self._stopping or link.closing:
            sock.close()
            return
        scheme, host, _port, user, password = parse_url(link.url)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = Transport()
        if scheme == "amqps":
            domain = self.ssl_client or SSLDomain(SSLDomain.MODE_CLIENT)
            SSL(transport, domain).peer_hostname = host
        sasl = transport.sasl()
        conn = link.factory()
        conn.hostname = host
        if user is None and self.credentials is not None:
            user, password = self.credentials[0], self.credentials[1].reveal()
        mechs = client_mechanisms(user, scheme == "amqps" and self.client_certificate)
        sasl.allowed_mechs(mechs)  # only this one: configured credentials never fall back to ANONYMOUS
        if user is not None:
            conn.user, conn.password = user, password or ""
            sasl.allow_insecure_mechs = scheme != "amqps"  # PLAIN in clear only where the URL asks for it
        transport.bind(conn)
        link.connection, link.transport, link.sock, link.connected = conn, transport, sock, True
        link.app["work"] = True
        self._register(link)
        self.app.connected(link)

    def _retry(self, link: Link, reason: str) -> None:
        delay = next(link.app["backoff"])
        log.warning("bus connection lost", url=_redact(link.url), reason=reason, retry_in=delay)
        self.call_later(delay, lambda: self._dial(link))

    def _register(self, link: Link) -> None:
        fd = link.sock.fileno()
        self.links[fd] = link
        self.sel.register(link.sock, selectors.EVENT_READ, link)

    def close_link(self, link: Link) -> None:
        """Close a client connection for good (no reconnection)."""
        link.closing = True
        if link.connection is not None and link.connection.state & 2:  # LOCAL_ACTIVE
            link.connection.close()

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        self.thread = threading.current_thread()
        while not self._stopping or self._has_output():
            self._run_due_timers()
            self._run_calls()
            for link in list(self.links.values()):
                self._service(link)
            timeout = self._timeout()
            for key, mask in self.sel.select(timeout):
                tag = key.data
                if tag == "wake":
                    self._drain_wake()
                elif tag == "listen":
                    self._accept(key.fileobj)
                elif tag.__class__ is _Dialing:
                    self._dialed(tag)
                else:
                    if mask & selectors.EVENT_READ:
                        self._read(tag)
                    if mask & selectors.EVENT_WRITE:
                        self._write(tag)
            if self._stopping and time.monotonic() > self._stop_deadline:
                break
        for link in list(self.links.values()):
            self._drop(link, "agent stopping")
        for dialing in list(self._dialing):
            self.sel.unregister(dialing.sock)
            dialing.sock.close()
        self._dialing.clear()
        for sock in self.listeners.values():
            sock.close()
        self.sel.close()

    def stop(self, grace: float = 2.0) -> None:
        """Stop after pending output is written (reactor thread)."""
        self._stopping = True
        self._stop_deadline = time.monotonic() + grace
        for fd, sock in list(self.listeners.items()):
            self.sel.unregister(sock)
            sock.close()
            del self.listeners[fd]

    def _has_output(self) -> bool:
        return any(link.transport is not None and link.transport.pending() > 0 for link in self.links.values())

    def _timeout(self) -> float:
        if self._calls:
            return 0.0
        now = time.monotonic()
        deadline = now + 1.0
        if self._timers:
            deadline = min(deadline, self._timers[0][0])
        return max(0.0, deadline - now)

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            self._guard(fn)
        for link in list(self.links.values()):
            if link.transport is not None and link.tick_deadline and now >= link.tick_deadline:
                link.tick_deadline = link.transport.tick(now)

    def _run_calls(self) -> None:
        calls = self._calls
        while calls:
            self._guard(calls.popleft())

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one bad callback must not stop the reactor
            log.exception("reactor callback failed")

    def _drain_wake(self) -> None:
        # Empty the pipe first, then clear the flag: a byte written after the flag was
        # cleared must stay in the pipe, or later wake-ups would be skipped for good.
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._wake_lock:
            self._wake_pending = False

    def _read(self, link: Link) -> None:
        t = link.transport
        budget = READ_BUDGET
        while budget > 0:
            cap = t.capacity()
            if cap < 0:  # tail closed
                break
            if cap == 0:
                break
            try:
                data = link.sock.recv(min(cap, READ_CHUNK))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                t.close_tail()
                link.app["error"] = str(exc)
                break
            if not data:
                t.close_tail()
                break
            t.push(data)
            budget -= len(data)
            if len(data) < min(cap, READ_CHUNK):
                break
        link.app["dirty"] = True

    def _write(self, link: Link) -> None:
        t = link.transport
        while True:
            pending = t.pending()
            if pending <= 0:
                if pending < 0:
                    t.close_head()
                break
            try:
                n = link.sock.send(t.peek(pending))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    link.app["error"] = str(exc)
                t.close_head()
                break
            t.pop(n)
            if n < pending:
                break

    def _service(self, link: Link) -> None:
        """Let the application look at a connection, then move bytes and notice closure."""
        if link.transport is None:
            return
        if link.app.pop("dirty", False) or link.app.get("work", True):
            link.app["work"] = False
            try:
                self.app.process(link)
            except Exception:
                log.exception("connection processing failed")
        t = link.transport
        if t.pending() != 0:
            self._write(link)
        if not link.tick_deadline:
            link.tick_deadline = t.tick(time.monotonic())
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if t.pending() > 0 else 0)
        key = self.sel.get_key(link.sock)
        if key.events != want:
            self.sel.modify(link.sock, want, link)
        if t.closed:
            cond = t.condition
            reason = link.app.pop("error", None) or (f"{cond.name}: {cond.description}" if cond else "closed")
            self._drop(link, reason)

    def _drop(self, link: Link, reason: str) -> None:
        fd = link.sock.fileno() if link.sock is not None else None
        if fd is not None and fd in self.links:
            del self.links[fd]
            self.sel.unregister(link.sock)
        if link.sock is not None:
            link.sock.close()
        link.sock, link.connected, link.tick_deadline = None, False, 0.0
        try:
            self.app.connection_lost(link, reason)
        except Exception:
            log.exception("connection_lost failed")
        if link.transport is not None:
            link.transport.unbind()
            link.transport = None
        if not link.server and not link.closing and not self._stopping:
            self._retry(link, reason)

    def mark_work(self, link: Link) -> None:
        """Ask for ``process(link)`` on the next loop turn (reactor thread)."""
        link.app["work"] = True


def _redact(url: str | None) -> str | None:
    """A URL without its password, for logs."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
