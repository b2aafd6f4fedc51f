"""vmrun.kdump: crash reservation, crash memory map, ELF core header, kdump command line.

Expected values are written out by hand from the fake host below (never computed by the code
under test); the core header is read back with binutils ``readelf`` and with a few lines of
``struct`` that apply the checks the kdump kernel's /proc/vmcore makes.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostsvc.memmap import PhysRange, RangeKind, TargetMemoryMap
from vmrun import kdump as K
from vmrun.errors import BadOptionError, VmrunError

RAM, RES, ACPI, NVS = RangeKind.RAM, RangeKind.RESERVED, RangeKind.ACPI_RECLAIM, RangeKind.ACPI_NVS
GiB = 1 << 30

# --- a fake 8 GiB x86_64 host ---------------------------------------------------------------------
# /sys/firmware/memmap as the firmware handed it over (the target map vmrun presents).
FIRMWARE_MAP = """\
0x0 0x9efff System RAM
0x9f000 0xfffff Reserved
0x100000 0x7ffd6fff System RAM
0x7ffd7000 0x7ffdefff ACPI Tables
0x7ffdf000 0x7fffffff ACPI Non-volatile Storage
0xb0000000 0xbfffffff Reserved
0xfed1c000 0xfed1ffff Reserved
0xfffc0000 0xffffffff Reserved
0x100000000 0x27fffffff System RAM
"""

IOMEM_HEAD = """\
00000000-00000fff : Reserved
00001000-0009efff : System RAM
0009f000-000fffff : Reserved
  000a0000-000bffff : PCI Bus 0000:00
  000c0000-000c99ff : Video ROM
  000f0000-000fffff : System ROM
00100000-7ffd6fff : System RAM
{low}  2a000000-2ae02fff : Kernel code
  2b000000-2b4fffff : Kernel rodata
  2b600000-2b8c2fff : Kernel data
  2bd9c000-2befffff : Kernel bss
7ffd7000-7ffdefff : ACPI Tables
7ffdf000-7fffffff : ACPI Non-volatile Storage
80000000-afffffff : PCI Bus 0000:00
b0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]
  b0000000-bfffffff : Reserved
c0000000-febfffff : PCI Bus 0000:00
  fd000000-fdffffff : 0000:00:01.0
fec00000-fec003ff : IOAPIC 0
fed00000-fed003ff : HPET 0
fed1c000-fed1ffff : Reserved
fee00000-fee00fff : Local APIC
fffc0000-ffffffff : Reserved
100000000-27fffffff : System RAM
{high}380000000-3ffffffff : PCI Bus 0000:00
"""
# crashkernel=512M,high: 512 MiB at the top of RAM plus the default 256 MiB low reservation.
IOMEM_HIGH_LOW = IOMEM_HEAD.format(low="  0d000000-1cffffff : Crash kernel\n",
                                   high="  260000000-27fffffff : Crash kernel\n")
# crashkernel=512M, reserved below 4 GiB.
IOMEM_LOW_ONLY = IOMEM_HEAD.format(low="  5d000000-7cffffff : Crash kernel\n", high="")
IOMEM_NONE = IOMEM_HEAD.format(low="", high="")

CPU_NOTES = {0: 0x3E40F4A8, 1: 0x3E44F4A8, 2: 0x3E48F4A8, 3: 0x3E4CF4A8}
NOTE_BUF = 368            # sizeof(note_buf_t) on x86_64: two note headers, "CORE", elf_prstatus
VMCOREINFO = (0x2B8A1000, 0x1024)
PAGE_OFFSET = 0xFFFF9D3B40000000
TEXT_VADDR, TEXT_PADDR, TEXT_MEMSZ = 0xFFFFFFFFAB000000, 0x2A000000, 0x1FF2A00
PADDR_NONE = (1 << 64) - 1


def kcore_bytes(loads: list[tuple[int, int, int]], *, extended: bool = False) -> bytes:
    """A /proc/kcore-like ELF64 core header: a PT_NOTE, then PT_LOAD (vaddr, paddr, memsz).
    ``extended``: e_phnum = PN_XNUM and the count in section header 0's sh_info."""
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, 0x1000, 0, 0, 0x900, 0, 0)]
    phdrs += [struct.pack("<IIQQQQQQ", 1, 7, 0x2000 + i * 0x1000, v, p, m, m, 0x1000)
              for i, (v, p, m) in enumerate(loads)]
    phnum, shoff, shnum, shdr = len(phdrs), 0, 0, b""
    if extended:
        shoff, shnum = 64 + 56 * phnum, 1
        shdr = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)
        phnum = 0xFFFF
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 4, 62, 1, 0, 64, shoff, 0,
                       64, 56, phnum, 64 if extended else 0, shnum, 0)
    return ehdr + b"".join(phdrs) + shdr


