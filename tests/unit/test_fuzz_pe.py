"""Fuzzing PE parsing and loading, bounded for CI.

The contract (scripts/fuzz_pe.py, :func:`exercise`): for any bytes, vmrun.formats.pe.parse_pe,
PEImage.load, vmrun.inspect.describe, the bzImage reader and the Authenticode hash either succeed
or raise vmrun's own parse error with a one-line message naming the file, and the hash accepts
every image the parser accepts. Property-based (hypothesis, derandomized: the same examples on
every run) over the real Debian kernels, systemd-stub 252/257, UKIs built from them and small
synthetic images; then a fixed slice of the mutants ``scripts/fuzz-pe`` runs a million of.
The regression tests below are the bugs the fuzzer found, each as a small image.
"""

from __future__ import annotations

import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pebuilder as pb  # noqa: E402

from hostsvc.tpm import PeHashError, authenticode_digests  # noqa: E402
from scripts import fuzz_pe as F  # noqa: E402
from vmrun.errors import MalformedImageError  # noqa: E402
from vmrun.formats import pe  # noqa: E402

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def seeds(payload_cache, bookworm_kernel, trixie_kernel, stub_252, stub_257):
    """The fuzz corpus, shrunk real images only (the multi-MB ones cost milliseconds each)."""
    return F.build_corpus(payload_cache, full=False)


def check(data: bytes) -> None:
    try:
        F.exercise(data)
    except F.Unexpected as u:
        pytest.fail(f"{u}\n{u.trace}", pytrace=False)


# --- property-based --------------------------------------------------------------------------
_MAX = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: (1 << 64) - 1}


def _mutated(data, seeds, fields_filter=None):
    seed = data.draw(st.sampled_from(seeds), label="seed")
    fields = [f for f in seed.fields if fields_filter is None or fields_filter(f[0])] or seed.fields
    buf = bytearray(seed.data)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        label, off, size = data.draw(st.sampled_from(fields), label="field")
        cur = int.from_bytes(buf[off:off + size], "little")
        other = data.draw(st.sampled_from(seed.fields), label="other field")
        value = data.draw(st.one_of(
            st.sampled_from(F._INTERESTING),
            st.integers(-0x1000, 0x1000).map(lambda d, c=cur: c + d),
            st.integers(-16, 16).map(lambda d, n=len(buf): n + d),
            st.just(int.from_bytes(buf[other[1]:other[1] + other[2]], "little")),
            st.integers(0, _MAX[size])), label="value")
        buf[off:off + size] = (value & _MAX[size]).to_bytes(size, "little")
    if data.draw(st.integers(0, 9), label="truncate?") == 0:
        del buf[data.draw(st.integers(0, len(buf)), label="cut at"):]
    return bytes(buf)


@settings(FUZZ, max_examples=1500)
@given(st.data())
def test_fuzz_headers_and_section_table(seeds, data):
    """DOS/COFF/optional header fields, data directories and section headers."""
    check(_mutated(data, seeds, lambda n: not n.startswith(("reloc", "cert", "debug"))))


@settings(FUZZ, max_examples=800)
@given(st.data())
def test_fuzz_data_directories_relocations_and_certificates(seeds, data):
    """Data directory entries (reloc, security, debug), .reloc blocks, WIN_CERTIFICATE, and the
    section raw pointers/sizes they depend on."""
    check(_mutated(data, seeds, lambda n: n.startswith(("dir[", "reloc", "cert", "debug"))
                   or n.endswith(("RawData", "VirtualSize", "VirtualAddress", "SizeOfImage"))))


@settings(FUZZ, max_examples=600)
@given(st.data())
def test_fuzz_raw_header_bytes_and_truncation(seeds, data):
    """Arbitrary bytes over the headers, then a cut anywhere."""
    seed = data.draw(st.sampled_from(seeds), label="seed")
    buf = bytearray(seed.data)
    hdr = min(len(buf), 0x600)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, hdr - 1))
        buf[at:at + 8] = data.draw(st.binary(min_size=1, max_size=8))
    if data.draw(st.booleans()):
        del buf[data.draw(st.integers(0, len(buf))):]
    check(bytes(buf))


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=0x400))
def test_fuzz_arbitrary_small_inputs(blob):
    check(blob)
    check(b"MZ" + blob[2:0x3C] + struct.pack("<I", 0x40) + b"PE\0\0" + blob)


