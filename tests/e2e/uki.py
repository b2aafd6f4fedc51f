"""Build Unified Kernel Images and addons from Debian's systemd-stub with binutils objcopy
(as systemd's documentation shows for systems without ukify). Output is reproducible and is
checked with vmrun's PE parser."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from vmrun.formats import pe as PE

PAGE = 0x1000
# UKI sections in file order: the small ones first, the kernel last.
SECTION_ORDER = (".osrel", ".cmdline", ".uname", ".splash", ".dtb", ".pcrsig", ".pcrpkey",
                 ".sbat", ".initrd", ".linux")
DEBIAN_OSREL = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')


def _round_up(x: int, a: int = PAGE) -> int:
    return (x + a - 1) // a * a


def _objcopy_for(stub: Path) -> str:
    override = os.environ.get("VMRUN_OBJCOPY")
    if override:
        return override
    return shutil.which("objcopy") or shutil.which("x86_64-w64-mingw32-objcopy") or "objcopy"


def build_uki(stub: Path, out: Path, *, linux: Path, initrd: Path | None, cmdline: str,
              osrel: str = DEBIAN_OSREL, extra_sections: dict[str, bytes] | None = None,
              objcopy: str | None = None) -> Path:
    """Build a UKI at ``out``: ``stub`` (systemd's linuxx64.efi.stub) with .osrel, .cmdline,
    ``extra_sections``, .initrd and .linux appended by ``objcopy --add-section`` (as systemd's
    documentation shows for systems without ukify).

    Each section starts at the next 4 KiB boundary after the previous one, the first after the
    stub's SizeOfImage, in :data:`SECTION_ORDER` (names not listed there before .initrd), the
    kernel last. ``cmdline`` and ``osrel`` are stored exactly as given (no NUL, no newline
    added). Reproducible: the stub's TimeDateStamp is kept (objcopy would stamp the current
    time, which the Authenticode hash and so PCR 4 cover). The result is checked with
    :func:`vmrun.formats.pe.parse_pe`: every section present with its bytes, none overlapping.
    Returns ``out``.
    """
    sections: dict[str, bytes] = {".osrel": osrel.encode(), ".cmdline": cmdline.encode()}
    if initrd is not None:
        sections[".initrd"] = Path(initrd).read_bytes()
    sections[".linux"] = Path(linux).read_bytes()
    return add_sections(stub, out, sections, extra_sections=extra_sections, objcopy=objcopy)


def add_sections(stub: Path, out: Path, sections: dict[str, bytes], *,
                 extra_sections: dict[str, bytes] | None = None, objcopy: str | None = None) -> Path:
    """``stub`` with ``sections`` (and ``extra_sections``) appended, as :func:`build_uki` lays
    them out; also makes UKI addons (the addon stub plus a .cmdline)."""
    sections = dict(sections)
    for name, data in (extra_sections or {}).items():
        if not name.startswith(".") or len(name) > 8:
            raise ValueError(f"section name {name!r}: must start with '.' and fit 8 bytes")
        sections[name] = bytes(data)

    def rank(name: str) -> float:  # unknown names just before .initrd
        return SECTION_ORDER.index(name) if name in SECTION_ORDER else SECTION_ORDER.index(".initrd") - 0.5
    names = sorted(sections, key=rank)

    img = PE.load_file(stub)
    existing = {s.name for s in img.sections}
    if clash := existing & set(names):
        raise ValueError(f"{stub} already has section(s) {sorted(clash)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rva = _round_up(max([img.size_of_image] + [s.rva + s.memory_size for s in img.sections]))
    with tempfile.TemporaryDirectory(prefix="uki-", dir=out.parent) as t:
        args = [objcopy or _objcopy_for(stub)]
        for name in names:
            part = Path(t, name.lstrip("."))
            part.write_bytes(sections[name])
            args += ["--add-section", f"{name}={part}",
                     "--set-section-flags", f"{name}=contents,alloc,load,readonly,data",
                     "--change-section-vma", f"{name}={img.image_base + rva:#x}"]
            rva = _round_up(rva + len(sections[name]))
        tmp_out = Path(t, "uki.efi")
        args += [str(stub), str(tmp_out)]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {r.stderr}")
        data = _reproducible(tmp_out.read_bytes(), img.data)
        check_uki(data, sections, stub_image=img)
        out.write_bytes(data)
    return out


def _pe_checksum(data: bytes, checksum_at: int) -> int:
    """The PE optional header's CheckSum (as imagehlp's CheckSumMappedFile computes it)."""
    buf = data[:checksum_at] + b"\0\0\0\0" + data[checksum_at + 4:]
    if len(buf) % 2:
        buf += b"\0"
    total = sum(struct.unpack(f"<{len(buf) // 2}H", buf))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(data)) & 0xFFFFFFFF


def _reproducible(data: bytes, stub: bytes) -> bytes:
    """objcopy stamps the current time into the COFF header (TimeDateStamp), which the
    Authenticode hash, and so PCR 4, covers: put back the stub's, and fix the CheckSum."""
    out = bytearray(data)
    pe, pe_stub = struct.unpack_from("<I", out, 0x3C)[0], struct.unpack_from("<I", stub, 0x3C)[0]
    out[pe + 8:pe + 12] = stub[pe_stub + 8:pe_stub + 12]
    checksum_at = pe + 24 + 64
    struct.pack_into("<I", out, checksum_at, _pe_checksum(bytes(out), checksum_at))
    return bytes(out)


def check_uki(data: bytes, sections: dict[str, bytes], *, stub_image: PE.PEImage | None = None) -> PE.PEImage:
    """Parse a built UKI and check it: the stub's sections kept, each added section present with
    exactly its bytes, no two sections overlapping in memory, all inside SizeOfImage."""
    built = PE.parse_pe(data, "uki.efi")
    for name, content in sections.items():
        sec = built.section(name)
        if sec is None:
            raise AssertionError(f"{name} missing from the built UKI")
        if sec.data() != content or sec.virtual_size != len(content):
            raise AssertionError(f"{name}: {sec.virtual_size} bytes in the UKI, {len(content)} given")
    if stub_image is not None:
        for s in stub_image.sections:
            b = built.section(s.name)
            if b is None or b.rva != s.rva or b.data() != s.data():
                raise AssertionError(f"stub section {s.name} changed in the UKI")
        if built.entry_rva != stub_image.entry_rva:
            raise AssertionError("entry point moved")
    spans = sorted((s.rva, s.rva + s.memory_size, s.name) for s in built.sections)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise AssertionError(f"sections {an} [{a0:#x},{a1:#x}) and {bn} [{b0:#x},{b1:#x}) overlap")
    if spans and spans[-1][1] > built.size_of_image:
        raise AssertionError(f"{spans[-1][2]} ends past SizeOfImage {built.size_of_image:#x}")
    return built




def build_addon(addon_stub: Path, out: Path, *, cmdline: str) -> Path:
    """A UKI addon (systemd's addonx64.efi.stub with a .cmdline section)."""
    return add_sections(addon_stub, out, {".cmdline": cmdline.encode()})