KCORE_LOADS = [
    (TEXT_VADDR, TEXT_PADDR, TEXT_MEMSZ),                    # KCORE_TEXT
    (0xFFFFFFFFC0000000, PADDR_NONE, 0x3F000000),            # modules
    (0xFFFFB2E580000000, PADDR_NONE, 0x1FFFFFFFFFFF),        # vmalloc
    (0xFFFF9D3B40001000, 0x1000, 0x9E000),                   # KCORE_RAM
    (0xFFFF9D3B40100000, 0x100000, 0x7FED7000),              # KCORE_RAM
    (0xFFFF9D3C40000000, 0x100000000, 0x180000000),          # KCORE_RAM
    (0xFFFFE3A0C0000000, PADDR_NONE, 0x8000000),             # vmemmap
]


def make_host(root: Path, iomem: str = IOMEM_HIGH_LOW, *, notes: dict[int, int] = CPU_NOTES,
              kcore: bytes | None = None, vmcoreinfo: str = "0x000000002b8a1000 1024\n") -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "iomem").write_text(iomem)
    if kcore is not None:
        (root / "proc" / "kcore").write_bytes(kcore)
    cpu = root / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    (cpu / "possible").write_text(f"0-{max(notes)}\n")
    (cpu / "cpufreq").mkdir(exist_ok=True)          # not a CPU
    for n, addr in notes.items():
        (cpu / f"cpu{n}").mkdir(exist_ok=True)
        (cpu / f"cpu{n}" / "crash_notes").write_text(f"{addr:x}\n")       # "%llx\n"
        (cpu / f"cpu{n}" / "crash_notes_size").write_text(f"{NOTE_BUF}\n")  # "%zu\n"
    (root / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
    (root / "sys" / "kernel" / "vmcoreinfo").write_text(vmcoreinfo)       # "%pa %x\n"
    return root


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return make_host(tmp_path / "host", kcore=kcore_bytes(KCORE_LOADS))


def target() -> TargetMemoryMap:
    return TargetMemoryMap.from_text(FIRMWARE_MAP, source="firmware-map")


def spans(ranges) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in ranges]


# --- 1. the crash reservation ---------------------------------------------------------------------

def test_crashkernel_high_gives_a_low_and_a_high_region_in_address_order():
    regions = K.parse_crash_regions(IOMEM_HIGH_LOW)
    assert spans(regions) == [(0x0D000000, 0x1D000000), (0x260000000, 0x280000000)]
    assert all(r.kind is RAM and r.label == "Crash kernel" for r in regions)
    # kexec_load(KEXEC_ON_CRASH) takes segments only in crashk_res, the high one
    assert spans([K.load_region(regions)]) == [(0x260000000, 0x280000000)]


def test_a_single_region_below_4g():
    regions = K.parse_crash_regions(IOMEM_LOW_ONLY)
    assert spans(regions) == [(0x5D000000, 0x7D000000)]
    K.require_load_region_below(regions)  # nothing to say


def test_a_reservation_above_4g_is_refused_for_vmrun_with_advice():
    with pytest.raises(K.KdumpError) as ei:
        K.require_load_region_below(K.parse_crash_regions(IOMEM_HIGH_LOW))
    assert "crashkernel=SIZE,high" in str(ei.value) and "0x260000000-0x27fffffff" in str(ei.value)


def test_crash_kernel_at_deeper_nesting_and_without_any():
    text = ("00100000-bfffffff : System RAM\n  01000000-02ffffff : Kernel code\n"
            "    03000000-03ffffff : Crash kernel\n")
    assert spans(K.parse_crash_regions(text)) == [(0x3000000, 0x4000000)]
    assert K.parse_crash_regions(IOMEM_NONE) == ()


def test_iomem_read_without_root_is_explained():
    zeros = re.sub(r"[0-9a-f]+-[0-9a-f]+ :", "00000000-00000000 :", IOMEM_HIGH_LOW)
    with pytest.raises(K.KdumpError) as ei:
        K.parse_crash_regions(zeros, "copy")
    assert "root" in str(ei.value) and "copy" in str(ei.value)


def test_a_line_that_is_not_iomem():
    with pytest.raises(K.KdumpError) as ei:
        K.parse_crash_regions("00100000-bfffffff : System RAM\nhello world\n", "x")
    assert "x: line 2" in str(ei.value) and "'hello world'" in str(ei.value)


def test_no_reservation_names_crashkernel_and_how_to_set_it(tmp_path):
    root = make_host(tmp_path, IOMEM_NONE)
    for call in (K.read_crash_regions, K.read_host_facts):
        with pytest.raises(K.NoCrashReservation) as ei:
            call(root)
        err = ei.value
        assert isinstance(err, VmrunError) and err.exit_code == 50 and err.kind == "no_crash_reservation"
        msg = str(err)
        assert "crashkernel=" in msg and "reboot" in msg and "crash kernel reservation" in msg
        assert str(root / "proc" / "iomem") in msg


def test_read_crash_regions_from_a_root(tmp_path):
    root = make_host(tmp_path, IOMEM_LOW_ONLY)
    assert spans(K.read_crash_regions(root)) == [(0x5D000000, 0x7D000000)]
    with pytest.raises(K.KdumpError, match="does not exist"):
        K.read_crash_regions(tmp_path / "nowhere")


