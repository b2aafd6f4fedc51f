"""Who is calling: the peer credentials of a Unix socket connection, and what they may call.

SO_PEERCRED gives the uid, gid and pid the peer had when it connected; SO_PEERGROUPS (Linux
4.13) its supplementary groups at that moment, so the check does not race with the peer
process exiting or changing groups. Where SO_PEERGROUPS is unavailable, the supplementary
groups come from /proc/<pid>/status and, failing that, from the group database
(os.getgrouplist).

Policy: uid 0 may call everything; a member of ``allow_group`` (primary or supplementary)
may call ``Status`` and ``Run``; everyone else gets org.varlink.service.PermissionDenied for
every io.vmrun.Manager method. The org.varlink.service introspection methods are open to all.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import socket
import struct

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
ROOT_METHODS = frozenset({"Run", "Load", "Unload", "Exec", "Status"})
GROUP_METHODS = frozenset({"Status", "Run"})


@dataclasses.dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int | None) -> bool:
        return gid is not None and (self.gid == gid or gid in self.groups)

    def describe(self) -> dict:
        return {"caller_uid": self.uid, "caller_gid": self.gid, "caller_pid": self.pid}


def _proc_groups(pid: int, proc: str = "/proc") -> tuple[int, ...] | None:
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return None


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    groups: tuple[int, ...] | None = None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    except OSError:
        groups = _proc_groups(pid)
        if groups is None:
            try:
                groups = tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
            except (KeyError, OSError):
                groups = ()
    return Peer(uid=uid, gid=gid, pid=pid, groups=tuple(groups))


def may_call(peer: Peer, method: str, allow_gid: int | None) -> bool:
    if method not in ROOT_METHODS:
        return False
    if peer.is_root:
        return True
    return method in GROUP_METHODS and peer.in_group(allow_gid)


def why_denied(peer: Peer, method: str, allow_group: str | None) -> str:
    if method in GROUP_METHODS:
        if allow_group is None:
            return f"{method} is for root (uid {peer.uid} is not; no allow_group is configured)"
        return f"{method} is for root and members of group {allow_group!r} (uid {peer.uid} is neither)"
    return f"{method} is for root only (the caller is uid {peer.uid})"
