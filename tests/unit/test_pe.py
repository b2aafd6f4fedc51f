"""vmrun.formats.pe: PE32+ parsing, validation and loading (no KVM needed).

Images are synthesized by tests/unit/pebuilder.py, which writes the headers from the PE/COFF
specification independently of vmrun.formats.pe.
"""

from __future__ import annotations

import random
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pebuilder as pb  # noqa: E402
from pebuilder import REL_DIR64, REL_HIGHLOW, Sec, build_pe  # noqa: E402

from vmrun.formats import pe  # noqa: E402
from vmrun.errors import (  # noqa: E402
    InputFileError,
    MalformedImageError,
    NotPEError,
    UnsupportedSubsystemError,
    WrongArchitectureError,
)

PARSE_ERRORS = (NotPEError, WrongArchitectureError, MalformedImageError, UnsupportedSubsystemError)


def u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


# --- a relocatable image used by several tests ---------------------------------------------------
PTR_VALUES = {0x00: 0x140001000, 0x08: 0x140002010, 0x10: 0x1400020F8}   # .data offset -> DIR64 value
HL_OFFSET, HL_VALUE = 0x20, 0x40002004                                    # a HIGHLOW slot in .data


def reloc_image(**kw):
    data = bytearray(b"\xAA" * 0x40)
    for off, v in PTR_VALUES.items():
        struct.pack_into("<Q", data, off, v)
    struct.pack_into("<I", data, HL_OFFSET, HL_VALUE)
    secs = [Sec(".text", b"\x90" * 0x30 + b"\xc3", characteristics=pb.SCN_CODE),
            Sec(".data", bytes(data), virtual_size=0x1800, characteristics=pb.SCN_DATA)]
    data_rva = 0x2000
    relocs = [(data_rva + off, REL_DIR64) for off in PTR_VALUES] + [(data_rva + HL_OFFSET, REL_HIGHLOW)]
    return build_pe(sections=secs, relocations=relocs, **kw), data_rva, relocs


# --- good images -------------------------------------------------------------------------------------
def test_good_image_fields():
    b = build_pe(image_base=0x140000000, subsystem=10, dll_characteristics=0x160)
    img = pe.parse_pe(b.data, "good.efi")
    assert img.name == "good.efi"
    assert img.data == b.data
    assert img.machine == 0x8664
    assert img.subsystem == 10 and pe.EFI_SUBSYSTEMS[img.subsystem] == "EFI application"
    assert img.image_base == 0x140000000
    assert img.size_of_image == b.size_of_image == 0x5000
    assert img.size_of_headers == b.size_of_headers == 0x200
    assert (img.section_alignment, img.file_alignment) == (0x1000, 0x200)
    assert img.entry_rva == 0x1000
    assert img.dll_characteristics == 0x160
    assert img.signed is False
    assert img.relocations == ()
    assert [s.name for s in img.sections] == [".text", ".data"]
    text, data = img.sections
    assert (text.rva, text.virtual_size, text.raw_offset, text.raw_size) == (0x1000, 0x401, 0x200, 0x600)
    assert text.characteristics == pb.SCN_CODE
    assert (data.rva, data.virtual_size, data.raw_offset, data.raw_size) == (0x2000, 0x2345, 0x800, 0x200)
    assert data.characteristics == pb.SCN_DATA


def test_section_lookup_and_data():
    img = pe.parse_pe(build_pe().data)
    text = img.section(".text")
    assert text is img.sections[0]
    assert img.section(".linux") is None
    # raw size 0x600 > virtual size 0x401: data() is trimmed to the virtual size
    assert text.data() == bytes(range(256)) * 4 + b"\xc3"
    # virtual size 0x2345 > raw size 0x200: data() is all the raw bytes
    assert img.section(".data").data() == (b"DATA" * 64 + bytes(64)).ljust(0x200, b"\0")