def test_this_machine(tmp_path):
    """The real /proc/iomem through the same function: a region, or the explained refusal."""
    try:
        text = Path("/proc/iomem").read_text()
    except OSError:
        pytest.skip("no /proc/iomem")
    if re.search(r"^0+-0+ : ", text, re.M) and not re.search(r"^0*[1-9a-f]", text, re.M):
        with pytest.raises(K.KdumpError, match="root"):
            K.read_crash_regions("/")
    elif "Crash kernel" not in text:
        with pytest.raises(K.NoCrashReservation, match="crashkernel="):
            K.read_crash_regions("/")
    else:
        assert K.read_crash_regions("/")


# --- 2. the crash memory map -----------------------------------------------------------------------

def test_crash_map_keeps_only_the_reservations_and_low_memory_as_ram():
    regions = K.parse_crash_regions(IOMEM_HIGH_LOW)
    m = K.crash_memory_map(target(), regions)
    assert [(r.start, r.end, r.kind) for r in m.ranges] == [
        (0x0, 0x9F000, RAM),                  # RAM below 1 MiB: the real-mode trampoline
        (0x9F000, 0x100000, RES),
        (0x0D000000, 0x1D000000, RAM),        # crashk_low_res
        # 0x100000-0x7ffd7000 outside it: the crashed kernel's RAM, dropped
        (0x7FFD7000, 0x7FFDF000, ACPI),
        (0x7FFDF000, 0x80000000, NVS),
        (0xB0000000, 0xC0000000, RES),
        (0xFED1C000, 0xFED20000, RES),
        (0xFFFC0000, 0x100000000, RES),
        # 0x100000000-0x260000000 dropped
        (0x260000000, 0x280000000, RAM),      # crashk_res
    ]
    assert m.role == "kdump"
    assert "kdump" in m.source and "firmware-map" in m.source
    assert "0x260000000-0x27fffffff" in m.source and "0xd000000-0x1cffffff" in m.source


def test_crash_map_digest_is_stable_and_never_a_machine_digest():
    regions = K.parse_crash_regions(IOMEM_LOW_ONLY)
    a = K.crash_memory_map(target(), regions)
    b = K.crash_memory_map(TargetMemoryMap.from_text(FIRMWARE_MAP, source="other name"), regions)
    assert a.digest() == b.digest()
    assert a.canonical_text().splitlines()[0] == "vmrun-memmap-v1 role=kdump"
    same_ranges = TargetMemoryMap(a.ranges, "plain")
    assert same_ranges.canonical_text().splitlines()[0] == "vmrun-memmap-v1"
    assert same_ranges.digest() != a.digest()
    # a machine map's digest is what it always was
    assert target().canonical_text().splitlines()[0] == "vmrun-memmap-v1"


def test_crash_map_without_low_memory():
    m = K.crash_memory_map(target(), K.parse_crash_regions(IOMEM_LOW_ONLY), low_memory=False)
    assert spans(m.ram()) == [(0x5D000000, 0x7D000000)]


def test_a_crash_region_that_is_not_ram_in_the_map():
    other = TargetMemoryMap.from_text("0x0 0x9efff System RAM\n0x100000 0x3fffffff System RAM\n")
    with pytest.raises(K.KdumpError) as ei:
        K.crash_memory_map(other, K.parse_crash_regions(IOMEM_LOW_ONLY))
    assert "0x5d000000-0x7cffffff" in str(ei.value) and "this machine" in str(ei.value)


def test_from_ranges_validates_like_a_parsed_map():
    with pytest.raises(BadOptionError, match="overlaps"):
        TargetMemoryMap.from_ranges([PhysRange(0, 0x2000, RAM), PhysRange(0x1000, 0x3000, RES)], "t")
    with pytest.raises(BadOptionError, match="no usable RAM"):
        TargetMemoryMap.from_ranges([PhysRange(0, 0x2000, RES)], "t")
    m = TargetMemoryMap.from_ranges([PhysRange(0x1000, 0x2000, RAM), PhysRange(0, 0x1000, RAM)], "t")
    assert spans(m.ranges) == [(0, 0x2000)]


# --- 3. host facts ----------------------------------------------------------------------------------

def test_host_facts(host):
    f = K.read_host_facts(host)
    assert spans(f.crash_regions) == [(0x0D000000, 0x1D000000), (0x260000000, 0x280000000)]
    assert spans(f.system_ram) == [(0x1000, 0x9F000), (0x100000, 0x7FFD7000), (0x100000000, 0x280000000)]
    assert [(n.cpu, n.addr, n.size) for n in f.cpu_notes] == [
        (0, 0x3E40F4A8, 368), (1, 0x3E44F4A8, 368), (2, 0x3E48F4A8, 368), (3, 0x3E4CF4A8, 368)]
    assert (f.vmcoreinfo.addr, f.vmcoreinfo.size, f.vmcoreinfo.cpu) == (0x2B8A1000, 0x1024, None)
    assert f.page_offset == 0xFFFF9D3B40000000
    assert f.kernel_text == K.KernelText(0xFFFFFFFFAB000000, 0x2A000000, 0x1FF3000)
    assert f.kernel_code == PhysRange(0x2A000000, 0x2AE03000, RAM, "Kernel code")
    assert f.remarks == ()


def test_cpus_are_ordered_numerically_and_gaps_are_fine(tmp_path):
    notes = {0: 0x3E40F4A8, 2: 0x3E48F4A8, 10: 0x3E50F4A8}
    f = K.read_host_facts(make_host(tmp_path, notes=notes))
    assert [(n.cpu, n.addr) for n in f.cpu_notes] == [(0, 0x3E40F4A8), (2, 0x3E48F4A8), (10, 0x3E50F4A8)]


def test_without_kcore_nothing_is_guessed(tmp_path):
    f = K.read_host_facts(make_host(tmp_path))  # no proc/kcore (lockdown, CONFIG_PROC_KCORE=n)
    assert f.page_offset is None and f.kernel_text is None
    assert any("kcore" in r for r in f.remarks)


def test_kcore_text_that_disagrees_with_iomem_is_left_out(tmp_path):
    loads = [(TEXT_VADDR, 0x2C000000, TEXT_MEMSZ)] + KCORE_LOADS[1:]
    f = K.read_host_facts(make_host(tmp_path, kcore=kcore_bytes(loads)))
    assert f.kernel_text is None and f.page_offset == PAGE_OFFSET
    assert any("Kernel code" in r for r in f.remarks)


def test_kcore_with_extended_numbering_and_a_vsyscall_remap(tmp_path):
    # older kernels give the vsyscall page (a kernel-image address) a p_paddr too
    loads = KCORE_LOADS + [(0xFFFFFFFFFF600000, 0x2A005000, 0x1000)]
    f = K.read_host_facts(make_host(tmp_path, kcore=kcore_bytes(loads, extended=True)))
    assert f.page_offset == PAGE_OFFSET
    assert f.kernel_text == K.KernelText(0xFFFFFFFFAB000000, 0x2A000000, 0x1FF3000)


def test_kcore_with_inconsistent_direct_map_gives_no_page_offset(tmp_path):
    loads = KCORE_LOADS + [(0xFFFF888000200000, 0x200000, 0x1000)]
    f = K.read_host_facts(make_host(tmp_path, kcore=kcore_bytes(loads)))
    # the direct map is unusable, the kernel text (KCORE_TEXT, whole pages) is still right
    assert f.page_offset is None
    assert f.kernel_text == K.KernelText(TEXT_VADDR, TEXT_PADDR, 0x1FF3000)


@pytest.mark.parametrize("content,needle", [
    ("zz\n", "'zz'"),
    ("\n", "''"),
    ("0x\n", "'0x'"),
    ("3e40f4a8 17\n", "'3e40f4a8 17'"),
])
def test_malformed_crash_notes(tmp_path, content, needle):
    root = make_host(tmp_path)
    p = root / "sys/devices/system/cpu/cpu2/crash_notes"
    p.write_text(content)
    with pytest.raises(K.KdumpError) as ei:
        K.read_host_facts(root)
    msg = str(ei.value)
    assert str(p) in msg and needle in msg and "hexadecimal" in msg
    assert ei.value.exit_code == 50 and ei.value.kind == "kdump"


def test_malformed_crash_notes_size(tmp_path):
    root = make_host(tmp_path)
    p = root / "sys/devices/system/cpu/cpu1/crash_notes_size"
    p.write_text("0x170\n")  # it is decimal
    with pytest.raises(K.KdumpError) as ei:
        K.read_host_facts(root)
    assert str(p) in str(ei.value) and "decimal" in str(ei.value)
    p.unlink()
    with pytest.raises(K.KdumpError, match="crash_notes_size: it does not exist"):
        K.read_host_facts(root)


def test_kernel_without_crash_notes(tmp_path):
    root = make_host(tmp_path)
    (root / "sys/devices/system/cpu/cpu0/crash_notes").unlink()
    with pytest.raises(K.KdumpError, match="CONFIG_CRASH_DUMP"):
        K.read_host_facts(root)


@pytest.mark.parametrize("addr", [0x0, 0x0D100000, 0x90000000])
def test_crash_notes_that_are_not_per_cpu_memory(tmp_path, addr):
    # zero, inside the crash reservation, in a PCI hole
    root = make_host(tmp_path, notes={0: CPU_NOTES[0], 1: addr})
    with pytest.raises(K.KdumpError, match="cpu1/crash_notes"):
        K.read_host_facts(root)


@pytest.mark.parametrize("text", ["0x2b8a1000\n", "nothex 1024\n", "0x2b8a1000 1024 7\n",
                                  "0x0000000090000000 1024\n"])
def test_malformed_vmcoreinfo(tmp_path, text):
    with pytest.raises(K.KdumpError, match="vmcoreinfo"):
        K.read_host_facts(make_host(tmp_path, vmcoreinfo=text))


