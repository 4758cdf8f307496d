"""The embedded nats-server's port check: a port whose connections linger in TIME_WAIT
after a clean stop is free (the server binds with SO_REUSEADDR); a port another program
listens on is reported with how to find that program and how to choose another port."""

from __future__ import annotations

import errno
import socket

import pytest

from daemon.embedded_nats import EmbeddedNatsServer, port_problem
from daemon.errors import LipsyncError
from tests.conftest import free_port


def _leave_time_wait(port: int) -> None:
    """A connection to ``port`` closed by the listening side first, as nats-server does
    on a stop with clients connected: that side's end stays in TIME_WAIT (~60 s)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first -> TIME_WAIT on 127.0.0.1:port
    client.recv(1)  # sees the FIN
    client.close()
    listener.close()


def _plain_bind_fails(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


async def test_time_wait_port_is_free_and_the_server_starts_there(tmp_path):
    port = free_port()
    _leave_time_wait(port)
    # The situation is real: a bind without SO_REUSEADDR trips on the lingering connection.
    assert _plain_bind_fails(port), "no TIME_WAIT connection was left on the port"
    assert port_problem("127.0.0.1", port) is None
    server = EmbeddedNatsServer("127.0.0.1", port, tmp_path / "nats")
    await server.start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        await server.aclose()


async def test_listening_port_is_reported_with_the_way_out(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        problem = port_problem("127.0.0.1", port)
        assert problem is not None
        server = EmbeddedNatsServer("127.0.0.1", port, tmp_path / "nats")
        with pytest.raises(LipsyncError) as caught:
            await server.start()
    err = caught.value
    assert err.code == "nats_unavailable"
    assert f"127.0.0.1:{port} is in use by another program" in err.message
    assert f"ss -ltnp 'sport = :{port}'" in err.message
    assert "nats.embedded_port" in err.message and "LIPSYNC_NATS__EMBEDDED_PORT" in err.message
    # Nothing in it claims a server that may not exist.
    assert "Stop the other server" not in err.message
