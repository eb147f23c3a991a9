"""Whether something answers as a Kafka broker: one ApiVersions v0 request over a plain or a
TLS socket, with no Kafka client and no credentials.

The local broker waits on it while it starts; the CLI and the demo ask it whether a
broker is there at all.
"""

from __future__ import annotations

import socket
import ssl
import struct

__all__ = ["answers_api_versions", "kafka_answers"]

_HOST = "127.0.0.1"


def kafka_answers(
    bootstrap_servers: str, timeout: float = 2.0, ssl_context: ssl.SSLContext | None = None
) -> bool:
    """True when the first of ``bootstrap_servers`` (``host:port,...``) answers as a Kafka
    broker; over TLS when an ``ssl_context`` is given (an SSL or SASL_SSL listener)."""
    host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
    return port.isdigit() and answers_api_versions(
        host or _HOST, int(port), timeout, ssl_context=ssl_context
    )


def answers_api_versions(
    host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> bool:
    """True when ``host:port`` answers an ApiVersions v0 request without error.

    v0 is the one version every broker keeps (clients open with it); Kafka
    enables its listener only after the node has joined the quorum and been
    unfenced, so an answer means clients can work. A SASL listener answers
    ApiVersions before authentication, so the probe needs no credentials.
    """
    client_id = b"lorastream-probe"
    request = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        sock = (
            _tls_socket(ssl_context, host, port, timeout)
            if ssl_context is not None
            else socket.create_connection((host, port), timeout=timeout)
        )
        with sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            if not 6 <= size <= 1 << 20:
                return False
            correlation_id, error_code = struct.unpack(">ih", _recv_exactly(sock, 6))
    except OSError:
        return False
    return correlation_id == 1 and error_code == 0


def _tls_socket(context: ssl.SSLContext, host: str, port: int, timeout: float) -> ssl.SSLSocket:
    """A connected TLS socket to ``host:port``, the handshake done."""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf
