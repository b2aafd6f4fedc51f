"""hostsvc.memmap: parsing the target machine's memory map (sysfs copy, /proc/iomem, e820 lines)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from hostsvc.memmap import FLASH_WINDOW, PhysRange, RangeKind, TargetMemoryMap
from vmrun.errors import BadOptionError

K = RangeKind

# One machine, printed three ways (a typical small VM with ACPI tables, like QEMU's).
SYSFS = """\
0x0 0x9fbff System RAM
0x9fc00 0x9ffff Reserved
0xf0000 0xfffff Reserved
0x100000 0x7ffdffff System RAM
0x7ffe0000 0x7ffeffff ACPI Tables
0x7fff0000 0x7fffffff ACPI Non-volatile Storage
0xfeffc000 0xfeffffff Reserved
0xfffc0000 0xffffffff Reserved
0x100000000 0x17fffffff System RAM
"""

E820 = """\
[    0.000000] Linux version 6.1.0 (gcc) #1 SMP PREEMPT_DYNAMIC
[    0.000000] BIOS-provided physical RAM map:
[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable
[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved
[    0.000000] BIOS-e820: [mem 0x00000000000f0000-0x00000000000fffff] reserved
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000007ffdffff] usable
[    0.000000] BIOS-e820: [mem 0x000000007ffe0000-0x000000007ffeffff] ACPI data
[    0.000000] BIOS-e820: [mem 0x000000007fff0000-0x000000007fffffff] ACPI NVS
[    0.000000] BIOS-e820: [mem 0x00000000feffc000-0x00000000feffffff] reserved
[    0.000000] BIOS-e820: [mem 0x00000000fffc0000-0x00000000ffffffff] reserved
[    0.000000] BIOS-e820: [mem 0x0000000100000000-0x000000017fffffff] usable
[    0.000000] NX (Execute Disable) protection: active
[    0.000473] e820: update [mem 0x00000000-0x00000fff] usable ==> reserved
"""

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
000c0000-000c99ff : Video ROM
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-7ffdffff : System RAM
  01000000-01e00000 : Kernel code
  02000000-0227bf7f : Kernel data
7ffe0000-7ffeffff : ACPI Tables
7fff0000-7fffffff : ACPI Non-volatile Storage
80000000-afffffff : PCI Bus 0000:00
b0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]
  b0000000-bfffffff : Reserved
fec00000-fec003ff : IOAPIC 0
fee00000-fee00fff : Local APIC
feffc000-feffffff : Reserved
fffc0000-ffffffff : Reserved
100000000-17fffffff : System RAM
"""

EXPECTED = (
    PhysRange(0x0, 0xA0000 - 0x400, K.RAM, "System RAM"),
    PhysRange(0x9FC00, 0xA0000, K.RESERVED, "Reserved"),
    PhysRange(0xF0000, 0x100000, K.RESERVED, "Reserved"),
    PhysRange(0x100000, 0x7FFE0000, K.RAM, "System RAM"),
    PhysRange(0x7FFE0000, 0x7FFF0000, K.ACPI_RECLAIM, "ACPI Tables"),
    PhysRange(0x7FFF0000, 0x80000000, K.ACPI_NVS, "ACPI Non-volatile Storage"),
    PhysRange(0xFEFFC000, 0xFF000000, K.RESERVED, "Reserved"),
    PhysRange(0xFFFC0000, 0x100000000, K.RESERVED, "Reserved"),
    PhysRange(0x100000000, 0x180000000, K.RAM, "System RAM"),
)


def spans(m: TargetMemoryMap) -> list[tuple[int, int, RangeKind]]:
    return [(r.start, r.end, r.kind) for r in m.ranges]


def bad(text: str, *needles: str) -> BadOptionError:
    with pytest.raises(BadOptionError) as ei:
        TargetMemoryMap.from_text(text, source="m.txt")
    msg = str(ei.value)
    assert "m.txt" in msg
    for n in needles:
        assert n in msg, msg
    return ei.value


# --- the three formats -----------------------------------------------------------------------
def test_sysfs_copy() -> None:
    m = TargetMemoryMap.from_text(SYSFS, source="copy")
    assert m.ranges == EXPECTED
    assert m.source == "copy"


def test_e820_with_dmesg_prefix() -> None:
    m = TargetMemoryMap.from_text(E820)
    assert spans(m) == [(r.start, r.end, r.kind) for r in EXPECTED]
    assert m.ranges[0].label == "usable"
    assert m.ranges[4].label == "ACPI data"


def test_e820_without_prefix() -> None:
    text = "\n".join(line.split("] ", 1)[1] for line in E820.splitlines()
                     if "BIOS-e820" in line)
    assert spans(TargetMemoryMap.from_text(text)) == [(r.start, r.end, r.kind) for r in EXPECTED]


def test_iomem_top_level_only() -> None:
    m = TargetMemoryMap.from_text(IOMEM)
    want = [(r.start, r.end, r.kind) for r in EXPECTED]
    # /proc/iomem shows the kernel's own view: page 0 reserved, RAM from 0x1000.
    want[0] = (0x1000, 0x9FC00, K.RAM)
    want.insert(0, (0, 0x1000, K.RESERVED))
    assert spans(m) == want
    # PCI windows, video ROM, IOAPIC, Local APIC and nested lines are not ranges.
    assert not any(r.start <= 0xA0000 < r.end for r in m.ranges)
    assert not any(r.start <= 0xB0000000 < r.end for r in m.ranges)
    assert not any(r.start <= 0xFEE00000 < r.end for r in m.ranges)


def test_e820_type_names() -> None:
    text = "\n".join([
        "BIOS-e820: [mem 0x0000000000000000-0x0000000000ffffff] usable",
        "BIOS-e820: [mem 0x0000000001000000-0x0000000001ffffff] reserved",
        "BIOS-e820: [mem 0x0000000002000000-0x0000000002ffffff] ACPI data",
        "BIOS-e820: [mem 0x0000000003000000-0x0000000003ffffff] ACPI NVS",
        "BIOS-e820: [mem 0x0000000004000000-0x0000000004ffffff] unusable",
        "BIOS-e820: [mem 0x0000000005000000-0x0000000005ffffff] persistent (type 12)",
        "BIOS-e820: [mem 0x0000000006000000-0x0000000006ffffff] soft reserved",
        "BIOS-e820: [mem 0x0000000007000000-0x0000000007ffffff] persistent (type 7)",
        "BIOS-e820: [mem 0x0000000008000000-0x0000000008ffffff] type 20",
    ])
    kinds = [r.kind for r in TargetMemoryMap.from_text(text).ranges]
    assert kinds == [K.RAM, K.RESERVED, K.ACPI_RECLAIM, K.ACPI_NVS, K.UNUSABLE, K.PERSISTENT,
                     K.RESERVED, K.PERSISTENT, K.RESERVED]


def test_sysfs_type_names() -> None:
    names = ["System RAM", "Reserved", "ACPI Tables", "ACPI Non-volatile Storage",
             "Unusable memory", "Persistent Memory", "Soft Reserved", "Persistent Memory (legacy)",
             "Unknown E820 type", "PCI Bus"]
    text = "".join(f"{i << 24:#x} {((i + 1) << 24) - 1:#x} {n}\n" for i, n in enumerate(names))
    m = TargetMemoryMap.from_text(text)
    # Reserved-like neighbours merge: check the kind at each original start instead.
    kind_at = {i: next(r.kind for r in m.ranges if r.start <= i << 24 < r.end)
               for i in range(len(names))}
    assert [kind_at[i] for i in range(len(names))] == [
        K.RAM, K.RESERVED, K.ACPI_RECLAIM, K.ACPI_NVS, K.UNUSABLE, K.PERSISTENT, K.RESERVED,
        K.PERSISTENT, K.RESERVED, K.RESERVED]


def test_iomem_type_names() -> None:
    text = "".join([
        "00000000-00ffffff : System RAM\n",
        "01000000-01ffffff : ACPI Tables\n",
        "02000000-02ffffff : ACPI Non-volatile Storage\n",
        "03000000-03ffffff : Unusable memory\n",
        "04000000-04ffffff : Persistent Memory\n",
        "05000000-05ffffff : Soft Reserved\n",
        "06000000-06ffffff : PCI Bus 0000:00\n",
        "07000000-07ffffff : Reserved\n",
    ])
    m = TargetMemoryMap.from_text(text)
    assert spans(m) == [
        (0, 0x1000000, K.RAM), (0x1000000, 0x2000000, K.ACPI_RECLAIM),
        (0x2000000, 0x3000000, K.ACPI_NVS), (0x3000000, 0x4000000, K.UNUSABLE),
        (0x4000000, 0x5000000, K.PERSISTENT), (0x5000000, 0x6000000, K.RESERVED),
        (0x7000000, 0x8000000, K.RESERVED)]


def test_sorting_and_merging() -> None:
    text = ("0x200000 0x2fffff System RAM\n"
            "0x0 0xfffff System RAM\n"
            "0x100000 0x1fffff System RAM\n"
            "# a comment\n\n"
            "0x300000 0x3fffff Reserved\n"
            "0x400000 0x4fffff Reserved\n")
    m = TargetMemoryMap.from_text(text)
    assert spans(m) == [(0, 0x300000, K.RAM), (0x300000, 0x500000, K.RESERVED)]
    assert m.ranges[0].label == "System RAM"


def test_ram_rounding_and_max_address() -> None:
    text = ("0x0 0x9fbff System RAM\n"
            "0x100800 0x2007ff System RAM\n"
            "0x300000 0x3007ff System RAM\n"   # less than a page: no whole page
            "0x400000 0x4fffff ACPI Tables\n")
    m = TargetMemoryMap.from_text(text)
    assert [(r.start, r.end) for r in m.ram()] == [(0, 0x9F000), (0x101000, 0x200000)]
    assert all(r.kind is K.RAM for r in m.ram())
    assert m.max_address() == 0x500000
    assert m.ram_bytes() == 0x9F000 + 0xFF000


def test_digest_same_machine_same_digest() -> None:
    a = TargetMemoryMap.from_text(SYSFS)
    b = TargetMemoryMap.from_text(E820)
    c = TargetMemoryMap.from_text(IOMEM)
    assert a.digest() == b.digest()       # labels differ, ranges don't
    # the digest a staged file carries: sha256 of the canonical text (canonical_text's
    # documented form: a version line, then "START END KIND", exclusive end, 16 hex digits),
    # written here by hand from the SYSFS lines
    canonical = ("vmrun-memmap-v1\n"
                 "0000000000000000 000000000009fc00 RAM\n"
                 "000000000009fc00 00000000000a0000 RESERVED\n"
                 "00000000000f0000 0000000000100000 RESERVED\n"
                 "0000000000100000 000000007ffe0000 RAM\n"
                 "000000007ffe0000 000000007fff0000 ACPI_RECLAIM\n"
                 "000000007fff0000 0000000080000000 ACPI_NVS\n"
                 "00000000feffc000 00000000ff000000 RESERVED\n"
                 "00000000fffc0000 0000000100000000 RESERVED\n"
                 "0000000100000000 0000000180000000 RAM\n")
    assert a.canonical_text() == canonical
    assert a.digest() == hashlib.sha256(canonical.encode()).hexdigest()
    assert c.digest() != a.digest()       # page 0 differs in iomem
    changed = TargetMemoryMap.from_text(SYSFS.replace("0x17fffffff", "0x17ffeffff"))
    assert changed.digest() != a.digest()
    kind_changed = TargetMemoryMap.from_text(SYSFS.replace("ACPI Tables", "Reserved"))
    assert kind_changed.digest() != a.digest()


# --- files and the host ------------------------------------------------------------------------
def test_from_file(tmp_path: Path) -> None:
    p = tmp_path / "target.e820"
    p.write_text(E820)
    m = TargetMemoryMap.from_file(p)
    assert m.source == str(p)
    assert m.digest() == TargetMemoryMap.from_text(SYSFS).digest()


def test_from_file_missing(tmp_path: Path) -> None:
    with pytest.raises(BadOptionError, match="nope.txt"):
        TargetMemoryMap.from_file(tmp_path / "nope.txt")


def test_from_file_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.txt"
    p.write_text("0x0 0x9fbff System RAM\n0x100000 zzz System RAM\n")
    with pytest.raises(BadOptionError) as ei:
        TargetMemoryMap.from_file(p)
    assert "broken.txt" in str(ei.value) and "line 2" in str(ei.value)


def _fake_sysfs(root: Path, entries: list[tuple[str, str, str]]) -> None:
    for i, (s, e, t) in enumerate(entries):
        d = root / str(i)
        d.mkdir()
        (d / "start").write_text(s + "\n")
        (d / "end").write_text(e + "\n")
        (d / "type").write_text(t + "\n")


def test_from_host_fake_tree(tmp_path: Path) -> None:
    # 11 entries so that numeric order (10 after 9) differs from text order.
    entries = [(hex(i << 20), hex(((i + 1) << 20) - 1), "System RAM" if i % 2 == 0 else "Reserved")
               for i in range(11)]
    _fake_sysfs(tmp_path, entries)
    m = TargetMemoryMap.from_host(tmp_path)
    assert m.source == "host"
    assert len(m.ranges) == 11
    assert m.ranges[-1] == PhysRange(10 << 20, 11 << 20, K.RAM, "System RAM")


def test_from_host_fake_tree_errors(tmp_path: Path) -> None:
    _fake_sysfs(tmp_path, [("0x0", "0xfffff", "System RAM"), ("0x80000", "0x1fffff", "Reserved")])
    with pytest.raises(BadOptionError, match=r"overlaps"):
        TargetMemoryMap.from_host(tmp_path)
    with pytest.raises(BadOptionError, match="cannot list"):
        TargetMemoryMap.from_host(tmp_path / "missing")


HOST = Path("/sys/firmware/memmap")


@pytest.mark.skipif(not HOST.is_dir(), reason="no /sys/firmware/memmap on this host")
def test_from_host_real() -> None:
    m = TargetMemoryMap.from_host()
    assert m.source == "host"
    # Read the tree independently and compare.
    raw = []
    for name in os.listdir(HOST):
        d = HOST / name
        raw.append((int((d / "start").read_text(), 16), int((d / "end").read_text(), 16) + 1,
                    (d / "type").read_text().strip()))
    raw.sort()
    for s, e, t in raw:
        r = next(r for r in m.ranges if r.start <= s < r.end)
        assert e <= r.end
        assert (r.kind is K.RAM) == (t == "System RAM")
    assert m.max_address() == max(e for _, e, _ in raw)
    assert m.ram()
    assert sum(r.size for r in m.ranges) == sum(e - s for s, e, _ in raw)
    # ... and as a text copy, it parses to the same map.
    copy = "".join(f"{s:#x} {e - 1:#x} {t}\n" for s, e, t in raw)
    assert TargetMemoryMap.from_text(copy).digest() == m.digest()


# --- errors ------------------------------------------------------------------------------------
def test_empty() -> None:
    bad("", "empty")
    bad("\n   \n# only a comment\n", "empty")


def test_unrecognised_format() -> None:
    bad("\nhello world\n", "line 2", "not a memory map")


def test_sysfs_bad_line_number() -> None:
    bad("0x0 0x9fbff System RAM\n\n0x100000 0x1fffff\n", "line 3")
    bad("0x0 0x9fbff System RAM\n0x100000 0xfffff System RAM\n", "line 2", "below start")


def test_iomem_bad_line_number() -> None:
    bad("00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\nxyz\n", "line 3")


def test_e820_bad_line_number() -> None:
    bad("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable\n"
        "something else\n"
        "BIOS-e820: [mem 0x0000000000100000 0x000000000fffffff] usable\n", "line 3")
    bad("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable\n"
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] weird\n", "line 2", "weird")


def test_overlap_names_both_lines() -> None:
    e = bad("0x0 0x9fbff System RAM\n0x100000 0x1fffffff System RAM\n"
            "0x1ff00000 0x2fffffff Reserved\n", "overlaps", "line 3", "line 2")
    assert e.exit_code == 15


def test_no_ram() -> None:
    bad("0x0 0xfffff Reserved\n0x100000 0x1fffff ACPI Tables\n", "no usable RAM")
    bad("0x100 0x7ff System RAM\n", "no usable RAM")  # less than a page
    bad("00000000-00000fff : Reserved\n000a0000-000bffff : PCI Bus 0000:00\n", "no usable RAM")


def test_iomem_only_skipped_lines() -> None:
    bad("000a0000-000bffff : PCI Bus 0000:00\n", "no memory ranges")


def test_iomem_as_non_root() -> None:
    text = "".join(f"00000000-00000000 : {n}\n" for n in
                   ("Reserved", "System RAM", "Reserved", "PCI Bus 0000:00", "System RAM"))
    text += "  00000000-00000000 : Kernel code\n"
    bad(text, "run as root")


@pytest.mark.parametrize("start,end", [
    (0xFFE00000, 0xFFE00FFF),             # the hypercall page itself
    (0xFFFFF000, 0xFFFFFFFF),             # the reset vector
    (0xC0000000, 0xFFE00000),             # one byte into the window
    (0xF0000000, 0x10FFFFFFF),            # spanning 4 GiB
])
def test_flash_window_ram_refused(start: int, end: int) -> None:
    text = f"0x0 0x9fbff System RAM\n{start:#x} {end:#x} System RAM\n"
    bad(text, "line 2", "flash", "hypercall")


def test_flash_window_edges_accepted() -> None:
    lo, hi = FLASH_WINDOW
    text = (f"0x0 0x9fbff System RAM\n0x100000 {lo - 1:#x} System RAM\n"
            f"{lo:#x} {hi - 1:#x} Reserved\n{hi:#x} 0x1ffffffff System RAM\n")
    m = TargetMemoryMap.from_text(text)
    assert m.ranges[2].kind is K.RESERVED


def test_flash_window_iomem_and_e820() -> None:
    bad("00000000-0009fbff : System RAM\nfff00000-ffffffff : System RAM\n", "line 2", "flash")
    bad("[ 0.0] BIOS-e820: [mem 0x0000000000000000-0x00000000ffffffff] usable\n", "line 1", "flash")


def test_direct_construction_checks_order() -> None:
    with pytest.raises(ValueError):
        TargetMemoryMap((PhysRange(0x1000, 0x3000, K.RAM), PhysRange(0x2000, 0x4000, K.RAM)))
    with pytest.raises(ValueError):
        TargetMemoryMap((PhysRange(0x3000, 0x1000, K.RAM),))
