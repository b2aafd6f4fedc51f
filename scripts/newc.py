"""The project's one newc cpio writer: deterministic initramfs archives for the Linux kernel.

Used by ``scripts/fetch_payloads.py`` (the cached test initrd) and ``tests/e2e/qemu.py`` (every
initramfs a QEMU guest boots). Standard library only: ``scripts/fetch-payloads`` runs with the
system's ``python3``, before and without the project's virtualenv.

The format is the kernel's "new ASCII" cpio (``Documentation/driver-api/early-userspace/
buffer-format.rst``): per entry a 110-byte header — magic ``070701`` and 13 fields of 8 hex
digits (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
rdevminor, namesize, check) — the NUL-terminated name padded to 4 bytes, the data padded to
4 bytes; a ``TRAILER!!!`` entry ends the archive. A symlink's data is its target.

Deterministic for the same entries: sorted by name (a directory before what it holds), inode
numbers 1, 2, 3 … in that order, uid/gid 0, mtime 0, nlink 2 for directories and 1 otherwise,
the whole archive zero-padded to 512-byte blocks as ``cpio -o`` and the kernel's
``gen_init_cpio`` pad it.

Why not libarchive (``libarchive-c`` on Debian 12's libarchive 3.6.2)? Through its API a
symlink's target is stored as a hard-link name, so a newc symlink comes out with an empty body
(python-libarchive-c issue #143), and it has no way to set inode numbers or link counts (every
entry gets ino 0, nlink 0). Getting this archive out of it takes raw ctypes calls to
libarchive functions the binding does not wrap, which is more code than this writer.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

S_IFMT = 0o170000
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000
TRAILER = "TRAILER!!!"
MAGIC = b"070701"
BLOCK = 512


@dataclass(frozen=True)
class Entry:
    name: str               # path inside the archive, without a leading "/"
    mode: int               # including the file type bits (S_IF*)
    data: bytes = b""       # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(ino: int, e: Entry) -> bytes:
    name = e.name.encode() + b"\0"
    nlink = 2 if e.mode & S_IFMT == S_IFDIR else 1
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
    head = MAGIC + b"".join(b"%08x" % v for v in fields) + name
    return head + _pad4(len(head)) + e.data + _pad4(len(e.data))


def write(entries) -> bytes:
    """A newc archive of ``entries`` (sorted by name, see the module's rules), then the trailer."""
    entries = sorted(entries, key=lambda e: e.name)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate names in a cpio archive")
    out = b"".join(_record(ino, e) for ino, e in enumerate(entries, 1))
    out += _record(0, Entry(TRAILER, 0))
    return out + b"\0" * (-len(out) % BLOCK)


def gzipped(data: bytes, level: int = 9) -> bytes:
    """``data`` gzip-compressed reproducibly: header mtime 0, no file name, and (through
    ``GzipFile`` rather than ``gzip.compress``, whose header comes from zlib on some Python
    versions) OS byte 255 whatever the Python version."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=level) as gz:
        gz.write(data)
    return out.getvalue()


class Tree:
    """Files for an initramfs; each name's parent directories are added on demand (0755)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self.entries.setdefault(d, Entry(d, S_IFDIR | 0o755))

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        self._parents(name)
        self.entries[name] = Entry(name, mode, data, rdev)

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.add(name, S_IFDIR | mode)

    def file(self, name: str, data: bytes | Path, mode: int = 0o755) -> None:
        if isinstance(data, Path):
            data = data.read_bytes()
        self.add(name, S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(name, S_IFCHR | mode, rdev=(major, minor))

    def cpio(self) -> bytes:
        return write(self.entries.values())