def test_section_with_zero_virtual_size_uses_raw_size():
    b = build_pe(sections=[Sec(".text", b"\xcc" * 0x300, virtual_size=0, characteristics=pb.SCN_CODE)])
    img = pe.parse_pe(b.data)
    assert img.sections[0].data() == b"\xcc" * 0x300 + bytes(0x100)
    mem = img.load(img.image_base)
    assert mem[0x1000:0x1300] == b"\xcc" * 0x300


def test_signed_image():
    b = build_pe(certificate=b"\x30\x82" + bytes(100))
    img = pe.parse_pe(b.data)
    assert img.signed is True
    assert b.cert_offset >= len(b.data) - b.cert_size


def test_load_at_image_base_places_sections_and_zero_fills():
    payload = bytes(range(1, 251))
    secs = [Sec(".text", b"\x55" * 0x100, characteristics=pb.SCN_CODE),
            # raw bytes beyond the virtual size must not be loaded
            Sec(".rdata", b"R" * 0x200, virtual_size=0x100, characteristics=pb.SCN_RDATA),
            # virtual size beyond the raw data is zero filled (bss)
            Sec(".data", payload, virtual_size=0x1F00, characteristics=pb.SCN_DATA)]
    b = build_pe(sections=secs)
    img = pe.parse_pe(b.data)
    mem = img.load(img.image_base)
    assert isinstance(mem, bytearray)
    assert len(mem) == img.size_of_image == 0x5000
    assert mem[:img.size_of_headers] == b.data[:b.size_of_headers]
    assert mem[0:2] == b"MZ"
    assert mem[img.size_of_headers:0x1000] == bytes(0x1000 - img.size_of_headers)
    t, r, d = (b.sections[n]["rva"] for n in (".text", ".rdata", ".data"))
    assert (t, r, d) == (0x1000, 0x2000, 0x3000)
    assert mem[t:t + 0x100] == b"\x55" * 0x100
    assert mem[t + 0x100:r] == bytes(r - t - 0x100)
    assert mem[r:r + 0x100] == b"R" * 0x100
    assert mem[r + 0x100:d] == bytes(d - r - 0x100)
    assert mem[d:d + len(payload)] == payload
    assert mem[d + len(payload):] == bytes(len(mem) - d - len(payload))


def test_load_size_rounded_up_to_page():
    # 512-byte section alignment (== file alignment), as some gnu-efi/systemd stubs use
    secs = [Sec(".text", b"\xc3" * 0x50, characteristics=pb.SCN_CODE),
            Sec(".data", b"D" * 0x10, characteristics=pb.SCN_DATA)]
    b = build_pe(sections=secs, section_alignment=0x200, file_alignment=0x200)
    img = pe.parse_pe(b.data)
    assert img.size_of_image == 0x600
    mem = img.load(0x7000_0000)
    assert len(mem) == 0x1000
    assert mem[0x200:0x250] == b"\xc3" * 0x50
    assert mem[0x400:0x410] == b"D" * 0x10
    assert mem[0x600:] == bytes(0xA00)


def test_relocations_listed_without_absolute_padding():
    b, data_rva, relocs = reloc_image()
    img = pe.parse_pe(b.data)
    # 4 entries in one page block: no padding needed; check a 3-entry block gets padded too
    assert sorted(img.relocations) == sorted(relocs)
    b3 = build_pe(relocations=[(0x1000, REL_DIR64), (0x1008, REL_DIR64), (0x2000, REL_DIR64)])
    img3 = pe.parse_pe(b3.data)
    assert sorted(img3.relocations) == [(0x1000, 10), (0x1008, 10), (0x2000, 10)]
    assert all(t != 0 for _, t in img3.relocations)


def test_load_at_image_base_does_not_relocate():
    b, data_rva, _ = reloc_image()
    img = pe.parse_pe(b.data)
    mem = img.load(img.image_base)
    for off, v in PTR_VALUES.items():
        assert u64(mem, data_rva + off) == v
    assert u32(mem, data_rva + HL_OFFSET) == HL_VALUE