def test_seeded_mutants_as_in_the_long_run(seeds):
    """A fixed slice of what `scripts/fuzz-pe --seed 1` runs (there: a million, 2 processes)."""
    r = F.run_range(seeds, 1, 0, 8000, None)
    assert r["outcomes"]["unexpected"] == 0, r["unexpected"]
    # the mutants reach deep: both accepted images and rejections at every level
    assert r["outcomes"]["accepted"] > 1000
    for kind in ("malformed_image", "not_pe", "wrong_architecture", "unsupported_subsystem"):
        assert r["outcomes"][kind] > 0, kind


def test_corpus_seeds_are_accepted_and_hashed(seeds):
    names = {s.name for s in seeds}
    assert {"kernel-bookworm-shrunk", "kernel-trixie-shrunk", "uki-257-shrunk", "uki-252-shrunk",
            "stub-257-shrunk", "synthetic-signed-reloc"} <= names
    for s in seeds:
        assert F.exercise(s.data) == ("accepted", ""), s.name
    kernel = next(s for s in seeds if s.name == "kernel-bookworm-shrunk")
    assert pe.parse_pe(kernel.data).signed
    assert any(lbl.startswith("reloc@") for lbl, _, _ in
               next(s for s in seeds if s.name == "synthetic-signed-reloc").fields)


# --- the harness can fail -----------------------------------------------------------------------
def test_harness_reports_a_foreign_exception(monkeypatch):
    def broken(*a, **kw):
        raise IndexError("index out of range")
    monkeypatch.setattr(F.PE, "parse_pe", broken)
    with pytest.raises(F.Unexpected, match=r"parse_pe: IndexError"):
        F.exercise(pb.build_pe().data)


def test_harness_reports_the_catch_all_message(monkeypatch):
    # a struct.error inside the parser comes out of parse_pe's safety net as a vague message
    def broken(self):
        raise struct.error("unpack_from requires a buffer of at least 4 bytes")
    monkeypatch.setattr(pe._Parser, "parse", broken)
    with pytest.raises(F.Unexpected, match=r"internal exception behind a generic message"):
        F.exercise(pb.build_pe().data)


def test_harness_reports_a_hash_refusing_an_accepted_image(monkeypatch):
    def refuse(*a, **kw):
        raise PeHashError("certificate table size exceeds the unhashed tail of the file")
    monkeypatch.setattr(F, "authenticode_digests", refuse)
    with pytest.raises(F.Unexpected, match=r"refuses an image parse_pe accepted"):
        F.exercise(pb.build_pe().data)


def test_harness_reports_a_multi_line_message(monkeypatch):
    def bad(*a, **kw):
        raise MalformedImageError(f"{F.NAME} is malformed: section .te\nxt")
    monkeypatch.setattr(F.PE, "parse_pe", bad)
    with pytest.raises(F.Unexpected, match=r"not one printable line"):
        F.exercise(pb.build_pe().data)


def test_mutator_is_total():
    # every mutation applies to whatever earlier ones left, an empty file included
    import random
    seeds = F.build_corpus(None)
    for i in range(2000):
        F.mutate(seeds[i % len(seeds)], random.Random(i))
    # was: a truncation to 0 bytes followed by a random-bytes mutation stopped the long run
    # (ValueError: empty range for randrange())
    empty = F.Seed("empty", b"", [])
    for i in range(200):
        F.mutate(empty, random.Random(i))


def test_mutants_are_reproducible(seeds):
    assert F.mutant(seeds, 5, 1234)[1] == F.mutant(seeds, 5, 1234)[1]
    assert F.mutant(seeds, 5, 1234)[1] != F.mutant(seeds, 6, 1234)[1]


# --- regressions: what the fuzzer found --------------------------------------------------------
def _malformed(data: bytes, pattern: str) -> None:
    with pytest.raises(MalformedImageError, match=pattern):
        pe.parse_pe(data, "x.efi")
    check(data)


def test_certificate_size_with_file_offset_zero_is_malformed():
    # was: accepted (signed=False), then the Authenticode hash failed at LoadImage
    b = pb.build_pe(certificate=bytes(64))
    data = b.with_data_dir(4, 0, 0x200)
    with pytest.raises(PeHashError):
        authenticode_digests(data)
    _malformed(data, r"x\.efi is malformed: certificate table \(data directory 4\) has size "
                     r"0x200 but file offset 0")


