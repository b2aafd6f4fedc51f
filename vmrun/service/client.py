"""A small blocking client of io.vmrun.Manager, for ``vmrun kexec`` and scripts.

    from vmrun.service import client
    if client.socket_available():
        reply = client.call("Load", {"payload": "/boot/efi/EFI/Linux/x.efi"})
    # errors: client.ServiceError(name, parameters), e.g. name "io.vmrun.Manager.KexecFailed",
    # parameters {"message": …, "exit_code": 50}

It speaks the Varlink wire format directly (one JSON object, NUL-terminated, each way) with the
standard library only: synchronous callers need no event loop, and the file descriptors of
``fds`` ride along with SCM_RIGHTS as systemd and asyncvarlink expect (a parameter such as
``payload_fd`` is the index of the descriptor in ``fds``). The daemon is asyncvarlink.
"""

from __future__ import annotations

import json
import os
import socket
import stat

DEFAULT_SOCKET = "/run/vmrun/io.vmrun.Manager"
INTERFACE = "io.vmrun.Manager"
MAX_REPLY = 256 << 20


class ServiceError(Exception):
    """An error reply (``name`` is the qualified Varlink error) or a failure to talk to the
    service (``name`` ``io.vmrun.client.Unavailable`` / ``ProtocolError`` / ``Timeout``)."""

    def __init__(self, name: str, parameters: dict | None = None):
        self.name = name
        self.parameters = parameters or {}
        msg = self.parameters.get("message") if isinstance(self.parameters, dict) else None
        super().__init__(f"{name}: {msg}" if msg else name)

    @property
    def exit_code(self) -> int:
        code = self.parameters.get("exit_code") if isinstance(self.parameters, dict) else None
        return code if isinstance(code, int) else 1


def socket_available(path: str = DEFAULT_SOCKET) -> bool:
    """Whether ``path`` is a socket something listens on (a stale file is not)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(2.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def call(method: str, params: dict | None = None, socket: str = DEFAULT_SOCKET,  # noqa: A002 - the brief's name
         timeout: float | None = None, *, fds: list[int] | None = None) -> dict:
    """Call ``method`` (``Run`` or ``io.vmrun.Manager.Run``, or a qualified method of another
    interface such as ``org.varlink.service.GetInfo``) and return the reply's parameters."""
    import socket as _socket

    qualified = method if "." in method else f"{INTERFACE}.{method}"
    msg = json.dumps({"method": qualified, "parameters": params or {}}).encode() + b"\0"
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            s.connect(socket)
        except OSError as e:
            raise ServiceError("io.vmrun.client.Unavailable", {"message": f"{socket}: {e.strerror or e}"}) from None
        try:
            if fds:
                _socket.send_fds(s, [msg], fds)
                msg = b""
            if msg:
                s.sendall(msg)
            buf = bytearray()
            while b"\0" not in buf:
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise ServiceError("io.vmrun.client.ProtocolError",
                                       {"message": "the service closed the connection without a reply"})
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise ServiceError("io.vmrun.client.ProtocolError", {"message": "reply too large"})
        except TimeoutError:
            raise ServiceError("io.vmrun.client.Timeout", {"message": f"no reply within {timeout} s"}) from None
        except OSError as e:
            raise ServiceError("io.vmrun.client.Unavailable", {"message": str(e)}) from None
    finally:
        s.close()
    try:
        reply = json.loads(bytes(buf[:buf.index(b"\0")]))
    except ValueError:
        raise ServiceError("io.vmrun.client.ProtocolError", {"message": "the reply is not JSON"}) from None
    if not isinstance(reply, dict):
        raise ServiceError("io.vmrun.client.ProtocolError", {"message": "the reply is not an object"})
    if reply.get("error"):
        raise ServiceError(reply["error"], reply.get("parameters") or {})
    return reply.get("parameters") or {}
