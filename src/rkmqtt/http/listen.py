"""The HTTP API's listening sockets, bound by the main thread at start-up before the model loads: a
busy port is refused at once, and the port is held while the model loads. The server's event loop
serves them later (`HttpServer`)."""

from __future__ import annotations

import contextlib
import errno
import socket

from rkmqtt.errors import ConfigError


def open_listeners(listen: str, host: str, port: int, backlog: int = 128) -> list[socket.socket]:
    """A listening socket for each address `host` stands for (as asyncio's own server binds them);
    ConfigError with one line when one cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise _cannot(listen, e.strerror or str(e)) from e
    sockets: list[socket.socket] = []
    unavailable = OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # without repeats, in order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio does: [::] is IPv6 only, 0.0.0.0 is its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
                # As asyncio does: that family is off on this machine (localhost's ::1 without IPv6).
                sockets.pop().close()
                unavailable = e
                continue
            sock.listen(backlog)
            sock.setblocking(False)
        if not sockets:
            raise unavailable
    except OSError as e:
        close_all(sockets)
        raise _cannot(listen, e.strerror or str(e)) from e
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


def _cannot(listen: str, why: str) -> ConfigError:
    return ConfigError(
        f"setting http_listen={listen!r}: cannot listen there ({why}); choose a free port or an address of this machine"
    )