def test_unreadable_file_says_root(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    root = make_host(tmp_path)
    (root / "sys/devices/system/cpu/cpu0/crash_notes").chmod(0)
    with pytest.raises(K.KdumpError, match="permission denied"):
        K.read_host_facts(root)


# --- 3. the ELF core header ---------------------------------------------------------------------------

def vmcore_sanity(hdr: bytes) -> list[tuple]:
    """The checks fs/proc/vmcore.c makes on the header, then its program headers."""
    ident, etype, machine, version, entry, phoff, shoff, flags, ehsize, phentsize, phnum, *_ = \
        struct.unpack_from("<16sHHIQQQIHHHHHH", hdr)
    assert ident[:4] == b"\x7fELF" and ident[4] == 2 and ident[5] == 1 and ident[6] == 1
    assert (etype, machine, version, ehsize, phentsize) == (4, 62, 1, 64, 56)
    assert phnum > 0 and phoff == 64 and shoff == 0 and entry == 0
    assert len(hdr) == 64 + 56 * phnum
    return [struct.unpack_from("<IIQQQQQQ", hdr, 64 + 56 * i) for i in range(phnum)]


def test_header_for_crashkernel_high_low(host):
    plan = K.plan_kdump(target(), K.read_host_facts(host))
    ph = vmcore_sanity(plan.header)
    notes = [(p[2], p[4], p[5], p[6], p[3], p[1]) for p in ph if p[0] == 4]   # off, paddr, sizes, vaddr, flags
    assert notes == [(a, a, 368, 368, 0, 0) for a in (0x3E40F4A8, 0x3E44F4A8, 0x3E48F4A8, 0x3E4CF4A8)] \
        + [(0x2B8A1000, 0x2B8A1000, 0x1024, 0x1024, 0, 0)]
    loads = [(p[4], p[4] + p[6], p[3]) for p in ph if p[0] == 1]
    assert all(p[2] == p[4] and p[5] == p[6] and p[1] == 7 for p in ph if p[0] == 1)
    assert loads == [
        (0x2A000000, 0x2A000000 + 0x1FF3000, 0xFFFFFFFFAB000000),                 # kernel text
        # System RAM minus the RAM given to the kdump kernel:
        # 0x1000-0x9f000 is inside the low MiB; 0xd000000-0x1d000000 is crashk_low_res;
        # 0x260000000-0x280000000 is crashk_res
        (0x100000, 0x0D000000, 0xFFFF9D3B40100000),
        (0x1D000000, 0x7FFD7000, 0xFFFF9D3B5D000000),
        (0x100000000, 0x260000000, 0xFFFF9D3C40000000),
    ]
    assert spans(plan.dumped) == [ld[:2] for ld in loads[1:]]


def test_header_location_and_the_ranges_around_it(host):
    plan = K.plan_kdump(target(), K.read_host_facts(host))
    assert len(plan.header) == 64 + 56 * 9   # 4 CPUs, VMCOREINFO, text, 3 RAM ranges
    assert (plan.elfcorehdr.start, plan.elfcorehdr.end) == (0x260000000, 0x260001000)
    assert spans([plan.load_region]) == [(0x260000000, 0x280000000)]
    assert spans(plan.kdump_only) == [(0x0, 0x9F000), (0x0D000000, 0x1D000000)]
    assert plan.header_segment() == (0x260000000, plan.header, 0x1000)


def test_header_single_region_no_kcore(tmp_path):
    plan = K.plan_kdump(target(), K.read_host_facts(make_host(tmp_path, IOMEM_LOW_ONLY)))
    ph = vmcore_sanity(plan.header)
    loads = [(p[4], p[4] + p[6], p[3]) for p in ph if p[0] == 1]
    assert loads == [(0x100000, 0x5D000000, 0), (0x7D000000, 0x7FFD7000, 0),
                     (0x100000000, 0x280000000, 0)]
    assert (plan.elfcorehdr.start, plan.elfcorehdr.size) == (0x5D000000, 0x1000)
    assert spans(plan.kdump_only) == [(0, 0x9F000)]


def test_kmem_ram_is_dumped_too(tmp_path):
    iomem = IOMEM_LOW_ONLY.replace(
        "380000000-3ffffffff : PCI Bus 0000:00\n",
        "280000000-2ffffffff : Soft Reserved\n  280000000-2ffffffff : dax0.0\n"
        "    280000000-2ffffffff : System RAM (kmem)\n")
    plan = K.plan_kdump(target(), K.read_host_facts(make_host(tmp_path, iomem)))
    assert spans(plan.dumped)[-1] == (0x100000000, 0x300000000)


READELF = shutil.which("readelf")


def test_readelf_reads_the_header_and_the_notes_it_points_at(host, tmp_path):
    """A sparse file whose offsets are physical addresses, like old memory seen by the kdump
    kernel: the header at offset 0, the notes where crash_notes/vmcoreinfo say they are."""
    if READELF is None:  # the reference reader: never skipped
        pytest.fail("binutils readelf is not installed (scripts/setup installs it)", pytrace=False)
    plan = K.plan_kdump(target(), K.read_host_facts(host))
    core = tmp_path / "oldmem"

    def note(name: bytes, ntype: int, desc: bytes) -> bytes:
        pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
        return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)

    with open(core, "wb") as f:
        f.write(plan.header)
        for cpu, addr in CPU_NOTES.items():
            if cpu == 2:
                continue  # this CPU saved nothing: its buffer stays zero
            prstatus = bytearray(336)
            struct.pack_into("<i", prstatus, 32, 1000 + cpu)   # pr_pid
            f.seek(addr)
            f.write(note(b"CORE", 1, bytes(prstatus)) + bytes(12))  # NT_PRSTATUS + final empty note
        f.seek(VMCOREINFO[0])
        f.write(note(b"VMCOREINFO", 0, b"OSRELEASE=6.1.0-fake\nPAGESIZE=4096\n"))
        f.truncate(0x80000000)
    out = subprocess.run([READELF, "-W", "-h", "-l", "-n", str(core)], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"Type:\s+CORE \(Core file\)", out)
    assert re.search(r"Machine:\s+Advanced Micro Devices X86-64", out)
    assert re.search(r"Class:\s+ELF64", out) and re.search(r"Number of program headers:\s+9", out)
    rows = re.findall(r"^\s+(NOTE|LOAD)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)"
                      r"\s+(0x[0-9a-f]+)", out, re.M)
    got = [(t, int(o, 16), int(v, 16), int(p, 16), int(fs, 16), int(ms, 16)) for t, o, v, p, fs, ms in rows]
    assert got == [
        ("NOTE", 0x3E40F4A8, 0, 0x3E40F4A8, 368, 368),
        ("NOTE", 0x3E44F4A8, 0, 0x3E44F4A8, 368, 368),
        ("NOTE", 0x3E48F4A8, 0, 0x3E48F4A8, 368, 368),
        ("NOTE", 0x3E4CF4A8, 0, 0x3E4CF4A8, 368, 368),
        ("NOTE", 0x2B8A1000, 0, 0x2B8A1000, 0x1024, 0x1024),
        ("LOAD", 0x2A000000, 0xFFFFFFFFAB000000, 0x2A000000, 0x1FF3000, 0x1FF3000),
        ("LOAD", 0x100000, 0xFFFF9D3B40100000, 0x100000, 0x0CF00000, 0x0CF00000),
        ("LOAD", 0x1D000000, 0xFFFF9D3B5D000000, 0x1D000000, 0x62FD7000, 0x62FD7000),
        ("LOAD", 0x100000000, 0xFFFF9D3C40000000, 0x100000000, 0x160000000, 0x160000000),
    ]
    # the notes readelf finds at those offsets, block by block
    blocks = re.split(r"Displaying notes found at file offset (0x[0-9a-f]+) with length (0x[0-9a-f]+):", out)[1:]
    found = {}
    for off, length, body in zip(blocks[::3], blocks[1::3], blocks[2::3]):
        owners = re.findall(r"^\s+(\S+)\s+0x([0-9a-f]+)\s+(.*?)\s*$", body, re.M)
        found[int(off, 16)] = (int(length, 16), [(o, int(s, 16), d.split("\t")[0].strip())
                                                  for o, s, d in owners if o not in ("Owner", "(NONE)")])
    assert found == {
        0x3E40F4A8: (368, [("CORE", 336, "NT_PRSTATUS (prstatus structure)")]),
        0x3E44F4A8: (368, [("CORE", 336, "NT_PRSTATUS (prstatus structure)")]),
        0x3E48F4A8: (368, []),
        0x3E4CF4A8: (368, [("CORE", 336, "NT_PRSTATUS (prstatus structure)")]),
        0x2B8A1000: (0x1024, [("VMCOREINFO", 35, "Unknown note type: (0x00000000)")]),
    }


