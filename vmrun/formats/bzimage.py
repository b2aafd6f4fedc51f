"""The Linux x86 boot image (bzImage) inside an EFI-stub kernel: its setup header and its
compressed payload (Documentation/arch/x86/boot.rst)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

COMPRESSIONS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b", "gzip"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),
)


@dataclass(frozen=True)
class BzImage:
    version: str
    protocol: tuple[int, int]
    payload: bytes
    compression: str
    init_size: int = 0  # memory the kernel needs from its load address to run (protocol 2.10+)


def parse(data: bytes) -> BzImage | None:
    """The setup header of a bzImage, or None when ``data`` is not one."""
    if len(data) < 0x268 or data[0x202:0x206] != b"HdrS":
        return None
    setup_sects = data[0x1F1] or 4
    proto = struct.unpack_from("<H", data, 0x206)[0]
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    payload = data[pm_start + payload_offset:pm_start + payload_offset + payload_length]
    compression = next((name for magic, name in COMPRESSIONS if payload.startswith(magic)), "unknown")
    version = ""
    kver = struct.unpack_from("<H", data, 0x20E)[0]
    if kver:
        raw = data[kver + 0x200:kver + 0x200 + 256]
        version = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    init_size = struct.unpack_from("<I", data, 0x260)[0] if proto >= 0x020A else 0
    return BzImage(version, (proto >> 8, proto & 0xFF), payload, compression, init_size)
