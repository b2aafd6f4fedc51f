"""PE/COFF (PE32+) parsing, validation and loading of EFI applications.

``parse_pe`` reads the headers itself with ``struct`` and has ``pefile`` (``fast_load=True``:
headers only) read them a second time: the two must agree. pefile is not trusted to validate
anything (it pads truncated headers with zeros, drops section headers it dislikes and only
*warns* about data outside the file), so this module checks every structural property the
loader and the Authenticode image hash rely on, with the bounds EDK2's PE/COFF loader applies
(so images that boot under OVMF are accepted). Each failure raises one of the classes from :mod:`vmrun.errors` with a
one-line message naming what is wrong, where, and why. Base relocations are decoded here too
(strictly). ``scripts/fuzz-pe`` and ``tests/unit/test_fuzz_pe.py`` fuzz all of this.

No other exception type escapes ``parse_pe``/``load_file``/``PEImage.load``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from vmrun.errors import (
    InputFileError,
    MalformedImageError,
    NotPEError,
    UnsupportedSubsystemError,
    VmrunError,
    WrongArchitectureError,
)
from vmrun.vm.layout import PAGE_SIZE

__all__ = [
    "EFI_SUBSYSTEMS",
    "MACHINE_AMD64",
    "PEImage",
    "Section",
    "load_file",
    "parse_pe",
]

SUBSYSTEM_EFI_APPLICATION = 10
SUBSYSTEM_EFI_BOOT_SERVICE_DRIVER = 11
SUBSYSTEM_EFI_RUNTIME_DRIVER = 12
EFI_SUBSYSTEMS = {SUBSYSTEM_EFI_APPLICATION: "EFI application",
                  SUBSYSTEM_EFI_BOOT_SERVICE_DRIVER: "EFI boot service driver",
                  SUBSYSTEM_EFI_RUNTIME_DRIVER: "EFI runtime driver"}

SUBSYSTEM_NAMES = {
    0: "unknown",
    1: "native",
    2: "Windows GUI",
    3: "Windows console",
    5: "OS/2 console",
    7: "POSIX console",
    8: "native Win9x driver",
    9: "Windows CE GUI",
    **EFI_SUBSYSTEMS,
    13: "EFI ROM",
    14: "Xbox",
    16: "Windows boot application",
}

MACHINE_AMD64 = 0x8664
MACHINE_NAMES = {
    0x14C: "i386",
    0x1C0: "ARM",
    0x1C2: "ARM (Thumb)",
    0x1C4: "ARM (Thumb-2/ARMv7)",
    0xAA64: "aarch64",
    0x200: "ia64",
    0xEBC: "EFI byte code",
    0x5032: "riscv32",
    0x5064: "riscv64",
    0x5128: "riscv128",
    0x6232: "loongarch32",
    0x6264: "loongarch64",
}

PE32_MAGIC = 0x10B
PE32PLUS_MAGIC = 0x20B

DIR_SECURITY = 4
DIR_BASERELOC = 5

REL_ABSOLUTE = 0
REL_HIGHLOW = 3
REL_DIR64 = 10
_REL_SIZE = {REL_HIGHLOW: 4, REL_DIR64: 8}
_REL_NAMES = {1: "HIGH", 2: "LOW", 4: "HIGHADJ", 5: "ARM_MOV32/RISCV_HI20", 7: "THUMB_MOV32/RISCV_LOW12I",
              8: "RISCV_LOW12S/LOONGARCH", 9: "MIPS_JMPADDR16"}

MAX_IMAGE_SIZE = 1 << 30
#: base relocations one image may have: each costs the host ~100 bytes as a Python tuple, so a
#: hostile multi-MB .reloc must not become gigabytes (systemd-stub has ~60, GRUB and shim a few
#: thousand)
MAX_RELOCATIONS = 1 << 20

_DOS_HEADER_SIZE = 64
_COFF_SIZE = 20
_OPT_FIXED_SIZE = 112          # PE32+ optional header without data directories
_SECTION_HEADER_SIZE = 40
_MAX_DATA_DIRECTORIES = 16

_U64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    name: str               # e.g. ".linux" (NULs stripped)
    rva: int                # VirtualAddress
    virtual_size: int
    raw_offset: int         # PointerToRawData
    raw_size: int           # SizeOfRawData
    characteristics: int
    _file: bytes = field(default=b"", repr=False, compare=False)

    @property
    def memory_size(self) -> int:
        """Bytes the section occupies in memory (VirtualSize; SizeOfRawData when that is 0)."""
        return self.virtual_size or self.raw_size

    def data(self) -> bytes:
        """The section's bytes as in the file, trimmed to virtual_size when that is smaller."""
        size = self.raw_size
        if self.virtual_size and self.virtual_size < size:
            size = self.virtual_size
        if size == 0:
            return b""
        return self._file[self.raw_offset:self.raw_offset + size]


