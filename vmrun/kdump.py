"""kdump standby: the pieces that turn a PE kernel or UKI into a crash kernel, as ``kexec -p``
does for a bzImage.

When the running kernel panics it jumps to the image loaded with ``KEXEC_ON_CRASH``. That image
(the *kdump kernel*) boots inside the memory reserved with ``crashkernel=`` and must not touch
any other RAM: that RAM is the crashed kernel's memory, which it exports as ``/proc/vmcore``.
It finds that memory through an ELF core header (*elfcorehdr*) whose address is on its command
line. This module builds, from the running host's facts:

1. the crash reservation, parsed from ``/proc/iomem`` (:func:`parse_crash_regions`,
   :func:`read_crash_regions`);
2. the memory map the kdump payload is shown (:func:`crash_memory_map`);
3. the ELF core header (:func:`build_elfcorehdr`) from the facts :func:`read_host_facts`
   collects under a root directory (``/`` on a real host, a fake tree in tests);
4. the kdump kernel's command line (:func:`kdump_cmdline`);

and ties them together in a :class:`KdumpPlan` (:func:`plan_kdump`), with two helpers for the
run's page allocator (:func:`reserve`, :func:`release_kdump_only`).

The crash reservation
---------------------
The kernel names every reservation ``Crash kernel`` in ``/proc/iomem``, nested under the
``System RAM`` range that holds it. ``crashkernel=X`` reserves one range (below 4 GiB if it
fits); ``crashkernel=X,high`` (or ``crashkernel=X`` that did not fit low) reserves one above
4 GiB (*crashk_res*) plus a low one below 4 GiB (*crashk_low_res*, 256 MiB unless
``crashkernel=Y,low``), because the low one is only reserved when the main one lies above
4 GiB. kexec_load(2) with ``KEXEC_ON_CRASH`` accepts segments only inside crashk_res, so every
segment goes to the highest range (:func:`load_region`); the low range is RAM the kdump kernel
may use (DMA, swiotlb) but nothing is loaded there.

The crash memory map
--------------------
kexec-tools hands the kdump kernel an e820 map made of: the crash reservations as RAM, minus the
range holding the ELF core header; the ACPI tables, ACPI NVS, reserved and persistent ranges as
they are; and the first 640 KiB as RAM (its purgatory copies the old contents to a backup area
in the reservation first). Every other System RAM range is left out of that map, not marked
reserved: the kdump kernel must never allocate from the crashed kernel's RAM, and it reads that
RAM through ``/proc/vmcore`` by mapping it like device memory, which x86 ``ioremap`` refuses for
pages that are System RAM of the running kernel. The kernel's own ``kexec_file_load`` path builds
the same map (low 1 MiB of System RAM, ACPI, NVS, reserved, crashk_low_res and crashk_res minus
the header as RAM).

:func:`crash_memory_map` follows both: the target's non-RAM ranges stay as they are, the RAM is
the crash reservation(s) plus the RAM below 1 MiB, and every other RAM range is dropped. The RAM
below 1 MiB is needed because an x86 kernel allocates its real-mode trampoline there and will
not boot without it; kexec-tools' backup copy of it is not reproduced. Instead, as the
kernel's ``kexec_file_load`` does, the core header leaves the first MiB out of the dump: since
Linux 5.13 the first kernel reserves the whole first MiB at boot, so it holds nothing of the
crashed kernel's that a dump needs (firmware data, the old trampoline).

The RAM the kdump kernel is given (the reservations and the low MiB) is excluded from the core
header's ``PT_LOAD`` s: its contents at crash time are the kdump kernel's, not the crashed one's.

Where the ELF core header lives
-------------------------------
The header is one more kexec segment, so it must lie inside crashk_res, and the kdump kernel
must treat its pages as not-RAM (x86 does not reserve ``elfcorehdr=`` itself; kexec-tools and
``kexec_file_load`` keep it out of the e820 RAM). vmrun's payload learns memory only through the
UEFI memory map, and the Linux EFI stub turns that map into the kernel's e820 table:
``EfiReservedMemoryType`` becomes ``E820_TYPE_RESERVED``, ``EfiLoaderData``/``EfiLoaderCode``/
``EfiBootServices*``/``EfiConventionalMemory`` become ``E820_TYPE_RAM``. So the header's pages
stay RAM in the crash map (the VM must back them and staging must turn them into a segment) and
are allocated before the payload starts as **EfiReservedMemoryType** (:data:`ELFCOREHDR_MEMORY_TYPE`)
at the start of crashk_res, where the kernel's own ``kexec_file_load`` puts it too. The payload
never gets them, ``GetMemoryMap`` shows them as reserved, and the kdump kernel never reuses them.

The RAM the kdump kernel may use but nothing may be loaded into (the low MiB and crashk_low_res,
:attr:`KdumpPlan.kdump_only`) is allocated as **EfiLoaderData** (:data:`KDUMP_ONLY_MEMORY_TYPE`):
the payload cannot allocate there (its pages would become kexec segments outside crashk_res,
which kexec_load refuses), yet the EFI stub reports it as RAM to the kdump kernel.

The core header
---------------
As kexec-tools builds it for x86_64 and as ``fs/proc/vmcore.c`` checks it: ELF64, little endian,
``ET_CORE``, ``EM_X86_64``, ``e_ehsize`` 64, ``e_phentsize`` 56, ``e_phnum`` > 0, no sections;
one ``PT_NOTE`` per CPU at that CPU's crash notes (``p_offset = p_paddr`` = physical address,
``p_vaddr`` 0, sizes = ``crash_notes_size``), one ``PT_NOTE`` for VMCOREINFO, then ``PT_LOAD`` s
(``p_offset = p_paddr``, ``PF_R|PF_W|PF_X``). The kdump kernel reads every ``PT_NOTE`` from old
memory, measures the notes in it up to the first one with ``n_namesz == 0`` (a CPU that did not
save its registers contributes nothing) and merges them into one ``PT_NOTE``; each ``PT_LOAD``'s
``p_offset`` is taken as the physical address to read.

``p_vaddr`` of a RAM ``PT_LOAD`` is its direct-map address (``page_offset + p_paddr``) when the
direct map's base can be read from ``/proc/kcore`` (KASLR randomises it), else 0, which dump
tools such as makedumpfile read as "no kernel virtual address". The extra ``PT_LOAD`` for the
kernel image mapping (virtual ``_text``, physical ``__pa_symbol(_text)``, size ``_end - _text``)
comes from the ``/proc/kcore`` segment that describes exactly that (its ``p_paddr`` is the
physical address of ``_text``) and is cross-checked against ``/proc/iomem``'s ``Kernel code``
start; without a readable ``/proc/kcore`` (kernel lockdown, no ``CONFIG_PROC_KCORE``) it is left
out rather than guessed.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from vmrun.vm.memory import merge_spans
from hostsvc.memmap import PhysRange, RangeKind, TargetMemoryMap
from hostsvc.uefi_types import MemType
from vmrun.vm.layout import FOUR_GIB, PAGE_SIZE
from vmrun.errors import BadOptionError, VmrunError

# --- errors ------------------------------------------------------------------------------------


class KdumpError(VmrunError):
    """This host cannot take a crash kernel as things stand (no reservation, unreadable or
    malformed crash notes, a crash region that is not RAM in the target map, …)."""
    exit_code = 50
    kind = "kdump"


class NoCrashReservation(KdumpError):
    """``/proc/iomem`` shows no ``Crash kernel`` range: the kernel reserved no memory for kdump."""
    kind = "no_crash_reservation"


# --- constants ---------------------------------------------------------------------------------

LOW_MEMORY_END = 0x100000          # the x86 real-mode area the kdump kernel needs RAM in
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # x86_64 __START_KERNEL_map: the kernel image mapping
_PADDR_NONE = (1 << 64) - 1       # /proc/kcore's p_paddr for segments without one

#: EFI memory type of the core header's pages (→ E820 reserved in the kdump kernel).
ELFCOREHDR_MEMORY_TYPE = MemType.ReservedMemoryType
#: EFI memory type of RAM only the kdump kernel may use (→ E820 RAM in the kdump kernel).
KDUMP_ONLY_MEMORY_TYPE = MemType.LoaderData

#: Added to the kdump kernel's command line unless the caller passes its own ``append``: the
#: options Debian's kdump-tools and Fedora's kdump both add, minus distribution-specific units.
#: ``reset_devices``: drivers reset devices the crashed kernel left running; ``nr_cpus=1``: one
#: CPU, so per-CPU memory fits the small reservation; ``irqpoll``: survive interrupts routed to
#: CPUs that are gone.
DEFAULT_APPEND = "reset_devices nr_cpus=1 irqpoll"
#: Parameters removed from the payload's own command line (kexec-tools removes ``crashkernel``;
#: Debian's kdump-tools also ``hugepages``/``hugepagesz``): a kdump kernel must not reserve a
#: crash region of its own nor huge pages out of its small reservation, and ``elfcorehdr`` is
#: vmrun's to set.
REMOVED_PARAMS = ("crashkernel", "elfcorehdr", "hugepages", "hugepagesz")
#: x86 COMMAND_LINE_SIZE is 2048 bytes including the terminating NUL.
COMMAND_LINE_MAX = 2047

# ELF (System V gABI; x86-64 psABI)
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
PF_RWX = 7
PN_XNUM = 0xFFFF


# --- interval helpers --------------------------------------------------------------------------

_merge = merge_spans  # sorted union of half-open spans


def _subtract(spans: Iterable[tuple[int, int]], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each span minus every hole, in span order (spans are not merged with each other)."""
    holes = _merge(holes)
    out = []
    for s, e in spans:
        cur = s
        for hs, he in holes:
            if he <= cur or hs >= e:
                continue
            if hs > cur:
                out.append((cur, hs))
            cur = max(cur, he)
            if cur >= e:
                break
        if cur < e:
            out.append((cur, e))
    return out


