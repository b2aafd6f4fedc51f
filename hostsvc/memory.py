"""Bookkeeping behind the UEFI memory services (UEFI 2.10 §7.2 Memory Allocation Services).

:class:`Allocator` decides *where* AllocatePages/AllocatePool put things and what GetMemoryMap
reports; it never touches guest memory. Only whole 4 KiB pages of the target map's RAM
(:meth:`hostsvc.memmap.TargetMemoryMap.ram`) are ever handed out; page 0 is kept as
EfiBootServicesData owned by ``"firmware"`` so that no allocation returns address 0 (a NULL
pointer to the payload).

Status codes follow the status tables of §7.2.1 AllocatePages, §7.2.2 FreePages,
§7.2.4 AllocatePool and §7.2.5 FreePool; where the spec is silent, EDK2's DXE core
(``MdeModulePkg/Core/Dxe/Mem/Page.c``, ``Pool.c``) is followed, namely:

* ``AllocatePages(AllocateAddress)`` at an address that is not page-aligned: EFI_NOT_FOUND.
* ``AllocatePages`` with NumberOfPages == 0: EFI_NOT_FOUND for AllocateAddress,
  EFI_OUT_OF_RESOURCES for AllocateAnyPages/AllocateMaxAddress (EDK2's FindFreePages finds
  nothing for zero pages).
* ``AllocatePool`` with Size == 0 succeeds and returns a unique, valid pointer (EDK2 always
  allocates a pool header, so every call gets its own block).
* ``FreePages`` with NumberOfPages == 0: EFI_INVALID_PARAMETER ("NumberOfPages is invalid").

Placement is top-down like EDK2: AllocateAnyPages takes the highest free pages below 4 GiB and
goes above 4 GiB only when nothing below fits; AllocateMaxAddress does the same under its limit.
AllocateMaxAddress returns EFI_NOT_FOUND when nothing fits under the limit but the request
would fit elsewhere, and EFI_OUT_OF_RESOURCES when it would not fit anywhere.

The payload's allocations are limited by a cap (the run's ``--memory-cap``): an allocation that
would succeed but push :meth:`Allocator.allocated_bytes` over it raises
:class:`vmrun.errors.MemoryCapExceeded`, which ends the run. Allocations owned by
``"firmware"`` (vmrun's own area) are not counted and cannot be freed by the payload.
"""

from __future__ import annotations

import bisect
import ctypes
import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from hostsvc import status
from hostsvc.memmap import PhysRange, RangeKind, TargetMemoryMap
from hostsvc.status import EfiError
from hostsvc.uefi_types import (EFI_MEMORY_DESCRIPTOR, EFI_MEMORY_DESCRIPTOR_VERSION, EFI_MEMORY_NV,
                                EFI_MEMORY_RUNTIME, EFI_MEMORY_UC, EFI_MEMORY_WB, EFI_MEMORY_WC,
                                EFI_MEMORY_WT, MAX_ALLOCATE_TYPE, MAX_MEMORY_TYPE, MEMORY_TYPE_MAX_VALUE,
                                OEM_RESERVED_MIN, AllocType, MemType)
from vmrun.errors import MemoryCapExceeded
from vmrun.vm.layout import FOUR_GIB, PAGE_SIZE

PAGE_MASK = PAGE_SIZE - 1
ADDR_LIMIT = 1 << 64
FIRMWARE = "firmware"

RAM_ATTRIBUTES = EFI_MEMORY_UC | EFI_MEMORY_WC | EFI_MEMORY_WT | EFI_MEMORY_WB

#: What GetMemoryMap reports as DescriptorSize: larger than the 40-byte EFI_MEMORY_DESCRIPTOR,
#: as EDK2 does, so payloads that index the map with sizeof() instead of DescriptorSize break
#: here as they would on real firmware.
DESCRIPTOR_SIZE = 48
DESCRIPTOR_VERSION = EFI_MEMORY_DESCRIPTOR_VERSION

#: Pool requests up to this many bytes share pool pages; larger ones get pages of their own.
POOL_SHARED_MAX = 2048
#: How many of the most recently used pool arenas a small request looks at before taking new pages.
POOL_SEARCH = 8
POOL_ALIGN = 8  # UEFI 2.10 §7.2.4: "All allocations are eight-byte aligned."


