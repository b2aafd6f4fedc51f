"""Staging: a run frozen at ExitBootServices → a kexec-loadable ELF.

What goes in: every page the payload, its images or the firmware allocated (that includes the
stub's stack, our identity page tables and GDT, the UEFI tables, the memory-map copy and the
runtime-services code), plus the purgatory. Allocations are coalesced into at most
``MAX_SEGMENTS`` PT_LOADs (kexec's KEXEC_SEGMENT_MAX is 16, one is the purgatory) — never across
a hole in the target's RAM — and each segment's trailing zero pages are left to memsz.
KVM's dirty-page log shows any guest write outside allocated memory ("stray writes"); staging
refuses those unless allowed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import structlog

from hostsvc.memory import AllocType, MemType
from hostsvc.setup import finalize_runtime_services
from vmrun.errors import VmrunError
from vmrun.handoff import elf, state
from vmrun.vm import layout as L
from vmrun.vm.memory import merge_spans
from vmrun.vm.kvm import abi

log = structlog.get_logger("vmrun.handoff")

KEXEC_SEGMENT_MAX = 16
MAX_SEGMENTS = KEXEC_SEGMENT_MAX - 1  # one PT_LOAD is the purgatory's
FORMAT_VERSION = 1


class StageError(VmrunError):
    """The frozen run cannot be turned into a handoff."""
    exit_code = 40
    kind = "stage"


class StrayWritesError(StageError):
    exit_code = 41
    kind = "stray_writes"


@dataclass
class StageReport:
    path: str
    entry: int
    size: int
    segments: list[dict]
    stray_writes: list[dict]
    metadata: dict
    purgatory: int = 0
    notes: list[str] = field(default_factory=list)


def _page_ranges(allocations) -> list[tuple[int, int]]:
    return merge_spans((a.start, a.start + a.pages * L.PAGE_SIZE) for a in allocations if a.start > 0)


def plan_segments(ranges: list[tuple[int, int]], ram: list[tuple[int, int]], limit: int = MAX_SEGMENTS
                  ) -> list[tuple[int, int]]:
    """Coalesce page ranges into at most ``limit`` segments, closing the smallest gaps first and
    never bridging two different RAM ranges of the target."""
    def ram_index(s: int, e: int) -> int:
        for i, (rs, re_) in enumerate(ram):
            if rs <= s and e <= re_:
                return i
        raise StageError(f"allocated memory {s:#x}-{e - 1:#x} is not inside the target's RAM")

    segs = [[s, e, ram_index(s, e)] for s, e in sorted(ranges)]
    while len(segs) > limit:
        best, gap = None, None
        for i in range(len(segs) - 1):
            if segs[i][2] == segs[i + 1][2]:
                g = segs[i + 1][0] - segs[i][1]
                if gap is None or g < gap:
                    best, gap = i, g
        if best is None:
            raise StageError(f"the payload's memory lies in {len(segs)} separate RAM ranges; kexec "
                             f"takes at most {KEXEC_SEGMENT_MAX} segments")
        segs[best][1] = segs[best + 1][1]
        del segs[best + 1]
    return [(s, e) for s, e, _ in segs]


def _trim(data: memoryview) -> memoryview:
    """Drop trailing all-zero pages (kexec zero-fills memsz beyond filesz)."""
    end = len(data)
    zero = bytes(L.PAGE_SIZE)
    while end >= L.PAGE_SIZE and data[end - L.PAGE_SIZE:end].tobytes() == zero:
        end -= L.PAGE_SIZE
    return data[:end]


def stray_writes(machine, allocations, extra: list[tuple[int, int]] = ()) -> list[dict]:
    """Pages the guest wrote that no allocation owns, as merged ranges."""
    owned = _page_ranges(allocations) + list(extra)
    owned.sort()
    bad = []
    for page in sorted(machine.dirty_pages()):
        if not any(s <= page < e for s, e in owned):
            if bad and bad[-1][1] == page:
                bad[-1][1] = page + L.PAGE_SIZE
            else:
                bad.append([page, page + L.PAGE_SIZE])
    return [{"start": hex(s), "end": hex(e), "pages": (e - s) // L.PAGE_SIZE} for s, e in bad]


def changed_tables(machine) -> list[dict]:
    """The target's firmware tables (SMBIOS) the payload changed in the VM. Their pages are
    not staged (the machine has them) and the dirty log cannot judge them: on a UEFI target
    nested in QEMU/TCG it reported both SMBIOS pages written by systemd-stub 257, which only
    reads them, so their contents are compared instead."""
    out = []
    for addr, data in machine.tables:
        if machine.mem.read(addr, len(data)) != data:
            start = addr & ~(L.PAGE_SIZE - 1)
            end = (addr + len(data) + L.PAGE_SIZE - 1) & ~(L.PAGE_SIZE - 1)
            out.append({"start": hex(start), "end": hex(end), "pages": (end - start) // L.PAGE_SIZE,
                        "what": "the target's SMBIOS table"})
    return out


@dataclass
class Handoff:
    """A staged handoff in memory: what ``vmrun stage`` writes and ``vmrun load`` passes to
    kexec_load(2)."""
    entry: int
    segments: list[elf.LoadSegment]
    notes: list[tuple[int, bytes]]
    metadata: dict
    stray_writes: list[dict]
    purgatory: int

    def write(self, out_path) -> int:
        """Write the handoff ELF; returns its size in bytes."""
        size = elf.write_elf(out_path, self.entry, self.segments, self.notes)
        log.info("stage.written", path=str(out_path), segments=len(self.segments), bytes=size,
                 entry=hex(self.entry))
        return size


def build(result, *, allow_stray_writes: bool = False, extra_metadata: dict | None = None,
          extra_segments: list[elf.LoadSegment] = (), not_staged: list[tuple[int, int]] = ()) -> Handoff:
    """Turn a run kept alive at ExitBootServices into a handoff (segments, entry, notes).

    ``extra_segments``: pages written after the run that belong to the handoff too (a kdump
    ELF core header); they must lie inside allocations of the run. ``not_staged``: [start,
    end) ranges whose allocations are bookkeeping only, never segments (RAM a kdump kernel may
    use but nothing may be loaded into)."""
    if result.outcome != "exit_boot_services" or result.frozen is None:
        raise StageError(f"cannot stage: the run ended with {result.outcome}"
                         + (f" ({result.error['message']})" if result.error else ""))
    fw, machine, frozen = result.firmware, result.machine, result.frozen
    stray = stray_writes(machine, fw.alloc.allocations, extra=machine.table_ranges) if machine.dirty_log else []
    stray += changed_tables(machine)
    if stray and not allow_stray_writes:
        first = stray[0]
        raise StrayWritesError(f"the payload wrote {sum(s['pages'] for s in stray)} page(s) it does not own "
                               f"(first {first['start']}-{first['end']}); refusing to stage "
                               "(--allow-stray-writes to stage anyway)", stray_writes=stray)
    finalize_runtime_services(fw)  # hostsvc.setup: the runtime switch after ExitBootServices
    for sg in extra_segments:
        fw.mem.write(sg.paddr, sg.data)
    # the purgatory goes into two free pages; the stub's memory map is final, so this is our
    # bookkeeping only: the next kernel sees conventional memory there, used once before it runs
    try:
        purg = fw.alloc.allocate_pages(AllocType.MaxAddress, MemType.LoaderCode,
                                       state.PURGATORY_SIZE // L.PAGE_SIZE, L.FIRMWARE_BELOW - 1,
                                       owner="purgatory")
    except Exception as e:  # noqa: BLE001
        raise StageError(f"no free memory below 4 GiB for the purgatory: {e}") from None
    fpu = abi.kvm_fpu.from_buffer_copy(frozen.fpu)
    try:
        area, entry = state.build_purgatory_area(purg, frozen.regs, frozen.sregs, fpu, rax=0,
                                                 pat=frozen.sregs.get("pat", L.PAT_DEFAULT))
    except ValueError as e:
        raise StageError(f"cannot build the purgatory: {e}") from None
    fw.mem.write(purg, area)

    ram = [(r.start, r.end) for r in fw.target.ram()]
    ranges = _page_ranges(a for a in fw.alloc.allocations
                          if not any(s <= a.start < e for s, e in not_staged))
    planned = plan_segments(ranges, ram)
    segments = []
    for s, e in planned:
        data = _trim(fw.mem.view(s, e - s))  # guest memory itself: no copy
        segments.append(elf.LoadSegment(s, data, e - s))
    meta = {
        "format": "vmrun-handoff",
        "format_version": FORMAT_VERSION,
        "payload": result.payload,
        "cmdline": fw.options.cmdline,
        "memmap": {"source": fw.target.source, "digest": fw.target.digest()},
        "entry": hex(entry),
        "purgatory": hex(purg),
        "resume_rip": hex(fw.mem.read_u64(frozen.regs["rsp"])),
        "system_table": hex(fw.system_table),
        "segments": [{"paddr": hex(sg.paddr), "filesz": len(sg.data), "memsz": sg.memsz} for sg in segments],
        **(extra_metadata or {}),
    }
    if result.pcrs is not None:
        meta["pcrs"] = result.pcrs
        meta["event_log_sha256"] = hashlib.sha256(result.event_log).hexdigest()
    notes = [(elf.NOTE_METADATA, json.dumps(meta, sort_keys=True).encode())]
    if result.event_log is not None:
        notes.append((elf.NOTE_EVENT_LOG, result.event_log))
    return Handoff(entry, segments, notes, meta, stray, purg)


def stage(result, out_path, *, allow_stray_writes: bool = False, extra_metadata: dict | None = None
          ) -> StageReport:
    """Write the handoff ELF for a run kept alive at ExitBootServices."""
    h = build(result, allow_stray_writes=allow_stray_writes, extra_metadata=extra_metadata)
    size = h.write(out_path)
    return StageReport(str(out_path), h.entry, size, h.metadata["segments"], h.stray_writes, h.metadata,
                       h.purgatory)