def _intersect(spans: Iterable[tuple[int, int]], windows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    windows = _merge(windows)
    out = []
    for s, e in spans:
        for ws, we in windows:
            lo, hi = max(s, ws), min(e, we)
            if lo < hi:
                out.append((lo, hi))
    return sorted(out)


def _page_up(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _page_down(x: int) -> int:
    return x & ~(PAGE_SIZE - 1)


def _span(r: PhysRange) -> str:
    return f"{r.start:#x}-{r.end - 1:#x}"


# --- 1. /proc/iomem ----------------------------------------------------------------------------

_RE_IOMEM = re.compile(r"^( *)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*?)\s*$")


@dataclass(frozen=True)
class IomemEntry:
    """One ``/proc/iomem`` line: ``[start, end)`` (the file prints inclusive ends), its name and
    nesting depth (two spaces of indentation a level)."""
    start: int
    end: int
    name: str
    depth: int


def parse_iomem(text: str, source: str = "/proc/iomem") -> list[IomemEntry]:
    """Every line of a ``/proc/iomem`` copy, nested ones included.

    Raises :class:`KdumpError` for a line that is not ``START-END : NAME`` and for a copy whose
    addresses are all zero (the kernel prints zeros to readers without ``CAP_SYS_ADMIN``).
    """
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _RE_IOMEM.match(line)
        if not m:
            raise KdumpError(f"{source}: line {n}: expected a /proc/iomem line 'START-END : NAME', "
                             f"got {line.strip()!r}")
        start, last = int(m[2], 16), int(m[3], 16)
        if last < start:
            raise KdumpError(f"{source}: line {n}: end {last:#x} is below start {start:#x}")
        out.append(IomemEntry(start, last + 1, m[4], len(m[1]) // 2))
    if out and all(e.start == 0 and e.end == 1 for e in out):
        raise KdumpError(f"{source}: every address is zero, as the kernel shows /proc/iomem to "
                         f"readers without CAP_SYS_ADMIN: run vmrun as root")
    return out


def parse_crash_regions(text: str, source: str = "/proc/iomem") -> tuple[PhysRange, ...]:
    """Every ``Crash kernel`` range of a ``/proc/iomem`` copy, at any nesting depth, sorted by
    address (the low reservation of ``crashkernel=…,high`` first). Empty if there is none."""
    return _crash_regions(parse_iomem(text, source), source)


def _crash_regions(entries: list[IomemEntry], source: str) -> tuple[PhysRange, ...]:
    found = sorted({(e.start, e.end) for e in entries if e.name == "Crash kernel"})
    for (s1, e1), (s2, e2) in zip(found, found[1:]):
        if s2 < e1:
            raise KdumpError(f"{source}: Crash kernel ranges {s1:#x}-{e1 - 1:#x} and "
                             f"{s2:#x}-{e2 - 1:#x} overlap")
    return tuple(PhysRange(s, e, RangeKind.RAM, "Crash kernel") for s, e in found)


_NO_RESERVATION_HELP = (
    "reserve memory for a crash kernel with crashkernel= on this kernel's command line and "
    "reboot: crashkernel=512M (or crashkernel=256M-:512M) places it below 4 GiB, which vmrun "
    "needs; e.g. add it to GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, run update-grub and "
    "reboot; `grep 'Crash kernel' /proc/iomem` (as root) then shows the range")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise KdumpError(f"cannot read {what} {path}: it does not exist") from None
    except PermissionError:
        raise KdumpError(f"cannot read {what} {path}: permission denied (run vmrun as root)") from None
    except OSError as e:
        raise KdumpError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_crash_regions(root: str | os.PathLike = "/") -> tuple[PhysRange, ...]:
    """The crash reservation(s) of the machine whose ``/proc`` is under ``root``.

    Raises :class:`NoCrashReservation` (naming ``crashkernel=`` and how to set it) when there is
    none, :class:`KdumpError` when ``/proc/iomem`` cannot be read or shows no addresses.
    """
    path = Path(root) / "proc" / "iomem"
    regions = parse_crash_regions(_read_text(path, "the memory resource map"), str(path))
    if not regions:
        raise _no_reservation(path)
    return regions


def _no_reservation(path: Path) -> NoCrashReservation:
    return NoCrashReservation(
        f"no crash kernel reservation: {path} has no 'Crash kernel' range, so this kernel "
        f"reserved no memory for kdump; {_NO_RESERVATION_HELP}")


def load_region(regions: Sequence[PhysRange]) -> PhysRange:
    """crashk_res, the range every crash segment must lie in: the highest one (a second range
    exists only as crashk_low_res below 4 GiB when crashk_res lies above)."""
    if not regions:
        raise NoCrashReservation(f"no crash kernel reservation; {_NO_RESERVATION_HELP}")
    return max(regions, key=lambda r: r.start)


def require_load_region_below(regions: Sequence[PhysRange], limit: int = FOUR_GIB,
                              need: int = 0) -> None:
    """Raise :class:`KdumpError` unless crashk_res has at least ``need`` bytes (any, if 0)
    below ``limit``: vmrun puts the PE image, its firmware tables and the purgatory below
    4 GiB, which a ``crashkernel=…,high`` reservation does not offer."""
    main = load_region(regions)
    below = max(0, min(main.end, limit) - main.start)
    if below == 0 or below < need:
        raise KdumpError(
            f"the crash kernel reservation {_span(main)} has {below:#x} bytes below {limit:#x}"
            f"{f', {need:#x} needed' if need else ''}: vmrun places the payload, its firmware "
            f"tables and the purgatory below 4 GiB; reserve it there with crashkernel=SIZE "
            f"instead of crashkernel=SIZE,high")


# --- 3a. host facts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSegment:
    """A ``PT_NOTE`` source in the crashed kernel's memory: ``cpu`` is None for VMCOREINFO."""
    addr: int
    size: int
    cpu: int | None = None


@dataclass(frozen=True)
class KernelText:
    """The kernel image mapping: virtual ``_text``, its physical address, ``_end - _text``
    rounded up to a page."""
    vaddr: int
    paddr: int
    size: int


@dataclass(frozen=True)
class HostCrashFacts:
    """What the running kernel says about itself, everything a core header needs."""
    crash_regions: tuple[PhysRange, ...]
    system_ram: tuple[PhysRange, ...]       # /proc/iomem "System RAM…" ranges, sorted
    cpu_notes: tuple[NoteSegment, ...]      # one per CPU directory, by CPU number
    vmcoreinfo: NoteSegment
    page_offset: int | None = None          # direct-map base, from /proc/kcore
    kernel_text: KernelText | None = None   # from /proc/kcore, checked against "Kernel code"
    kernel_code: PhysRange | None = None    # /proc/iomem "Kernel code"
    remarks: tuple[str, ...] = ()           # why page_offset/kernel_text are unknown, if they are


def _parse_int(path: Path, text: str, base: int, what: str) -> int:
    t = text.strip()
    digits = t[2:] if base == 16 and t[:2].lower() == "0x" else t
    ok = bool(digits) and all(c in ("0123456789abcdefABCDEF" if base == 16 else "0123456789")
                              for c in digits)
    if not ok:
        raise KdumpError(f"{path}: expected {what}, got {t!r}")
    return int(digits, base)


def _read_cpu_notes(cpu_root: Path, ram: list[tuple[int, int]],
                    crash: list[tuple[int, int]]) -> tuple[NoteSegment, ...]:
    try:
        names = os.listdir(cpu_root)
    except OSError as e:
        raise KdumpError(f"cannot list {cpu_root}: {e.strerror or e} (is sysfs mounted?)") from None
    cpus = sorted(int(m[1]) for n in names if (m := re.fullmatch(r"cpu(\d+)", n))
                  and (cpu_root / n).is_dir())
    if not cpus:
        raise KdumpError(f"{cpu_root} lists no CPU (cpuN directories): is sysfs mounted?")
    notes = []
    for cpu in cpus:
        d = cpu_root / f"cpu{cpu}"
        path = d / "crash_notes"
        if not path.exists():
            raise KdumpError(f"{path} does not exist: the running kernel keeps no crash notes "
                             f"(built without CONFIG_CRASH_DUMP/CONFIG_KEXEC), so it cannot be "
                             f"dumped by a crash kernel")
        addr = _parse_int(path, _read_text(path, "crash notes address"), 16,
                          "the physical address of this CPU's crash notes in hexadecimal")
        size_path = d / "crash_notes_size"
        size = _parse_int(size_path, _read_text(size_path, "crash notes size"), 10,
                          "the size of this CPU's crash notes in decimal")
        if addr == 0 or size == 0:
            raise KdumpError(f"{path}: crash notes at {addr:#x} of {size} bytes: not a usable range")
        note = (addr, addr + size)
        if not _inside(note, ram) or _intersect([note], crash):
            raise KdumpError(f"{path}: crash notes {addr:#x}+{size:#x} are not inside System RAM "
                             f"outside the crash kernel reservation, as per-CPU memory is")
        notes.append(NoteSegment(addr, size, cpu))
    return tuple(notes)


def _inside(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(s <= span[0] and span[1] <= e for s, e in _merge(spans))


def _read_vmcoreinfo(path: Path, ram: list[tuple[int, int]]) -> NoteSegment:
    text = _read_text(path, "the VMCOREINFO location")
    parts = text.split()
    if len(parts) != 2:
        raise KdumpError(f"{path}: expected 'ADDRESS SIZE' in hexadecimal, got {text.strip()!r}")
    addr = _parse_int(path, parts[0], 16, "a hexadecimal physical address")
    size = _parse_int(path, parts[1], 16, "a hexadecimal size")
    if addr == 0 or size == 0 or not _inside((addr, addr + size), ram):
        raise KdumpError(f"{path}: VMCOREINFO at {addr:#x}+{size:#x} is not inside System RAM")
    return NoteSegment(addr, size, None)


def _read_kcore(path: Path) -> tuple[list[tuple[int, int, int]], str | None]:
    """``(p_vaddr, p_paddr, p_memsz)`` of each PT_LOAD in /proc/kcore's headers, or a reason."""
    try:
        with open(path, "rb") as f:
            ehdr = f.read(_EHDR.size)
            if len(ehdr) < _EHDR.size or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
                return [], f"{path} is not an ELF64 little-endian file"
            (_i, _t, _m, _v, _e, phoff, shoff, _fl, _eh, phentsize, phnum, shentsize, _sn,
             _ss) = _EHDR.unpack(ehdr)
            if phentsize != _PHDR.size:
                return [], f"{path}: program headers of {phentsize} bytes"
            if phnum == PN_XNUM:  # the real count is sh_info of section header 0
                f.seek(shoff + 44)
                raw = f.read(4)
                if len(raw) != 4:
                    return [], f"{path}: truncated section header"
                phnum = struct.unpack("<I", raw)[0]
            f.seek(phoff)
            raw = f.read(phnum * _PHDR.size)
    except OSError as e:
        return [], f"cannot read {path}: {e.strerror or e}"
    if len(raw) < phnum * _PHDR.size:
        return [], f"{path}: program headers truncated"
    loads = []
    for i in range(phnum):
        ptype, _fl, _off, vaddr, paddr, _fs, memsz, _al = _PHDR.unpack_from(raw, i * _PHDR.size)
        if ptype == PT_LOAD:
            loads.append((vaddr, paddr, memsz))
    return loads, None


def _kcore_facts(path: Path, kernel_code: PhysRange | None
                 ) -> tuple[int | None, KernelText | None, list[str]]:
    loads, why = _read_kcore(path)
    if why:
        return None, None, [f"{why}: RAM segments get p_vaddr 0 and there is no kernel text segment"]
    remarks = []
    # KCORE_RAM segments: p_vaddr = __va(p_paddr), i.e. page_offset + p_paddr.
    offsets = {(v - p) & ((1 << 64) - 1) for v, p, _ in loads if p != _PADDR_NONE and v < START_KERNEL_MAP}
    page_offset = offsets.pop() if len(offsets) == 1 else None
    if page_offset is None:
        remarks.append(f"{path}: direct-map segments {'disagree' if offsets else 'missing'}; "
                       f"RAM segments get p_vaddr 0")
    # KCORE_TEXT: p_vaddr = _text, p_paddr = __pa_symbol(_text), p_memsz = _end - _text; and
    # /proc/iomem's "Kernel code" starts at __pa_symbol(_text) too.
    texts = [(v, p, s) for v, p, s in loads if p != _PADDR_NONE and v >= START_KERNEL_MAP]
    if kernel_code is not None:
        texts = [t for t in texts if t[1] == kernel_code.start]
    text = None
    if len(texts) != 1:
        where = f" at /proc/iomem's Kernel code start {kernel_code.start:#x}" if kernel_code else ""
        remarks.append(f"{path}: {len(texts)} kernel image segments{where}; no kernel text segment")
    else:
        v, p, s = texts[0]
        text = KernelText(v, p, _page_up(s))
    return page_offset, text, remarks


def read_host_facts(root: str | os.PathLike = "/") -> HostCrashFacts:
    """Read everything the core header needs from the machine whose ``/proc`` and ``/sys``
    are under ``root``:

    * ``proc/iomem`` (as root): ``Crash kernel``, ``System RAM…`` (also ``System RAM (kmem)``
      and ``(virtio_mem)``, which the kernel's RAM is too) and ``Kernel code`` ranges;
    * ``sys/devices/system/cpu/cpuN/crash_notes`` (physical address, hexadecimal) and
      ``crash_notes_size`` (bytes, decimal) for every CPU sysfs lists (a possible CPU that is
      not present has no directory, cannot run, and so saves no notes);
    * ``sys/kernel/vmcoreinfo``: ``ADDRESS SIZE``, both hexadecimal;
    * ``proc/kcore`` headers, optionally: the direct-map base and the kernel image mapping.

    Raises :class:`NoCrashReservation` or :class:`KdumpError` with the file and what is wrong.
    """
    root = Path(root)
    iomem_path = root / "proc" / "iomem"
    entries = parse_iomem(_read_text(iomem_path, "the memory resource map"), str(iomem_path))
    regions = _crash_regions(entries, str(iomem_path))
    if not regions:
        raise _no_reservation(iomem_path)
    ram_spans = _merge((x.start, x.end) for x in entries if "System RAM" in x.name)
    if not ram_spans:
        raise KdumpError(f"{iomem_path} has no System RAM range")
    system_ram = tuple(PhysRange(s, e, RangeKind.RAM, "System RAM") for s, e in ram_spans)
    codes = [x for x in entries if x.name == "Kernel code"]
    kernel_code = PhysRange(codes[0].start, codes[0].end, RangeKind.RAM, "Kernel code") if codes else None
    crash_spans = [(r.start, r.end) for r in regions]
    cpu_notes = _read_cpu_notes(root / "sys" / "devices" / "system" / "cpu", ram_spans, crash_spans)
    vmcoreinfo = _read_vmcoreinfo(root / "sys" / "kernel" / "vmcoreinfo", ram_spans)
    page_offset, text, remarks = _kcore_facts(root / "proc" / "kcore", kernel_code)
    return HostCrashFacts(regions, system_ram, cpu_notes, vmcoreinfo, page_offset, text,
                          kernel_code, tuple(remarks))


# --- 2. the crash memory map ---------------------------------------------------------------------

def crash_memory_map(target: TargetMemoryMap, regions: Sequence[PhysRange], *,
                     low_memory: bool = True) -> TargetMemoryMap:
    """The map the kdump payload is shown: ``target``'s non-RAM ranges as they are, RAM only
    inside the crash reservation(s) and, with ``low_memory``, below 1 MiB; every other RAM range
    is dropped (a hole), as kexec-tools and ``kexec_file_load`` do (see the module docstring).

    The result has role ``"kdump"`` (its digest differs from any machine map's) and a source
    naming the reservation. Raises :class:`KdumpError` if a crash region is not RAM in
    ``target`` (the map is not this machine's).
    """
    if not regions:
        raise NoCrashReservation(f"no crash kernel reservation; {_NO_RESERVATION_HELP}")
    ram = [(r.start, r.end) for r in target.ranges if r.kind is RangeKind.RAM]
    for r in regions:
        if not _inside((_page_up(r.start), _page_down(r.end)), ram):
            raise KdumpError(f"crash kernel region {_span(r)} is not RAM in the memory map "
                             f"{target.source}: the map must be this machine's")
    windows = [(r.start, r.end) for r in regions]
    if low_memory:
        windows.append((0, LOW_MEMORY_END))
    kept = [r for r in target.ranges if r.kind is not RangeKind.RAM]
    for s, e in _intersect(ram, windows):
        label = "System RAM (below 1 MiB)" if e <= LOW_MEMORY_END else "Crash kernel"
        kept.append(PhysRange(s, e, RangeKind.RAM, label))
    desc = ", ".join(_span(r) for r in regions)
    source = (f"kdump map of {target.source}: crash kernel {desc}"
              + (", RAM below 1 MiB" if low_memory else ""))
    try:
        return TargetMemoryMap.from_ranges(kept, source, role="kdump")
    except BadOptionError as e:
        raise KdumpError(str(e)) from None


# --- 3b. the ELF core header -----------------------------------------------------------------------

def dump_ranges(system_ram: Sequence[PhysRange], exclude: Iterable[tuple[int, int]]) -> tuple[PhysRange, ...]:
    """The ranges the core header describes: each System RAM range minus ``exclude`` (the RAM
    the kdump kernel is given, whose contents at crash time are its own)."""
    return tuple(PhysRange(s, e, RangeKind.RAM, "System RAM")
                 for s, e in _subtract([(r.start, r.end) for r in system_ram], exclude))


def build_elfcorehdr(facts: HostCrashFacts, exclude: Iterable[tuple[int, int]]) -> bytes:
    """The ELF64 core header for the running kernel, as kexec-tools writes it for x86_64:
    CPU notes, VMCOREINFO, the kernel text mapping (when known), then one ``PT_LOAD`` per
    :func:`dump_ranges` range. ``exclude`` must cover the crash reservation(s)."""
    phdrs = []
    for n in facts.cpu_notes + (facts.vmcoreinfo,):
        phdrs.append(_PHDR.pack(PT_NOTE, 0, n.addr, 0, n.addr, n.size, n.size, 0))
    if facts.kernel_text is not None:
        t = facts.kernel_text
        phdrs.append(_PHDR.pack(PT_LOAD, PF_RWX, t.paddr, t.vaddr, t.paddr, t.size, t.size, 0))
    exclude = list(exclude)
    if _subtract([(r.start, r.end) for r in facts.crash_regions], exclude):
        raise ValueError("build_elfcorehdr: exclude must cover every crash region")
    for r in dump_ranges(facts.system_ram, exclude):
        vaddr = (facts.page_offset + r.start) & ((1 << 64) - 1) if facts.page_offset is not None else 0
        phdrs.append(_PHDR.pack(PT_LOAD, PF_RWX, r.start, vaddr, r.start, r.size, r.size, 0))
    if len(phdrs) >= PN_XNUM:
        raise KdumpError(f"the core header needs {len(phdrs)} program headers; ELF allows "
                         f"{PN_XNUM - 1} without extended numbering, which /proc/vmcore does not read")
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, LSB, EV_CURRENT, SYSV
    ehdr = _EHDR.pack(ident, ET_CORE, EM_X86_64, 1, 0, _EHDR.size, 0, 0, _EHDR.size,
                      _PHDR.size, len(phdrs), 0, 0, 0)
    return ehdr + b"".join(phdrs)


def elfcorehdr_range(region: PhysRange, size: int) -> PhysRange:
    """Whole pages for a ``size``-byte header at the start of ``region`` (crashk_res), where
    the kernel's own ``kexec_file_load`` puts it: top-down allocations (vmrun's firmware area,
    the stub's) take the other end."""
    start = _page_up(region.start)
    end = start + _page_up(max(size, 1))
    if end > _page_down(region.end):
        raise KdumpError(f"the crash kernel reservation {_span(region)} cannot hold a "
                         f"{size}-byte ELF core header")
    return PhysRange(start, end, RangeKind.RAM, "elfcorehdr")


# --- 4. the command line ---------------------------------------------------------------------------

def _split_args(text: str) -> list[str]:
    """Words as the kernel's ``next_arg`` splits them: whitespace outside double quotes."""
    out, cur, quoted, started = [], [], False, False
    for c in text:
        if c.isspace() and not quoted:
            if started:
                out.append("".join(cur))
                cur, started = [], False
            continue
        if c == '"':
            quoted = not quoted
        cur.append(c)
        started = True
    if started:
        out.append("".join(cur))
    return out


def _param_name(word: str) -> str:
    """A parameter's name, with '-' and '_' equal as the kernel compares them (``parameq``)."""
    w = word[1:] if word.startswith('"') else word
    return w.split("=", 1)[0].replace('"', "").replace("-", "_")


def _split_init(words: list[str]) -> tuple[list[str], list[str]]:
    """Kernel parameters, and everything from a bare ``--`` on (passed to init)."""
    if "--" in words:
        i = words.index("--")
        return words[:i], words[i:]
    return words, []


def kdump_cmdline(base: str, elfcorehdr_addr: int, elfcorehdr_size: int,
                  append: str | None = None) -> str:
    """The kdump kernel's command line: ``base`` (the payload's own: a UKI's ``.cmdline`` or
    ``--cmdline``) without :data:`REMOVED_PARAMS` and without any parameter ``append`` sets,
    then ``append`` (:data:`DEFAULT_APPEND` when None; ``""`` adds nothing), then
    ``elfcorehdr=SIZE@ADDRESS`` — the syntax ``elfcorehdr=[size[KMG]@]offset[KMG]`` the kernel
    parses with ``memparse`` (``0x`` numbers accepted) — all before a bare ``--`` whose
    following words go to init unchanged.

    Raises :class:`vmrun.errors.BadOptionError` for an ``append`` holding ``--`` or
    ``elfcorehdr=``, and for a result longer than x86's 2047 bytes (COMMAND_LINE_SIZE 2048).
    """
    if elfcorehdr_addr <= 0 or elfcorehdr_size <= 0:
        raise ValueError(f"elfcorehdr {elfcorehdr_size:#x}@{elfcorehdr_addr:#x} is not a range")
    base = base.split("\0", 1)[0]  # a UKI's .cmdline may end in NULs; the kernel stops at one
    extra = _split_args(DEFAULT_APPEND if append is None else append)
    if "--" in extra:
        raise BadOptionError(f"kdump append {append!r}: '--' (init arguments) cannot be appended")
    if any(_param_name(w) == "elfcorehdr" for w in extra):
        raise BadOptionError(f"kdump append {append!r}: elfcorehdr= is set by vmrun")
    drop = {n.replace("-", "_") for n in REMOVED_PARAMS} | {_param_name(w) for w in extra}
    params, init = _split_init(_split_args(base))
    kept = [w for w in params if _param_name(w) not in drop]
    words = kept + extra + [f"elfcorehdr={elfcorehdr_size:#x}@{elfcorehdr_addr:#x}"] + init
    line = " ".join(words)
    if len(line.encode()) > COMMAND_LINE_MAX:
        raise BadOptionError(f"the kdump kernel's command line would be {len(line.encode())} bytes; "
                             f"x86 Linux takes at most {COMMAND_LINE_MAX} (COMMAND_LINE_SIZE 2048 "
                             f"with its NUL): shorten the command line or the kdump append")
    return line


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KdumpPlan:
    """Everything a crash load needs, fixed before the payload runs.

    * :attr:`map`: the map to run the payload against (role ``kdump``);
    * :attr:`elfcorehdr`: whole pages at the start of :attr:`load_region` for :attr:`header`,
      allocated as :data:`ELFCOREHDR_MEMORY_TYPE` before the payload starts (:func:`reserve`)
      and filled after the run (a kexec segment like the others);
    * :attr:`kdump_only`: RAM of :attr:`map` outside :attr:`load_region` (the low MiB,
      crashk_low_res): the kdump kernel's to use, never a kexec segment's;
    * :attr:`dumped`: the ``PT_LOAD`` RAM ranges of the header.
    """
    map: TargetMemoryMap
    regions: tuple[PhysRange, ...]
    load_region: PhysRange
    elfcorehdr: PhysRange
    header: bytes
    kdump_only: tuple[PhysRange, ...]
    dumped: tuple[PhysRange, ...]
    facts: HostCrashFacts

    def cmdline(self, base: str, append: str | None = None) -> str:
        """:func:`kdump_cmdline` with this plan's header range."""
        return kdump_cmdline(base, self.elfcorehdr.start, self.elfcorehdr.size, append)

    def header_segment(self) -> tuple[int, bytes, int]:
        """``(paddr, data, memsz)`` of the header's kexec segment."""
        return self.elfcorehdr.start, self.header, self.elfcorehdr.size

    def metadata(self, cmdline: str) -> dict:
        """The ``kdump`` record for a handoff's metadata note."""
        f = self.facts
        return {
            "cmdline": cmdline,
            "crash_regions": [{"start": hex(r.start), "end": hex(r.end - 1)} for r in self.regions],
            "load_region": {"start": hex(self.load_region.start), "end": hex(self.load_region.end - 1)},
            "elfcorehdr": {"addr": hex(self.elfcorehdr.start), "size": self.elfcorehdr.size,
                           "bytes": len(self.header)},
            "cpus": len(f.cpu_notes),
            "vmcoreinfo": {"addr": hex(f.vmcoreinfo.addr), "size": f.vmcoreinfo.size},
            "dumped_ranges": len(self.dumped),
            "dumped_bytes": sum(r.size for r in self.dumped),
            "kernel_text": f.kernel_text is not None,
            "page_offset": hex(f.page_offset) if f.page_offset is not None else None,
            "remarks": list(f.remarks),
            "memmap_digest": self.map.digest(),
        }


def plan_kdump(target: TargetMemoryMap, facts: HostCrashFacts, *, low_memory: bool = True) -> KdumpPlan:
    """Crash map, header and header location for ``facts`` on ``target`` (this machine's map).

    The header's ``PT_LOAD`` s are System RAM minus every range the crash map gives the kdump
    kernel as RAM (and minus the reservations themselves, whole)."""
    regions = tuple(sorted(facts.crash_regions, key=lambda r: r.start))
    main = load_region(regions)
    cmap = crash_memory_map(target, regions, low_memory=low_memory)
    given = [(r.start, r.end) for r in cmap.ram()]
    exclude = _merge(given + [(r.start, r.end) for r in regions])
    header = build_elfcorehdr(facts, exclude)
    hdr = elfcorehdr_range(main, len(header))
    kdump_only = tuple(PhysRange(s, e, RangeKind.RAM, "kdump only")
                       for s, e in _subtract(given, [(main.start, main.end)]))
    dumped = dump_ranges(facts.system_ram, exclude)
    return KdumpPlan(cmap, regions, main, hdr, header, kdump_only, dumped, facts)


# --- the run's allocator -------------------------------------------------------------------------


@dataclass
class Reservation:
    """What :func:`reserve` allocated: ``(start, pages)`` runs."""
    header: tuple[int, int]
    kdump_only: list[tuple[int, int]] = field(default_factory=list)


def reserve(alloc, plan: KdumpPlan) -> Reservation:
    """Allocate, in a fresh run's :class:`hostsvc.memory.Allocator` and before anything but
    the allocator itself has allocated, the header's pages (EfiReservedMemoryType) and every
    free page of :attr:`KdumpPlan.kdump_only` (EfiLoaderData), all owned by ``"firmware"`` (not
    charged to the memory cap, not freeable by the payload). Page 0, which the allocator keeps,
    stays as it is (the stub reports it as RAM too).

    Raises :class:`KdumpError` if those pages are already taken by other allocations.
    """
    from hostsvc.memory import FIRMWARE, AllocType
    from hostsvc.status import EfiError

    def busy(s: int, e: int) -> list[str]:
        return [f"{a.start:#x}-{a.end - 1:#x} ({a.owner})" for a in alloc.allocations
                if a.start < e and s < a.end and not (a.start == 0 and a.pages == 1)]

    h = plan.elfcorehdr
    taken = busy(h.start, h.end)
    if taken:
        raise KdumpError(f"the ELF core header's pages {_span(h)} are already allocated: {', '.join(taken)}")
    try:
        alloc.allocate_pages(AllocType.Address, ELFCOREHDR_MEMORY_TYPE, h.size // PAGE_SIZE,
                             address=h.start, owner=FIRMWARE)
    except EfiError as e:
        raise KdumpError(f"cannot allocate the ELF core header's pages {_span(h)}: {e}") from None
    res = Reservation((h.start, h.size // PAGE_SIZE))
    for r in plan.kdump_only:
        taken = busy(r.start, r.end)
        if taken:
            raise KdumpError(f"RAM {_span(r)}, which only the kdump kernel may use, is already "
                             f"allocated: {', '.join(taken)}; reserve it before the firmware allocates")
        for s, e in _intersect(alloc.free_ranges(), [(r.start, r.end)]):
            alloc.allocate_pages(AllocType.Address, KDUMP_ONLY_MEMORY_TYPE, (e - s) // PAGE_SIZE,
                                 address=s, owner=FIRMWARE)
            res.kdump_only.append((s, (e - s) // PAGE_SIZE))
    return res


def release_kdump_only(alloc, reservation: Reservation) -> None:
    """Free the kdump-only pages :func:`reserve` took (the payload's memory map is final after
    ExitBootServices), so that staging does not turn them into kexec segments. The header's
    pages stay allocated: they are a segment."""
    from hostsvc.memory import FIRMWARE
    for start, pages in reservation.kdump_only:
        alloc.free_pages(start, pages, owner=FIRMWARE)
    reservation.kdump_only.clear()


# --- `vmrun load --crash PAYLOAD` ------------------------------------------------------------------


class PayloadTooBig(KdumpError):
    """The payload needs more memory than the crash kernel reservation offers."""
    exit_code = 52
    kind = "crash_region_too_small"


def payload_cmdline(path: str | os.PathLike) -> str:
    """A UKI's own command line (its ``.cmdline`` section, trailing NULs and whitespace cut),
    or "" for a payload without one."""
    from vmrun.formats import pe as PE
    img = PE.load_file(path)
    sec = img.section(".cmdline")
    return sec.data().rstrip(b"\0").decode("utf-8", "replace").strip() if sec is not None else ""


def payload_needs(path: str | os.PathLike, initrd_size: int = 0) -> int:
    """A lower bound of the memory a Linux payload needs to reach ExitBootServices: the PE
    image itself, the kernel's ``init_size`` (setup header, boot protocol 2.10+: what it needs
    from its load address to decompress and run) and the initrd (``--initrd``, or a UKI's
    ``.initrd``), which the stub copies. 0 when the payload holds no bzImage."""
    from vmrun.formats import bzimage
    from vmrun.formats import pe as PE
    img = PE.load_file(path)
    linux = img.section(".linux")
    bz = bzimage.parse(linux.data() if linux is not None else img.data)
    if bz is None:
        return 0
    uki_initrd = img.section(".initrd")
    initrd = initrd_size or (len(uki_initrd.data()) if uki_initrd is not None else 0)
    return _page_up(img.load_size) + _page_up(bz.init_size) + _page_up(initrd)


def _suggest(need: int) -> int:
    """A crashkernel= size in MiB with room for ``need`` bytes and the kdump kernel's own
    run-time memory: twice the need, rounded up to 64 MiB, at least 256 MiB."""
    mib = -(-2 * need // (64 << 20)) * 64
    return max(256, mib)


class CrashLoad:
    """One ``vmrun load --crash PAYLOAD``: the run options to use, then the header segment.

    The kdump kernel's command line goes to the payload as LoadOptions. A plain EFI-stub kernel
    takes it as its command line. systemd-stub (252 and 257 alike) uses LoadOptions *instead
    of* its ``.cmdline`` when Secure Boot is off (vmrun presents SecureBoot=0 unless
    ``--host-vars`` or ``--var`` say otherwise), so for a UKI the base is its ``.cmdline`` and
    the kdump additions follow it. With Secure Boot on, systemd-stub ignores LoadOptions and
    boots the ``.cmdline`` alone: the kdump kernel would not learn ``elfcorehdr=``. :meth:`finish`
    checks the command line the kernel really received and refuses the load otherwise.
    """

    def __init__(self, payload: str | os.PathLike, options, append: str | None = None, root: str = "/"):
        import dataclasses
        facts = read_host_facts(root)
        require_load_region_below(facts.crash_regions)
        self.plan = plan_kdump(TargetMemoryMap.from_host(), facts)
        r = self.plan.load_region
        initrd_size = os.stat(options.initrd).st_size if options.initrd is not None else 0
        need, room = payload_needs(payload, initrd_size), r.size - self.plan.elfcorehdr.size
        if need > room:
            raise PayloadTooBig(
                f"the payload needs at least {need >> 20} MiB (image, the kernel's init_size and the "
                f"initrd) but the crash kernel reservation {r.start:#x}-{r.end - 1:#x} offers "
                f"{room >> 20} MiB; boot with a larger crashkernel= (e.g. crashkernel={_suggest(need)}M)")
        self.base = options.cmdline or payload_cmdline(payload)
        self.cmdline = self.plan.cmdline(self.base, append)
        self.reservation: Reservation | None = None
        self.options = dataclasses.replace(options, cmdline=self.cmdline, target=self.plan.map,
                                           hooks=[self._reserve, *options.hooks])

    def _reserve(self, fw) -> dict:
        self.reservation = reserve(fw.alloc, self.plan)
        return {}

    def check_outcome(self, result) -> None:
        """A run that failed for want of memory in the crash map: say so with the sizes."""
        fw = result.firmware
        if result.outcome == "exit_boot_services" or fw is None or not fw.alloc.refusals:
            return
        asked, free = max(fw.alloc.refusals)
        r = self.plan.load_region
        raise PayloadTooBig(
            f"the payload needs more memory than the crash kernel reservation {r.start:#x}-{r.end - 1:#x} "
            f"({r.size >> 20} MiB) offers: it asked for {asked:#x} bytes ({asked >> 20} MiB) when "
            f"{free:#x} bytes ({free >> 20} MiB) were free (it ended with {result.outcome}); boot with a "
            f"larger crashkernel= (e.g. crashkernel={_suggest(r.size + asked)}M)")

    def finish(self, result) -> tuple[dict, list, list[tuple[int, int]]]:
        """After ExitBootServices: (metadata, extra segments, ranges not to stage) for
        :func:`vmrun.handoff.stage.build`."""
        from vmrun.handoff.elf import LoadSegment
        got = (result.linux or {}).get("cmdline")
        want = f"elfcorehdr={self.plan.elfcorehdr.size:#x}@{self.plan.elfcorehdr.start:#x}"
        if got is not None and want not in got.split():
            raise KdumpError(f"the kernel received the command line {got!r}, without {want}: the payload "
                             "ignored LoadOptions (systemd-stub does when Secure Boot is on), so the kdump "
                             "kernel could not find the crashed kernel's memory")
        paddr, data, memsz = self.plan.header_segment()
        not_staged = [(r.start, r.end) for r in self.plan.kdump_only]
        return {"kdump": self.plan.metadata(self.cmdline)}, [LoadSegment(paddr, data, memsz)], not_staged
