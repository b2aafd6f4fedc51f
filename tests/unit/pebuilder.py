"""Synthesize small PE32+ images for the tests, straight from the PE/COFF specification.

Deliberately independent of vmrun.formats.pe: every header is written with ``struct`` here, so a
misreading of the format in the parser is not mirrored by the builder.

Layout produced by ``build_pe`` (defaults):

    0x00   DOS header ("MZ", e_lfanew at 0x3c), stub padding up to e_lfanew (0x80)
    0x80   "PE\\0\\0", COFF file header (20 bytes), PE32+ optional header
           (112 bytes + 16 data directories), section table (40 bytes per section)
    SizeOfHeaders = end of the section table rounded up to FileAlignment
    then each section's raw data, each at a FileAlignment boundary,
    then (optionally) the Authenticode certificate table, 8-byte aligned.

Section rvas start at SizeOfHeaders rounded up to SectionAlignment, each following the previous
section's virtual extent rounded up to SectionAlignment. ``relocations`` adds a ``.reloc``
section (last) with base relocation blocks grouped by 4 KiB page, each block padded to a
4-byte multiple with ABSOLUTE entries (spec §6.6), and points data directory 5 at it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

IMAGE_FILE_MACHINE_AMD64 = 0x8664
PE32PLUS = 0x20B
PE32 = 0x10B

SCN_CODE = 0x60000020      # CNT_CODE | MEM_EXECUTE | MEM_READ
SCN_RDATA = 0x40000040     # CNT_INITIALIZED_DATA | MEM_READ
SCN_DATA = 0xC0000040      # CNT_INITIALIZED_DATA | MEM_READ | MEM_WRITE
SCN_RELOC = 0x42000040     # CNT_INITIALIZED_DATA | MEM_DISCARDABLE | MEM_READ

REL_ABSOLUTE = 0
REL_HIGHLOW = 3
REL_DIR64 = 10

# offsets inside the headers
DOS_E_LFANEW = 0x3C
COFF_SIZE = 20
OPT_FIXED_SIZE = 112      # PE32+ without data directories
SECTION_HEADER_SIZE = 40

# field offsets relative to the start of the PE32+ optional header
OPT = {
    "Magic": (0, "<H"),
    "SizeOfCode": (4, "<I"),
    "AddressOfEntryPoint": (16, "<I"),
    "BaseOfCode": (20, "<I"),
    "ImageBase": (24, "<Q"),
    "SectionAlignment": (32, "<I"),
    "FileAlignment": (36, "<I"),
    "SizeOfImage": (56, "<I"),
    "SizeOfHeaders": (60, "<I"),
    "CheckSum": (64, "<I"),
    "Subsystem": (68, "<H"),
    "DllCharacteristics": (70, "<H"),
    "NumberOfRvaAndSizes": (108, "<I"),
}
# field offsets relative to the start of a section header
SECT = {
    "Name": (0, "8s"),
    "VirtualSize": (8, "<I"),
    "VirtualAddress": (12, "<I"),
    "SizeOfRawData": (16, "<I"),
    "PointerToRawData": (20, "<I"),
    "Characteristics": (36, "<I"),
}
# field offsets relative to the start of the COFF file header
COFF = {
    "Machine": (0, "<H"),
    "NumberOfSections": (2, "<H"),
    "SizeOfOptionalHeader": (16, "<H"),
    "Characteristics": (18, "<H"),
}


def align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class Sec:
    """One section to build. ``None`` fields get the natural value."""
    name: str
    data: bytes = b""
    virtual_size: int | None = None      # default len(data)
    characteristics: int = SCN_DATA
    rva: int | None = None               # default: next SectionAlignment boundary
    raw_size: int | None = None          # default len(data) rounded up to FileAlignment
    raw_offset: int | None = None        # default: next FileAlignment boundary


@dataclass
class Built:
    """A built image and where everything is in it (for corrupting it in tests)."""
    data: bytes
    e_lfanew: int
    coff: int
    opt: int
    section_table: int
    size_of_headers: int
    size_of_image: int
    image_base: int
    entry: int
    sections: dict = field(default_factory=dict)   # name -> dict(rva, vsize, raw_offset, raw_size, header)
    cert_offset: int = 0
    cert_size: int = 0

    # -- patching helpers ------------------------------------------------------------------------
    def patched(self, offset: int, fmt: str, value) -> bytes:
        b = bytearray(self.data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    def with_opt(self, fieldname: str, value) -> bytes:
        off, fmt = OPT[fieldname]
        return self.patched(self.opt + off, fmt, value)

    def with_coff(self, fieldname: str, value) -> bytes:
        off, fmt = COFF[fieldname]
        return self.patched(self.coff + off, fmt, value)

    def with_section(self, name: str, fieldname: str, value) -> bytes:
        off, fmt = SECT[fieldname]
        return self.patched(self.sections[name]["header"] + off, fmt, value)

    def with_data_dir(self, index: int, rva: int, size: int) -> bytes:
        b = bytearray(self.data)
        struct.pack_into("<II", b, self.opt + OPT_FIXED_SIZE + 8 * index, rva, size)
        return bytes(b)


def reloc_blocks(relocations) -> bytes:
    """Base relocation blocks for [(rva, type), ...], grouped by 4 KiB page, 4-byte aligned."""
    pages: dict[int, list[int]] = {}
    for rva, typ in relocations:
        pages.setdefault(rva & ~0xFFF, []).append((typ << 12) | (rva & 0xFFF))
    out = bytearray()
    for page in sorted(pages):
        entries = pages[page]
        if len(entries) % 2:
            entries = entries + [REL_ABSOLUTE << 12]   # pad the block to a 32-bit boundary
        out += struct.pack("<II", page, 8 + 2 * len(entries))
        out += struct.pack(f"<{len(entries)}H", *entries)
    return bytes(out)


def default_sections() -> list[Sec]:
    text = bytes(range(256)) * 4 + b"\xc3"          # 0x401 bytes, ends with ret
    data = b"DATA" * 64 + bytes(64)                   # 0x140 bytes, then bss via virtual size
    return [Sec(".text", text, characteristics=SCN_CODE),
            Sec(".data", data, virtual_size=0x2345, characteristics=SCN_DATA)]


def build_pe(
    *,
    machine: int = IMAGE_FILE_MACHINE_AMD64,
    magic: int = PE32PLUS,
    subsystem: int = 10,
    image_base: int = 0x140000000,
    sections: list[Sec] | None = None,
    entry: int | None = None,                  # default: rva of the first section
    relocations=(),                            # [(rva, type)] -> a .reloc section
    reloc_blob: bytes | None = None,           # raw .reloc contents instead (for bad blocks)
    reloc_dir_size: int | None = None,         # override data directory 5's size
    section_alignment: int = 0x1000,
    file_alignment: int = 0x200,
    size_of_image: int | None = None,
    size_of_headers: int | None = None,
    dll_characteristics: int = 0x0160,         # HIGH_ENTROPY_VA | DYNAMIC_BASE | NX_COMPAT
    certificate: bytes | None = None,          # appended as a WIN_CERTIFICATE, data directory 4
    number_of_rva_and_sizes: int = 16,
    e_lfanew: int = 0x80,
) -> Built:
    sections = [Sec(**vars(s)) for s in (sections if sections is not None else default_sections())]
    if reloc_blob is None and relocations:
        reloc_blob = reloc_blocks(relocations)
    if reloc_blob is not None:
        sections.append(Sec(".reloc", reloc_blob, characteristics=SCN_RELOC))

    nsect = len(sections)
    opt_size = OPT_FIXED_SIZE + 8 * number_of_rva_and_sizes
    coff_off = e_lfanew + 4
    opt_off = coff_off + COFF_SIZE
    st_off = opt_off + opt_size
    headers_end = st_off + SECTION_HEADER_SIZE * nsect
    hdr_size = size_of_headers if size_of_headers is not None else align(headers_end, file_alignment)

    # place sections
    next_raw = align(hdr_size, file_alignment)
    next_rva = align(hdr_size, section_alignment)
    layout = []
    for s in sections:
        vsize = s.virtual_size if s.virtual_size is not None else len(s.data)
        raw_size = s.raw_size if s.raw_size is not None else align(len(s.data), file_alignment)
        raw_off = s.raw_offset if s.raw_offset is not None else (next_raw if raw_size else 0)
        rva = s.rva if s.rva is not None else next_rva
        layout.append((s, rva, vsize, raw_off, raw_size))
        if s.raw_offset is None and raw_size:
            next_raw = align(raw_off + raw_size, file_alignment)
        next_rva = max(next_rva, align(rva + max(vsize, 1), section_alignment))
    image_size = size_of_image if size_of_image is not None else next_rva
    entry_rva = entry if entry is not None else (layout[0][1] if layout else 0)

    # the file holds the headers and every section's SizeOfRawData bytes (tests that want a
    # short file patch the headers or truncate the result)
    buf = bytearray(max([hdr_size] + [ro + rs for _, _, _, ro, rs in layout if rs]))

    # DOS header
    buf[0:2] = b"MZ"
    struct.pack_into("<I", buf, DOS_E_LFANEW, e_lfanew)
    # PE signature + COFF header
    buf[e_lfanew:e_lfanew + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", buf, coff_off, machine, nsect, 0x5F5E100, 0, 0, opt_size,
                     0x0022)  # EXECUTABLE_IMAGE | LARGE_ADDRESS_AWARE
    # optional header (PE32+)
    code_size = sum(rs for s, _, _, _, rs in layout if s.characteristics & 0x20)
    struct.pack_into(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", buf, opt_off,
        magic, 2, 40,                            # Magic, linker version
        code_size, 0, 0,                         # SizeOfCode, SizeOfInitializedData, SizeOfUninitializedData
        entry_rva,                               # AddressOfEntryPoint
        layout[0][1] if layout else 0,           # BaseOfCode
        image_base,
        section_alignment, file_alignment,
        0, 0, 0, 0, 0, 0,                        # OS, image, subsystem versions
        0,                                       # Win32VersionValue
        image_size, hdr_size, 0,                 # SizeOfImage, SizeOfHeaders, CheckSum
        subsystem, dll_characteristics,
        0x100000, 0x1000, 0x100000, 0x1000,      # stack/heap reserve/commit
        0,                                       # LoaderFlags
        number_of_rva_and_sizes,
    )
    # section table + raw data
    info = {}
    for i, (s, rva, vsize, raw_off, raw_size) in enumerate(layout):
        h = st_off + i * SECTION_HEADER_SIZE
        struct.pack_into("<8sIIIIIIHHI", buf, h, s.name.encode()[:8], vsize, rva, raw_size,
                         raw_off, 0, 0, 0, 0, s.characteristics)
        if raw_size and s.data:
            chunk = s.data[:raw_size]
            buf[raw_off:raw_off + len(chunk)] = chunk
        info[s.name] = dict(rva=rva, vsize=vsize, raw_offset=raw_off, raw_size=raw_size, header=h)
    # data directories
    if reloc_blob is not None and number_of_rva_and_sizes > 5:
        r = info[".reloc"]
        size = reloc_dir_size if reloc_dir_size is not None else len(reloc_blob)
        struct.pack_into("<II", buf, opt_off + OPT_FIXED_SIZE + 8 * 5, r["rva"], size)
    cert_off = cert_size = 0
    if certificate is not None and number_of_rva_and_sizes > 4:
        cert_off = align(len(buf), 8)
        buf.extend(bytes(cert_off - len(buf)))
        win_cert = struct.pack("<IHH", 8 + len(certificate), 0x0200, 0x0002) + certificate
        win_cert += bytes(align(len(win_cert), 8) - len(win_cert))
        cert_size = len(win_cert)
        buf += win_cert
        struct.pack_into("<II", buf, opt_off + OPT_FIXED_SIZE + 8 * 4, cert_off, cert_size)

    return Built(data=bytes(buf), e_lfanew=e_lfanew, coff=coff_off, opt=opt_off,
                 section_table=st_off, size_of_headers=hdr_size, size_of_image=image_size,
                 image_base=image_base, entry=entry_rva, sections=info,
                 cert_offset=cert_off, cert_size=cert_size)