@pytest.mark.parametrize("base", [0x1000000, 0x140000000 + 0x200000, 0x7FFF_F000_0000, 0x3000])
def test_load_applies_dir64_and_highlow(base):
    b, data_rva, _ = reloc_image()
    img = pe.parse_pe(b.data)
    delta = base - img.image_base
    mem = img.load(base)
    for off, v in PTR_VALUES.items():
        assert u64(mem, data_rva + off) == (v + delta) % (1 << 64), hex(off)
    assert u32(mem, data_rva + HL_OFFSET) == (HL_VALUE + delta) % (1 << 32)
    # bytes around the slots are untouched
    assert mem[data_rva + 0x24:data_rva + 0x40] == b"\xAA" * 0x1C
    assert mem[data_rva + 0x40:data_rva + 0x1800] == bytes(0x17C0)
    # the file itself is not modified
    assert img.data == b.data


def test_load_rejects_unknown_relocation_type_in_image_object():
    b, _, _ = reloc_image()
    img = pe.parse_pe(b.data)
    from dataclasses import replace
    bad = replace(img, relocations=img.relocations + ((0x2030, 5),))
    with pytest.raises(MalformedImageError, match=r"relocation type 5"):
        bad.load(img.image_base + 0x1000)


# --- not PE ---------------------------------------------------------------------------------------------
def test_empty_file():
    with pytest.raises(NotPEError, match=r"x\.efi is not a PE/COFF image: empty file"):
        pe.parse_pe(b"", "x.efi")


@pytest.mark.parametrize("data", [b"\x7fELF\x02\x01\x01" + bytes(100), b"ZM" + bytes(200), b"M"])
def test_no_mz(data):
    with pytest.raises(NotPEError, match=r"x\.efi is not a PE/COFF image: no MZ header"):
        pe.parse_pe(data, "x.efi")


def test_short_dos_header():
    with pytest.raises(NotPEError, match=r"DOS header truncated"):
        pe.parse_pe(b"MZ" + bytes(20), "x.efi")


def test_e_lfanew_outside_file():
    b = build_pe()
    data = b.patched(pb.DOS_E_LFANEW, "<I", len(b.data) + 0x100)
    with pytest.raises(NotPEError, match=rf"e_lfanew {len(b.data) + 0x100:#x} points outside the file"):
        pe.parse_pe(data, "x.efi")


def test_no_pe_signature():
    b = build_pe()
    data = b.patched(b.e_lfanew, "4s", b"NE\0\0")
    with pytest.raises(NotPEError, match=r"no PE\\0\\0 signature at e_lfanew offset 0x80"):
        pe.parse_pe(data, "x.efi")


# --- wrong architecture ---------------------------------------------------------------------------------
@pytest.mark.parametrize("machine,words", [
    (0xAA64, ["aarch64", "needs an aarch64 host"]),
    (0x14C, ["i386", "0x14c"]),
    (0x1C2, ["ARM", "0x1c2"]),
    (0x1C4, ["ARM", "0x1c4"]),
    (0x5064, ["riscv64"]),
    (0x6264, ["loongarch64"]),
    (0x1234, ["0x1234"]),
])
def test_wrong_machine(machine, words):
    data = build_pe(machine=machine).data
    with pytest.raises(WrongArchitectureError) as ei:
        pe.parse_pe(data, "a.efi")
    msg = str(ei.value)
    assert msg.startswith("a.efi ")
    for w in words:
        assert w in msg
    assert "x86_64" in msg
    assert ei.value.exit_code == WrongArchitectureError.exit_code


def test_pe32_magic_is_wrong_architecture():
    data = build_pe().with_opt("Magic", pb.PE32)
    with pytest.raises(WrongArchitectureError, match=r"32-bit PE32 image"):
        pe.parse_pe(data, "a.efi")


