"""Guest-physical memory: sparse host mappings behind typed, bounds-checked accessors.

Each RAM range of the presented memory map gets one anonymous ``MAP_NORESERVE`` mapping, so a
24 GiB map costs nothing until the guest touches it. Loaders and services never compute mmap
offsets themselves: they call ``read``/``write``/``read_u64``/… or, for a C structure,
``read_struct``/``write_struct`` with a ctypes type (``hostsvc.uefi_types``) and a guest-physical
address; an access not wholly inside one range raises :class:`vmrun.errors.GuestMemoryError`.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import struct
from dataclasses import dataclass, field
from typing import TypeVar

from vmrun.errors import GuestMemoryError, VmrunError
from vmrun.vm.layout import PAGE_SIZE

#: A ctypes type: a Structure, an array of them, a scalar.
CType = TypeVar("CType", bound="ctypes._CData")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class UnallocatedWrite(GuestMemoryError):
    """A host write on the payload's behalf to guest RAM that no allocation covers."""

    def __init__(self, gpa: int, size: int):
        VmrunError.__init__(self, f"write of {size} bytes at {gpa:#x} reaches guest RAM that no "
                            "allocation covers", gpa=gpa, size=size)
        self.gpa = gpa
        self.size = size


@dataclass
class Region:
    gpa: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)
    host_addr: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size


def merge_spans(spans) -> list[tuple[int, int]]:
    """Sorted union of half-open [start, end) spans: overlapping or touching ones merged, empty
    ones dropped."""
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


class GuestMemory:
    """A set of non-overlapping, page-aligned guest-physical ranges, each backed by host memory."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self._starts: list[int] = []
        #: ``guard(gpa, size) -> bool``: may the host write there (``vmrun.vm.paging``: RAM that no
        #: allocation covers stays untouched, so host memory grows only with allocations); None:
        #: anywhere inside the regions.
        self.write_guard = None

    def add_region(self, gpa: int, size: int) -> Region:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"guest region {gpa:#x}+{size:#x} is not page-aligned")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"guest region {gpa:#x}+{size:#x} overlaps {r.gpa:#x}+{r.size:#x}")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
        m = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:  # 2 MiB host pages: far fewer first-touch faults for a decompressing kernel
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        host = ctypes.addressof(ctypes.c_char.from_buffer(m))
        region = Region(gpa, size, m, memoryview(m), host)
        idx = bisect.bisect(self._starts, gpa)
        self.regions.insert(idx, region)
        self._starts.insert(idx, gpa)
        return region

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            try:
                r.mapping.close()
            except BufferError:  # a ctypes view still alive; the mapping dies with the process
                pass
        self.regions.clear()
        self._starts.clear()

    # lookup ----------------------------------------------------------------------------------
    def _find(self, gpa: int, size: int, what: str = "access") -> tuple[Region, int]:
        idx = bisect.bisect(self._starts, gpa) - 1
        if idx >= 0:
            r = self.regions[idx]
            off = gpa - r.gpa
            if gpa >= r.gpa and off + size <= r.size and size >= 0:
                return r, off
        raise GuestMemoryError(gpa, size, what)

    def unguarded(self) -> "GuestMemory":
        """The same memory without the write guard: for vmrun's own structures (page tables, the
        monitor's exception frame), never for a pointer the payload passed."""
        other = GuestMemory.__new__(GuestMemory)
        other.regions, other._starts, other.write_guard = self.regions, self._starts, None
        return other

    def _find_w(self, gpa: int, size: int) -> tuple[Region, int]:
        found = self._find(gpa, size, "write")
        if self.write_guard is not None and not self.write_guard(gpa, size):
            raise UnallocatedWrite(gpa, size)
        return found

    def contains(self, gpa: int, size: int = 1) -> bool:
        try:
            self._find(gpa, size)
            return True
        except GuestMemoryError:
            return False

    def view(self, gpa: int, size: int) -> memoryview:
        """A view of guest memory, no copy (valid while the memory lives): what the handoff
        writes to its file or passes to kexec_load(2) as is."""
        r, off = self._find(gpa, size, "read")
        return r.view[off:off + size]

    # raw bytes -------------------------------------------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        r, off = self._find(gpa, size, "read")
        return bytes(r.view[off:off + size])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        r, off = self._find_w(gpa, n)
        r.view[off:off + n] = data

    def fill(self, gpa: int, size: int, value: int = 0) -> None:
        r, off = self._find_w(gpa, size)
        ctypes.memset(r.host_addr + off, value & 0xFF, size)

    def copy(self, dst: int, src: int, size: int) -> None:
        """memmove semantics (overlapping ranges are fine)."""
        rs, so = self._find(src, size, "read")
        rd, do = self._find_w(dst, size)
        ctypes.memmove(rd.host_addr + do, rs.host_addr + so, size)

    # typed -----------------------------------------------------------------------------------
    def read_u8(self, gpa: int) -> int:
        r, off = self._find(gpa, 1, "read")
        return r.view[off]

    def read_u16(self, gpa: int) -> int:
        r, off = self._find(gpa, 2, "read")
        return _U16.unpack_from(r.view, off)[0]

    def read_u32(self, gpa: int) -> int:
        r, off = self._find(gpa, 4, "read")
        return _U32.unpack_from(r.view, off)[0]

    def read_u64(self, gpa: int) -> int:
        r, off = self._find(gpa, 8, "read")
        return _U64.unpack_from(r.view, off)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        r, off = self._find_w(gpa, 1)
        r.view[off] = value & 0xFF

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self._find_w(gpa, 4)
        _U32.pack_into(r.view, off, value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        r, off = self._find_w(gpa, 8)
        _U64.pack_into(r.view, off, value & 0xFFFFFFFFFFFFFFFF)

    def read_struct(self, gpa: int, ctype: type[CType]) -> CType:
        """A copy of the ``ctype`` (a ctypes Structure, array or scalar type) at ``gpa``; the
        whole object must lie in guest memory (GuestMemoryError otherwise)."""
        r, off = self._find(gpa, ctypes.sizeof(ctype), "read")
        return ctype.from_buffer_copy(r.view, off)

    def write_struct(self, gpa: int, obj: "ctypes._CData") -> None:
        """Write ``obj`` (a ctypes Structure, array or scalar) at ``gpa``, all or nothing."""
        size = ctypes.sizeof(obj)
        r, off = self._find_w(gpa, size)
        ctypes.memmove(r.host_addr + off, ctypes.addressof(obj), size)

    def read_utf16z(self, gpa: int, max_chars: int = 32768) -> str:
        """A NUL-terminated UTF-16LE string (CHAR16*), at most ``max_chars`` characters."""
        out = bytearray()
        for i in range(max_chars):
            ch = self.read_u16(gpa + 2 * i)
            if ch == 0:
                return out.decode("utf-16-le", errors="replace")
            out += _U16.pack(ch)
        raise GuestMemoryError(gpa, 2 * max_chars, "unterminated UTF-16 string read")

    def read_cstr(self, gpa: int, max_len: int = 65536) -> bytes:
        out = bytearray()
        for i in range(max_len):
            b = self.read_u8(gpa + i)
            if b == 0:
                return bytes(out)
            out.append(b)
        raise GuestMemoryError(gpa, max_len, "unterminated string read")
