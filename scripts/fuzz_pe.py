"""Mutation fuzzing of PE parsing and loading: the code of ``scripts/fuzz-pe`` and of
``tests/unit/test_fuzz_pe.py``.

The contract under test: for ANY input bytes, vmrun's PE parser
(:func:`vmrun.formats.pe.parse_pe`), the loader's pure part (:meth:`PEImage.load`), ``vmrun
inspect`` (:func:`vmrun.inspect.describe`), the bzImage setup-header reader and the Authenticode
image hash (:func:`hostsvc.tpm.authenticode_digests`) either succeed or fail with vmrun's own
error, whose message names the file and says what is wrong. :func:`exercise` runs all of them on
one input and raises :class:`Unexpected` when the contract is broken:

- ``parse_pe`` raises anything but NotPEError/WrongArchitectureError/MalformedImageError/
  UnsupportedSubsystemError, or one of those through its catch-all ("cannot parse headers
  (IndexError: …)" is a parser bug with a vague message, not a diagnosis), or a message that
  does not start with the file's name;
- the hash raises anything but its own PeHashError, or refuses an image the parser accepted
  (LoadImage would then fail after the image was placed);
- for an accepted image: inspect, the bzImage reader or ``load`` raise anything, or ``load``
  returns a memory image of another size than ``load_size``;
- one input takes longer than :data:`SLOW_SECONDS`.

The corpus (:func:`build_corpus`): the real Debian kernels (EFI-stub bzImages, signed, so with a
certificate table), systemd-stub 252/257 and the 257 addon stub, UKIs built from them with
``tests/e2e/uki.py`` (objcopy), and small synthetic images from ``tests/unit/pebuilder.py``
(relocations, a certificate table, small alignments). Real images are fuzzed *shrunk*
(:func:`shrink`: every section's raw data cut to 64 KiB, the file re-laid out, the certificate
table kept at the end), so that headers, section table, data directories, relocation blocks and
the certificate table are the real ones but one mutant costs microseconds, not an 8 MB copy and
hash; the unshrunk images are in the corpus too, mutated in their first 256 KiB and their tail.

Mutants (:func:`mutate`) are a pure function of (seed, index), so any one can be regenerated.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hostsvc.tpm import PeHashError, authenticode_digests
from vmrun.errors import (
    MalformedImageError,
    NotPEError,
    UnsupportedSubsystemError,
    VmrunError,
    WrongArchitectureError,
)
from vmrun.formats import bzimage
from vmrun.formats import pe as PE
from vmrun.inspect import describe

NAME = "mutant.efi"
PARSE_ERRORS = (NotPEError, WrongArchitectureError, MalformedImageError, UnsupportedSubsystemError)
ALL_EFI = tuple(PE.EFI_SUBSYSTEMS)
SHRINK_LIMIT = 0x10000          # raw bytes kept per section of a real image
FULL_HEAD = 0x40000             # unshrunk images: mutations land in the first 256 KiB …
FULL_TAIL = 0x2000              # … or in the last 8 KiB (the certificate table)
LOAD_LIMIT = 64 << 20           # ``load`` is exercised for images up to this load_size
SLOW_SECONDS = 2.0              # one input taking longer is a hang for the fuzzer
OTHER_BASE = 0x7F5A3000         # a load address no image links at: relocations are applied

#: real payloads (relative to the payload cache) the corpus is built from
PAYLOADS = {
    "kernel-bookworm": "kernels/bookworm/vmlinuz",
    "kernel-trixie": "kernels/trixie/vmlinuz",
    "stub-252": "stubs/252/linuxx64.efi.stub",
    "stub-257": "stubs/257/linuxx64.efi.stub",
    "addon-stub-257": "stubs/257/addonx64.efi.stub",
}


class Unexpected(Exception):
    """The contract is broken: ``stage`` raised ``exc`` (or misbehaved, ``exc`` is None)."""

    def __init__(self, stage: str, what: str, exc: BaseException | None = None):
        self.stage, self.what, self.exc = stage, what, exc
        self.trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
        super().__init__(f"{stage}: {what}")

    @property
    def signature(self) -> str:
        """Where it happened, for grouping: stage, exception type, innermost frame."""
        where = ""
        if self.exc is not None and self.exc.__traceback__ is not None:
            tb = traceback.extract_tb(self.exc.__traceback__)[-1]
            where = f" at {Path(tb.filename).name}:{tb.lineno}"
        return f"{self.stage}: {type(self.exc).__name__ if self.exc else self.what}{where}"


# --- the contract ------------------------------------------------------------------------------
_NUM = re.compile(r"0x[0-9a-fA-F]+|\b\d+\b")
_SECT = re.compile(r"section \S+ \(header #\)")
_SECTS = re.compile(r"sections \S+ \(rva #\.\.#\) and \S+ \(rva #\) overlap")


def reason(message: str) -> str:
    """A rejection message with the numbers and names taken out, for counting."""
    m = message[len(NAME):] if message.startswith(NAME) else message
    m = _NUM.sub("#", m)
    m = _SECT.sub("section S (header #)", m)
    return _SECTS.sub("sections A and B overlap", m).strip()


def exercise(data: bytes) -> tuple[str, str]:
    """Run every function under test on ``data``; return (outcome, reason): ("accepted", "")
    or (error kind, :func:`reason` of its message). Raises :class:`Unexpected`."""
    t0 = time.monotonic()
    try:
        img = PE.parse_pe(data, NAME, allowed_subsystems=ALL_EFI)
    except VmrunError as e:
        _check_error(e, "parse_pe")
        outcome = (e.kind, reason(e.message))
        img = None
    except BaseException as e:  # noqa: BLE001 - the point of the exercise
        raise Unexpected("parse_pe", f"{type(e).__name__}: {e}", e) from None

    try:
        authenticode_digests(data)
    except PeHashError as e:
        if img is not None:
            raise Unexpected("authenticode_digests", f"refuses an image parse_pe accepted: {e}",
                             e) from None
    except BaseException as e:  # noqa: BLE001
        raise Unexpected("authenticode_digests", f"{type(e).__name__}: {e}", e) from None

    if img is not None:
        outcome = ("accepted", "")
        _exercise_accepted(img, data)
    if time.monotonic() - t0 > SLOW_SECONDS:
        raise Unexpected("time", f"took {time.monotonic() - t0:.1f} s (limit {SLOW_SECONDS} s)")
    return outcome


def _check_error(e: VmrunError, stage: str) -> None:
    if not isinstance(e, PARSE_ERRORS):
        raise Unexpected(stage, f"{type(e).__name__} is not a parse error: {e}", e)
    if not e.message.startswith(NAME + " "):
        raise Unexpected(stage, f"message does not name the file: {e.message!r}", e)
    if not e.message.isprintable():
        raise Unexpected(stage, f"message is not one printable line: {e.message!r}", e)
    if "cannot parse headers (" in e.message:  # parse_pe's catch-all: a bug, vaguely reported
        raise Unexpected(stage, f"internal exception behind a generic message: {e.message}",
                         e.__cause__ or e)


def _exercise_accepted(img: PE.PEImage, data: bytes) -> None:
    # the same bytes for an EFI application only (what `vmrun run` asks for)
    try:
        PE.parse_pe(data, NAME)
    except UnsupportedSubsystemError:
        pass
    except BaseException as e:  # noqa: BLE001
        raise Unexpected("parse_pe(application)", f"{type(e).__name__}: {e}", e) from None
    stage = "inspect"
    try:
        describe(img, NAME)
        stage = "bzimage"
        bzimage.parse(img.data)
        linux = img.section(".linux")
        if linux is not None:
            bzimage.parse(linux.data())
        stage = "load"
        if img.load_size <= LOAD_LIMIT:
            # at its ImageBase (no relocation) only when that is cheap: a shrunk kernel
            # still has a 12 MB SizeOfImage
            for base in ((img.image_base, OTHER_BASE) if img.load_size <= 1 << 20 else (OTHER_BASE,)):
                mem = img.load(base)
                if len(mem) != img.load_size:
                    raise Unexpected("load", f"memory image of {len(mem):#x} bytes at base "
                                             f"{base:#x}, load_size is {img.load_size:#x}")
    except Unexpected:
        raise
    except BaseException as e:  # noqa: BLE001
        raise Unexpected(stage, f"{type(e).__name__}: {e}", e) from None


# --- corpus --------------------------------------------------------------------------------------
@dataclass
class Seed:
    name: str
    data: bytes
    fields: list = field(default_factory=list)   # [(label, offset, size)]
    full: bool = False                            # an unshrunk multi-MB image


def _u16(b, o):
    return struct.unpack_from("<H", b, o)[0]


def _u32(b, o):
    return struct.unpack_from("<I", b, o)[0]


def _layout(data: bytes) -> dict:
    """Where the structures of a well-formed PE32+ are (this module's own reading)."""
    nt = _u32(data, 0x3C)
    coff = nt + 4
    opt = coff + 20
    opt_size = _u16(data, coff + 16)
    nsect = _u16(data, coff + 2)
    ndirs = _u32(data, opt + 108)
    st = opt + opt_size
    sections = []
    for i in range(nsect):
        h = st + 40 * i
        vsize, rva, raw_size, raw_off = struct.unpack_from("<IIII", data, h + 8)
        sections.append(dict(header=h, vsize=vsize, rva=rva, raw_size=raw_size, raw_off=raw_off))
    dirs = [struct.unpack_from("<II", data, opt + 112 + 8 * i) for i in range(ndirs)]
    return dict(nt=nt, coff=coff, opt=opt, opt_size=opt_size, nsect=nsect, ndirs=ndirs, st=st,
                sections=sections, dirs=dirs, size_of_headers=_u32(data, opt + 60),
                falign=_u32(data, opt + 36))


def _rva_to_file(lay: dict, rva: int) -> int | None:
    for s in lay["sections"]:
        if s["raw_size"] and s["rva"] <= rva < s["rva"] + s["raw_size"]:
            return s["raw_off"] + rva - s["rva"]
    return None


_OPT_FIELDS = (("Magic", 0, 2), ("AddressOfEntryPoint", 16, 4), ("BaseOfCode", 20, 4),
               ("ImageBase", 24, 8), ("ImageBase.lo", 24, 4), ("SectionAlignment", 32, 4),
               ("FileAlignment", 36, 4), ("SizeOfImage", 56, 4), ("SizeOfHeaders", 60, 4),
               ("CheckSum", 64, 4), ("Subsystem", 68, 2), ("DllCharacteristics", 70, 2),
               ("NumberOfRvaAndSizes", 108, 4))
_SECT_FIELDS = (("Name", 0, 8), ("VirtualSize", 8, 4), ("VirtualAddress", 12, 4),
                ("SizeOfRawData", 16, 4), ("PointerToRawData", 20, 4), ("Characteristics", 36, 4))


def fields_of(data: bytes) -> list[tuple[str, int, int]]:
    """The fields worth mutating in ``data``: (label, file offset, size)."""
    lay = _layout(data)
    coff, opt = lay["coff"], lay["opt"]
    out = [("MZ", 0, 2), ("e_lfanew", 0x3C, 4), ("PE signature", lay["nt"], 4),
           ("Machine", coff, 2), ("NumberOfSections", coff + 2, 2),
           ("PointerToSymbolTable", coff + 8, 4), ("SizeOfOptionalHeader", coff + 16, 2)]
    out += [(f"opt.{n}", opt + o, s) for n, o, s in _OPT_FIELDS]
    for i in range(min(16, (lay["opt_size"] - 112) // 8)):
        out += [(f"dir[{i}].rva", opt + 112 + 8 * i, 4), (f"dir[{i}].size", opt + 116 + 8 * i, 4)]
    for i, s in enumerate(lay["sections"]):
        out += [(f"section[{i}].{n}", s["header"] + o, sz) for n, o, sz in _SECT_FIELDS]
    n = len(data)
    if lay["ndirs"] > 5 and lay["dirs"][5][1]:       # base relocation blocks
        rva, size = lay["dirs"][5]
        at = _rva_to_file(lay, rva)
        pos = 0
        while at is not None and pos + 8 <= size and at + pos + 8 <= n and len(out) < 600:
            page, bsize = struct.unpack_from("<II", data, at + pos)
            if bsize < 8:
                break
            out += [(f"reloc@{pos:#x}.page", at + pos, 4), (f"reloc@{pos:#x}.size", at + pos + 4, 4)]
            out += [(f"reloc@{pos:#x}.entry", at + pos + e, 2)
                    for e in range(8, min(bsize, 8 + 2 * 24), 2) if at + pos + e + 2 <= n]
            pos += bsize
    if lay["ndirs"] > 4 and lay["dirs"][4][1]:       # WIN_CERTIFICATE header
        off = lay["dirs"][4][0]
        if off + 8 <= n:
            out += [("cert.dwLength", off, 4), ("cert.wRevision", off + 4, 2),
                    ("cert.wCertificateType", off + 6, 2)]
    if lay["ndirs"] > 6 and lay["dirs"][6][1]:       # debug directory entries
        at = _rva_to_file(lay, lay["dirs"][6][0])
        for k in range(min(4, lay["dirs"][6][1] // 28)):
            if at is not None and at + 28 * k + 28 <= n:
                out += [(f"debug[{k}].SizeOfData", at + 28 * k + 16, 4),
                        (f"debug[{k}].AddressOfRawData", at + 28 * k + 20, 4),
                        (f"debug[{k}].PointerToRawData", at + 28 * k + 24, 4)]
    return [f for f in out if f[1] + f[2] <= n]


def shrink(data: bytes, limit: int = SHRINK_LIMIT) -> bytes:
    """``data`` with each section's raw data cut to ``limit`` bytes and the file re-laid out
    (sections in file order at FileAlignment boundaries, then the certificate table, 8-byte
    aligned). Virtual sizes, rvas and SizeOfImage are kept."""
    lay = _layout(data)
    out = bytearray(data[:lay["size_of_headers"]])
    falign = lay["falign"]
    for s in sorted((s for s in lay["sections"] if s["raw_size"]), key=lambda s: s["raw_off"]):
        pos = -(-len(out) // falign) * falign
        out += bytes(pos - len(out))
        keep = min(s["raw_size"], limit)
        out += data[s["raw_off"]:s["raw_off"] + keep]
        struct.pack_into("<II", out, s["header"] + 16, keep, pos)
    if lay["ndirs"] > 4 and lay["dirs"][4][1]:
        off, size = lay["dirs"][4]
        pos = -(-len(out) // 8) * 8
        out += bytes(pos - len(out)) + data[off:off + size]
        struct.pack_into("<I", out, lay["opt"] + 112 + 8 * 4, pos)
    return bytes(out)


def synthetic_images() -> dict[str, bytes]:
    """Small images from tests/unit/pebuilder.py."""
    from tests.unit import pebuilder as pb

    data = bytearray(b"\xAA" * 0x3000)
    for off in range(0, 0x3000, 0x180):
        struct.pack_into("<Q", data, off, 0x140001000 + off)
    relocs = [(0x2000 + off, pb.REL_DIR64) for off in range(0, 0x3000, 0x180)]
    relocs += [(0x2000 + 0x100, pb.REL_HIGHLOW), (0x4000 + 0x40, pb.REL_HIGHLOW)]
    secs = [pb.Sec(".text", b"\x90" * 0x30 + b"\xc3", characteristics=pb.SCN_CODE),
            pb.Sec(".data", bytes(data), virtual_size=0x3800, characteristics=pb.SCN_DATA)]
    return {
        "synthetic-default": pb.build_pe().data,
        "synthetic-signed-reloc": pb.build_pe(sections=secs, relocations=relocs,
                                              certificate=bytes(range(256)) * 2).data,
        "synthetic-small-align": pb.build_pe(section_alignment=0x200, file_alignment=0x200,
                                             relocations=[(0x400, pb.REL_DIR64)]).data,
        "synthetic-driver": pb.build_pe(subsystem=11, number_of_rva_and_sizes=6,
                                        certificate=b"x" * 24).data,
    }


def real_images(cache: Path, *, ukis: bool = True, workdir: Path | None = None) -> dict[str, bytes]:
    """The cached Debian payloads and UKIs built from them. A missing payload is an error
    (FileNotFoundError naming it), as the tests treat it."""
    paths = {}
    for name, rel in PAYLOADS.items():
        p = cache / rel
        if not p.is_file():
            raise FileNotFoundError(f"payload {p} is missing: run scripts/fetch-payloads")
        paths[name] = p
    images = {name: p.read_bytes() for name, p in paths.items()}
    if ukis:
        from tests.e2e import uki as U

        with tempfile.TemporaryDirectory(prefix="fuzz-pe-", dir=workdir) as t:
            for stub in ("stub-252", "stub-257"):
                out = Path(t) / f"uki-{stub}.efi"
                U.build_uki(paths[stub], out, linux=paths["kernel-bookworm"], initrd=None,
                            cmdline="console=ttyS0 root=/dev/vda1 ro",
                            extra_sections={".uname": b"6.1.0-fuzz-amd64"})
                images[f"uki-{stub[5:]}"] = out.read_bytes()
            addon = Path(t) / "addon.efi"
            U.build_addon(paths["addon-stub-257"], addon, cmdline="quiet")
            images["uki-addon-257"] = addon.read_bytes()
    return images


def build_corpus(cache: Path | None, *, full: bool = True, ukis: bool = True) -> list[Seed]:
    """Seeds: synthetic images, and (``cache`` given) the real payloads shrunk, plus unshrunk
    when ``full``. Every seed is checked to parse."""
    images = dict(synthetic_images())
    seeds = []
    if cache is not None:
        for name, data in real_images(cache, ukis=ukis).items():
            small = shrink(data)
            images[name if small == data else f"{name}-shrunk"] = small
            if full and len(data) > 4 * FULL_HEAD:
                seeds.append(Seed(f"{name}-full", data, fields_of(data), full=True))
    seeds[:0] = [Seed(name, data, fields_of(data)) for name, data in images.items()]
    for s in seeds:
        PE.parse_pe(s.data, s.name, allowed_subsystems=ALL_EFI)  # a bad seed fuzzes nothing
    return seeds


# --- mutation -------------------------------------------------------------------------------------
_MAX = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: (1 << 64) - 1}
_INTERESTING = (0, 1, 2, 3, 4, 7, 8, 0x10, 0x1F, 0x20, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200,
                0x3FF, 0x400, 0xFFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x100000,
                0x3FFFFFFF, 0x40000000, 0x40000001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0,
                0xFFFFFFFE, 0xFFFFFFFF)


def _value_for(rng: random.Random, seed: Seed, data: bytearray, off: int, size: int) -> int:
    cur = int.from_bytes(data[off:off + size], "little")
    lay_vals = (len(data), len(seed.data))
    r = rng.random()
    if r < 0.30:
        v = rng.choice(_INTERESTING)
    elif r < 0.50:
        v = cur + rng.choice((-1, 1, -2, 2, -8, 8, -0x200, 0x200, -0x1000, 0x1000, 0x10000))
    elif r < 0.60:
        v = rng.choice(lay_vals) + rng.choice((-9, -8, -1, 0, 1, 8))
    elif r < 0.75:  # another field's value: offsets, sizes and rvas that mean something here
        _, o2, s2 = rng.choice(seed.fields)
        v = int.from_bytes(data[o2:o2 + s2], "little") + rng.choice((0, 0, 1, -1, 8))
    elif r < 0.85:
        v = cur ^ (1 << rng.randrange(8 * size))
    elif r < 0.92:
        v = cur * 2 if rng.random() < 0.5 else cur // 2
    else:
        v = rng.getrandbits(8 * size)
    return v & _MAX[size]


def _headers_size(data: bytes) -> int:
    """SizeOfHeaders of a seed (0 when it has none)."""
    try:
        return _u32(data, _layout(data)["opt"] + 60)
    except struct.error:
        return 0


def mutate(seed: Seed, rng: random.Random) -> bytes:
    """One mutant of ``seed``: 1-4 structure-aware mutations, sometimes a truncation."""
    if seed.full:  # mutate a copy of the head and the tail only; the middle is shared
        n = len(seed.data)
        head, tail = bytearray(seed.data[:FULL_HEAD]), bytearray(seed.data[n - FULL_TAIL:])
        fields = [f for f in seed.fields if f[1] + f[2] <= FULL_HEAD or f[1] >= n - FULL_TAIL]
        for _ in range(rng.randint(1, 3)):
            label, off, size = rng.choice(fields)
            buf, at = (head, off) if off < FULL_HEAD else (tail, off - (n - FULL_TAIL))
            v = _value_for(rng, seed, buf, at, size)
            buf[at:at + size] = v.to_bytes(size, "little")
        data = bytes(head) + seed.data[FULL_HEAD:n - FULL_TAIL] + bytes(tail)
        if rng.random() < 0.1:
            data = data[:rng.choice((n - 1, n - 8, n - FULL_TAIL, rng.randrange(n)))]
        return data

    data = bytearray(seed.data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        r = rng.random()
        n = len(data)
        if n == 0:  # truncated to nothing by an earlier mutation
            data += rng.randbytes(rng.choice((1, 2, 64)))
            continue
        if r < 0.70 and seed.fields:
            label, off, size = rng.choice(seed.fields)
            if off + size <= n:
                data[off:off + size] = _value_for(rng, seed, data, off, size).to_bytes(size, "little")
        elif r < 0.80:  # random bytes in the headers
            hdr = min(n, max(0x400, _headers_size(seed.data)))
            at = rng.randrange(hdr)
            k = rng.choice((1, 1, 2, 4, 8, 16))
            data[at:at + k] = rng.randbytes(k)
        elif r < 0.85:  # random bytes anywhere
            at = rng.randrange(n)
            data[at:at + 4] = rng.randbytes(4)
        elif r < 0.90:  # copy one section header over another, or swap two
            lay_st = [f[1] for f in seed.fields if f[0].endswith("].Name")]
            if len(lay_st) >= 2:
                a, b = rng.sample(lay_st, 2)
                ha, hb = bytes(data[a:a + 40]), bytes(data[b:b + 40])
                data[b:b + 40] = ha
                if rng.random() < 0.5:
                    data[a:a + 40] = hb
        elif r < 0.95:  # truncate
            cut = rng.choice((rng.randrange(n + 1), rng.randrange(min(n, 0x800) + 1),
                              n - rng.randrange(1, 0x40), n - 1))
            del data[max(cut, 0):]
        else:  # extend
            data += bytes(rng.choice((1, 8, 0x200, 0x1000))) if rng.random() < 0.5 \
                else rng.randbytes(rng.choice((1, 7, 64, 600)))
    return bytes(data)


def mutant(seeds: list[Seed], seed: int, index: int) -> tuple[Seed, bytes]:
    """Mutant number ``index`` of the run with ``seed``: a pure function of both."""
    rng = random.Random((seed << 40) ^ index)
    weights = [0.02 if s.full else 1.0 for s in seeds]
    s = rng.choices(seeds, weights)[0]
    return s, mutate(s, rng)


# --- reproducers ------------------------------------------------------------------------------------
def save_reproducer(directory: Path, data: bytes, u: Unexpected, label: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = directory / f"{digest}.efi"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{label}\n{u}\n{u.signature}\n\n{u.trace}")
    return path


def run_range(seeds: list[Seed], seed: int, start: int, stop: int, repro_dir: Path | None,
              max_saved: int = 20) -> dict:
    """Fuzz mutants ``start``…``stop - 1``: counts of outcomes and reasons, and the unexpected."""
    outcomes, reasons, unexpected = Counter(), Counter(), []
    by_sig = Counter()
    for i in range(start, stop):
        s, data = mutant(seeds, seed, i)
        try:
            kind, why = exercise(data)
        except Unexpected as u:
            outcomes["unexpected"] += 1
            by_sig[u.signature] += 1
            saved = None
            if repro_dir is not None and by_sig[u.signature] <= 3 and len(unexpected) < max_saved:
                saved = str(save_reproducer(repro_dir, data, u, f"seed {seed} mutant {i} of {s.name}"))
            if by_sig[u.signature] <= 3:
                unexpected.append(dict(index=i, corpus=s.name, signature=u.signature,
                                       what=str(u), file=saved))
            continue
        outcomes[kind] += 1
        if why:
            reasons[f"{kind}: {why}"] += 1
    return dict(outcomes=outcomes, reasons=reasons, unexpected=unexpected, signatures=by_sig)


def default_cache() -> Path:
    root = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("VMRUN_CACHE") or root / ".cache" / "payloads")