@dataclass
class Allocation:
    """A run of pages that is not ConventionalMemory. ``pool`` marks pages backing pools."""

    start: int
    pages: int
    mem_type: int
    owner: str
    pool: bool = False

    @property
    def end(self) -> int:
        return self.start + self.pages * PAGE_SIZE

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE


@dataclass(frozen=True)
class Descriptor:
    """One EFI_MEMORY_DESCRIPTOR (UEFI 2.10 §7.2.3); VirtualStart is always 0."""

    type: int
    start: int
    pages: int
    attribute: int

    @property
    def end(self) -> int:
        return self.start + self.pages * PAGE_SIZE


@dataclass
class _Arena:
    """Pool pages (one Allocation with pool=True) and the blocks carved out of them."""

    alloc: Allocation
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (offset, size), sorted
    used: int = 0  # bytes in blocks


def type_name(mem_type: int) -> str:
    try:
        return "Efi" + MemType(mem_type).name
    except ValueError:
        return f"type {mem_type:#x}"


def _attributes_for(mem_type: int) -> int:
    """Attributes of an allocated (RAM-backed) range of ``mem_type``."""
    attr = RAM_ATTRIBUTES
    if mem_type in (MemType.RuntimeServicesCode, MemType.RuntimeServicesData):
        attr |= EFI_MEMORY_RUNTIME
    return attr


# non-RAM target kinds → (descriptor type, attributes, priority when two share an edge page)
_KIND_DESC = {
    RangeKind.ACPI_RECLAIM: (MemType.ACPIReclaimMemory, RAM_ATTRIBUTES, 1),
    RangeKind.PERSISTENT: (MemType.PersistentMemory, RAM_ATTRIBUTES | EFI_MEMORY_NV, 2),
    RangeKind.UNUSABLE: (MemType.UnusableMemory, RAM_ATTRIBUTES, 3),
    RangeKind.RESERVED: (MemType.ReservedMemoryType, 0, 4),
    RangeKind.ACPI_NVS: (MemType.ACPIMemoryNVS, RAM_ATTRIBUTES, 5),
}


def _fmt_bytes(n: int) -> str:
    return f"{n:#x} bytes ({n / (1 << 20):.1f} MiB)"


