"""A software TPM's measurement side: PCR banks, the crypto-agile TCG event log, replay, and the
Authenticode PE image digest that firmware measures.

References (structure names as the specifications have them):

- TCG PC Client Platform Firmware Profile (PFP) 1.05, §10.2 (TCG_PCR_EVENT, TCG_PCR_EVENT2,
  TCG_EfiSpecIDEventStruct "Spec ID Event03", TCG_EfiStartupLocalityEvent), §10.4 (event types).
- TPM 2.0 Part 2 §6.3 (TPM_ALG_ID), PC Client PTP (PCR 17-22 reset to all ones).
- EDK2 SecurityPkg/Tcg/Tcg2Dxe (SetupEventLog, MeasurePeImageAndExtend): the layout and the
  field values real firmware (OVMF) writes, which this module reproduces byte for byte:
  platformClass 0, spec 2.0 errata 0, uintnSize 2, no vendor info, digests in TPM_ALG_ID order.

A log is a list of :class:`Event`; the first is the Spec ID event in the SHA1 (TCG_PCR_EVENT)
format, every later one a TCG_PCR_EVENT2 carrying one digest per bank named in the Spec ID
event. EV_NO_ACTION events are logged but never extended. The fixed-size structures are those
of :mod:`hostsvc.uefi_types`; TCG_PCR_EVENT2, a run of variable-sized digests, is serialised here.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from hostsvc import uefi_types as U

_PCR_EVENT_DATA = U.TCG_PCR_EVENT.Event.offset             # 32: the SHA1-format record's header
_SPEC_ID_ALGORITHMS = U.TCG_EfiSpecIDEventStruct.digestSizes.offset   # 28

# --- algorithms ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alg:
    name: str        # hashlib name
    alg_id: int      # TPM_ALG_ID
    size: int        # digest size in bytes
    bit: int         # EFI_TCG2_BOOT_HASH_ALG_* bit


ALGS: dict[str, Alg] = {a.name: a for a in (
    Alg("sha1", 0x0004, 20, 0x01),
    Alg("sha256", 0x000B, 32, 0x02),
    Alg("sha384", 0x000C, 48, 0x04),
    Alg("sha512", 0x000D, 64, 0x08),
)}
ALG_BY_ID: dict[int, Alg] = {a.alg_id: a for a in ALGS.values()}
# known to the parser only (digest size comes from the Spec ID event anyway)
_OTHER_ALG_NAMES = {0x0012: "sm3_256", 0x0027: "sha3_256", 0x0028: "sha3_384", 0x0029: "sha3_512"}

NUM_PCRS = 24
MAX_PCR_INDEX = 23


def alg_name(alg_id: int) -> str:
    a = ALG_BY_ID.get(alg_id)
    return a.name if a else _OTHER_ALG_NAMES.get(alg_id, f"alg_{alg_id:#06x}")


def canonical_banks(banks: Iterable[str]) -> tuple[str, ...]:
    """Validated bank names in TPM_ALG_ID order (the order EDK2 writes them)."""
    out = []
    for b in banks:
        b = b.lower().replace("-", "")
        if b not in ALGS:
            raise ValueError(f"unsupported PCR bank {b!r} (supported: {', '.join(ALGS)})")
        if b not in out:
            out.append(b)
    if not out:
        raise ValueError("at least one PCR bank is required")
    return tuple(sorted(out, key=lambda n: ALGS[n].alg_id))


def bank_bitmap(banks: Iterable[str]) -> int:
    m = 0
    for b in banks:
        m |= ALGS[b].bit
    return m


def hash_all(data: bytes, banks: Iterable[str]) -> dict[str, bytes]:
    return {b: hashlib.new(b, data).digest() for b in banks}


# --- event types (PFP 1.05 §10.4.1) -------------------------------------------------------------

EV_PREBOOT_CERT = 0x0
EV_POST_CODE = 0x1
EV_UNUSED = 0x2
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_ACTION = 0x5
EV_EVENT_TAG = 0x6
EV_S_CRTM_CONTENTS = 0x7
EV_S_CRTM_VERSION = 0x8
EV_CPU_MICROCODE = 0x9
EV_PLATFORM_CONFIG_FLAGS = 0xA
EV_TABLE_OF_DEVICES = 0xB
EV_COMPACT_HASH = 0xC
EV_IPL = 0xD
EV_IPL_PARTITION_DATA = 0xE
EV_NONHOST_CODE = 0xF
EV_NONHOST_CONFIG = 0x10
EV_NONHOST_INFO = 0x11
EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
EV_EFI_EVENT_BASE = 0x80000000
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_BOOT2 = 0x8000000C
EV_EFI_GPT_EVENT2 = 0x8000000D
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2

EVENT_TYPE_NAMES = {v: k for k, v in dict(globals()).items()
                    if k.startswith("EV_") and isinstance(v, int) and k != "EV_EFI_EVENT_BASE"}


def event_type_name(t: int) -> str:
    return EVENT_TYPE_NAMES.get(t, f"{t:#010x}")


# the strings EDK2 measures (MdePkg UefiTcgPlatform.h), logged without a NUL
CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
RETURNING_FROM_EFI_APPLICATION = b"Returning from EFI Application from Boot Option"
EXIT_BOOT_SERVICES_INVOCATION = b"Exit Boot Services Invocation"
EXIT_BOOT_SERVICES_FAILED = b"Exit Boot Services Returned with Failure"
EXIT_BOOT_SERVICES_SUCCEEDED = b"Exit Boot Services Returned with Success"
SEPARATOR_DATA = b"\0\0\0\0"

SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"


# --- PCR banks ----------------------------------------------------------------------------------

def initial_pcr(index: int, alg: str, locality: int = 0) -> bytes:
    """The reset value: zero, except PCR 17-22 (all ones, PC Client PTP) and PCR 0 after a
    TPM2_Startup at locality 3/4 (the locality in the last byte, PFP §10.4.5.3)."""
    size = ALGS[alg].size
    if 17 <= index <= 22:
        return b"\xff" * size
    if index == 0 and locality:
        return bytes(size - 1) + bytes([locality])
    return bytes(size)


class PcrBanks:
    """PCR 0-23 in each configured bank; ``extend`` is TPM2_PCR_Extend."""

    def __init__(self, banks: Iterable[str] = ("sha256",),
                 base: Mapping[str, Mapping[int, bytes]] | None = None, *, locality: int = 0):
        self.banks = canonical_banks(banks)
        self.pcrs: dict[str, list[bytes]] = {
            b: [initial_pcr(i, b, locality) for i in range(NUM_PCRS)] for b in self.banks}
        for b, values in (base or {}).items():
            if b not in self.pcrs:
                raise ValueError(f"base value for bank {b!r}, which is not configured")
            for i, v in values.items():
                self._check(b, i, v)
                self.pcrs[b][i] = bytes(v)

    def _check(self, bank: str, index: int, digest: bytes) -> None:
        if not 0 <= index <= MAX_PCR_INDEX:
            raise ValueError(f"PCR index {index} out of range 0-{MAX_PCR_INDEX}")
        if len(digest) != ALGS[bank].size:
            raise ValueError(f"{bank} digest of {len(digest)} bytes (need {ALGS[bank].size})")

    def extend(self, index: int, digests: Mapping[str, bytes]) -> None:
        """Extend every configured bank: new = H(old || digest). A digest for every bank is
        required (as a TPM2_PCR_Extend with a full TPML_DIGEST_VALUES)."""
        missing = [b for b in self.banks if b not in digests]
        if missing:
            raise ValueError(f"no digest for bank(s) {', '.join(missing)}")
        for b in self.banks:
            d = digests[b]
            self._check(b, index, d)
        for b in self.banks:
            self.pcrs[b][index] = hashlib.new(b, self.pcrs[b][index] + digests[b]).digest()

    def extend_data(self, index: int, data: bytes) -> dict[str, bytes]:
        d = hash_all(data, self.banks)
        self.extend(index, d)
        return d

    def read(self, index: int, bank: str = "sha256") -> bytes:
        return self.pcrs[bank][index]

    def values(self) -> dict[str, dict[int, bytes]]:
        return {b: dict(enumerate(v)) for b, v in self.pcrs.items()}


# --- events -------------------------------------------------------------------------------------

@dataclass
class Event:
    pcr: int
    event_type: int
    digests: dict[str, bytes]   # bank name -> digest, in log order
    data: bytes
    sha1_format: bool = False   # TCG_PCR_EVENT (only the first, Spec ID, event)
    offset: int | None = None   # byte offset in the log it was parsed from / written to

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def to_bytes(self, alg_sizes: Mapping[str, int] | None = None) -> bytes:
        if self.sha1_format:
            digest = self.digests.get("sha1", bytes(20))
            size = U.TCG_PCR_EVENT.Digest.size
            head = U.TCG_PCR_EVENT(PCRIndex=self.pcr, EventType=self.event_type, EventSize=len(self.data))
            head.Digest[:] = digest[:size].ljust(size, b"\0")
            return bytes(head) + self.data
        parts = [struct.pack("<III", self.pcr, self.event_type, len(self.digests))]
        for name, d in self.digests.items():
            alg_id = ALGS[name].alg_id if name in ALGS else _id_from_name(name)
            if alg_sizes is not None and name in alg_sizes and alg_sizes[name] != len(d):
                raise ValueError(f"{name} digest of {len(d)} bytes in a log that says {alg_sizes[name]}")
            parts.append(struct.pack("<H", alg_id) + d)
        parts.append(struct.pack("<I", len(self.data)))
        parts.append(self.data)
        return b"".join(parts)


def _id_from_name(name: str) -> int:
    for k, v in _OTHER_ALG_NAMES.items():
        if v == name:
            return k
    if name.startswith("alg_"):
        return int(name[4:], 16)
    raise ValueError(f"unknown algorithm {name!r}")


@dataclass
class SpecId:
    """TCG_EfiSpecIDEventStruct (PFP §10.4.5.1)."""
    algorithms: list[tuple[int, int]]  # (TPM_ALG_ID, digest size)
    platform_class: int = 0
    spec_version: tuple[int, int] = (2, 0)   # major, minor
    spec_errata: int = 0
    uintn_size: int = 2
    vendor_info: bytes = b""

    def to_bytes(self) -> bytes:
        major, minor = self.spec_version
        head = U.TCG_EfiSpecIDEventStruct(platformClass=self.platform_class, specVersionMinor=minor,
                                          specVersionMajor=major, specErrata=self.spec_errata,
                                          uintnSize=self.uintn_size, numberOfAlgorithms=len(self.algorithms))
        head.signature[:] = SPEC_ID_SIGNATURE
        sizes = (U.TCG_EfiSpecIdEventAlgorithmSize * len(self.algorithms))(*self.algorithms)
        return bytes(head) + bytes(sizes) + bytes([len(self.vendor_info)]) + self.vendor_info

    @classmethod
    def parse(cls, data: bytes) -> "SpecId":
        data = bytes(data)
        if len(data) < _SPEC_ID_ALGORITHMS + 1 or data[:16] != SPEC_ID_SIGNATURE:
            raise ValueError("first event is not a 'Spec ID Event03' (not a crypto-agile log)")
        head = U.TCG_EfiSpecIDEventStruct.from_buffer_copy(data)
        n = head.numberOfAlgorithms
        size = ctypes.sizeof(U.TCG_EfiSpecIdEventAlgorithmSize)
        if n == 0 or _SPEC_ID_ALGORITHMS + size * n + 1 > len(data):
            raise ValueError(f"Spec ID event with {n} algorithms does not fit its {len(data)} bytes")
        sizes = (U.TCG_EfiSpecIdEventAlgorithmSize * n).from_buffer_copy(data, _SPEC_ID_ALGORITHMS)
        algs = [(a.algorithmId, a.digestSize) for a in sizes]
        pos = _SPEC_ID_ALGORITHMS + size * n
        vlen = data[pos]
        if pos + 1 + vlen > len(data):
            raise ValueError("Spec ID event vendorInfo overruns the event")
        return cls(algs, head.platformClass, (head.specVersionMajor, head.specVersionMinor), head.specErrata,
                   head.uintnSize, data[pos + 1:pos + 1 + vlen])

    @property
    def sizes(self) -> dict[str, int]:
        return {alg_name(a): s for a, s in self.algorithms}


class EventLogFull(Exception):
    """The event would not fit the log area (the log is now marked truncated)."""


class EventLog:
    """A crypto-agile event log being built: the Spec ID event, then TCG_PCR_EVENT2 records."""

    def __init__(self, banks: Iterable[str] = ("sha256",), *, spec_id: SpecId | None = None,
                 max_size: int | None = None):
        self.banks = canonical_banks(banks)
        self.spec_id = spec_id or SpecId([(ALGS[b].alg_id, ALGS[b].size) for b in self.banks])
        self.max_size = max_size
        self.truncated = False
        header = Event(0, EV_NO_ACTION, {"sha1": bytes(20)}, self.spec_id.to_bytes(), sha1_format=True,
                       offset=0)
        self.events: list[Event] = [header]
        self._raw = bytearray(header.to_bytes())

    @property
    def size(self) -> int:
        return len(self._raw)

    @property
    def last_offset(self) -> int:
        return self.events[-1].offset or 0

    def record(self, pcr: int, event_type: int, digests: Mapping[str, bytes], event_data: bytes) -> Event:
        """An Event (not yet appended) with the log's banks in the log's order."""
        missing = [b for b in self.banks if b not in digests]
        if missing:
            raise ValueError(f"no digest for bank(s) {', '.join(missing)}")
        ordered = {}
        for b in self.banks:
            if len(digests[b]) != ALGS[b].size:
                raise ValueError(f"{b} digest of {len(digests[b])} bytes")
            ordered[b] = bytes(digests[b])
        return Event(pcr, event_type, ordered, bytes(event_data))

    def append(self, pcr: int, event_type: int, digests: Mapping[str, bytes], event_data: bytes) -> Event:
        """Append one TCG_PCR_EVENT2; raises EventLogFull (and sets ``truncated``) when
        ``max_size`` would be exceeded, as EDK2's TcgDxeLogEvent does."""
        ev = self.record(pcr, event_type, digests, event_data)
        raw = ev.to_bytes()
        if self.truncated or (self.max_size is not None and self.size + len(raw) > self.max_size):
            self.truncated = True
            raise EventLogFull(f"event of {len(raw)} bytes does not fit ({self.size}/{self.max_size})")
        ev.offset = self.size
        self._raw += raw
        self.events.append(ev)
        return ev

    def to_bytes(self) -> bytes:
        return bytes(self._raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EventLog":
        events = parse(data)
        spec = SpecId.parse(events[0].data)
        log = cls([alg_name(a) for a, _ in spec.algorithms if alg_name(a) in ALGS], spec_id=spec)
        log.events = events
        log._raw = bytearray(data[:_end_of(events)])
        return log


def _end_of(events: list[Event]) -> int:
    last = events[-1]
    return (last.offset or 0) + len(last.to_bytes())


def parse(data: bytes) -> list[Event]:
    """Parse a crypto-agile log (e.g. /sys/kernel/security/tpm0/binary_bios_measurements or our
    to_bytes()). Parsing stops at the end of the data or at padding (an all-0xFF or all-zero
    header, as an EDK2 log area filled with 0xFF shows after its last event)."""
    data = bytes(data)
    if len(data) < _PCR_EVENT_DATA:
        raise ValueError(f"event log of {len(data)} bytes is too short")
    head = U.TCG_PCR_EVENT.from_buffer_copy(data)
    pcr, etype, esize = head.PCRIndex, head.EventType, head.EventSize
    if etype != EV_NO_ACTION or pcr != 0 or _PCR_EVENT_DATA + esize > len(data):
        raise ValueError("the first event is not an EV_NO_ACTION Spec ID event")
    first = Event(pcr, etype, {"sha1": bytes(head.Digest)}, data[_PCR_EVENT_DATA:_PCR_EVENT_DATA + esize],
                  sha1_format=True, offset=0)
    spec = SpecId.parse(first.data)
    sizes = dict(spec.algorithms)
    events = [first]
    pos = _PCR_EVENT_DATA + esize
    while pos + 12 <= len(data):
        pcr, etype, count = struct.unpack_from("<III", data, pos)
        if (pcr, etype) in ((0xFFFFFFFF, 0xFFFFFFFF), (0, 0)) and count in (0, 0xFFFFFFFF):
            break  # padding after the last event
        p = pos + 12
        if count > len(spec.algorithms) * 4 or count == 0:
            raise ValueError(f"event at offset {pos:#x}: {count} digests")
        digests: dict[str, bytes] = {}
        for _ in range(count):
            if p + 2 > len(data):
                raise ValueError(f"event at offset {pos:#x} is truncated")
            (alg,) = struct.unpack_from("<H", data, p)
            if alg not in sizes:
                raise ValueError(f"event at offset {pos:#x}: algorithm {alg:#06x} is not in the Spec ID event")
            digests[alg_name(alg)] = data[p + 2:p + 2 + sizes[alg]]
            p += 2 + sizes[alg]
        if p + 4 > len(data):
            raise ValueError(f"event at offset {pos:#x} is truncated")
        (esize,) = struct.unpack_from("<I", data, p)
        p += 4
        if p + esize > len(data):
            raise ValueError(f"event at offset {pos:#x}: {esize} data bytes overrun the log")
        events.append(Event(pcr, etype, digests, data[p:p + esize], offset=pos))
        pos = p + esize
    return events


def startup_locality(events: Iterable[Event]) -> int:
    size = ctypes.sizeof(U.TCG_EfiStartupLocalityEvent)
    for ev in events:
        if ev.event_type == EV_NO_ACTION and ev.data[:16] == STARTUP_LOCALITY_SIGNATURE and len(ev.data) >= size:
            return U.TCG_EfiStartupLocalityEvent.from_buffer_copy(ev.data).StartupLocality
    return 0


def replay(events: Iterable[Event], banks: Iterable[str] = ("sha256",),
           base: Mapping[str, Mapping[int, bytes]] | None = None) -> dict[str, dict[int, bytes]]:
    """PCR values a TPM would hold after the log's extends (EV_NO_ACTION is never extended; a
    StartupLocality event sets PCR 0's reset value)."""
    events = list(events)
    pcrs = PcrBanks(banks, base, locality=startup_locality(events))
    for ev in events:
        if ev.sha1_format or ev.event_type == EV_NO_ACTION:
            continue
        pcrs.extend(ev.pcr, {b: ev.digests[b] for b in pcrs.banks})
    return pcrs.values()


# --- event data -------------------------------------------------------------------------------

def image_load_event(image_address: int, image_length: int, link_time_address: int,
                     device_path: bytes) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT (PFP §10.2.4; EDK2 EFI_IMAGE_LOAD_EVENT, packed, UINTN = 8)."""
    return bytes(U.UEFI_IMAGE_LOAD_EVENT(ImageLocationInMemory=image_address, ImageLengthInMemory=image_length,
                                         ImageLinkTimeAddress=link_time_address,
                                         LengthOfDevicePath=len(device_path))) + device_path


def variable_data(name: str, guid: uuid.UUID, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA (PFP §10.2.6): GUID, name length in CHAR16, data length, name, data."""
    head = U.UEFI_VARIABLE_DATA(VariableName=U.EFI_GUID.from_uuid(guid), UnicodeNameLength=len(name),
                                VariableDataLength=len(data))
    return bytes(head) + name.encode("utf-16-le") + data


def tagged_event(tag: int, data: bytes) -> bytes:
    """TCG_PCClientTaggedEvent (PFP §10.2.3)."""
    return bytes(U.TCG_PCClientTaggedEvent(taggedEventID=tag, taggedEventDataSize=len(data))) + data


# --- Authenticode PE digest (EDK2 MeasurePeImageAndExtend) -------------------------------------

class PeHashError(ValueError):
    pass


#: authenticode_digests hashes in pieces of this size and calls its ``tick`` between them
HASH_CHUNK = 16 << 20


def authenticode_digests(pe: bytes, algs: Iterable[str] = ("sha256",), *,
                         tick: Callable[[], None] | None = None) -> dict[str, bytes]:
    """The PE/COFF image hash as EDK2's MeasurePeImageAndExtend computes it over a file image
    (Authenticode, PE/COFF spec appendix "Calculating the PE Image Hash"): headers without the
    CheckSum and the Certificate Table directory entry, the sections with raw data in file
    order, then the data after SUM_OF_BYTES_HASHED up to FileSize - CertificateTable.Size.

    The sections' raw data may overlap (EDK2 hashes each anyway), so the work can be up to
    65535 times the file's size: ``tick()`` (the run's deadline check) is called before every
    :data:`HASH_CHUNK` bytes hashed."""
    pe = memoryview(bytes(pe))
    n = len(pe)

    def u16(o):
        return struct.unpack_from("<H", pe, o)[0]

    def u32(o):
        return struct.unpack_from("<I", pe, o)[0]

    try:
        nt = u32(0x3C) if u16(0) == 0x5A4D else 0
        if pe[nt:nt + 4] != b"PE\0\0":
            raise PeHashError("no PE signature")
        coff = nt + 4
        nsect, opt_size = u16(coff + 2), u16(coff + 16)
        opt = coff + 20
        magic = u16(opt)
        if magic == 0x10B:
            dd, nrva_off = opt + 96, opt + 92
        elif magic == 0x20B:
            dd, nrva_off = opt + 112, opt + 108
        else:
            raise PeHashError(f"optional header magic {magic:#x}")
        checksum = opt + 64
        size_of_headers = u32(opt + 60)
        nrva = u32(nrva_off)
        sect_table = opt + opt_size
        if size_of_headers > n or sect_table + 40 * nsect > n:
            raise PeHashError("headers overrun the file")
        sections = []
        for i in range(nsect):
            s = sect_table + 40 * i
            sections.append((u32(s + 20), u32(s + 16)))  # PointerToRawData, SizeOfRawData
    except struct.error as e:
        raise PeHashError(f"truncated PE headers: {e}") from None

    hs = {a: hashlib.new(a) for a in algs}

    def update(lo: int, hi: int) -> None:
        if hi < lo or hi > n:
            raise PeHashError(f"range {lo:#x}-{hi:#x} outside the {n:#x}-byte file")
        for at in range(lo, hi, HASH_CHUNK):
            if tick is not None:
                tick()
            chunk = pe[at:min(at + HASH_CHUNK, hi)]
            for h in hs.values():
                h.update(chunk)

    SECURITY = 4
    update(0, checksum)
    if nrva <= SECURITY:
        update(checksum + 4, size_of_headers)
        cert_size = 0
    else:
        cert_entry = dd + 8 * SECURITY
        update(checksum + 4, cert_entry)
        update(cert_entry + 8, size_of_headers)
        cert_size = u32(cert_entry + 4)
    hashed = size_of_headers
    for ptr, size in sorted(sections, key=lambda s: s[0]):  # stable, like EDK2's insertion sort
        if size == 0:
            continue
        update(ptr, ptr + size)
        hashed += size
    if n > hashed:
        if n > hashed + cert_size:
            update(hashed, n - cert_size)
        elif n < hashed + cert_size:
            raise PeHashError("certificate table size exceeds the unhashed tail of the file")
    return {a: h.digest() for a, h in hs.items()}


# --- pretty printer -----------------------------------------------------------------------------

def _ucs2(b: bytes) -> str:
    return b.decode("utf-16-le", "replace")


def describe_event_data(ev: Event) -> str:
    d, t = ev.data, ev.event_type
    from hostsvc import kexeclog   # its events are built from this module's
    info = kexeclog.decode(ev)
    if info is not None:
        return kexeclog.describe(info)
    try:
        if ev.sha1_format and d[:16] == SPEC_ID_SIGNATURE:
            s = SpecId.parse(d)
            algs = ", ".join(f"{alg_name(a)}({sz})" for a, sz in s.algorithms)
            return (f"Spec ID Event03: platformClass {s.platform_class}, spec {s.spec_version[0]}."
                    f"{s.spec_version[1]} errata {s.spec_errata}, uintnSize {s.uintn_size}, algorithms {algs}")
        if t == EV_NO_ACTION and d[:16] == STARTUP_LOCALITY_SIGNATURE:
            return f"StartupLocality {U.TCG_EfiStartupLocalityEvent.from_buffer_copy(d).StartupLocality}"
        if t in (EV_EFI_ACTION, EV_ACTION, EV_IPL, EV_POST_CODE, EV_S_CRTM_VERSION, EV_COMPACT_HASH):
            if t == EV_S_CRTM_VERSION and len(d) % 2 == 0:
                return repr(_ucs2(d).rstrip("\0"))
            return repr(d.decode("latin-1"))
        if t == EV_SEPARATOR:
            return f"separator {d.hex()}"
        if t in (EV_EFI_BOOT_SERVICES_APPLICATION, EV_EFI_BOOT_SERVICES_DRIVER,
                 EV_EFI_RUNTIME_SERVICES_DRIVER) and len(d) >= ctypes.sizeof(U.UEFI_IMAGE_LOAD_EVENT):
            load = U.UEFI_IMAGE_LOAD_EVENT.from_buffer_copy(d)
            addr, length, link = load.ImageLocationInMemory, load.ImageLengthInMemory, load.ImageLinkTimeAddress
            at = U.UEFI_IMAGE_LOAD_EVENT.DevicePath.offset
            dp = d[at:at + load.LengthOfDevicePath]
            try:
                from hostsvc.devicepath import to_text
                dpt = to_text(dp) if dp else "(none)"
            except Exception:  # noqa: BLE001 - a log from elsewhere may hold anything
                dpt = dp.hex()
            return f"image at {addr:#x} length {length:#x} link-time {link:#x} path {dpt}"
        if t in (EV_EFI_VARIABLE_DRIVER_CONFIG, EV_EFI_VARIABLE_BOOT, EV_EFI_VARIABLE_BOOT2,
                 EV_EFI_VARIABLE_AUTHORITY) and len(d) >= ctypes.sizeof(U.UEFI_VARIABLE_DATA):
            var = U.UEFI_VARIABLE_DATA.from_buffer_copy(d)
            guid, nlen, dlen = var.VariableName.uuid, var.UnicodeNameLength, var.VariableDataLength
            at = U.UEFI_VARIABLE_DATA.UnicodeName.offset
            name = _ucs2(d[at:at + 2 * nlen])
            vd = d[at + 2 * nlen:at + 2 * nlen + dlen]
            shown = vd.hex() if len(vd) <= 32 else vd[:32].hex() + f"... ({len(vd)} bytes)"
            return f"variable {name}-{guid} = {shown or '(empty)'}"
        if t == EV_EVENT_TAG and len(d) >= ctypes.sizeof(U.TCG_PCClientTaggedEvent):
            tagged = U.TCG_PCClientTaggedEvent.from_buffer_copy(d)
            tag, size = tagged.taggedEventID, tagged.taggedEventDataSize
            at = U.TCG_PCClientTaggedEvent.taggedEventData.offset
            payload = d[at:at + size]
            text = payload.decode("latin-1") if all(32 <= c < 127 or c == 0 for c in payload) else payload.hex()
            return f"tag {tag:#x}: {text!r}"
    except (struct.error, ValueError, IndexError):
        pass
    return d.hex() if len(d) <= 48 else d[:48].hex() + f"... ({len(d)} bytes)"


def format_log(events: Iterable[Event], banks: Iterable[str] | None = None) -> str:
    """A human-readable listing plus the replayed PCR values (for ``vmrun eventlog FILE``)."""
    events = list(events)
    out = []
    for i, ev in enumerate(events):
        out.append(f"#{i} PCR {ev.pcr} {ev.type_name} ({len(ev.data)} bytes)")
        for name, d in ev.digests.items():
            out.append(f"    {name}: {d.hex()}")
        out.append(f"    {describe_event_data(ev)}")
    if banks is None:
        present = [n for n in (events[1].digests if len(events) > 1 else {}) if n in ALGS]
        banks = present or ["sha256"]
    vals = replay(events, banks)
    used = sorted({ev.pcr for ev in events[1:] if ev.event_type != EV_NO_ACTION})
    for b in canonical_banks(banks):
        out.append(f"{b}:")
        for i in used:
            out.append(f"  {i:2d}: {vals[b][i].hex()}")
    return "\n".join(out) + "\n"