def test_the_header_refuses_to_dump_a_crash_region():
    f = K.HostCrashFacts((PhysRange(0x5D000000, 0x7D000000, RAM),), (PhysRange(0x100000, 0x80000000, RAM),),
                         (K.NoteSegment(0x3E40F4A8, 368, 0),), K.NoteSegment(0x2B8A1000, 0x1024))
    with pytest.raises(ValueError):
        K.build_elfcorehdr(f, [(0, 0x100000)])


# --- the run's allocator ----------------------------------------------------------------------------

def test_reserve_in_the_allocator(tmp_path):
    from hostsvc.memory import AllocType, Allocator, MemType
    from hostsvc.status import NOT_FOUND, EfiError

    plan = K.plan_kdump(target(), K.read_host_facts(make_host(tmp_path, IOMEM_LOW_ONLY)))
    alloc = Allocator(plan.map, 2 * GiB)
    res = K.reserve(alloc, plan)
    assert res.header == (0x5D000000, 1)
    assert res.kdump_only == [(0x1000, 0x9E)]   # page 0 is the allocator's own
    descs = [(d.type, d.start, d.end) for d in alloc.descriptors()]
    assert (0, 0x5D000000, 0x5D001000) in descs           # EfiReservedMemoryType → E820 reserved
    assert (2, 0x1000, 0x9F000) in descs                  # EfiLoaderData → E820 RAM
    assert alloc.allocated_bytes() == 0                    # the firmware's, not the payload's
    # the payload gets the rest of crashk_res, top-down, and nothing else
    a = alloc.allocate_pages(AllocType.AnyPages, MemType.LoaderData, 16)
    assert 0x5D001000 <= a and a + 16 * 0x1000 <= 0x7D000000
    # UEFI 2.10 §7.2: AllocatePages(AllocateAddress) of pages that are not free is
    # EFI_NOT_FOUND, and so is FreePages of pages AllocatePages did not hand out
    with pytest.raises(EfiError) as ei:
        alloc.allocate_pages(AllocType.Address, MemType.LoaderData, 1, address=0x5D000000)
    assert ei.value.status == NOT_FOUND                    # the header page
    with pytest.raises(EfiError) as ei:
        alloc.allocate_pages(AllocType.Address, MemType.LoaderData, 1, address=0x8000)
    assert ei.value.status == NOT_FOUND                    # the low MiB, held as LoaderData
    with pytest.raises(EfiError) as ei:
        alloc.free_pages(0x5D000000, 1)
    assert ei.value.status == NOT_FOUND
    K.release_kdump_only(alloc, res)
    assert all(not (a.start < 0x9F000 and a.start > 0) for a in alloc.allocations)
    assert (0x5D000000, 1) in [(a.start, a.pages) for a in alloc.allocations]