class Allocator:
    """Free-range bookkeeping for AllocatePages/FreePages/AllocatePool/FreePool/GetMemoryMap.

    Free RAM is a sorted list of disjoint, page-aligned ``(start, end)`` runs (merged when
    adjacent); allocations are a sorted list of :class:`Allocation`. Every operation is linear in
    the number of runs at worst, and :meth:`descriptors` is O(n log n), never per page.
    """

    def __init__(self, target: TargetMemoryMap, cap_bytes: int):
        self.target = target
        self.cap_bytes = cap_bytes
        self.map_key = 1
        # (bytes asked for, bytes free) of every request refused for want of free RAM: what
        # tells "the map is too small for the payload" apart from other failures
        self.refusals: list[tuple[int, int]] = []
        self._ram: list[PhysRange] = target.ram()
        self._free: list[tuple[int, int]] = [(r.start, r.end) for r in self._ram]
        self._allocs: list[Allocation] = []
        self._charged = 0
        # (type, owner) → arenas by address, least recently useful first
        self._arenas: dict[tuple[int, str], OrderedDict[int, _Arena]] = {}
        self._pool_blocks: dict[int, tuple[_Arena, int]] = {}  # address → (arena, size)
        #: ``on_commit(start, end)`` before an allocation is made (the VM maps its pages; may
        #: raise MemoryCapExceeded, and then nothing was allocated)
        self.on_commit = None
        self._page0: Allocation | None = None
        if self._is_free(0, PAGE_SIZE):
            self._page0 = self._commit(0, 1, MemType.BootServicesData, FIRMWARE, pool=False)

    # --- public: state ---------------------------------------------------------------------
    @property
    def allocations(self) -> list[Allocation]:
        """Live allocations (including page 0 and pool pages), sorted by address."""
        return list(self._allocs)

    def allocated_bytes(self) -> int:
        """Bytes of all allocations not owned by ``"firmware"`` (pool pages included)."""
        return self._charged

    def free_bytes(self) -> int:
        return sum(e - s for s, e in self._free)

    def free_ranges(self) -> list[tuple[int, int]]:
        return list(self._free)

    # --- AllocatePages / FreePages (§7.2.1, §7.2.2) ---------------------------------------------
    def allocate_pages(self, alloc_type: int, mem_type: int, pages: int, address: int = 0,
                       owner: str = "payload") -> int:
        """EFI_BOOT_SERVICES.AllocatePages (UEFI 2.10 §7.2.1); returns the base address.

        ``address`` is the input value of ``*Memory``: the limit for AllocateMaxAddress (its
        last allowed byte; need not be page-aligned), the base for AllocateAddress.
        """
        if not 0 <= alloc_type < MAX_ALLOCATE_TYPE:
            raise EfiError(status.INVALID_PARAMETER, f"allocation type {alloc_type} is invalid")
        self._check_mem_type(mem_type, "AllocatePages")
        if not 0 <= pages < ADDR_LIMIT:
            raise EfiError(status.INVALID_PARAMETER, f"NumberOfPages {pages} is invalid")
        size = pages * PAGE_SIZE
        if alloc_type == AllocType.Address:
            if address & PAGE_MASK:
                raise EfiError(status.NOT_FOUND, f"AllocateAddress {address:#x} is not page-aligned")
            if pages == 0:
                raise EfiError(status.NOT_FOUND, "AllocateAddress of 0 pages")
            if not 0 <= address < ADDR_LIMIT or address + size > ADDR_LIMIT:
                raise EfiError(status.NOT_FOUND, f"{address:#x}+{size:#x} is beyond 64 bits")
            if not self._is_free(address, address + size):
                raise EfiError(status.NOT_FOUND,
                               f"{address:#x}-{address + size - 1:#x} is not free RAM "
                               f"({self._why_not_free(address, address + size)})")
            start = address
        else:
            if pages == 0:
                raise EfiError(status.OUT_OF_RESOURCES, "NumberOfPages is 0")
            if alloc_type == AllocType.MaxAddress:
                limit = ((address + 1) & ~PAGE_MASK) if address < ADDR_LIMIT - 1 else ADDR_LIMIT
            else:
                limit = ADDR_LIMIT
            found = self._find_fit(size, limit)
            if found is None:
                if limit < ADDR_LIMIT and self._find_fit(size, ADDR_LIMIT) is not None:
                    raise EfiError(status.NOT_FOUND,
                                   f"no {pages} free pages end at or below {address:#x}")
                self.refusals.append((size, self.free_bytes()))
                raise EfiError(status.OUT_OF_RESOURCES,
                               f"no run of {pages} free pages ({self.free_bytes():#x} bytes free)")
            start = found
        self._charge(owner, size, f"{pages} pages of {type_name(mem_type)}")
        self._commit(start, pages, mem_type, owner, pool=False)
        return start

    def free_pages(self, address: int, pages: int, owner: str = "payload") -> None:
        """EFI_BOOT_SERVICES.FreePages (UEFI 2.10 §7.2.2).

        The range must be entirely covered by page allocations (it may span several adjacent
        ones, or part of one: the rest stays allocated). Pool pages, page 0, and, unless
        ``owner`` is ``"firmware"``, the firmware's own allocations are EFI_NOT_FOUND.
        """
        if address & PAGE_MASK or not 0 <= address < ADDR_LIMIT:
            raise EfiError(status.INVALID_PARAMETER, f"{address:#x} is not page-aligned")
        if not 0 < pages < ADDR_LIMIT or address + pages * PAGE_SIZE > ADDR_LIMIT:
            raise EfiError(status.INVALID_PARAMETER, f"NumberOfPages {pages} is invalid")
        end = address + pages * PAGE_SIZE
        covered = self._overlapping(address, end)
        cur = address
        for a in covered:
            if a.start > cur:
                break
            if a.pool:
                raise EfiError(status.NOT_FOUND,
                               f"{a.start:#x}-{a.end - 1:#x} holds pool allocations (use FreePool)")
            if a is self._page0 or (a.owner == FIRMWARE and owner != FIRMWARE):
                raise EfiError(status.NOT_FOUND,
                               f"{a.start:#x}-{a.end - 1:#x} belongs to the firmware")
            cur = a.end
        if cur < end:
            raise EfiError(status.NOT_FOUND,
                           f"{cur:#x}-{end - 1:#x} was not allocated with AllocatePages")
        self._release(address, end, covered)
        self.map_key += 1

    # --- AllocatePool / FreePool (§7.2.4, §7.2.5) ------------------------------------------
    def allocate_pool(self, mem_type: int, size: int, owner: str = "payload") -> int:
        """EFI_BOOT_SERVICES.AllocatePool (UEFI 2.10 §7.2.4): an 8-byte-aligned block.

        Blocks of at most :data:`POOL_SHARED_MAX` bytes share pool pages of the same type and
        owner; larger ones get pages of their own (whose tail may later hold small blocks).
        Only a call that takes new pool pages changes the memory map (and ``map_key``).
        """
        self._check_mem_type(mem_type, "AllocatePool")
        if not 0 <= size < ADDR_LIMIT:
            raise EfiError(status.INVALID_PARAMETER, f"pool size {size} is invalid")
        need = max(POOL_ALIGN, (size + POOL_ALIGN - 1) & ~(POOL_ALIGN - 1))
        arenas = self._arenas.setdefault((mem_type, owner), OrderedDict())
        if need <= POOL_SHARED_MAX:
            # only the most recently used arenas are searched, and one that cannot serve the
            # request goes to the back: the cost of a call must not grow with the number of
            # earlier ones (a payload can make hundreds of thousands)
            for arena in list(itertools.islice(reversed(arenas.values()), POOL_SEARCH)):
                if arena.alloc.size - arena.used >= need:
                    off = self._arena_gap(arena, need)
                    if off is not None:
                        return self._place_block(arena, off, need)
                arenas.move_to_end(arena.alloc.start, last=False)
        pages = (need + PAGE_MASK) // PAGE_SIZE
        start = self._find_fit(pages * PAGE_SIZE, ADDR_LIMIT)
        if start is None:
            self.refusals.append((pages * PAGE_SIZE, self.free_bytes()))
            raise EfiError(status.OUT_OF_RESOURCES,
                           f"no run of {pages} free pages for a pool of {size:#x} bytes")
        self._charge(owner, pages * PAGE_SIZE,
                     f"a pool of {size:#x} bytes of {type_name(mem_type)} ({pages} new pages)")
        arena = _Arena(self._commit(start, pages, mem_type, owner, pool=True))
        arenas[arena.alloc.start] = arena
        return self._place_block(arena, 0, need)

    def free_pool(self, address: int, owner: str = "payload") -> None:
        """EFI_BOOT_SERVICES.FreePool (UEFI 2.10 §7.2.5); pool pages left empty are freed.

        The firmware's own blocks (the system table, handles, protocol interfaces) are
        EFI_INVALID_PARAMETER unless ``owner`` is ``"firmware"``: they are not the payload's to
        free, and handing them out again would let two owners share them."""
        entry = self._pool_blocks.get(address)
        if entry is None:
            raise EfiError(status.INVALID_PARAMETER, f"{address:#x} is not a live pool allocation")
        arena, size = entry
        if arena.alloc.owner == FIRMWARE and owner != FIRMWARE:
            raise EfiError(status.INVALID_PARAMETER,
                           f"{address:#x} is the firmware's own pool block, not the payload's")
        del self._pool_blocks[address]
        off = address - arena.alloc.start
        del arena.blocks[bisect.bisect_left(arena.blocks, (off, size))]
        arena.used -= size
        a = arena.alloc
        arenas = self._arenas[(a.mem_type, a.owner)]
        if not arena.blocks:
            del arenas[a.start]
            self._release(a.start, a.end, [a])
            self.map_key += 1
        else:
            arenas.move_to_end(a.start)  # its hole is the first to be reused

    def pool_size(self, address: int) -> int:
        """The (8-byte-rounded) size of the live pool block at ``address``."""
        entry = self._pool_blocks.get(address)
        if entry is None:
            raise EfiError(status.INVALID_PARAMETER, f"{address:#x} is not a live pool allocation")
        return entry[1]

    # --- GetMemoryMap (§7.2.3) ---------------------------------------------------------------
    def descriptors(self) -> list[Descriptor]:
        """The whole memory map, sorted by address, adjacent equal descriptors merged.

        RAM pages are ConventionalMemory or the type they were allocated as; the other target
        ranges map to Reserved/ACPIReclaim/ACPIMemoryNVS/Unusable/PersistentMemory. Non-RAM
        ranges are widened to whole pages and partial pages at the edges of RAM ranges are
        reported as reserved; where two non-RAM ranges share an edge page the more restrictive
        type wins (NVS > reserved > unusable > persistent > ACPI reclaim). Holes of the target
        map are not described.
        """
        ram_runs = heapq.merge(
            ((a.start, a.end, a.mem_type, _attributes_for(a.mem_type)) for a in self._allocs),
            ((s, e, MemType.ConventionalMemory, RAM_ATTRIBUTES) for s, e in self._free),
        )
        runs = heapq.merge(ram_runs, self._non_ram_runs())
        out: list[Descriptor] = []
        for s, e, t, attr in runs:
            if out and out[-1].type == t and out[-1].attribute == attr and out[-1].end == s:
                last = out[-1]
                out[-1] = Descriptor(t, last.start, last.pages + (e - s) // PAGE_SIZE, attr)
            else:
                out.append(Descriptor(int(t), s, (e - s) // PAGE_SIZE, attr))
        return out

    def map_size(self) -> int:
        """Bytes GetMemoryMap needs for the current map."""
        return len(self.descriptors()) * DESCRIPTOR_SIZE

    def encode_map(self) -> bytes:
        """:meth:`descriptors` as EFI_MEMORY_DESCRIPTORs (VirtualStart 0), each padded with
        zeros to DESCRIPTOR_SIZE."""
        pad = bytes(DESCRIPTOR_SIZE - ctypes.sizeof(EFI_MEMORY_DESCRIPTOR))
        return b"".join(bytes(EFI_MEMORY_DESCRIPTOR(Type=d.type, PhysicalStart=d.start, NumberOfPages=d.pages,
                                                    Attribute=d.attribute)) + pad
                        for d in self.descriptors())

    # --- internals -----------------------------------------------------------------------------
    @staticmethod
    def _check_mem_type(mem_type: int, service: str) -> None:
        bad = (not 0 <= mem_type <= MEMORY_TYPE_MAX_VALUE
               or MAX_MEMORY_TYPE <= mem_type < OEM_RESERVED_MIN
               or mem_type in (MemType.ConventionalMemory, MemType.PersistentMemory,
                               MemType.UnacceptedMemoryType))
        if bad:
            raise EfiError(status.INVALID_PARAMETER,
                           f"{service}: memory type {mem_type:#x} cannot be allocated")

    def _charge(self, owner: str, size: int, what: str) -> None:
        if owner == FIRMWARE:
            return
        if self._charged + size > self.cap_bytes:
            raise MemoryCapExceeded(
                f"the payload asked for {what} = {_fmt_bytes(size)} with "
                f"{_fmt_bytes(self._charged)} already allocated; the memory cap is "
                f"{_fmt_bytes(self.cap_bytes)}",
                asked=size, in_use=self._charged, cap=self.cap_bytes)

    def _free_index(self, addr: int) -> int:
        """Index of the free run that starts at or before ``addr`` (-1 if none)."""
        return bisect.bisect_right(self._free, addr, key=lambda r: r[0]) - 1

    def _is_free(self, start: int, end: int) -> bool:
        i = self._free_index(start)
        return i >= 0 and self._free[i][0] <= start and end <= self._free[i][1]

    def _why_not_free(self, start: int, end: int) -> str:
        if any(a.start < end and start < a.end for a in self._overlapping(start, end)):
            return "already allocated"
        return "outside the RAM of the target map"

    def _find_fit(self, size: int, limit: int) -> int | None:
        """Top-down: the highest ``size`` bytes of free RAM ending at or below ``limit``,
        looking below 4 GiB first."""
        if size <= 0:
            return None
        for lo, hi in ((0, min(limit, FOUR_GIB)), (FOUR_GIB, limit)):
            if hi <= lo:
                continue
            for s, e in reversed(self._free):
                if s >= hi:
                    continue
                top = min(e, hi)
                if top - max(s, lo) >= size:
                    return top - size
                if e <= lo:
                    break
        return None

    def _take(self, start: int, end: int) -> None:
        i = self._free_index(start)
        s, e = self._free[i]
        assert s <= start and end <= e, (hex(start), hex(end), hex(s), hex(e))
        repl = [r for r in ((s, start), (end, e)) if r[1] > r[0]]
        self._free[i:i + 1] = repl

    def _give(self, start: int, end: int) -> None:
        i = self._free_index(start) + 1  # insertion point
        if i > 0 and self._free[i - 1][1] == start:
            i -= 1
            start = self._free[i][0]
            del self._free[i]
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free[i][1]
            del self._free[i]
        self._free.insert(i, (start, end))

    def _commit(self, start: int, pages: int, mem_type: int, owner: str, pool: bool) -> Allocation:
        if self.on_commit is not None:
            self.on_commit(start, start + pages * PAGE_SIZE)
        self._take(start, start + pages * PAGE_SIZE)
        a = Allocation(start, pages, int(mem_type), owner, pool)
        if owner != FIRMWARE:
            self._charged += a.size
        bisect.insort(self._allocs, a, key=lambda x: x.start)
        self.map_key += 1
        return a

    def _overlapping(self, start: int, end: int) -> list[Allocation]:
        i = max(0, bisect.bisect_right(self._allocs, start, key=lambda x: x.start) - 1)
        out = []
        while i < len(self._allocs) and self._allocs[i].start < end:
            a = self._allocs[i]
            if a.end > start:
                out.append(a)
            i += 1
        return out

    def _release(self, start: int, end: int, covered: list[Allocation]) -> None:
        """Return [start, end) (tiled by ``covered``) to free RAM, keeping the parts of the
        first/last allocation that stick out."""
        first = bisect.bisect_left(self._allocs, covered[0].start, key=lambda x: x.start)
        assert self._allocs[first] is covered[0]
        keep = []
        for a in covered:
            if a.owner != FIRMWARE:
                self._charged -= (min(a.end, end) - max(a.start, start))
            if a.start < start:
                keep.append(Allocation(a.start, (start - a.start) // PAGE_SIZE,
                                       a.mem_type, a.owner, a.pool))
            if a.end > end:
                keep.append(Allocation(end, (a.end - end) // PAGE_SIZE,
                                       a.mem_type, a.owner, a.pool))
        self._allocs[first:first + len(covered)] = keep
        self._give(start, end)

    @staticmethod
    def _arena_gap(arena: _Arena, need: int) -> int | None:
        cur = 0
        for off, size in arena.blocks:
            if off - cur >= need:
                return cur
            cur = off + size
        return cur if arena.alloc.size - cur >= need else None

    def _place_block(self, arena: _Arena, off: int, size: int) -> int:
        bisect.insort(arena.blocks, (off, size))
        arena.used += size
        addr = arena.alloc.start + off
        self._pool_blocks[addr] = (arena, size)
        return addr

    def _non_ram_runs(self) -> list[tuple[int, int, int, int]]:
        """Page-aligned (start, end, type, attribute) runs for everything but whole RAM pages."""
        pieces = []  # (start, end, priority, type, attribute)
        rsv_type, rsv_attr, rsv_prio = _KIND_DESC[RangeKind.RESERVED]
        for r in self.target.ranges:
            lo = r.start & ~PAGE_MASK
            hi = (r.end + PAGE_MASK) & ~PAGE_MASK if r.end < ADDR_LIMIT else ADDR_LIMIT
            if r.kind is RangeKind.RAM:
                s_in = (r.start + PAGE_MASK) & ~PAGE_MASK
                e_in = r.end & ~PAGE_MASK
                if e_in <= s_in:
                    pieces.append((lo, hi, rsv_prio, rsv_type, rsv_attr))
                    continue
                if lo < s_in:
                    pieces.append((lo, s_in, rsv_prio, rsv_type, rsv_attr))
                if e_in < hi:
                    pieces.append((e_in, hi, rsv_prio, rsv_type, rsv_attr))
            else:
                t, attr, prio = _KIND_DESC[r.kind]
                pieces.append((lo, hi, prio, t, attr))
        if not pieces:
            return []
        # Resolve shared edge pages: sweep the elementary intervals between boundaries.
        pieces.sort()
        bounds = sorted({p[0] for p in pieces} | {p[1] for p in pieces})
        out: list[tuple[int, int, int, int]] = []
        active: list[tuple[int, int, int, int, int]] = []
        j = 0
        for s, e in zip(bounds, bounds[1:]):
            while j < len(pieces) and pieces[j][0] <= s:
                active.append(pieces[j])
                j += 1
            active = [p for p in active if p[1] > s]
            if not active:
                continue
            best = max(active, key=lambda p: p[2])
            if out and out[-1][1] == s and out[-1][2:] == (best[3], best[4]):
                out[-1] = (out[-1][0], e, best[3], best[4])
            else:
                out.append((s, e, best[3], best[4]))
        return out