# --- unsupported subsystem -----------------------------------------------------------------------------
def test_windows_console_subsystem():
    data = build_pe(subsystem=3).data
    with pytest.raises(UnsupportedSubsystemError) as ei:
        pe.parse_pe(data, "tool.exe")
    msg = str(ei.value)
    assert "subsystem 3" in msg and "Windows console" in msg and "EFI application" in msg


def test_boot_service_driver_only_when_allowed():
    data = build_pe(subsystem=11).data
    with pytest.raises(UnsupportedSubsystemError, match=r"EFI boot service driver"):
        pe.parse_pe(data)
    img = pe.parse_pe(data, allowed_subsystems=(10, 11, 12))
    assert img.subsystem == 11


# --- malformed ------------------------------------------------------------------------------------------
def _malformed(data, pattern, name="m.efi"):
    with pytest.raises(MalformedImageError, match=pattern) as ei:
        pe.parse_pe(data, name)
    assert str(ei.value).startswith(f"{name} is malformed: ")
    assert "\n" not in str(ei.value)
    return ei.value


def test_truncated_coff_header():
    b = build_pe()
    _malformed(b.data[:b.coff + 10], r"COFF file header at 0x84 truncated")


def test_truncated_optional_header():
    b = build_pe()
    _malformed(b.data[:b.opt + 60], r"optional header at 0x98 truncated")
    _malformed(b.data[:b.opt + 1], r"optional header at 0x98 missing or truncated")
    _malformed(b.data[:b.opt + 0xF0 - 8], r"optional header .*truncated")


def test_truncated_section_table():
    b = build_pe()
    _malformed(b.data[:b.section_table + 50], r"section table at 0x188 \(2 sections\) is truncated")


def test_truncated_headers_size_of_headers():
    b = build_pe()
    assert b.size_of_headers == 0x200 and b.section_table + 80 < 0x1F0
    _malformed(b.data[:0x1F0], r"headers truncated: SizeOfHeaders is 0x200 but the file has 0x1f0 bytes")


def test_size_of_headers_smaller_than_section_table():
    b = build_pe()
    _malformed(b.with_opt("SizeOfHeaders", 0x100), r"SizeOfHeaders 0x100 does not cover the section table")


def test_unknown_optional_header_magic():
    _malformed(build_pe().with_opt("Magic", 0x107), r"unknown optional header magic 0x107")


def test_too_many_data_directories():
    _malformed(build_pe().with_opt("NumberOfRvaAndSizes", 17), r"NumberOfRvaAndSizes 17")


def test_section_raw_data_beyond_end_of_file():
    b = build_pe()
    d = b.sections[".data"]
    cut = d["raw_offset"] + 0x10
    e = _malformed(b.data[:cut], r"section \.data .*raw data 0x800\.\.0xa00 extends beyond the end of the file")
    assert f"{cut:#x}" in str(e)
    # same thing through a bogus SizeOfRawData
    _malformed(b.with_section(".text", "SizeOfRawData", 0x100000),
               r"section \.text .*raw data 0x200\.\.0x100200 extends beyond the end of the file")


def test_section_beyond_size_of_image():
    b = build_pe()
    _malformed(b.with_section(".data", "VirtualSize", 0x3001),
               r"section \.data .*rva 0x2000 \+ size 0x3001 extends beyond SizeOfImage 0x5000")
    _malformed(b.with_opt("SizeOfImage", 0x3000), r"section \.data .*beyond SizeOfImage 0x3000")


def test_section_overlapping_headers():
    b = build_pe()
    _malformed(b.with_section(".text", "VirtualAddress", 0x100), r"section \.text .*overlaps the headers")


@pytest.mark.parametrize("value,pattern", [
    (0, r"SizeOfImage is 0"),
    ((1 << 30) + 0x1000, r"SizeOfImage 0x40001000 is larger than 1 GiB"),
])
def test_bad_size_of_image(value, pattern):
    _malformed(build_pe().with_opt("SizeOfImage", value), pattern)


def test_section_alignment_not_power_of_two():
    _malformed(build_pe().with_opt("SectionAlignment", 0x1800), r"SectionAlignment 0x1800 is not a power of two")