@dataclass(frozen=True)
class PEImage:
    name: str
    data: bytes = field(repr=False)
    machine: int
    subsystem: int
    image_base: int
    size_of_image: int
    size_of_headers: int
    section_alignment: int
    file_alignment: int
    entry_rva: int
    dll_characteristics: int
    sections: tuple[Section, ...]
    relocations: tuple[tuple[int, int], ...] = field(repr=False)
    signed: bool

    def section(self, name: str) -> Section | None:
        """The first section called ``name``, or None."""
        for s in self.sections:
            if s.name == name:
                return s
        return None

    @property
    def load_size(self) -> int:
        """Size of the memory image ``load`` returns: size_of_image rounded up to 4 KiB."""
        return _round_up(self.size_of_image, PAGE_SIZE)

    def load(self, base: int) -> bytearray:
        """The memory image for loading at guest address ``base``, relocations applied.

        Headers (size_of_headers bytes) at offset 0, each section's raw bytes at its rva
        (trimmed to its virtual size) followed by zero fill; DIR64/HIGHLOW base relocations
        adjusted by ``base - image_base``.
        """
        if not isinstance(base, int) or not 0 <= base <= _U64:
            raise ValueError(f"load base {base!r} is not a 64-bit address")
        mem = bytearray(self.load_size)
        data = self.data
        mem[:self.size_of_headers] = data[:self.size_of_headers]
        for s in self.sections:
            chunk = s.data()
            mem[s.rva:s.rva + len(chunk)] = chunk
        delta = (base - self.image_base) & _U64
        if delta and self.relocations:
            delta32 = delta & 0xFFFFFFFF
            unpack_q, pack_q = struct.Struct("<Q").unpack_from, struct.Struct("<Q").pack_into
            unpack_i, pack_i = struct.Struct("<I").unpack_from, struct.Struct("<I").pack_into
            for rva, typ in self.relocations:
                size = _REL_SIZE.get(typ)
                if size is None:
                    raise MalformedImageError(
                        f"{self.name} is malformed: unsupported base relocation type "
                        f"{_rel_name(typ)} at rva {rva:#x}")
                if rva + size > self.size_of_image:
                    raise MalformedImageError(
                        f"{self.name} is malformed: base relocation at rva {rva:#x} "
                        f"({size} bytes) is past the end of the image ({self.size_of_image:#x})")
                if typ == REL_DIR64:
                    pack_q(mem, rva, (unpack_q(mem, rva)[0] + delta) & _U64)
                else:
                    pack_i(mem, rva, (unpack_i(mem, rva)[0] + delta32) & 0xFFFFFFFF)
        return mem


