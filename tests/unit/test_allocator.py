"""hostsvc.memory: AllocatePages/FreePages/AllocatePool/FreePool/GetMemoryMap bookkeeping.

The property tests at the end need ``hypothesis`` (a test dependency); without it they are
reported as skipped, never silently absent.
"""

from __future__ import annotations

import struct
import time

import pytest
try:  # the property tests need hypothesis (see the module doc)
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover
    HAVE_HYPOTHESIS = False

from hostsvc import status
from hostsvc.memmap import TargetMemoryMap
from hostsvc.memory import (DESCRIPTOR_SIZE, DESCRIPTOR_VERSION, EFI_MEMORY_NV, EFI_MEMORY_RUNTIME,
                            EFI_MEMORY_UC, EFI_MEMORY_WB, EFI_MEMORY_WC, EFI_MEMORY_WT, Allocator,
                            AllocType, Descriptor, MemType)
from hostsvc.status import EfiError
from vmrun.errors import MemoryCapExceeded

P = 0x1000
G = 1 << 30
RAM_ATTR = EFI_MEMORY_UC | EFI_MEMORY_WC | EFI_MEMORY_WT | EFI_MEMORY_WB
ANY, MAX, ADDR = AllocType.AnyPages, AllocType.MaxAddress, AllocType.Address
LD, BSD, BSC = MemType.LoaderData, MemType.BootServicesData, MemType.BootServicesCode
CONV = MemType.ConventionalMemory

# RAM: [0, 0x9f000) whole pages (+ a partial page up to 0x9fc00), [1 MiB, 2 GiB), [4 GiB, 5 GiB).
MAP = TargetMemoryMap.from_text("""\
0x0 0x9fbff System RAM
0x9fc00 0x9ffff Reserved
0xf0000 0xfffff Reserved
0x100000 0x7fffffff System RAM
0x80000000 0x8000ffff ACPI Tables
0x80010000 0x8001ffff ACPI Non-volatile Storage
0xfec00000 0xfec00fff Reserved
0x100000000 0x13fffffff System RAM
""")
RAM_PAGES = (0x9F000 + (0x80000000 - 0x100000) + G) // P


def new(cap: int = 64 * G, target: TargetMemoryMap = MAP) -> Allocator:
    return Allocator(target, cap)


def err(fn, *args, **kw) -> int:
    with pytest.raises(EfiError) as ei:
        fn(*args, **kw)
    return ei.value.status


def desc_at(a: Allocator, addr: int) -> Descriptor:
    return next(d for d in a.descriptors() if d.start <= addr < d.start + d.pages * P)