def test_file_alignment_not_power_of_two():
    _malformed(build_pe().with_opt("FileAlignment", 0x300), r"FileAlignment 0x300 is not a power of two")


def test_small_section_alignment_must_equal_file_alignment():
    b = build_pe(section_alignment=0x200, file_alignment=0x200)
    assert pe.parse_pe(b.data).section_alignment == 0x200
    _malformed(b.with_opt("FileAlignment", 0x100), r"SectionAlignment 0x200 is below the page size")
    _malformed(build_pe().with_opt("FileAlignment", 0x2000), r"SectionAlignment 0x1000 is smaller than FileAlignment")


@pytest.mark.parametrize("entry,pattern", [
    (0x5000, r"entry point rva 0x5000 is outside the image"),
    (0xFFFFFFFF, r"entry point rva 0xffffffff is outside the image"),
    (0x0, r"entry point rva 0x0 is outside the image"),
    (0x4800, r"entry point rva 0x4800 is not inside any section"),
])
def test_bad_entry_point(entry, pattern):
    _malformed(build_pe().with_opt("AddressOfEntryPoint", entry), pattern)


def test_overlapping_sections():
    b = build_pe()
    _malformed(b.with_section(".data", "VirtualAddress", 0x1400),
               r"sections \.text \(rva 0x1000\.\.0x1401\) and \.data \(rva 0x1400\) overlap")


def test_relocation_block_past_directory():
    b = build_pe(relocations=[(0x1000, REL_DIR64), (0x1008, REL_DIR64)], reloc_dir_size=8)
    _malformed(b.data, r"relocation block at rva 0x5000 \(size 0xc\) extends past the relocation directory")


def test_relocation_directory_past_image():
    b = build_pe(relocations=[(0x1000, REL_DIR64)])
    _malformed(b.with_data_dir(5, 0x5000, 0x2000), r"relocation directory rva 0x5000 size 0x2000 extends beyond SizeOfImage")


def test_relocation_target_past_image():
    # with a .reloc section the image is 0x6000 bytes; the last valid DIR64 slot is 0x5ff8
    img = pe.parse_pe(build_pe(relocations=[(0x5FF8, REL_DIR64)]).data)
    assert img.size_of_image == 0x6000 and img.relocations == ((0x5FF8, REL_DIR64),)
    b = build_pe(relocations=[(0x5FFC, REL_DIR64)])
    _malformed(b.data, r"base relocation for rva 0x5ffc .*past the end of the image \(0x6000\)")
    b = build_pe(relocations=[(0x9000, REL_HIGHLOW)])
    _malformed(b.data, r"base relocation for rva 0x9000 .*past the end of the image")


@pytest.mark.parametrize("typ", [1, 2, 4, 5, 9, 11, 15])
def test_unknown_relocation_type(typ):
    b = build_pe(relocations=[(0x1000, REL_DIR64), (0x1010, typ)])
    _malformed(b.data, rf"unsupported base relocation type {typ}\b.*rva 0x1010")


def test_relocation_block_with_bad_size():
    blob = struct.pack("<II", 0x1000, 4) + bytes(8)
    _malformed(build_pe(reloc_blob=blob).data, r"relocation block at rva 0x5000 has invalid size 0x4")
    blob = struct.pack("<II", 0x1000, 0) + struct.pack("<HH", 0xA000, 0)
    _malformed(build_pe(reloc_blob=blob).data, r"invalid size 0x0")


def test_relocation_directory_outside_sections():
    b = build_pe(relocations=[(0x1000, REL_DIR64)])
    _malformed(b.with_data_dir(5, 0x4F00, 0x10), r"relocation directory rva 0x4f00 size 0x10 is not inside a section")


def test_certificate_table_beyond_file():
    b = build_pe(certificate=bytes(64))
    _malformed(b.data[:-8], r"certificate table .* extends beyond the end of the file")