def test_reserve_refuses_memory_already_taken(tmp_path):
    from hostsvc.memory import FIRMWARE, AllocType, Allocator, MemType

    plan = K.plan_kdump(target(), K.read_host_facts(make_host(tmp_path)))
    alloc = Allocator(plan.map, 2 * GiB)
    alloc.allocate_pages(AllocType.MaxAddress, MemType.BootServicesData, 4, 0xFFFFFFFF, owner=FIRMWARE)
    with pytest.raises(K.KdumpError, match="kdump kernel may use"):
        K.reserve(alloc, plan)  # the firmware went top-down below 4 GiB: into crashk_low_res


# --- 4. the command line ------------------------------------------------------------------------------

def memparse(s: str) -> tuple[int, str]:
    """lib/cmdline.c memparse: simple_strtoull(base 0) then an optional K/M/G/T/P/E suffix."""
    m = re.match(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", s)
    text = m[1]
    n = int(text, 16) if text[:2].lower() == "0x" else int(text, 8) if text.startswith("0") else int(text)
    rest = s[len(text):]
    shift = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}.get(rest[:1].lower())
    if shift:
        n, rest = n << shift, rest[1:]
    return n, rest


def elfcorehdr_param(line: str) -> tuple[int, int]:
    """setup_elfcorehdr(): [size@]offset."""
    arg = [w for w in line.split() if w.startswith("elfcorehdr=")][-1].split("=", 1)[1]
    first, rest = memparse(arg)
    assert rest.startswith("@")
    addr, rest = memparse(rest[1:])
    assert rest == ""
    return addr, first


def test_cmdline_uki_style():
    base = "root=UUID=3f1c1d2e-7f0b-4c55-9d1a-2b5e9a1c0f00 ro quiet crashkernel=512M,high crashkernel=256M,low"
    line = K.kdump_cmdline(base, 0x260000000, 0x1000, None)
    assert line == ("root=UUID=3f1c1d2e-7f0b-4c55-9d1a-2b5e9a1c0f00 ro quiet reset_devices nr_cpus=1 irqpoll "
                    "elfcorehdr=0x1000@0x260000000")
    assert elfcorehdr_param(line) == (0x260000000, 0x1000)


def test_cmdline_removes_what_must_not_carry_over_and_what_append_replaces():
    base = ("BOOT_IMAGE=/vmlinuz console=ttyS0,115200 hugepagesz=1G hugepages=16 default_hugepagesz=1G "
            "nr_cpus=8 nr-cpus=4 elfcorehdr=0x1000 crashkernel=256M-:512M")
    line = K.kdump_cmdline(base, 0x5D000000, 0x2000, None)
    assert line == ("BOOT_IMAGE=/vmlinuz console=ttyS0,115200 default_hugepagesz=1G reset_devices nr_cpus=1 "
                    "irqpoll elfcorehdr=0x2000@0x5d000000")


def test_cmdline_custom_append_and_none():
    base = "root=/dev/vda1 irqpoll maxcpus=4"
    assert K.kdump_cmdline(base, 0x5D000000, 0x1000, "maxcpus=1 systemd.unit=kdump-tools-dump.service") == \
        "root=/dev/vda1 irqpoll maxcpus=1 systemd.unit=kdump-tools-dump.service elfcorehdr=0x1000@0x5d000000"
    assert K.kdump_cmdline(base, 0x5D000000, 0x1000, "") == \
        "root=/dev/vda1 irqpoll maxcpus=4 elfcorehdr=0x1000@0x5d000000"