def test_overlapping_raw_data_that_breaks_the_image_hash_is_malformed():
    # .text's raw data grown 8 bytes into .data's: the hash counts them twice, and the
    # certificate table no longer fits in the unhashed tail
    b = pb.build_pe(certificate=bytes(64))
    data = b.with_section(".text", "SizeOfRawData", b.sections[".text"]["raw_size"] + 8)
    with pytest.raises(PeHashError):
        authenticode_digests(data)
    _malformed(data, r"section \.text raw data 0x200\.\.0x808 overlaps section \.data "
                     r"raw data at 0x800: the Authenticode image hash would count those "
                     r"bytes twice")


def test_certificate_table_overlapping_section_data_is_malformed():
    b = pb.build_pe(certificate=bytes(64))
    d = b.sections[".data"]
    data = b.with_data_dir(4, d["raw_offset"], len(b.data) - d["raw_offset"])
    _malformed(data, r"certificate table 0x800\.\.0x[0-9a-f]+ overlaps section \.data raw data")


def test_accepted_image_with_overlapping_raw_data_still_hashes():
    # overlap alone is not refused when the hash can be computed (EDK2 loads such images)
    b = pb.build_pe()
    data = b.with_section(".data", "PointerToRawData", b.sections[".text"]["raw_offset"])
    pe.parse_pe(data, "x.efi")
    check(data)


@pytest.mark.parametrize("name", [b".te\nxt\0\0", b"\x80\xff\x00abc\0\0", b"a\\b\0\0\0\0\0"])
def test_section_names_are_printable(name):
    # was: raw latin-1 names, newlines included, in messages and `vmrun inspect`
    b = pb.build_pe()
    data = bytearray(b.data)
    hdr = b.sections[".text"]["header"]
    data[hdr:hdr + 8] = name
    img = pe.parse_pe(bytes(data), "x.efi")
    assert img.sections[0].name.isprintable() and img.sections[0].name.isascii()
    struct.pack_into("<I", data, hdr + 20, len(data) + 0x1000)  # PointerToRawData past the end
    with pytest.raises(MalformedImageError) as ei:
        pe.parse_pe(bytes(data), "x.efi")
    assert ei.value.message.isprintable() and "\\x" in ei.value.message


def test_relocation_directory_in_zero_fill_is_not_materialized():
    # was: a 512 MiB relocation directory in a section without raw data allocated 512 MiB of
    # zeros on the host while parsing a 3 KiB file
    big = 0x20000000
    secs = pb.default_sections() + [pb.Sec(".bss", b"", virtual_size=big, raw_size=0)]
    b = pb.build_pe(sections=secs)
    bss = b.sections[".bss"]
    data = b.with_data_dir(5, bss["rva"], big)
    tracemalloc.start()
    try:
        img = pe.parse_pe(data, "x.efi")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert img.relocations == ()
    assert peak < 1 << 20, f"parsing a {len(data)}-byte file allocated {peak} bytes"


def test_relocation_block_straddling_the_end_of_raw_data():
    # a block whose entries run from the file-backed bytes into the zero fill: the zero
    # entries are ABSOLUTE padding
    blob = struct.pack("<II", 0x1000, 8 + 2 * 4) + struct.pack("<HH", 0xA000 | 0x10, 0xA000 | 0x18)
    secs = [pb.Sec(".text", b"\x90" * 0x40 + b"\xc3", characteristics=pb.SCN_CODE),
            pb.Sec(".reloc", blob, virtual_size=0x100, raw_size=len(blob), characteristics=pb.SCN_RELOC)]
    b = pb.build_pe(sections=secs, file_alignment=0x200)
    r = b.sections[".reloc"]
    data = b.with_data_dir(5, r["rva"], 0x40)
    img = pe.parse_pe(data, "x.efi")
    assert img.relocations == ((0x1010, pb.REL_DIR64), (0x1018, pb.REL_DIR64))
    check(data)


def test_too_many_relocations(monkeypatch):
    monkeypatch.setattr(pe, "MAX_RELOCATIONS", 3)
    relocs = [(0x2000 + 8 * i, pb.REL_DIR64) for i in range(5)]
    b = pb.build_pe(sections=[pb.Sec(".text", b"\xc3" * 0x41, characteristics=pb.SCN_CODE),
                              pb.Sec(".data", bytes(0x100))], relocations=relocs)
    with pytest.raises(MalformedImageError, match=r"holds more than 3 relocations"):
        pe.parse_pe(b.data, "x.efi")
