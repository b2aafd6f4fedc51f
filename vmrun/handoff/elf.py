"""A minimal ELF64 writer/reader for handoff files: ET_EXEC, x86_64, one PT_NOTE with vmrun's
metadata, PT_LOAD segments at physical addresses (p_vaddr = p_paddr, identity), entry = the
purgatory. This is what ``kexec -l FILE -t elf-x86_64 --args-none`` loads (kexec-tools places
each PT_LOAD at p_paddr and jumps to e_entry)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmrun.errors import MalformedImageError
from vmrun.vm.layout import PAGE_SIZE

EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD, PT_NOTE = 1, 4
PF_RWX = 7
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
NOTE_NAME = b"vmrun\0"
NOTE_METADATA = 1     # desc: UTF-8 JSON
NOTE_EVENT_LOG = 2    # desc: TCG event log bytes


@dataclass(frozen=True)
class LoadSegment:
    paddr: int
    data: bytes | memoryview  # a view of guest memory when staged from a run
    memsz: int


def nonzero_runs(data, page: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """[start, end) offsets of the runs of pages of ``data`` that are not all zero."""
    zero = bytes(page)
    view = memoryview(data)
    runs: list[list[int]] = []
    for off in range(0, len(view), page):
        chunk = view[off:off + page]
        if chunk.tobytes() == zero[:len(chunk)]:
            continue
        if runs and runs[-1][1] == off:
            runs[-1][1] = off + len(chunk)
        else:
            runs.append([off, off + len(chunk)])
    return [(a, b) for a, b in runs]


def _note(ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(NOTE_NAME), len(desc), ntype) + pad(NOTE_NAME) + pad(desc)


def write_elf(path, entry: int, segments: list[LoadSegment], notes: list[tuple[int, bytes]]) -> int:
    """Write the handoff ELF; returns its size in bytes."""
    note_blob = b"".join(_note(t, d) for t, d in notes)
    nph = 1 + len(segments)
    off = EHDR.size + PHDR.size * nph
    note_off = off
    off += len(note_blob)
    phdrs = [PHDR.pack(PT_NOTE, 4, note_off, 0, 0, len(note_blob), len(note_blob), 4)]
    placed = []
    for seg in segments:
        off = (off + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        phdrs.append(PHDR.pack(PT_LOAD, PF_RWX, off, seg.paddr, seg.paddr, len(seg.data), seg.memsz, PAGE_SIZE))
        placed.append((off, seg.data))
        off += len(seg.data)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = EHDR.pack(ident, ET_EXEC, EM_X86_64, 1, entry, EHDR.size, 0, 0, EHDR.size, PHDR.size, nph, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(ehdr + b"".join(phdrs) + note_blob)
        for o, data in placed:
            view = memoryview(data)
            for a, b in nonzero_runs(view):  # zero pages stay holes: a sparse file reads as zeros
                f.seek(o + a)
                f.write(view[a:b])
        f.truncate(max(off, f.tell()))
    return off


@dataclass
class ElfHandoff:
    entry: int
    segments: list[tuple[int, int, int, int]]  # (file offset, filesz, paddr, memsz)
    notes: dict[int, bytes]


def read_elf(data: bytes, name: str = "handoff") -> ElfHandoff:
    """Parse a handoff ELF (enough for ``vmrun load`` and the tests)."""
    if len(data) < EHDR.size or data[:4] != b"\x7fELF":
        raise MalformedImageError(f"{name} is not an ELF file")
    ident, etype, machine, _v, entry, phoff, _sh, _fl, _eh, phentsize, phnum, *_ = EHDR.unpack_from(data)
    if ident[4] != 2 or ident[5] != 1 or machine != EM_X86_64 or etype != ET_EXEC:
        raise MalformedImageError(f"{name} is not an x86_64 ET_EXEC ELF64 file")
    if phentsize != PHDR.size or phoff + phnum * PHDR.size > len(data):
        raise MalformedImageError(f"{name}: program headers truncated")
    segs, notes = [], {}
    for i in range(phnum):
        ptype, _f, off, _va, paddr, filesz, memsz, _al = PHDR.unpack_from(data, phoff + i * PHDR.size)
        if off + filesz > len(data):
            raise MalformedImageError(f"{name}: segment {i} extends past the end of the file")
        if ptype == PT_LOAD:
            segs.append((off, filesz, paddr, memsz))
        elif ptype == PT_NOTE:
            pos = off
            while pos + 12 <= off + filesz:
                namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
                pos += 12
                nm = data[pos:pos + namesz]
                pos += (namesz + 3) & ~3
                desc = data[pos:pos + descsz]
                pos += (descsz + 3) & ~3
                if nm == NOTE_NAME:
                    notes[ntype] = desc
    return ElfHandoff(entry, segs, notes)