# --------------------------------------------------------------------------------------------
def load_file(path, *, allowed_subsystems=(SUBSYSTEM_EFI_APPLICATION,)) -> PEImage:
    """Read and parse the PE image at ``path``."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputFileError(f"{p}: no such file", path=p) from None
    except IsADirectoryError:
        raise InputFileError(f"{p}: is a directory, not a file", path=p) from None
    except PermissionError:
        raise InputFileError(f"{p}: permission denied", path=p) from None
    except OSError as e:
        raise InputFileError(f"{p}: cannot read: {e.strerror or e}", path=p) from None
    return parse_pe(data, os.path.basename(p) or p, allowed_subsystems=allowed_subsystems)


def parse_pe(data: bytes, name: str = "image", *, allowed_subsystems=(SUBSYSTEM_EFI_APPLICATION,)) -> PEImage:
    """Parse and validate a PE32+ x86_64 image; raises a VmrunError subclass when unusable."""
    try:
        return _Parser(bytes(data), name, tuple(allowed_subsystems)).parse()
    except VmrunError:
        raise
    except Exception as e:  # a bug or a pefile surprise: still report it as a bad image
        raise MalformedImageError(
            f"{name} is malformed: cannot parse headers ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
def _round_up(x: int, align: int) -> int:
    return (x + align - 1) & ~(align - 1)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _machine_name(m: int) -> str:
    return MACHINE_NAMES.get(m, f"machine {m:#x}")


def _subsystem_desc(s: int) -> str:
    n = SUBSYSTEM_NAMES.get(s)
    return f"{s} ({n})" if n else str(s)


def _printable(raw: bytes) -> str:
    """A section name for messages and lookups: latin-1, other bytes than printable ASCII as
    \\xNN (real names are ASCII: ".text", ".linux"; a hostile one must not break a message)."""
    text = raw.decode("latin-1")
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(c if " " <= c <= "~" and c != "\\" else f"\\x{ord(c):02x}" for c in text)


def _rel_name(t: int) -> str:
    n = _REL_NAMES.get(t)
    return f"{t} ({n})" if n else str(t)


class _Parser:
    def __init__(self, data: bytes, name: str, allowed: tuple):
        self.data = data
        self.name = name
        self.allowed = allowed

    # -- error helpers -------------------------------------------------------------------------
    def not_pe(self, why: str) -> NotPEError:
        return NotPEError(f"{self.name} is not a PE/COFF image: {why}", file=self.name)

    def bad(self, why: str) -> MalformedImageError:
        return MalformedImageError(f"{self.name} is malformed: {why}", file=self.name)

    # -- the checks, in order --------------------------------------------------------------------
    def parse(self) -> PEImage:
        data, n = self.data, len(self.data)

        # DOS header and PE signature -> NotPEError
        if n == 0:
            raise self.not_pe("empty file")
        if data[:2] != b"MZ":
            raise self.not_pe("no MZ header")
        if n < _DOS_HEADER_SIZE:
            raise self.not_pe(f"DOS header truncated ({n} of {_DOS_HEADER_SIZE} bytes)")
        (e_lfanew,) = struct.unpack_from("<I", data, 0x3C)
        if e_lfanew + 4 > n:
            raise self.not_pe(f"e_lfanew {e_lfanew:#x} points outside the file ({n:#x} bytes)")
        if data[e_lfanew:e_lfanew + 4] != b"PE\0\0":
            raise self.not_pe(f"no PE\\0\\0 signature at e_lfanew offset {e_lfanew:#x}")

        # COFF file header
        coff = e_lfanew + 4
        if coff + _COFF_SIZE > n:
            raise self.bad(f"COFF file header at {coff:#x} truncated (file is {n:#x} bytes)")
        machine, nsections, _, _, _, opt_size, _ = struct.unpack_from("<HHIIIHH", data, coff)
        if machine != MACHINE_AMD64:
            what = _machine_name(machine)
            if machine == 0xAA64:
                raise WrongArchitectureError(
                    f"{self.name} is an aarch64 image (machine 0xaa64); it needs an aarch64 "
                    f"host, vmrun runs x86_64 (0x8664) images only", machine=machine)
            raise WrongArchitectureError(
                f"{self.name} is an image for {what} (machine {machine:#x}); vmrun runs "
                f"x86_64 (0x8664) images only", machine=machine)

        # optional header
        opt = coff + _COFF_SIZE
        if opt_size < 2 or opt + 2 > n:
            raise self.bad(f"optional header at {opt:#x} missing or truncated "
                           f"(SizeOfOptionalHeader {opt_size}, file is {n:#x} bytes)")
        (magic,) = struct.unpack_from("<H", data, opt)
        if magic == PE32_MAGIC:
            raise WrongArchitectureError(
                f"{self.name} is a 32-bit PE32 image (optional header magic 0x10b) although "
                f"its machine is x86_64; vmrun runs PE32+ (0x20b) images only", machine=machine)
        if magic != PE32PLUS_MAGIC:
            raise self.bad(f"unknown optional header magic {magic:#x} at {opt:#x} "
                           f"(expected 0x20b, PE32+)")
        if opt_size < _OPT_FIXED_SIZE:
            raise self.bad(f"SizeOfOptionalHeader {opt_size} is smaller than a PE32+ optional "
                           f"header ({_OPT_FIXED_SIZE} bytes)")
        if opt + _OPT_FIXED_SIZE > n:
            raise self.bad(f"optional header at {opt:#x} truncated by the end of the file "
                           f"({n:#x} bytes)")
        (ndirs,) = struct.unpack_from("<I", data, opt + 108)
        if ndirs > _MAX_DATA_DIRECTORIES:
            raise self.bad(f"NumberOfRvaAndSizes {ndirs} is more than {_MAX_DATA_DIRECTORIES}")
        if _OPT_FIXED_SIZE + 8 * ndirs > opt_size:
            raise self.bad(f"{ndirs} data directories do not fit in SizeOfOptionalHeader "
                           f"{opt_size}")
        if opt + opt_size > n:
            raise self.bad(f"optional header at {opt:#x} ({opt_size} bytes) truncated by the "
                           f"end of the file ({n:#x} bytes)")
        (subsystem,) = struct.unpack_from("<H", data, opt + 68)
        if subsystem not in self.allowed:
            wanted = ", ".join(f"{s} ({SUBSYSTEM_NAMES.get(s, '?')})" for s in self.allowed)
            raise UnsupportedSubsystemError(
                f"{self.name} has subsystem {_subsystem_desc(subsystem)}; vmrun runs EFI "
                f"applications (subsystem {wanted})", subsystem=subsystem)

        # section table
        sect_off = opt + opt_size
        sect_end = sect_off + nsections * _SECTION_HEADER_SIZE
        if sect_end > n:
            raise self.bad(f"section table at {sect_off:#x} ({nsections} sections) is "
                           f"truncated by the end of the file ({n:#x} bytes)")

        # the optional header's fields (PE32+ layout, PE/COFF spec §3.4)
        (entry,) = struct.unpack_from("<I", data, opt + 16)
        (image_base, salign, falign) = struct.unpack_from("<QII", data, opt + 24)
        (size_of_image, size_of_headers) = struct.unpack_from("<II", data, opt + 56)
        (dll_characteristics,) = struct.unpack_from("<H", data, opt + 70)
        # a second reading: pefile (fast_load: headers only) must see the same image
        pe = self._pefile()
        if len(pe.sections) != nsections:
            warn = pe.get_warnings()
            raise self.bad(f"section header {len(pe.sections)} (at "
                           f"{sect_off + len(pe.sections) * _SECTION_HEADER_SIZE:#x}) is invalid"
                           + (f": {warn[-1]}" if warn else ""))
        fh, oh = pe.FILE_HEADER, pe.OPTIONAL_HEADER
        if ((fh.Machine, oh.Magic, oh.Subsystem, oh.AddressOfEntryPoint, oh.ImageBase, oh.SizeOfImage)
                != (machine, magic, subsystem, entry, image_base, size_of_image)):
            raise self.bad("pefile reads other header values than the raw headers hold")
        dirs = list(struct.iter_unpack("<II", data[opt + _OPT_FIXED_SIZE:
                                                   opt + _OPT_FIXED_SIZE + 8 * ndirs]))

        # image geometry
        if size_of_image == 0:
            raise self.bad("SizeOfImage is 0")
        if size_of_image > MAX_IMAGE_SIZE:
            raise self.bad(f"SizeOfImage {size_of_image:#x} is larger than 1 GiB")
        if not _is_pow2(salign):
            raise self.bad(f"SectionAlignment {salign:#x} is not a power of two")
        if not _is_pow2(falign):
            raise self.bad(f"FileAlignment {falign:#x} is not a power of two")
        if salign < falign:
            raise self.bad(f"SectionAlignment {salign:#x} is smaller than FileAlignment "
                           f"{falign:#x}")
        if salign < PAGE_SIZE and salign != falign:
            raise self.bad(f"SectionAlignment {salign:#x} is below the page size but differs "
                           f"from FileAlignment {falign:#x}")
        if size_of_headers < sect_end:
            raise self.bad(f"SizeOfHeaders {size_of_headers:#x} does not cover the section "
                           f"table, which ends at {sect_end:#x}")
        if size_of_headers > n:
            raise self.bad(f"headers truncated: SizeOfHeaders is {size_of_headers:#x} but the "
                           f"file has {n:#x} bytes")
        if size_of_headers >= size_of_image:
            raise self.bad(f"SizeOfHeaders {size_of_headers:#x} is not below SizeOfImage "
                           f"{size_of_image:#x}")

        # sections
        sections = []
        for i in range(nsections):
            at = sect_off + i * _SECTION_HEADER_SIZE
            raw_name, vsize, rva, raw_size, raw_offset = struct.unpack_from("<8sIIII", data, at)
            (characteristics,) = struct.unpack_from("<I", data, at + 36)
            if not any(data[at:at + _SECTION_HEADER_SIZE]):
                raise self.bad(f"section header {i} (at {at:#x}) is invalid: all "
                               f"{_SECTION_HEADER_SIZE} bytes are zero, but NumberOfSections "
                               f"is {nsections}")
            sname = _printable(raw_name.rstrip(b"\0")) or f"#{i}"
            s = Section(sname, rva, vsize, raw_offset, raw_size, characteristics, data)
            where = f"section {s.name} (header {i})"
            if s.raw_size:
                if s.raw_offset + s.raw_size > n:
                    raise self.bad(f"{where} raw data {s.raw_offset:#x}..{s.raw_offset + s.raw_size:#x}"
                                   f" extends beyond the end of the file ({n:#x} bytes)")
                if s.raw_offset < size_of_headers:
                    raise self.bad(f"{where} raw data at {s.raw_offset:#x} lies inside the "
                                   f"headers (SizeOfHeaders {size_of_headers:#x})")
                if s.rva < size_of_headers:
                    raise self.bad(f"{where} at rva {s.rva:#x} overlaps the headers "
                                   f"(SizeOfHeaders {size_of_headers:#x})")
            if s.rva + s.memory_size > size_of_image:
                raise self.bad(f"{where} rva {s.rva:#x} + size {s.memory_size:#x} extends "
                               f"beyond SizeOfImage {size_of_image:#x}")
            sections.append(s)
        placed = sorted((s for s in sections if s.memory_size), key=lambda s: s.rva)
        for a, b in zip(placed, placed[1:]):
            if a.rva + a.memory_size > b.rva:
                raise self.bad(f"sections {a.name} (rva {a.rva:#x}..{a.rva + a.memory_size:#x})"
                               f" and {b.name} (rva {b.rva:#x}) overlap")

        # entry point
        if not size_of_headers <= entry < size_of_image:
            raise self.bad(f"entry point rva {entry:#x} is outside the image "
                           f"({size_of_headers:#x}..{size_of_image:#x})")
        if not any(s.rva <= entry < s.rva + s.memory_size for s in sections):
            raise self.bad(f"entry point rva {entry:#x} is not inside any section")

        # data directories
        cert_off, cert_size = dirs[DIR_SECURITY] if ndirs > DIR_SECURITY else (0, 0)
        if cert_size:
            if not cert_off:
                raise self.bad(f"certificate table (data directory {DIR_SECURITY}) has size "
                               f"{cert_size:#x} but file offset 0")
            if cert_off + cert_size > n:
                raise self.bad(f"certificate table {cert_off:#x}..{cert_off + cert_size:#x} "
                               f"extends beyond the end of the file ({n:#x} bytes)")
        signed = bool(cert_off and cert_size)
        self._check_image_hash(sections, size_of_headers, cert_off, cert_size)
        relocations: tuple[tuple[int, int], ...] = ()
        if ndirs > DIR_BASERELOC and dirs[DIR_BASERELOC][1]:
            relocations = self._relocations(*dirs[DIR_BASERELOC], sections, size_of_headers,
                                            size_of_image)

        return PEImage(
            name=self.name, data=data, machine=machine, subsystem=subsystem,
            image_base=image_base, size_of_image=size_of_image, size_of_headers=size_of_headers,
            section_alignment=salign, file_alignment=falign, entry_rva=entry,
            dll_characteristics=dll_characteristics, sections=tuple(sections),
            relocations=relocations, signed=signed)

    def _pefile(self):
        import pefile

        try:
            return pefile.PE(data=self.data, fast_load=True)
        except Exception as e:  # PEFormatError or anything pefile trips over
            raise self.bad(f"pefile cannot parse the headers: {e}") from e

    def _check_image_hash(self, sections, size_of_headers: int, cert_off: int,
                          cert_size: int) -> None:
        """The Authenticode image hash (PE/COFF spec, "Calculating the PE Image Hash"; EDK2's
        MeasurePeImageAndExtend, hostsvc.tpm.authenticode_digests) covers the headers, each
        section's raw data, and the bytes after them up to FileSize - CertificateTable.Size.
        It cannot be computed when that tail is shorter than the certificate table: reject such
        an image here, naming the cause, rather than fail when firmware measures it."""
        n = len(self.data)
        raw = sorted((s for s in sections if s.raw_size), key=lambda s: s.raw_offset)
        hashed = size_of_headers + sum(s.raw_size for s in raw)
        if not hashed < n < hashed + cert_size:
            return
        for a, b in zip(raw, raw[1:]):
            if a.raw_offset + a.raw_size > b.raw_offset:
                raise self.bad(
                    f"section {a.name} raw data {a.raw_offset:#x}..{a.raw_offset + a.raw_size:#x}"
                    f" overlaps section {b.name} raw data at {b.raw_offset:#x}: the "
                    f"Authenticode image hash would count those bytes twice and leave less than "
                    f"the certificate table's {cert_size:#x} bytes unhashed")
        cert_end = cert_off + cert_size
        for s in raw:
            if s.raw_offset < cert_end and cert_off < s.raw_offset + s.raw_size:
                raise self.bad(
                    f"certificate table {cert_off:#x}..{cert_end:#x} overlaps section "
                    f"{s.name} raw data {s.raw_offset:#x}..{s.raw_offset + s.raw_size:#x}")
        raise self.bad(f"certificate table size {cert_size:#x} is larger than the {n - hashed:#x}"
                       f" bytes of the file after the headers and section raw data: the "
                       f"Authenticode image hash cannot be computed")

    def _rva_file_bytes(self, rva: int, size: int, sections, size_of_headers: int) -> bytes | None:
        """The file-backed part of the ``size`` bytes at ``rva`` in memory (if inside one
        region): they are followed by ``size - len(result)`` bytes of zero fill, which are not
        materialized (a header may claim a 1 GiB directory in a section without raw data)."""
        if rva + size <= size_of_headers:
            return self.data[rva:rva + size]
        for s in sections:
            if s.rva <= rva and rva + size <= s.rva + s.memory_size:
                # the section's file bytes, trimmed as Section.data does
                raw_len = min(s.raw_size, s.virtual_size) if s.virtual_size else s.raw_size
                off = rva - s.rva
                lo = s.raw_offset + min(off, raw_len)
                hi = s.raw_offset + min(off + size, raw_len)
                return self.data[lo:hi]
        return None

    def _relocations(self, rva: int, size: int, sections, size_of_headers: int,
                     size_of_image: int) -> tuple[tuple[int, int], ...]:
        if rva + size > size_of_image:
            raise self.bad(f"base relocation directory rva {rva:#x} size {size:#x} extends "
                           f"beyond SizeOfImage {size_of_image:#x}")
        blob = self._rva_file_bytes(rva, size, sections, size_of_headers)
        if blob is None:
            raise self.bad(f"base relocation directory rva {rva:#x} size {size:#x} is not "
                           f"inside a section")
        avail = len(blob)          # the directory's bytes from avail on are zero fill
        blob += bytes(8)           # so that a block header straddling avail reads its zeros
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            at = rva + pos
            if pos >= avail:
                break  # zero fill: padding or a null terminator block
            if size - pos < 8:
                if not any(blob[pos:]):
                    break  # zero padding after the last block
                raise self.bad(f"base relocation block header at rva {at:#x} is truncated by "
                               f"the end of the relocation directory")
            page, block_size = struct.unpack_from("<II", blob, pos)
            if block_size == 0 and page == 0:
                break  # a null terminator block
            if block_size < 8 or block_size & 1:
                raise self.bad(f"base relocation block at rva {at:#x} has invalid size "
                               f"{block_size:#x}")
            if pos + block_size > size:
                raise self.bad(f"base relocation block at rva {at:#x} (size {block_size:#x}) "
                               f"extends past the relocation directory (ends at rva "
                               f"{rva + size:#x})")
            # entries in the zero fill are ABSOLUTE (type 0): only the file-backed ones count
            end = min(pos + block_size, avail)
            for (entry,) in struct.iter_unpack("<H", blob[pos + 8:end + (end - pos) % 2]):
                typ, off = entry >> 12, entry & 0xFFF
                if typ == REL_ABSOLUTE:
                    continue
                target = page + off
                width = _REL_SIZE.get(typ)
                if width is None:
                    raise self.bad(f"unsupported base relocation type {_rel_name(typ)} for rva "
                                   f"{target:#x} (block at rva {at:#x})")
                if target + width > size_of_image:
                    raise self.bad(f"base relocation for rva {target:#x} (block at rva {at:#x}) "
                                   f"is past the end of the image ({size_of_image:#x})")
                out.append((target, typ))
            if len(out) > MAX_RELOCATIONS:
                raise self.bad(f"base relocation directory rva {rva:#x} size {size:#x} holds "
                               f"more than {MAX_RELOCATIONS} relocations (vmrun's limit; the "
                               f"block at rva {at:#x} passes it)")
            pos += block_size
        return tuple(out)