def test_cmdline_init_arguments_and_quotes_stay_as_they_are():
    base = 'dyndbg="file foo.c +p" root=/dev/sda2 -- single crashkernel=1G "a b"'
    line = K.kdump_cmdline(base, 0x5D000000, 0x1000, "irqpoll")
    assert line == ('dyndbg="file foo.c +p" root=/dev/sda2 irqpoll elfcorehdr=0x1000@0x5d000000 '
                    '-- single crashkernel=1G "a b"')
    quoted = K.kdump_cmdline('"crashkernel=512M" quiet', 0x5D000000, 0x1000, "")
    assert quoted == "quiet elfcorehdr=0x1000@0x5d000000"
    # a UKI .cmdline section as objcopy stores it: newline, then NUL padding
    uki = K.kdump_cmdline("root=/dev/vda2 ro\n\0\0\0", 0x5D000000, 0x1000, "")
    assert uki == "root=/dev/vda2 ro elfcorehdr=0x1000@0x5d000000"


@pytest.mark.parametrize("append,needle", [("nr_cpus=1 -- single", "'--'"),
                                           ("elfcorehdr=0x1000@0x0", "elfcorehdr")])
def test_cmdline_bad_append(append, needle):
    with pytest.raises(BadOptionError) as ei:
        K.kdump_cmdline("quiet", 0x5D000000, 0x1000, append)
    assert needle in str(ei.value)


def test_cmdline_too_long_for_x86():
    base = "x" * 2000
    with pytest.raises(BadOptionError, match="2047"):
        K.kdump_cmdline(base, 0x5D000000, 0x1000, None)
    ok = K.kdump_cmdline("y" * (2047 - len(" elfcorehdr=0x1000@0x5d000000")), 0x5D000000, 0x1000, "")
    assert len(ok) == 2047


def test_plan_cmdline_and_metadata(host):
    plan = K.plan_kdump(target(), K.read_host_facts(host))
    line = plan.cmdline("console=ttyS0 crashkernel=512M,high")
    assert line == "console=ttyS0 reset_devices nr_cpus=1 irqpoll elfcorehdr=0x1000@0x260000000"
    meta = plan.metadata(line)
    assert meta["cmdline"] == line and meta["cpus"] == 4
    assert meta["elfcorehdr"] == {"addr": "0x260000000", "size": 0x1000, "bytes": 568}
    assert meta["load_region"] == {"start": "0x260000000", "end": "0x27fffffff"}
    assert meta["memmap_digest"] == plan.map.digest()


# --- properties --------------------------------------------------------------------------------------

PAGE = 0x1000


@st.composite
def layouts(draw):
    """Page-granular RAM ranges below 64 MiB, a crash region inside one of them, maybe a low one."""
    cuts = sorted(draw(st.sets(st.integers(1, 0x4000 - 1), min_size=4, max_size=12)))
    bounds = [0] + cuts + [0x4000]
    ram = [(bounds[i] * PAGE, bounds[i + 1] * PAGE) for i in range(0, len(bounds) - 1, 2)]
    ram = [r for r in ram if r[1] - r[0] >= 4 * PAGE and r[0] >= 0x200 * PAGE] or [(0x200 * PAGE, 0x300 * PAGE)]
    i = draw(st.integers(0, len(ram) - 1))
    s, e = ram[i]
    cs = draw(st.integers(s // PAGE, e // PAGE - 2)) * PAGE
    ce = draw(st.integers(cs // PAGE + 2, e // PAGE)) * PAGE
    low = draw(st.booleans())
    return [(0x1000, 0x9F000)] + ram, (cs, ce), low


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_dumped_and_given_ram_partition_system_ram(layout):
    ram, crash, low = layout
    text = "".join(f"{s:#x} {e - 1:#x} System RAM\n" for s, e in ram)
    tgt = TargetMemoryMap.from_text(text)
    facts = K.HostCrashFacts((PhysRange(*crash, RAM),), tuple(PhysRange(s, e, RAM) for s, e in ram),
                             (K.NoteSegment(0x2000, 368, 0),), K.NoteSegment(0x3000, 0x1024))
    plan = K.plan_kdump(tgt, facts, low_memory=low)

    def pages(spans_):
        return {p for s, e in spans_ for p in range(s // PAGE, e // PAGE)}
    system = pages(ram)
    given_ = pages(spans(plan.map.ram()))
    dumped = pages(spans(plan.dumped))
    expect_given = pages([crash]) | (pages([(0, 0x100000)]) & system if low else set())
    assert given_ == expect_given
    assert dumped == system - expect_given
    assert plan.elfcorehdr.start == crash[0] and plan.elfcorehdr.end <= crash[1]
    loads = [p for p in vmcore_sanity(plan.header) if p[0] == 1]
    assert pages([(p[4], p[4] + p[6]) for p in loads]) == dumped
