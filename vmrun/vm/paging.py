"""The guest's identity page tables, kept by the host: what the CPL-3 payload may touch.

vmrun's firmware area (GDT, IDT, TSS, the ring-0 monitor's stack, these page tables) lies in
guest RAM. If the payload could write it, it could install its own IDT gate or page table and
run at ring 0. So the tables give CPL 3 only what it is owed:

* the firmware area's system pages are **supervisor-only** (U/S=0: the CPU's own accesses to the
  IDT, GDT, TSS and the monitor stack are implicit supervisor accesses and still work);
* the monitor and service thunks (``guest/firmware.bin``) are **user read-only** (the payload
  calls the thunks; it cannot patch them);
* a **guard page** below the payload's stack is not present, so a runaway recursion faults at
  once instead of overwriting the firmware's tables below the stack;
* page 0 is not present (a NULL dereference faults, as EDK2's NULL-pointer detection does);
* the target's firmware tables copied in (SMBIOS) are user read-only;
* everything else: once the firmware calls :meth:`IdentityMap.restrict`, a 2 MiB frame of RAM is
  present only while some allocation (AllocatePages/AllocatePool, the firmware's own) has touched
  it. RAM that no allocation covers is not present: the payload's write there is a page fault,
  and host memory (the guest's RAM is an anonymous mapping that costs nothing until touched)
  grows only with what was allocated. Frames are counted: :attr:`IdentityMap.mapped_bytes`
  bounds the host memory the guest can make resident, and the machine's memory cap applies to it.

The boot/runtime service *tables* live in ordinary pool memory and stay writable: hooking them
is legal UEFI (shim and systemd-stub do it).

Frames stay mapped once mapped (FreePages does not unmap): removing a translation would need a
TLB flush that reaches KVM's shadow page tables, and host writes to the guest's page tables are
not seen by a shadow MMU; adding one needs no flush (a not-present entry is never cached), so
every change made while the guest runs only *adds* translations. The 4 KiB tables of the frames
that need them (firmware area, stack guard, page 0, copied tables) are made before the guest
first runs.

At ExitBootServices the handoff needs the plain identity map of all RAM (the next kernel runs on
it at CPL 0 until it builds its own): :meth:`IdentityMap.handoff` rewrites the tables so, exactly
as they were before this module existed (``vmrun.vm.cpu.build_page_tables``).
"""

from __future__ import annotations

import struct

from vmrun.vm import cpu
from vmrun.vm import layout as L

PTE_P, PTE_RW, PTE_US, PTE_PS = cpu.PTE_P, cpu.PTE_RW, cpu.PTE_US, cpu.PTE_PS
_ADDR = 0x000F_FFFF_FFFF_F000
FRAME = L.PAGE_2M
FRAME_SHIFT = 21

# access kinds for protect()
NONE = 0                          # not present
USER_RW = PTE_P | PTE_RW | PTE_US
USER_RO = PTE_P | PTE_US
SUPERVISOR = PTE_P | PTE_RW       # ring 0 only
KIND_NAMES = {NONE: "not present", USER_RW: "user read/write", USER_RO: "user read-only",
              SUPERVISOR: "supervisor-only"}

_Q = struct.Struct("<Q")


class PagingError(Exception):
    """vmrun's own use of the page tables is inconsistent (a bug, not the payload's doing)."""