def test_null_section_header_dropped_by_pefile_is_reported():
    b = build_pe()
    hdr = b.sections[".data"]["header"]
    data = bytearray(b.data)
    data[hdr:hdr + 40] = bytes(40)
    _malformed(bytes(data), r"section header 1 \(at 0x1b0\) is invalid")


# --- load_file ------------------------------------------------------------------------------------------
def test_load_file_ok(tmp_path):
    p = tmp_path / "BOOTX64.EFI"
    b = build_pe()
    p.write_bytes(b.data)
    img = pe.load_file(p)
    assert img.name == "BOOTX64.EFI"
    # .text where the builder put it, with the builder's bytes (pebuilder.default_sections)
    text = img.section(".text")
    code = bytes(range(256)) * 4 + b"\xc3"
    assert (text.rva, text.virtual_size, text.raw_offset) == (
        b.sections[".text"]["rva"], len(code), b.sections[".text"]["raw_offset"])
    assert text.data() == code
    img2 = pe.load_file(str(p))
    assert img2.data == img.data


def test_load_file_errors_name_path(tmp_path):
    missing = tmp_path / "nope.efi"
    with pytest.raises(InputFileError, match=rf"{missing}: no such file"):
        pe.load_file(missing)
    with pytest.raises(InputFileError, match=rf"{tmp_path}: is a directory"):
        pe.load_file(tmp_path)
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    with pytest.raises(InputFileError, match=rf"{f}/x\.efi: cannot read"):
        pe.load_file(f / "x.efi")


def test_load_file_checks_content(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"hello")
    with pytest.raises(NotPEError, match=r"^notes\.txt is not a PE/COFF image: no MZ header$"):
        pe.load_file(p)


def test_exit_codes_are_distinct():
    codes = {c.exit_code for c in (InputFileError,) + PARSE_ERRORS}
    assert len(codes) == 5


# --- fuzz --------------------------------------------------------------------------------------------
def _check_robust(data: bytes):
    """parse_pe either succeeds (and load() works) or raises one of the parse errors."""
    try:
        img = pe.parse_pe(data, "fuzz.efi", allowed_subsystems=(10, 11, 12))
    except PARSE_ERRORS as e:
        assert str(e) and "\n" not in str(e)
        return type(e)
    except Exception as e:  # pragma: no cover - the failure we look for
        raise AssertionError(f"{type(e).__name__} escaped parse_pe: {e}") from e
    for s in img.sections:
        s.data()
    if img.size_of_image <= 64 << 20:
        for base in (img.image_base, 0x200000):
            try:
                mem = img.load(base)
            except MalformedImageError:
                continue
            assert len(mem) >= img.size_of_image
    return None


def _fuzz_seeds():
    b, _, _ = reloc_image(certificate=b"\x30" * 40)
    return [b, build_pe(), build_pe(section_alignment=0x200, file_alignment=0x200)]


def test_fuzz_truncations():
    for b in _fuzz_seeds():
        kinds = set()
        hdr_end = b.section_table + 40 * len(b.sections)
        cuts = set(range(0, hdr_end + 0x40)) | set(range(hdr_end, len(b.data), 13))
        for sec in b.sections.values():   # around every section's raw data boundaries
            for edge in (sec["raw_offset"], sec["raw_offset"] + sec["raw_size"]):
                cuts |= set(range(max(edge - 3, 0), min(edge + 4, len(b.data))))
        for cut in sorted(cuts):
            kinds.add(_check_robust(b.data[:cut]))
        assert NotPEError in kinds and MalformedImageError in kinds


def test_fuzz_byte_flips():
    rng = random.Random(0x5EED)
    seen = set()
    for b in _fuzz_seeds():
        hdr_end = b.section_table + 40 * len(b.sections)
        for _ in range(1500):
            data = bytearray(b.data)
            for _ in range(rng.choice((1, 1, 2, 4, 16))):
                # mostly the headers (where the structure is), sometimes anywhere
                pos = rng.randrange(hdr_end) if rng.random() < 0.8 else rng.randrange(len(data))
                data[pos] = rng.randrange(256) if rng.random() < 0.5 else data[pos] ^ (1 << rng.randrange(8))
            seen.add(_check_robust(bytes(data)))
    assert None in seen and len(seen) >= 3