def check_consistent(a: Allocator) -> None:
    """Allocations are disjoint, page-aligned, inside RAM; with the free runs they tile the RAM;
    descriptors are sorted, disjoint, page-granular, and agree with both."""
    ram = [(r.start, r.end) for r in a.target.ram()]

    def in_ram(s: int, e: int) -> bool:
        return any(rs <= s and e <= re for rs, re in ram)

    allocs = a.allocations
    for x, y in zip(allocs, allocs[1:]):
        assert x.start + x.pages * P <= y.start
    for x in allocs:
        assert x.start % P == 0 and x.pages > 0 and in_ram(x.start, x.start + x.pages * P)
    free = a.free_ranges()
    for (s1, e1), (s2, e2) in zip(free, free[1:]):
        assert e1 < s2, "free runs not sorted, overlapping or not merged"
    pieces = sorted([(x.start, x.start + x.pages * P) for x in allocs] + free)
    merged: list[list[int]] = []
    for s, e in pieces:
        assert not merged or merged[-1][1] <= s
        if merged and merged[-1][1] == s:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    assert [tuple(m) for m in merged] == ram
    assert a.allocated_bytes() == sum(x.pages * P for x in allocs if x.owner != "firmware")
    ds = a.descriptors()
    for d, n in zip(ds, ds[1:]):
        assert d.start + d.pages * P <= n.start
        assert not (d.start + d.pages * P == n.start and d.type == n.type
                    and d.attribute == n.attribute), "adjacent equal descriptors not merged"
    # RAM pages are described exactly once (a RAM run may merge with an adjacent non-RAM range
    # of the same type and attributes, e.g. allocated ACPI reclaim next to the ACPI tables).
    ram_pages = 0
    for d in ds:
        e = d.start + d.pages * P
        assert d.pages > 0 and d.start % P == 0
        inside = sum(max(0, min(e, re) - max(d.start, rs)) for rs, re in ram) // P
        ram_pages += inside
        if inside:
            assert d.attribute & RAM_ATTR == RAM_ATTR
        if 0 < inside < d.pages:
            assert d.type not in (CONV, MemType.ReservedMemoryType), d
    assert ram_pages == sum((e - s) // P for s, e in ram)
    # every target range is covered (widened to pages)
    for r in a.target.ranges:
        lo, hi = r.start & ~(P - 1), (r.end + P - 1) & ~(P - 1)
        covered = sum(min(hi, d.start + d.pages * P) - max(lo, d.start) for d in ds
                      if d.start < hi and lo < d.start + d.pages * P)
        assert covered == hi - lo
    assert not any(d.start < x and x < d.start + d.pages * P for d in ds
                   for x in (a.target.max_address() + P,))
    conv = sum(d.pages for d in ds if d.type == CONV)
    assert conv * P == a.free_bytes()


# --- the initial map -----------------------------------------------------------------------
def test_initial_state() -> None:
    a = new()
    assert [(x.start, x.pages, x.mem_type, x.owner, x.pool) for x in a.allocations] == [
        (0, 1, BSD, "firmware", False)]
    assert a.allocated_bytes() == 0
    assert a.free_bytes() == (RAM_PAGES - 1) * P
    check_consistent(a)


def test_initial_descriptors() -> None:
    ds = new().descriptors()
    got = [(d.type, d.start, d.pages, d.attribute) for d in ds]
    assert got == [
        (BSD, 0, 1, RAM_ATTR),
        (CONV, 0x1000, 0x9E, RAM_ATTR),
        # the partial page [0x9f000, 0x9fc00) of RAM joins the reserved range after it
        (MemType.ReservedMemoryType, 0x9F000, 1, 0),
        (MemType.ReservedMemoryType, 0xF0000, 0x10, 0),
        (CONV, 0x100000, (0x80000000 - 0x100000) // P, RAM_ATTR),
        (MemType.ACPIReclaimMemory, 0x80000000, 0x10, RAM_ATTR),
        (MemType.ACPIMemoryNVS, 0x80010000, 0x10, RAM_ATTR),
        (MemType.ReservedMemoryType, 0xFEC00000, 1, 0),
        (CONV, 0x100000000, G // P, RAM_ATTR),
    ]
    ram_pages = sum(d.pages for d in ds if d.type in (CONV, BSD))
    assert ram_pages == sum(r.size for r in MAP.ram()) // P == RAM_PAGES


def test_no_page0_reservation_when_page0_is_not_ram() -> None:
    t = TargetMemoryMap.from_text("0x0 0xfff Reserved\n0x1000 0xfffff System RAM\n")
    a = new(target=t)
    assert a.allocations == []
    assert a.descriptors()[0] == Descriptor(MemType.ReservedMemoryType, 0, 1, 0)
    assert a.descriptors()[1] == Descriptor(CONV, 0x1000, 0xFF, RAM_ATTR)


# --- AllocateAnyPages ------------------------------------------------------------------------
def test_any_pages_top_down_below_4g() -> None:
    a = new()
    x = a.allocate_pages(ANY, LD, 1)
    y = a.allocate_pages(ANY, LD, 2)
    z = a.allocate_pages(ANY, LD, 3)
    assert x == 0x80000000 - P
    assert y == x - 2 * P
    assert z == y - 3 * P
    check_consistent(a)


def test_any_pages_skips_runs_too_small() -> None:
    # below 4 GiB: a 1 MiB run high up and a 16 MiB run lower down
    t = TargetMemoryMap.from_text("0x0 0xfffff Reserved\n0x100000 0x10ffffff System RAM\n"
                                  "0x20000000 0x200fffff System RAM\n")
    a = new(target=t)
    assert a.allocate_pages(ANY, LD, 0x100) == 0x20000000   # exactly fills the high run
    assert a.allocate_pages(ANY, LD, 1) == 0x11000000 - P
    assert a.allocate_pages(ANY, LD, 0x200) == 0x11000000 - P - 0x200 * P


def test_any_pages_goes_above_4g_only_when_needed() -> None:
    t = TargetMemoryMap.from_text("0x100000 0x1fffff System RAM\n"
                                  "0x100000000 0x100ffffff System RAM\n")
    a = new(target=t)
    assert a.allocate_pages(ANY, LD, 0x80) == 0x200000 - 0x80 * P        # fits below 4 GiB
    big = a.allocate_pages(ANY, LD, 0x200)                                 # 2 MiB does not
    assert big == 0x101000000 - 0x200 * P
    check_consistent(a)


def test_any_pages_out_of_resources() -> None:
    t = TargetMemoryMap.from_text("0x100000 0x1fffff System RAM\n")
    a = new(target=t)
    assert err(a.allocate_pages, ANY, LD, 0x101) == status.OUT_OF_RESOURCES
    key = a.map_key
    assert a.allocate_pages(ANY, LD, 0x100) == 0x100000
    assert a.map_key == key + 1
    assert err(a.allocate_pages, ANY, LD, 1) == status.OUT_OF_RESOURCES
    assert a.map_key == key + 1


def test_zero_pages() -> None:
    a = new()
    key = a.map_key
    assert err(a.allocate_pages, ANY, LD, 0) == status.OUT_OF_RESOURCES
    assert err(a.allocate_pages, MAX, LD, 0, 0xFFFFFFFF) == status.OUT_OF_RESOURCES
    assert err(a.allocate_pages, ADDR, LD, 0, 0x200000) == status.NOT_FOUND
    assert a.map_key == key


# --- AllocateMaxAddress ----------------------------------------------------------------------
def test_max_address_boundaries() -> None:
    a = new()
    assert a.allocate_pages(MAX, LD, 1, 0x1FFFFF) == 0x1FF000          # last byte == limit
    assert a.allocate_pages(MAX, LD, 1, 0x200FFF) == 0x200000          # page-aligned limit + 0xfff
    assert a.allocate_pages(MAX, LD, 1, 0x201FFE) == 0x1FE000          # unaligned: rounds down
    assert a.allocate_pages(MAX, LD, 2, 0x300000) == 0x2FE000          # limit at a page start
    check_consistent(a)


def test_max_address_prefers_below_4g() -> None:
    a = new()
    assert a.allocate_pages(MAX, LD, 1, (1 << 64) - 1) == 0x80000000 - P
    assert a.allocate_pages(MAX, LD, 1, 0x13FFFFFFF) == 0x80000000 - 2 * P


def test_max_address_above_4g_when_low_is_full() -> None:
    t = TargetMemoryMap.from_text("0x100000 0x1fffff System RAM\n"
                                  "0x100000000 0x100ffffff System RAM\n")
    a = new(target=t)
    assert a.allocate_pages(MAX, LD, 0x200, 0x100FFFFFF) == 0x101000000 - 0x200 * P
    assert a.allocate_pages(MAX, LD, 0x200, 0x100DFFFFF) == 0x100E00000 - 0x200 * P


def test_max_address_below_lowest_ram() -> None:
    a = new()
    # page 0 is RAM but the firmware's: nothing else ends at or below 0xfff
    assert err(a.allocate_pages, MAX, LD, 1, 0xFFF) == status.NOT_FOUND
    assert err(a.allocate_pages, MAX, LD, 1, 0) == status.NOT_FOUND
    t = TargetMemoryMap.from_text("0x100000 0x1fffff System RAM\n")
    b = new(target=t)
    assert err(b.allocate_pages, MAX, LD, 1, 0xFFFFF) == status.NOT_FOUND
    assert err(b.allocate_pages, MAX, LD, 2, 0x100FFF) == status.NOT_FOUND
    assert b.allocate_pages(MAX, LD, 1, 0x100FFF) == 0x100000


def test_max_address_nothing_fits_anywhere() -> None:
    t = TargetMemoryMap.from_text("0x100000 0x1fffff System RAM\n")
    a = new(target=t)
    assert err(a.allocate_pages, MAX, LD, 0x200, 0xFFFFFFFF) == status.OUT_OF_RESOURCES


# --- AllocateAddress -------------------------------------------------------------------------
def test_address_exact() -> None:
    a = new()
    assert a.allocate_pages(ADDR, LD, 0x100, 0x1000000) == 0x1000000
    assert a.allocate_pages(ADDR, LD, 1, 0x1000) == 0x1000               # lowest allocatable page
    assert a.allocate_pages(ADDR, LD, 1, 0x9E000) == 0x9E000             # last whole low page
    assert a.allocate_pages(ADDR, LD, 1, 0x7FFFF000) == 0x7FFFF000
    assert a.allocate_pages(ADDR, LD, G // P, 0x100000000) == 0x100000000  # all of high RAM
    check_consistent(a)


def test_address_unaligned() -> None:
    a = new()
    assert err(a.allocate_pages, ADDR, LD, 1, 0x1000800) == status.NOT_FOUND
    assert err(a.allocate_pages, ADDR, LD, 1, 0x1000008) == status.NOT_FOUND


def test_address_occupied() -> None:
    a = new()
    a.allocate_pages(ADDR, LD, 4, 0x1000000)
    key = a.map_key
    assert err(a.allocate_pages, ADDR, LD, 1, 0x1000000) == status.NOT_FOUND
    assert err(a.allocate_pages, ADDR, LD, 1, 0x1003000) == status.NOT_FOUND
    assert err(a.allocate_pages, ADDR, LD, 2, 0xFFF000) == status.NOT_FOUND  # overlaps the start
    assert err(a.allocate_pages, ADDR, LD, 1, 0) == status.NOT_FOUND          # page 0
    assert a.map_key == key
    assert a.allocate_pages(ADDR, LD, 1, 0xFFF000) == 0xFFF000
    assert a.allocate_pages(ADDR, LD, 1, 0x1004000) == 0x1004000


@pytest.mark.parametrize("addr,pages", [
    (0x9F000, 1),          # partial RAM page
    (0x9E000, 2),          # runs into the partial page
    (0xA0000, 1),          # hole
    (0xF0000, 1),          # reserved
    (0x7FFFF000, 2),       # runs off the end of RAM into ACPI tables
    (0x80000000, 1),       # ACPI tables
    (0x80010000, 1),       # ACPI NVS
    (0xC0000000, 1),       # hole
    (0xFFE00000, 1),       # flash window
    (0x140000000, 1),      # above the top of RAM
    (0xFFFFFFFFFFFFF000, 2),  # wraps
])
def test_address_not_ram(addr: int, pages: int) -> None:
    a = new()
    assert err(a.allocate_pages, ADDR, LD, pages, addr) == status.NOT_FOUND


# --- parameter checks ------------------------------------------------------------------------
@pytest.mark.parametrize("mt", [MemType.ConventionalMemory, MemType.PersistentMemory,
                                MemType.UnacceptedMemoryType, 16, 0x6FFFFFFF, 1 << 32, -1])
def test_invalid_memory_types(mt: int) -> None:
    a = new()
    assert err(a.allocate_pages, ANY, mt, 1) == status.INVALID_PARAMETER
    assert err(a.allocate_pool, mt, 16) == status.INVALID_PARAMETER


@pytest.mark.parametrize("mt", [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13,
                                0x70000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_valid_memory_types_are_reported(mt: int) -> None:
    a = new()
    x = a.allocate_pages(ADDR, mt, 3, 0x1000000)   # away from same-typed neighbours
    d = desc_at(a, x)
    assert (d.type, d.start, d.pages) == (mt, x, 3)
    want = RAM_ATTR | (EFI_MEMORY_RUNTIME if mt in (5, 6) else 0)
    assert d.attribute == want
    p = a.allocate_pool(mt, 10)
    assert desc_at(a, p).type == mt


@pytest.mark.parametrize("t", [3, 4, 0xFFFFFFFF, -1])
def test_invalid_allocation_type(t: int) -> None:
    assert err(new().allocate_pages, t, LD, 1) == status.INVALID_PARAMETER


# --- FreePages -------------------------------------------------------------------------------
def test_free_pages_roundtrip() -> None:
    a = new()
    before = (a.free_ranges(), a.descriptors())
    x = a.allocate_pages(ANY, LD, 10)
    key = a.map_key
    a.free_pages(x, 10)
    assert a.map_key == key + 1
    assert (a.free_ranges(), a.descriptors()) == before
    assert a.allocated_bytes() == 0
    assert a.allocate_pages(ANY, LD, 10) == x  # reused


def test_free_pages_merges_both_neighbours() -> None:
    a = new()
    before = a.free_ranges()
    x = a.allocate_pages(ANY, LD, 3)
    y = a.allocate_pages(ANY, LD, 2)
    a.free_pages(x, 3)
    a.free_pages(y, 2)          # merges with the run below and the run above
    assert a.free_ranges() == before
    assert a.allocate_pages(ANY, LD, 5) == x + 3 * P - 5 * P


def test_free_pages_errors() -> None:
    a = new()
    x = a.allocate_pages(ADDR, LD, 4, 0x1000000)
    key = a.map_key
    assert err(a.free_pages, x + 8, 1) == status.INVALID_PARAMETER
    assert err(a.free_pages, x + 0x800, 1) == status.INVALID_PARAMETER
    assert err(a.free_pages, x, 0) == status.INVALID_PARAMETER
    assert err(a.free_pages, x, 5) == status.NOT_FOUND           # runs past the allocation
    assert err(a.free_pages, x - P, 2) == status.NOT_FOUND       # starts before it
    assert err(a.free_pages, 0x2000000, 1) == status.NOT_FOUND   # free RAM
    assert err(a.free_pages, 0xF0000, 1) == status.NOT_FOUND     # reserved
    assert err(a.free_pages, 0, 1) == status.NOT_FOUND           # page 0
    assert a.map_key == key
    assert len(a.allocations) == 2
    a.free_pages(x, 4)
    assert err(a.free_pages, x, 4) == status.NOT_FOUND           # double free
    check_consistent(a)


def test_free_pages_partial_splits() -> None:
    a = new()
    x = a.allocate_pages(ADDR, BSC, 10, 0x1000000)
    a.free_pages(x + 3 * P, 4)                                   # middle
    got = [(y.start, y.pages, y.mem_type) for y in a.allocations if y.owner == "payload"]
    assert got == [(x, 3, BSC), (x + 7 * P, 3, BSC)]
    assert a.allocated_bytes() == 6 * P
    assert desc_at(a, x + 3 * P) == Descriptor(CONV, x + 3 * P, 4, RAM_ATTR)
    a.free_pages(x, 1)                                           # head
    a.free_pages(x + 9 * P, 1)                                   # tail
    got = [(y.start, y.pages) for y in a.allocations if y.owner == "payload"]
    assert got == [(x + P, 2), (x + 7 * P, 2)]
    assert err(a.free_pages, x + 2 * P, 6) == status.NOT_FOUND  # spans a free hole
    check_consistent(a)


def test_free_pages_spanning_adjacent_allocations() -> None:
    a = new()
    x = a.allocate_pages(ADDR, LD, 2, 0x1000000)
    a.allocate_pages(ADDR, BSD, 2, 0x1002000)
    a.free_pages(x + P, 2)
    got = [(y.start, y.pages, y.mem_type) for y in a.allocations if y.owner == "payload"]
    assert got == [(x, 1, LD), (x + 3 * P, 1, BSD)]
    check_consistent(a)


def test_free_pages_firmware_owned() -> None:
    a = new()
    fw = a.allocate_pages(ANY, BSC, 8, owner="firmware")
    assert a.allocated_bytes() == 0
    assert err(a.free_pages, fw, 8) == status.NOT_FOUND
    assert err(a.free_pages, fw + P, 1) == status.NOT_FOUND
    a.free_pages(fw, 8, owner="firmware")
    check_consistent(a)


def test_free_pages_refuses_pool_pages() -> None:
    a = new()
    p = a.allocate_pool(LD, 100)
    page = p & ~(P - 1)
    assert err(a.free_pages, page, 1) == status.NOT_FOUND
    a.free_pool(p)


# --- pools ---------------------------------------------------------------------------------
def test_pool_alignment_and_packing() -> None:
    a = new()
    key = a.map_key
    addrs = [a.allocate_pool(LD, n) for n in (1, 7, 8, 9, 13, 100)]
    assert all(x % 8 == 0 for x in addrs)
    assert a.map_key == key + 1                       # one new pool page, then none
    pages = {x & ~(P - 1) for x in addrs}
    assert len(pages) == 1
    sizes = [8, 8, 8, 16, 16, 104]
    spans = sorted(zip(addrs, sizes))
    for (s1, n1), (s2, _) in zip(spans, spans[1:]):
        assert s1 + n1 <= s2
    pool_allocs = [y for y in a.allocations if y.pool]
    assert [(y.start, y.pages, y.mem_type) for y in pool_allocs] == [(pages.pop(), 1, LD)]
    check_consistent(a)


def test_pool_types_and_owners_do_not_share_pages() -> None:
    a = new()
    x = a.allocate_pool(LD, 16)
    y = a.allocate_pool(BSD, 16)
    z = a.allocate_pool(LD, 16, owner="firmware")
    assert len({x & ~(P - 1), y & ~(P - 1), z & ~(P - 1)}) == 3
    assert desc_at(a, y).type == BSD
    assert a.allocated_bytes() == 2 * P                # the firmware's pool page is not counted


def test_pool_fills_page_then_grows() -> None:
    a = new()
    blocks = [a.allocate_pool(LD, 1000) for _ in range(8)]  # 4 per page
    pages = sorted({b & ~(P - 1) for b in blocks})
    assert len(pages) == 2
    ivs = sorted((b, b + 1000) for b in blocks)
    assert all(e <= s for (_, e), (s, _) in zip(ivs, ivs[1:]))
    assert all(p <= b and b + 1000 <= p + P for b in blocks for p in [b & ~(P - 1)])


def test_large_pool_gets_own_pages() -> None:
    a = new()
    small = a.allocate_pool(LD, 64)
    big = a.allocate_pool(LD, 3 * P + 1)
    assert big % P == 0
    own = next(y for y in a.allocations if y.start == big)
    assert (own.pages, own.pool, own.mem_type) == (4, True, LD)
    assert small & ~(P - 1) != big
    x = a.allocate_pool(LD, 2048)
    assert x == big + 3 * P + 8                          # the most recent arena: the big block's tail
    a.free_pool(x)
    assert err(a.free_pages, big, 4) == status.NOT_FOUND
    key = a.map_key
    a.free_pool(big)
    assert not any(y.start == big for y in a.allocations)
    assert a.map_key == key + 1
    # the tail of a large block's last page takes small blocks of its type
    big2 = a.allocate_pool(BSD, 2 * P + 8)
    tail = a.allocate_pool(BSD, 100)
    assert tail == big2 + 2 * P + 8
    a.free_pool(big2)
    assert any(y.start == big2 and y.pool for y in a.allocations)   # still holds `tail`
    a.free_pool(tail)
    assert not any(y.start == big2 for y in a.allocations)
    check_consistent(a)


def test_pool_size_zero_unique_pointers() -> None:
    a = new()
    ptrs = [a.allocate_pool(LD, 0) for _ in range(5)]
    assert len(set(ptrs)) == 5 and all(p and p % 8 == 0 for p in ptrs)
    for p in ptrs:
        a.free_pool(p)
    assert not any(y.pool for y in a.allocations)


def test_free_pool_errors_and_page_release() -> None:
    a = new()
    p = a.allocate_pool(LD, 24)
    q = a.allocate_pool(LD, 24)
    key = a.map_key
    assert err(a.free_pool, p + 8) == status.INVALID_PARAMETER      # inside a block
    assert err(a.free_pool, 0x2000000) == status.INVALID_PARAMETER  # never allocated
    x = a.allocate_pages(ANY, LD, 1)
    assert err(a.free_pool, x) == status.INVALID_PARAMETER          # page allocation
    key = a.map_key
    a.free_pool(p)
    assert a.map_key == key                                         # page still in use by q
    assert err(a.free_pool, p) == status.INVALID_PARAMETER          # double free
    assert a.allocate_pool(LD, 24) == p                             # gap reused
    a.free_pool(p)
    a.free_pool(q)
    assert a.map_key == key + 1                                     # the pool page went back
    assert not any(y.pool for y in a.allocations)
    check_consistent(a)


def test_pool_size() -> None:
    a = new()
    p = a.allocate_pool(LD, 13)
    assert a.pool_size(p) == 16
    assert err(a.pool_size, p + 8) == status.INVALID_PARAMETER


# --- the cap -------------------------------------------------------------------------------
def test_cap_exceeded() -> None:
    a = new(cap=1 << 20)
    a.allocate_pages(ANY, LD, 200)
    a.allocate_pages(ANY, LD, 56, owner="payload")
    a.allocate_pages(ANY, LD, 1000, owner="firmware")     # not counted
    assert a.allocated_bytes() == 1 << 20
    key = a.map_key
    with pytest.raises(MemoryCapExceeded) as ei:
        a.allocate_pages(ANY, LD, 1)
    e = ei.value
    msg = str(e)
    assert "0x1000 bytes" in msg and "0x100000 bytes" in msg and "cap" in msg
    assert e.details == {"asked": P, "in_use": 1 << 20, "cap": 1 << 20}
    assert e.exit_code == 22
    assert a.map_key == key and a.allocated_bytes() == 1 << 20
    check_consistent(a)


def test_cap_counts_pool_pages_and_frees() -> None:
    a = new(cap=4 * P)
    a.allocate_pool(LD, 10)                       # one page
    x = a.allocate_pages(ANY, LD, 3)
    assert a.allocated_bytes() == 4 * P
    a.allocate_pool(LD, 10)                       # fits in the existing pool page
    with pytest.raises(MemoryCapExceeded):
        a.allocate_pool(BSD, 10)                  # would need a new page
    a.free_pages(x, 1)
    assert a.allocated_bytes() == 3 * P
    a.allocate_pool(BSD, 10)


def test_cap_after_spec_errors() -> None:
    """A request that could not be satisfied anyway gets its EFI status, not the cap."""
    a = new(cap=P)
    assert err(a.allocate_pages, ANY, LD, 1 << 40) == status.OUT_OF_RESOURCES
    assert err(a.allocate_pages, ADDR, LD, 2, 0xF0000) == status.NOT_FOUND
    with pytest.raises(MemoryCapExceeded):
        a.allocate_pages(ANY, LD, 2)


# --- map key -------------------------------------------------------------------------------
def test_map_key_changes_on_every_change() -> None:
    a = new()
    keys = [a.map_key]
    x = a.allocate_pages(ANY, LD, 2)
    keys.append(a.map_key)
    a.free_pages(x, 1)
    keys.append(a.map_key)
    p = a.allocate_pool(BSD, 8)
    keys.append(a.map_key)
    a.free_pool(p)
    keys.append(a.map_key)
    assert keys == list(range(keys[0], keys[0] + 5))
    a.descriptors()
    a.encode_map()
    assert a.map_key == keys[-1]


# --- descriptors and the encoded map -----------------------------------------------------------
def test_descriptors_merge_and_attributes() -> None:
    a = new()
    a.allocate_pages(ADDR, LD, 2, 0x1000000)
    a.allocate_pages(ADDR, LD, 3, 0x1002000)              # adjacent, same type: one descriptor
    a.allocate_pages(ADDR, MemType.RuntimeServicesData, 1, 0x1005000)
    a.allocate_pages(ADDR, MemType.RuntimeServicesData, 1, 0x1006000)
    ds = a.descriptors()
    assert Descriptor(LD, 0x1000000, 5, RAM_ATTR) in ds
    assert Descriptor(MemType.RuntimeServicesData, 0x1005000, 2,
                      RAM_ATTR | EFI_MEMORY_RUNTIME) in ds
    assert desc_at(a, 0x1007000) == Descriptor(CONV, 0x1007000, (0x80000000 - 0x1007000) // P,
                                               RAM_ATTR)
    # allocations stay separate even though their descriptor is merged
    assert len([y for y in a.allocations if y.owner == "payload"]) == 4
    check_consistent(a)


def test_descriptors_edges_and_other_kinds() -> None:
    t = TargetMemoryMap.from_text("\n".join([
        "0x0 0xfff Reserved",
        "0x1000 0x7ffff System RAM",
        "0x80000 0x807ff ACPI Non-volatile Storage",   # shares a page with the next range
        "0x80800 0x80fff Reserved",
        "0x81000 0x81fff ACPI Tables",
        "0x82000 0x827ff ACPI Tables",
        "0x82800 0x82fff Unusable memory",             # wins the shared page over ACPI tables
        "0x83000 0x84fff Persistent Memory",
        "0x100400 0x1ffbff System RAM",                 # partial pages at both ends
        "0x200000 0x2003ff System RAM",                 # less than a page
    ]))
    ds = [(d.type, d.start, d.pages, d.attribute) for d in new(target=t).descriptors()]
    R = MemType.ReservedMemoryType
    assert ds == [
        (R, 0, 1, 0),
        (CONV, 0x1000, 0x7F, RAM_ATTR),
        (MemType.ACPIMemoryNVS, 0x80000, 1, RAM_ATTR),
        (MemType.ACPIReclaimMemory, 0x81000, 1, RAM_ATTR),
        (MemType.UnusableMemory, 0x82000, 1, RAM_ATTR),
        (MemType.PersistentMemory, 0x83000, 2, RAM_ATTR | EFI_MEMORY_NV),
        (R, 0x100000, 1, 0),
        (CONV, 0x101000, 0xFE, RAM_ATTR),
        (R, 0x1FF000, 2, 0),
    ]


def test_encode_map_layout() -> None:
    a = new()
    a.allocate_pages(ANY, MemType.RuntimeServicesCode, 3)
    a.allocate_pages(ANY, 0x80000001, 2)
    a.allocate_pool(LD, 10)
    raw = a.encode_map()
    ds = a.descriptors()
    assert DESCRIPTOR_SIZE == 48 and DESCRIPTOR_VERSION == 1
    assert len(raw) == len(ds) * 48 == a.map_size()
    parsed = []
    for i in range(len(raw) // 48):
        rec = raw[i * 48:(i + 1) * 48]
        typ, pad = struct.unpack_from("<II", rec, 0)
        phys, virt, npages, attr = struct.unpack_from("<QQQQ", rec, 8)
        assert pad == 0 and virt == 0 and rec[40:] == bytes(8)
        parsed.append((typ, phys, npages, attr))
    assert parsed == [(d.type, d.start, d.pages, d.attribute) for d in ds]
    rt = next(p for p in parsed if p[0] == MemType.RuntimeServicesCode)
    assert rt[3] == 0x800000000000000F and rt[2] == 3
    assert any(p[0] == 0x80000001 and p[2] == 2 for p in parsed)
    # Field offsets from the EFI_MEMORY_DESCRIPTOR layout, read byte-wise.
    first = raw[:48]
    assert int.from_bytes(first[0:4], "little") == MemType.BootServicesData
    assert int.from_bytes(first[8:16], "little") == 0
    assert int.from_bytes(first[24:32], "little") == 1
    assert int.from_bytes(first[32:40], "little") == 0xF


def test_descriptors_scale_with_allocations_not_pages() -> None:
    big = TargetMemoryMap.from_text("0x0 0x9fbff System RAM\n0x100000 0xbfffffff System RAM\n"
                                    "0x100000000 0x63fffffff System RAM\n")
    a = new(target=big)
    t0 = time.perf_counter()
    xs = [a.allocate_pages(ANY, LD if i % 2 else BSD, 1 + i % 3) for i in range(1500)]
    for x in xs[::3]:
        a.free_pages(x, 1)
    ds = a.descriptors()
    raw = a.encode_map()
    elapsed = time.perf_counter() - t0
    assert len(raw) == 48 * len(ds)
    assert sum(d.pages for d in ds if d.type != MemType.ReservedMemoryType) == \
        sum(r.size for r in big.ram()) // P
    assert elapsed < 5.0


# --- property test ---------------------------------------------------------------------------
if not HAVE_HYPOTHESIS:  # pragma: no cover
    @pytest.mark.skip(reason="hypothesis is not installed: the allocator property tests did not run")
    def test_property_tests_need_hypothesis() -> None:
        pass

SMALL = TargetMemoryMap.from_text("""\
0x0 0x3ffff System RAM
0x40000 0x4ffff Reserved
0x50000 0x8ffff System RAM
0x90000 0x90fff ACPI Tables
0x91000 0xa07ff System RAM
0x100000000 0x10001ffff System RAM
""")
SMALL_RAM = [(r.start, r.end) for r in SMALL.ram()]

if HAVE_HYPOTHESIS:
    TYPES = st.sampled_from([1, 2, 3, 4, 5, 6, 9, 0x80000000])
    ADDRS = st.integers(0, 0xA1).map(lambda n: n * P) | st.integers(0, 0x100030000 // P).map(
        lambda n: n * P) | st.sampled_from(
        [0, 0x3F000, 0x50000, 0xA0000, 0xFFFFF000, 0x100000000, 0x10001F000])


    class AllocatorMachine(RuleBasedStateMachine):
        """Random AllocatePages/FreePages/AllocatePool/FreePool against a page-level model."""

        @initialize()
        def setup(self) -> None:
            self.a = Allocator(SMALL, cap_bytes=1 << 40)
            self.model: dict[int, int] = {0: MemType.BootServicesData}  # page → type (page allocs)
            self.pools: dict[int, tuple[int, int]] = {}   # address → (size, type)
            self.pages: list[tuple[int, int]] = []        # live AllocatePages runs (address, pages)
            self.key = self.a.map_key

        def _pool_pages(self) -> dict[int, int]:
            return {p: y.mem_type for y in self.a.allocations if y.pool
                    for p in range(y.start, y.start + y.pages * P, P)}

        def _free_in_model(self, s: int, n: int) -> bool:
            pool = self._pool_pages()
            return all(p not in self.model and p not in pool
                       and any(rs <= p and p + P <= re for rs, re in SMALL_RAM)
                       for p in range(s, s + n * P, P))

        def _changed(self, did: bool) -> None:
            if did:
                assert self.a.map_key == self.key + 1
            else:
                assert self.a.map_key == self.key
            self.key = self.a.map_key

        @rule(kind=st.sampled_from([ANY, MAX, ADDR]), mt=TYPES, n=st.integers(0, 40), addr=ADDRS)
        def allocate(self, kind: int, mt: int, n: int, addr: int) -> None:
            was_free = self._free_in_model(addr, n) if kind == ADDR else None
            try:
                x = self.a.allocate_pages(kind, mt, n, addr)
            except EfiError as e:
                self._changed(False)
                if kind == ADDR and n:
                    assert e.status == status.NOT_FOUND and not was_free
                return
            self._changed(True)
            assert n > 0
            pool = self._pool_pages()
            assert all(p not in pool and any(rs <= p and p + P <= re for rs, re in SMALL_RAM)
                       for p in range(x, x + n * P, P))
            if kind == ADDR:
                assert x == addr and was_free
            if kind == MAX:
                assert x + n * P - 1 <= addr
            for p in range(x, x + n * P, P):
                assert p not in self.model
                self.model[p] = mt
            self.pages.append((x, n))

        @rule(data=st.data())
        def free(self, data) -> None:
            if not self.pages:
                return
            i = data.draw(st.integers(0, len(self.pages) - 1))
            x, n = self.pages[i]
            off = data.draw(st.integers(0, n - 1))
            cnt = data.draw(st.integers(1, n - off))
            self.a.free_pages(x + off * P, cnt)
            self._changed(True)
            for p in range(x + off * P, x + (off + cnt) * P, P):
                del self.model[p]
            rest = [(x, off), (x + (off + cnt) * P, n - off - cnt)]
            self.pages[i:i + 1] = [r for r in rest if r[1] > 0]

        @rule(addr=ADDRS, n=st.integers(1, 4))
        def free_wild(self, addr: int, n: int) -> None:
            owned = all(any(x <= p < x + c * P for x, c in self.pages)
                        for p in range(addr, addr + n * P, P))
            try:
                self.a.free_pages(addr, n)
            except EfiError as e:
                assert e.status == status.NOT_FOUND and not owned
                self._changed(False)
                return
            assert owned
            self._changed(True)
            for p in range(addr, addr + n * P, P):
                del self.model[p]
            new = []
            for x, c in self.pages:
                e = x + c * P
                if e <= addr or x >= addr + n * P:
                    new.append((x, c))
                    continue
                if x < addr:
                    new.append((x, (addr - x) // P))
                if e > addr + n * P:
                    new.append((addr + n * P, (e - addr - n * P) // P))
            self.pages = new

        @rule(mt=TYPES, size=st.integers(0, 3 * P))
        def pool(self, mt: int, size: int) -> None:
            before = self._pool_pages()
            try:
                x = self.a.allocate_pool(mt, size)
            except EfiError as e:
                assert e.status == status.OUT_OF_RESOURCES
                self._changed(False)
                return
            after = self._pool_pages()
            self._changed(after.keys() != before.keys())
            assert x % 8 == 0
            for y, (n, _) in self.pools.items():
                assert x + max(size, 1) <= y or y + max(n, 1) <= x
            for p in range(x & ~(P - 1), x + max(size, 1), P):
                assert after.get(p) == mt
            assert not (after.keys() - before.keys()) & self.model.keys()
            self.pools[x] = (size, mt)

        @rule(data=st.data())
        def free_pool(self, data) -> None:
            if not self.pools:
                return
            x = data.draw(st.sampled_from(sorted(self.pools)))
            before = self._pool_pages()
            del self.pools[x]
            self.a.free_pool(x)
            after = self._pool_pages()
            self._changed(after.keys() != before.keys())
            assert after.keys() <= before.keys()
            assert err(self.a.free_pool, x) == status.INVALID_PARAMETER

        @invariant()
        def consistent(self) -> None:
            if not hasattr(self, "a"):
                return
            check_consistent(self.a)
            pool = self._pool_pages()
            assert not pool.keys() & self.model.keys()
            # descriptors, expanded to pages, equal the model on every RAM page
            for d in self.a.descriptors():
                for p in range(d.start, d.start + d.pages * P, P):
                    in_ram = any(rs <= p and p + P <= re for rs, re in SMALL_RAM)
                    if not in_ram:
                        assert d.type in (MemType.ReservedMemoryType, MemType.ACPIReclaimMemory)
                    else:
                        assert d.type == self.model.get(p, pool.get(p, CONV)), hex(p)
            for x, (n, mt) in self.pools.items():
                assert all(pool.get(p) == mt for p in range(x & ~(P - 1), x + max(n, 1), P))
            assert self.a.allocated_bytes() == P * (len(self.model) - 1 + len(pool))


    TestAllocatorMachine = AllocatorMachine.TestCase
    TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None, database=None,
                                             suppress_health_check=[HealthCheck.too_slow])


    @given(st.lists(st.tuples(st.integers(1, 64), st.booleans()), max_size=30))
    @settings(max_examples=100, deadline=None, database=None)
    def test_top_down_any_pages_never_leaves_higher_fit(reqs) -> None:
        """AllocateAnyPages returns the highest fit below 4 GiB: no free run below 4 GiB ends
        higher than the chosen block while being able to hold it."""
        a = new(target=SMALL)
        live = []
        for n, free_one in reqs:
            try:
                x = a.allocate_pages(ANY, LD, n)
            except EfiError:
                continue
            if x < 1 << 32:
                for s, e in a.free_ranges():
                    if e <= 1 << 32 and e - s >= n * P:
                        assert e <= x, (hex(x), hex(s), hex(e))
            else:
                assert all(e - s < n * P for s, e in a.free_ranges() if e <= 1 << 32)
            live.append((x, n))
            if free_one and live:
                y, m = live.pop(0)
                a.free_pages(y, m)
            check_consistent(a)


def test_pool_calls_cost_does_not_grow_with_earlier_calls(monkeypatch) -> None:
    """200,000 live small pools: each AllocatePool looks at no more than POOL_SEARCH arenas (a
    payload's storm of pools once made every call scan all earlier pool pages)."""
    from hostsvc import memory as M
    a = new()
    looked = []
    real_gap = M.Allocator._arena_gap
    monkeypatch.setattr(M.Allocator, "_arena_gap", staticmethod(lambda arena, need: looked.append(1) or real_gap(arena, need)))
    n = 200_000
    blocks = [a.allocate_pool(MemType.BootServicesData, 2048) for _ in range(n)]  # two per page
    assert len(looked) <= M.POOL_SEARCH * n
    for p in blocks[::2]:          # holes everywhere …
        a.free_pool(p)
    looked.clear()
    for _ in range(1000):          # … are found among the recently freed arenas
        a.allocate_pool(MemType.BootServicesData, 2048)
    assert len(looked) <= M.POOL_SEARCH * 1000
    assert a.allocated_bytes() == (n // 2) * 4096, "the 1000 new blocks reused freed holes"


def test_payload_cannot_free_the_firmwares_pool_blocks() -> None:
    a = new()
    table = a.allocate_pool(MemType.BootServicesData, 96, owner="firmware")
    assert err(a.free_pool, table) == status.INVALID_PARAMETER
    assert a.allocate_pool(MemType.BootServicesData, 96, owner="firmware") != table
    a.free_pool(table, owner="firmware")
