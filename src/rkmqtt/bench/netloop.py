"""One thread ("rkmqtt-bench-net") that runs the network I/O of many paho clients on one selector,
and their message callbacks: a thread per device cost the bench more CPU than the bridge it
measured (docs/benchmarks.md). Selector changes are made by this thread only; other threads queue
them and wake it (docs/architecture.md, "The bench")."""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

SocketHook = Callable[[mqtt.Client, Any, Any], None]
_MISC_INTERVAL_S = 1.0  # keep-alive pings and timeouts (paho's loop_misc)
_READS_PER_WAKE = 16  # packets read per readiness event before going back to the selector


class NetLoop:
    """Start it, `attach()` clients before they connect, `stop()` after they disconnected."""

    def __init__(self, name: str = "rkmqtt-bench-net") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops: deque[Callable[[], None]] = deque()
        self._clients: list[mqtt.Client] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> NetLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close what is left: sockets of clients that could not disconnect
        (a wedged broker) are closed here, not leaked."""
        self._stopping = True
        self._wake()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        for key in list(self._sel.get_map().values()):
            if key.data is not None:
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def attach(self, client: mqtt.Client, on_open: SocketHook | None = None) -> None:
        """Route `client`'s socket through this loop (instead of `loop_start()`); `on_open(client,
        userdata, sock)` runs first when its socket opens (socket options)."""

        def opened(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            if on_open is not None:
                on_open(c, userdata, sock)
            self._on_open(c, userdata, sock)

        client.on_socket_open = opened
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_write_interest
        client.on_socket_unregister_write = self._on_write_interest
        self._call(lambda: self._clients.append(client))

    def kick(self, client: mqtt.Client) -> None:
        """Call after publishing on (or disconnecting) `client` from any thread: paho may not ask
        for write readiness itself (its flag says it asked already, just as this loop's thread
        clears it), and `want_write()` checked after the call cannot miss the packet."""
        self._call(lambda: self._sync(client))

    def detach(self, client: mqtt.Client) -> None:
        def op() -> None:
            with contextlib.suppress(ValueError):
                self._clients.remove(client)

        self._call(op)

    # -- any thread: paho's socket callbacks ---------------------------------------------------
    def _on_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(lambda: self._set(sock, client, selectors.EVENT_READ))

    def _on_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(lambda: self._unset(sock))

    def _on_write_interest(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho's "register" and "unregister" both mean: look at want_write() again
        self._call(lambda: self._sync(client))

    def _call(self, op: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            op()
            return
        self._ops.append(op)  # deque.append is atomic
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- loop thread ------------------------------------------------------------------------
    def _sync(self, client: mqtt.Client) -> None:
        """Wait for writing exactly while paho has packets to write."""
        sock = client.socket()
        if sock is not None:
            write = selectors.EVENT_WRITE if client.want_write() else 0
            self._set(sock, client, selectors.EVENT_READ | write)

    def _set(self, sock: Any, client: mqtt.Client, events: int) -> None:
        try:
            key = self._sel.get_map().get(sock)
            if key is not None and key.fileobj is not sock:  # a closed socket's number, reused
                self._unset(key.fileobj)
                key = None
            if key is None:
                self._sel.register(sock, events, client)
            elif key.events != events:
                self._sel.modify(sock, events, client)
        except (ValueError, OSError):  # closed before this op ran
            self._unset(sock)

    def _unset(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)

    def _run(self) -> None:
        next_misc = time.monotonic() + _MISC_INTERVAL_S
        try:
            while not self._stopping:
                timeout = max(0.0, next_misc - time.monotonic())
                events = self._sel.select(timeout)
                if any(key.data is None for key, _ in events):
                    # Drained before the ops run: a wake-up sent after this is for an op still to come.
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                while self._ops:
                    self._ops.popleft()()
                for key, mask in events:
                    client = key.data
                    if client is None or client.socket() is not key.fileobj:
                        continue  # the wake-up, or a socket an op above closed or replaced
                    if mask & selectors.EVENT_READ:
                        self._read(client, key.fileobj)
                    if mask & selectors.EVENT_WRITE and client.socket() is key.fileobj:
                        client.loop_write()
                        self._sync(client)
                if time.monotonic() >= next_misc:
                    for c in list(self._clients):
                        c.loop_misc()
                    next_misc = time.monotonic() + _MISC_INTERVAL_S
        except BaseException as e:  # surfaced by the caller: a dead loop must not look like a slow bridge
            self.error = e
            raise

    def _read(self, client: mqtt.Client, sock: Any) -> None:
        """`loop_read()` reads one packet per call (more only while QoS 1 or 2 exchanges are
        open): read on while the socket still holds bytes, so that a burst of stream messages
        costs one trip through the selector, not one each. TLS data already decrypted into the SSL
        object's buffer does not wake a selector, so that is always read to the end."""
        reads = 0
        while True:
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or client.socket() is not sock:
                return  # an error or a closed socket: paho has handled it
            reads += 1
            if isinstance(sock, ssl.SSLSocket):
                if sock.pending() <= 0:
                    return
                continue
            assert isinstance(sock, socket.socket)
            if reads >= _READS_PER_WAKE:
                return  # the selector is level-triggered: it reports the rest
            try:
                if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return
            except OSError:  # BlockingIOError: nothing left
                return