def test_fuzz_header_fields():
    """Random (often extreme) values in every header field the parser reads."""
    rng = random.Random(1234)
    b, _, _ = reloc_image(certificate=b"\x30" * 40)
    fields = ([(b.opt + off, fmt) for off, fmt in pb.OPT.values()]
              + [(b.coff + off, fmt) for off, fmt in pb.COFF.values()]
              + [(pb.DOS_E_LFANEW, "<I")]
              + [(h["header"] + off, fmt) for h in b.sections.values()
                 for off, fmt in pb.SECT.values() if fmt != "8s"]
              + [(b.opt + pb.OPT_FIXED_SIZE + 8 * i + j, "<I") for i in range(16) for j in (0, 4)])
    specials = [0, 1, 2, 7, 8, 0x200, 0x1000, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
                0xFFFFFFFFFFFFFFFF, 0x40000000]
    for _ in range(2500):
        data = bytearray(b.data)
        for _ in range(rng.choice((1, 2, 3))):
            off, fmt = rng.choice(fields)
            limit = (1 << (8 * struct.calcsize(fmt))) - 1
            v = rng.choice(specials) if rng.random() < 0.5 else rng.randrange(limit + 1)
            struct.pack_into(fmt, data, off, v & limit)
        _check_robust(bytes(data))


def test_random_garbage_with_pe_prefix():
    rng = random.Random(99)
    for n in (0, 1, 63, 64, 65, 0x100, 0x1000):
        for _ in range(50):
            body = bytearray(rng.randbytes(max(n, 0x40)))
            body[0:2] = b"MZ"
            struct.pack_into("<I", body, 0x3C, rng.choice((0x40, 0x80, rng.randrange(0x2000))))
            if 0x44 <= len(body):
                body[0x40:0x44] = b"PE\0\0"
                struct.pack_into("<H", body, 0x44, 0x8664)
            _check_robust(bytes(body[:n]))


# --- a real kernel -------------------------------------------------------------------------------------
def test_debian_bookworm_kernel(bookworm_kernel):
    # the conftest fixture: a missing payload fails (skips only with VMRUN_ALLOW_MISSING_PAYLOADS=1)
    path = bookworm_kernel
    t0 = time.perf_counter()
    img = pe.load_file(path)
    mem = img.load(0x100_0000)
    elapsed = time.perf_counter() - t0
    assert img.machine == 0x8664
    assert img.subsystem == 10
    assert img.signed is True
    # GNU objdump (binutils) reads the same headers: every section's RVA, raw size and file
    # offset, and the entry point
    dump = subprocess.run(["objdump", "-h", "-p", str(path)], capture_output=True, text=True,
                          check=True).stdout
    theirs = [(m[1], int(m[3], 16), int(m[2], 16), int(m[4], 16)) for m in re.finditer(
        r"^\s*\d+ (\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s", dump, re.M)]
    assert [(s.name, s.rva, s.raw_size, s.raw_offset) for s in img.sections] == theirs
    assert img.entry_rva == int(re.search(r"^AddressOfEntryPoint\s+([0-9a-f]+)$", dump, re.M)[1], 16)
    text = img.section(".text")
    assert text.rva <= img.entry_rva < text.rva + text.memory_size
    assert len(mem) == (img.size_of_image + 0xFFF) & ~0xFFF
    assert mem[:2] == b"MZ"
    chunk = text.data()[:0x1000]
    assert mem[text.rva:text.rva + len(chunk)] == chunk
    # the bzImage setup header ("HdrS" at 0x202) is in the loaded headers/.setup
    assert mem[0x202:0x206] == b"HdrS"
    assert elapsed < 1.0, f"parse+load took {elapsed:.3f}s"