class IdentityMap:
    """4-level identity tables at ``base`` for [0, ``limit``): PML4, one PDPT, a PD per GiB, then
    ``spare_pts`` page tables for the frames that need 4 KiB pages (see the module docstring)."""

    def __init__(self, mem, base: int, limit: int, spare_pts: int = L.FW_SPARE_PTS):
        self.mem = mem.unguarded()  # the tables are written here, never on the payload's behalf
        self.base = base
        self.limit = limit
        self.gibs = max(1, (limit + L.GIB - 1) // L.GIB)
        self.pd_base = base + 2 * L.PAGE_SIZE
        self._free_pts = [base + (2 + self.gibs + i) * L.PAGE_SIZE for i in range(spare_pts)]
        self.pt_of_frame: dict[int, int] = {}      # frame → its page table's address
        self.pinned: dict[int, int] = {}           # page address → access kind set by protect()
        self.present: set[int] = set()             # frames mapped by a 2 MiB PDE
        self.restricted = False                    # only allocated frames are present
        self.sealed = False                        # the guest has run: only additions from now on
        self.mapped_bytes = 0                      # bytes of frames mapped for allocations
        self.names: list[tuple[int, int, str]] = []  # (start, end, what) of protected ranges
        mem.write(base, cpu.build_page_tables(base, limit))
        self.present = set(range(self._frames_in(0, min(limit, self.gibs * L.GIB))[1]))

    # --- set-up (before the guest runs) ----------------------------------------------------
    @staticmethod
    def size(limit: int, spare_pts: int = L.FW_SPARE_PTS) -> int:
        return (cpu.page_table_pages(limit) + spare_pts) * L.PAGE_SIZE

    def protect(self, start: int, end: int, kind: int, what: str) -> None:
        """Give the pages of [start, end) (page-aligned) the access ``kind`` for good: later
        allocations do not change them."""
        self._not_sealed("protect")
        start &= ~(L.PAGE_SIZE - 1)
        end = (end + L.PAGE_SIZE - 1) & ~(L.PAGE_SIZE - 1)
        for page in range(start, end, L.PAGE_SIZE):
            pt = self._split(page >> FRAME_SHIFT)
            self.pinned[page] = kind
            self._write_pte(pt, page, page | kind if kind else 0)
        self.names.append((start, end, what))

    def restrict(self, allocations) -> None:
        """From now on only frames that ``allocations`` ((start, end) pairs) and later
        :meth:`map_allocation` calls touch are present (apart from the pinned pages and the
        always-mapped ``HCALL_PAGE`` frame)."""
        self._not_sealed("restrict")
        for f in list(self.present):
            self._write_pde(f, 0)
        self.present.clear()
        for f, pt in self.pt_of_frame.items():
            for i in range(512):
                page = (f << FRAME_SHIFT) + i * L.PAGE_SIZE
                if page not in self.pinned:
                    self._write_pte(pt, page, 0)
        self.restricted = True
        hc = L.HCALL_PAGE >> FRAME_SHIFT
        if hc not in self.pt_of_frame:
            self._write_pde(hc, (hc << FRAME_SHIFT) | USER_RW | PTE_PS)
            self.present.add(hc)
        for start, end in allocations:
            self.map_allocation(start, end, charge=False)

    def seal(self) -> None:
        """The guest is about to run: from now on translations are only added."""
        self.sealed = True

    # --- while the guest runs ----------------------------------------------------------------
    def frames_to_map(self, start: int, end: int) -> int:
        """How many new 2 MiB frames :meth:`map_allocation` of [start, end) would map."""
        if not self.restricted:
            return 0
        lo, hi = self._frames_in(start, end)
        return sum(1 for f in range(lo, hi) if f not in self.present and f not in self.pt_of_frame)

    def map_allocation(self, start: int, end: int, charge: bool = True) -> int:
        """Make the RAM of an allocation [start, end) present for the payload; returns the bytes
        of new 2 MiB frames this mapped (counted in :attr:`mapped_bytes` when ``charge``)."""
        if not self.restricted or end <= start:
            return 0
        lo, hi = self._frames_in(start, end)
        new = 0
        for f in range(lo, hi):
            pt = self.pt_of_frame.get(f)
            if pt is not None:
                fs = f << FRAME_SHIFT
                for page in range(max(start, fs) & ~(L.PAGE_SIZE - 1), min(end, fs + FRAME), L.PAGE_SIZE):
                    if page not in self.pinned:
                        self._write_pte(pt, page, page | USER_RW)
            elif f not in self.present:
                if (f << FRAME_SHIFT) >= self.limit:
                    raise PagingError(f"allocation {start:#x}-{end:#x} lies beyond the identity map")
                self._write_pde(f, (f << FRAME_SHIFT) | USER_RW | PTE_PS)
                self.present.add(f)
                new += FRAME
        if charge:
            self.mapped_bytes += new
        return new

    def host_may_write(self, gpa: int, size: int) -> bool:
        """Whether the host may write [gpa, gpa+size) on the payload's behalf: what the payload
        could write itself. Every 2 MiB frame of it is mapped, and in the frames with 4 KiB tables
        every page is present and user-writable (not vmrun's GDT, IDT, page tables, thunks).
        Once restricted, RAM that no allocation ever touched stays untouched on the host too."""
        if not self.restricted:
            return True
        if size <= 0:
            return True
        lo, hi = self._frames_in(gpa, gpa + size)
        for f in range(lo, hi):
            if f in self.present:
                continue
            pt = self.pt_of_frame.get(f)
            if pt is None:
                return False
            fs = f << FRAME_SHIFT
            for page in range(max(gpa, fs) & ~(L.PAGE_SIZE - 1), min(gpa + size, fs + FRAME), L.PAGE_SIZE):
                kind = self.pinned.get(page)
                if kind is not None and kind != USER_RW:
                    return False  # vmrun's own pages: the payload cannot write them, nor make us
                if kind is None and not self.mem.read_u64(pt + 8 * ((page >> 12) & 511)) & PTE_P:
                    return False
        return True

    def describe(self, addr: int) -> str:
        """What ``addr`` is to the payload: a protected range's name, "memory no allocation
        covers", or "" (nothing special: mapped, or outside the identity map)."""
        page = addr & ~(L.PAGE_SIZE - 1)
        for start, end, what in self.names:
            if start <= addr < end:
                return f"{what}: {KIND_NAMES[self.pinned.get(page, NONE)]}"
        if not self.restricted or addr >= self.limit:
            return ""
        f = addr >> FRAME_SHIFT
        pt = self.pt_of_frame.get(f)
        if pt is None:
            return "" if f in self.present else "memory no allocation covers"
        return "" if self.mem.read_u64(pt + 8 * ((addr >> 12) & 511)) & PTE_P else "memory no allocation covers"

    # --- ExitBootServices ----------------------------------------------------------------------
    def handoff(self) -> None:
        """The plain identity map of [0, limit) with 2 MiB user pages, as the handoff expects."""
        self.mem.write(self.base, cpu.build_page_tables(self.base, self.limit))
        self.restricted = False
        self.pt_of_frame.clear()
        self.pinned.clear()

    # --- internals -------------------------------------------------------------------------------
    def _frames_in(self, start: int, end: int) -> tuple[int, int]:
        return start >> FRAME_SHIFT, (end + FRAME - 1) >> FRAME_SHIFT

    def _not_sealed(self, what: str) -> None:
        if self.sealed:
            raise PagingError(f"{what} after the guest ran: a removed translation would need a "
                              "TLB flush the shadow MMU does not see")

    def _pde_addr(self, frame: int) -> int:
        gib, idx = frame >> 9, frame & 511
        if gib >= self.gibs:
            raise PagingError(f"frame {frame << FRAME_SHIFT:#x} lies beyond the identity map")
        return self.pd_base + gib * L.PAGE_SIZE + 8 * idx

    def _write_pde(self, frame: int, value: int) -> None:
        self.mem.write_u64(self._pde_addr(frame), value)

    def _write_pte(self, pt: int, page: int, value: int) -> None:
        self.mem.write_u64(pt + 8 * ((page >> 12) & 511), value)

    def _split(self, frame: int) -> int:
        """The 4 KiB page table of ``frame``, made on first use with the frame's current
        mapping copied into it."""
        pt = self.pt_of_frame.get(frame)
        if pt is not None:
            return pt
        if not self._free_pts:
            raise PagingError("out of spare page tables for 4 KiB protections "
                              f"(layout.FW_SPARE_PTS = {L.FW_SPARE_PTS})")
        pt = self._free_pts.pop(0)
        fs = frame << FRAME_SHIFT
        present = frame in self.present
        raw = b"".join(_Q.pack((fs + i * L.PAGE_SIZE) | USER_RW if present else 0) for i in range(512))
        self.mem.write(pt, raw)
        self._write_pde(frame, pt | USER_RW)
        self.present.discard(frame)
        self.pt_of_frame[frame] = pt
        return pt
