"""The one free-port helper: a port the kernel just handed out on 127.0.0.1.

Another process may take it before the caller binds it; every caller here binds within
milliseconds and fails loudly if it lost the race.
"""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
