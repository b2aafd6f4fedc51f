"""The target machine's physical memory layout: the map vmrun presents to the payload.

vmrun boots the payload on a VM whose memory map is a copy of the machine the kernel will
later be kexec'd on (the *target*), so that the memory map the payload sees through
``GetMemoryMap`` (UEFI 2.10 §7.2 Memory Allocation Services) and any addresses it chose by
``AllocatePages(AllocateAddress)`` stay valid on the real machine.

The map can come from:

* this host's ``/sys/firmware/memmap`` (:meth:`TargetMemoryMap.from_host`): one directory per
  range holding ``start``, ``end`` (inclusive) and ``type``;
* a file (:meth:`TargetMemoryMap.from_file`) in one of three auto-detected formats:

  (a) a copy of ``/sys/firmware/memmap``, one range per line::

          0x0 0x9fbff System RAM

  (b) ``/proc/iomem`` read as root (only top-level lines count)::

          00001000-0009fbff : System RAM

  (c) the kernel's boot-time e820 lines, optionally with a dmesg timestamp::

          [    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable

All three print inclusive end addresses; :class:`PhysRange` stores an exclusive ``end``.

Anything unusable raises :class:`vmrun.errors.BadOptionError` naming the source and the line:
an unparseable line, an empty map, overlapping ranges, a map without RAM, and a map that puts
RAM in the x86 flash/reset-vector window [0xFFE00000, 0x100000000), which vmrun uses for its
hypercall page (see ``vmrun.vm.layout.HCALL_PAGE``).
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import BadOptionError
from vmrun.vm.layout import PAGE_SIZE

_PAGE_MASK = PAGE_SIZE - 1
_ADDR_LIMIT = 1 << 64

#: RAM must not overlap this window: vmrun's hypercall page lives there (vmrun.vm.layout.HCALL_PAGE).
FLASH_WINDOW = (0xFFE00000, 0x1_0000_0000)

SYSFS_MEMMAP = Path("/sys/firmware/memmap")


class RangeKind(enum.Enum):
    """What a physical range is, as far as the memory map is concerned."""

    RAM = "ram"
    RESERVED = "reserved"
    ACPI_RECLAIM = "acpi_reclaim"
    ACPI_NVS = "acpi_nvs"
    UNUSABLE = "unusable"
    PERSISTENT = "persistent"


@dataclass(frozen=True)
class PhysRange:
    """``[start, end)`` of kind ``kind``; ``label`` is the type text the source printed."""

    start: int
    end: int  # exclusive
    kind: RangeKind
    label: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"PhysRange({self.start:#x}-{self.end:#x} {self.kind.name} {self.label!r})"


# --- type names ------------------------------------------------------------------------------
# Kernel: e820_type_to_string() (sysfs and iomem) and e820_print_type() (boot lines).
_SYSFS_KINDS = {
    "system ram": RangeKind.RAM,
    "acpi tables": RangeKind.ACPI_RECLAIM,
    "acpi non-volatile storage": RangeKind.ACPI_NVS,
    "unusable memory": RangeKind.UNUSABLE,
    "persistent memory": RangeKind.PERSISTENT,
    "persistent memory (legacy)": RangeKind.PERSISTENT,
    "reserved": RangeKind.RESERVED,
    "soft reserved": RangeKind.RESERVED,
}
# Top-level /proc/iomem lines that describe memory; every other top-level line (PCI bus
# windows, device MMIO, "Local APIC", …) is skipped.
_IOMEM_KINDS = dict(_SYSFS_KINDS)
_IOMEM_KINDS["unknown e820 type"] = RangeKind.RESERVED

_E820_KINDS = {
    "usable": RangeKind.RAM,
    "reserved": RangeKind.RESERVED,
    "soft reserved": RangeKind.RESERVED,
    "acpi data": RangeKind.ACPI_RECLAIM,
    "acpi nvs": RangeKind.ACPI_NVS,
    "unusable": RangeKind.UNUSABLE,
}
_E820_PERSISTENT = re.compile(r"persistent \(type \d+\)$", re.I)
_E820_OTHER = re.compile(r"type \d+$", re.I)


def _sysfs_kind(label: str) -> RangeKind:
    """sysfs and e820 both describe everything; unknown names are reserved."""
    return _SYSFS_KINDS.get(label.strip().lower(), RangeKind.RESERVED)


def _e820_kind(label: str) -> RangeKind | None:
    low = label.strip().lower()
    if low in _E820_KINDS:
        return _E820_KINDS[low]
    if _E820_PERSISTENT.match(low):
        return RangeKind.PERSISTENT
    if _E820_OTHER.match(low):
        return RangeKind.RESERVED
    return None


# --- line formats ------------------------------------------------------------------------------
_RE_SYSFS = re.compile(r"^\s*(0[xX][0-9a-fA-F]+)\s+(0[xX][0-9a-fA-F]+)\s+(\S.*?)\s*$")
_RE_IOMEM = re.compile(r"^([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*?)\s*$")
_RE_E820 = re.compile(
    r"BIOS-e820:\s*\[mem\s+(0[xX][0-9a-fA-F]+)-(0[xX][0-9a-fA-F]+)\]\s+(\S.*?)\s*$")


@dataclass(frozen=True)
class _Entry:
    start: int
    end: int  # exclusive
    kind: RangeKind
    label: str
    where: str  # "line 3" or "/sys/firmware/memmap/3", for messages


def _significant(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _inclusive(where: str, source: str, start: int, last: int) -> tuple[int, int]:
    if last < start:
        raise BadOptionError(f"memory map {source}: {where}: end {last:#x} is below start {start:#x}")
    if last >= _ADDR_LIMIT:
        raise BadOptionError(f"memory map {source}: {where}: address {last:#x} is beyond 64 bits")
    return start, last + 1


def _parse_sysfs_text(lines: list[str], source: str) -> list[_Entry]:
    out = []
    for n, line in enumerate(lines, 1):
        if not _significant(line):
            continue
        m = _RE_SYSFS.match(line)
        if not m:
            raise BadOptionError(
                f"memory map {source}: line {n}: expected 'START END TYPE' "
                f"(a copy of /sys/firmware/memmap), got {line.strip()!r}")
        s, e = _inclusive(f"line {n}", source, int(m[1], 16), int(m[2], 16))
        out.append(_Entry(s, e, _sysfs_kind(m[3]), m[3], f"line {n}"))
    return out


def _parse_iomem(lines: list[str], source: str) -> list[_Entry]:
    out = []
    top = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line[:1].isspace():
            continue  # nested resources (kernel code, device BARs inside a window, …)
        m = _RE_IOMEM.match(line.rstrip("\r\n"))
        if not m:
            raise BadOptionError(
                f"memory map {source}: line {n}: expected a /proc/iomem line "
                f"'START-END : NAME', got {line.strip()!r}")
        start, last = int(m[1], 16), int(m[2], 16)
        top.append((start, last))
        kind = _IOMEM_KINDS.get(m[3].strip().lower())
        if kind is None:
            continue
        s, e = _inclusive(f"line {n}", source, start, last)
        out.append(_Entry(s, e, kind, m[3], f"line {n}"))
    if top and all(s == 0 and e == 0 for s, e in top):
        raise BadOptionError(
            f"memory map {source}: every address in this /proc/iomem copy is zero, as the kernel "
            f"prints them to non-root readers: run as root (sudo cat /proc/iomem) and try again")
    return out


def _parse_e820(lines: list[str], source: str) -> list[_Entry]:
    out = []
    for n, line in enumerate(lines, 1):
        if "BIOS-e820" not in line:
            continue  # the rest of a dmesg/journal dump
        m = _RE_E820.search(line)
        if not m:
            raise BadOptionError(
                f"memory map {source}: line {n}: expected "
                f"'BIOS-e820: [mem 0xSTART-0xEND] TYPE', got {line.strip()!r}")
        kind = _e820_kind(m[3])
        if kind is None:
            raise BadOptionError(f"memory map {source}: line {n}: unknown e820 type {m[3]!r}")
        s, e = _inclusive(f"line {n}", source, int(m[1], 16), int(m[2], 16))
        out.append(_Entry(s, e, kind, m[3], f"line {n}"))
    return out


def _detect_and_parse(text: str, source: str) -> list[_Entry]:
    lines = text.splitlines()
    first = next(((n, l) for n, l in enumerate(lines, 1) if _significant(l)), None)
    if first is None:
        raise BadOptionError(f"memory map {source}: the file is empty")
    n, line = first
    if "BIOS-e820" in text:
        return _parse_e820(lines, source)
    if _RE_IOMEM.match(line.rstrip("\r\n")):
        return _parse_iomem(lines, source)
    if _RE_SYSFS.match(line):
        return _parse_sysfs_text(lines, source)
    raise BadOptionError(
        f"memory map {source}: line {n}: not a memory map this tool reads "
        f"(a copy of /sys/firmware/memmap, /proc/iomem, or the kernel's BIOS-e820 boot lines): "
        f"{line.strip()!r}")


def _build(entries: list[_Entry], source: str, role: str = "") -> "TargetMemoryMap":
    if not entries:
        raise BadOptionError(f"memory map {source}: no memory ranges found")
    entries = sorted(entries, key=lambda e: (e.start, e.end))
    for a, b in zip(entries, entries[1:]):
        if b.start < a.end:
            raise BadOptionError(
                f"memory map {source}: {b.where}: range {b.start:#x}-{b.end - 1:#x} ({b.label}) "
                f"overlaps {a.where}: {a.start:#x}-{a.end - 1:#x} ({a.label})")
    lo, hi = FLASH_WINDOW
    for e in entries:
        if e.kind is RangeKind.RAM and e.start < hi and lo < e.end:
            raise BadOptionError(
                f"memory map {source}: {e.where}: RAM {e.start:#x}-{e.end - 1:#x} overlaps "
                f"{lo:#x}-{hi - 1:#x}, the flash/reset-vector window vmrun uses for hypercalls; "
                f"no PC firmware describes RAM there")
    merged: list[PhysRange] = []
    for e in entries:
        if merged and merged[-1].kind is e.kind and merged[-1].end == e.start:
            prev = merged[-1]
            label = prev.label if e.label in prev.label.split(" + ") else f"{prev.label} + {e.label}"
            merged[-1] = PhysRange(prev.start, e.end, e.kind, label)
        else:
            merged.append(PhysRange(e.start, e.end, e.kind, e.label))
    result = TargetMemoryMap(tuple(merged), source, role)
    if not result.ram():
        raise BadOptionError(f"memory map {source}: no usable RAM (no whole 4 KiB page of RAM)")
    return result


@dataclass(frozen=True)
class TargetMemoryMap:
    """The target's physical ranges, sorted, non-overlapping, adjacent same-kind ones merged.

    Holes (addresses no range covers, e.g. PCI windows) are simply absent, as in an e820 map or
    a UEFI memory map (UEFI 2.10 §7.2.3 GetMemoryMap describes only what the firmware knows).
    """

    ranges: tuple[PhysRange, ...]
    source: str = "text"
    #: What the map is for: ``""`` for a machine's own map; ``"kdump"`` for the map a crash
    #: kernel is shown (``vmrun.kdump.crash_memory_map``). A non-empty role is part of
    #: :meth:`canonical_text`, so such a map never has the digest of a machine's map.
    role: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", tuple(self.ranges))
        for a, b in zip(self.ranges, self.ranges[1:]):
            if b.start < a.end:
                raise ValueError(f"memory map ranges overlap or are unsorted: {a!r}, {b!r}")
        for r in self.ranges:
            if not 0 <= r.start < r.end <= _ADDR_LIMIT:
                raise ValueError(f"bad memory range {r!r}")

    # --- queries ---------------------------------------------------------------------------
    def ram(self) -> list[PhysRange]:
        """RAM ranges shrunk to whole 4 KiB pages (start rounded up, end down); empty ones dropped."""
        out = []
        for r in self.ranges:
            if r.kind is not RangeKind.RAM:
                continue
            s = (r.start + _PAGE_MASK) & ~_PAGE_MASK
            e = r.end & ~_PAGE_MASK
            if e > s:
                out.append(PhysRange(s, e, r.kind, r.label))
        return out

    def ram_bytes(self) -> int:
        return sum(r.size for r in self.ram())

    def max_address(self) -> int:
        """The (exclusive) end of the highest range."""
        return max(r.end for r in self.ranges) if self.ranges else 0

    def canonical_text(self) -> str:
        """One ``START END KIND`` line per range (exclusive end, hex): labels are left out, so
        the same machine read through sysfs, iomem or e820 lines gives the same text as long as
        the ranges agree. A map with a :attr:`role` says so on the first line."""
        lines = ["vmrun-memmap-v1" + (f" role={self.role}" if self.role else "")]
        lines += [f"{r.start:016x} {r.end:016x} {r.kind.name}" for r in self.ranges]
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        """sha256 (hex) of :meth:`canonical_text`."""
        return hashlib.sha256(self.canonical_text().encode()).hexdigest()

    # --- constructors ------------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, source: str = "text") -> "TargetMemoryMap":
        """Parse ``text`` in any of the three formats (detected from the content)."""
        return _build(_detect_and_parse(text, source), source)

    @classmethod
    def from_ranges(cls, ranges, source: str, *, role: str = "") -> "TargetMemoryMap":
        """A map built from :class:`PhysRange` values (in any order), with the same checks and
        merging as a parsed map: overlaps, RAM in the flash window and a map without RAM raise
        :class:`vmrun.errors.BadOptionError` naming ``source``."""
        entries = [_Entry(r.start, r.end, r.kind, r.label, f"range {r.start:#x}-{r.end - 1:#x}")
                   for r in ranges]
        for e in entries:
            if not 0 <= e.start < e.end <= _ADDR_LIMIT:
                raise BadOptionError(f"memory map {source}: {e.where}: empty or beyond 64 bits")
        return _build(entries, source, role)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TargetMemoryMap":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise BadOptionError(f"memory map {p}: cannot read: {e.strerror or e}") from e
        return cls.from_text(text, source=str(p))

    @classmethod
    def from_host(cls, root: str | os.PathLike = SYSFS_MEMMAP) -> "TargetMemoryMap":
        """Read this host's firmware map from ``/sys/firmware/memmap`` (``root`` for tests).

        This is the map the firmware/boot loader handed the running kernel (before the kernel's
        own e820 adjustments), i.e. what a kexec'd kernel will be told as well.
        """
        root = Path(root)
        try:
            names = [d for d in os.listdir(root) if d.isdigit()]
        except OSError as e:
            raise BadOptionError(
                f"memory map host: cannot list {root}: {e.strerror or e} "
                f"(pass a memory map file instead)") from e
        entries = []
        for name in sorted(names, key=int):
            d = root / name
            try:
                start = (d / "start").read_text().strip()
                end = (d / "end").read_text().strip()
                label = (d / "type").read_text().strip()
            except OSError as e:
                raise BadOptionError(f"memory map host: cannot read {d}: {e.strerror or e}") from e
            try:
                s_val, e_val = int(start, 16), int(end, 16)
            except ValueError:
                raise BadOptionError(
                    f"memory map host: {d}: unparseable start/end {start!r}/{end!r}") from None
            s, e = _inclusive(str(d), "host", s_val, e_val)
            entries.append(_Entry(s, e, _sysfs_kind(label), label, str(d)))
        return _build(entries, "host")
