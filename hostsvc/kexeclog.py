"""The events vmrun adds to an event log it carries across a kexec ("measured kexec").

A kexec'd kernel's log is the machine's firmware log, then a *carried section* of fixed size,
then the kexec boundary, then the payload's own measurements::

    [firmware log, as the running kernel has it (binary_bios_measurements)]
    [carried section: userspace extends since boot; PCR-state markers; a not-measured marker; padding]
    [PCR 4 EV_EFI_ACTION "vmrun: kexec boundary"]
    [the payload's measurements: PCR 4 images, 9, 11, 12, 13, PCR 5 ExitBootServices, …]

The section is written when the payload is staged and rewritten in the frozen image just
before the kexec (in the payload's copy of the log, whose size field follows), so it can
describe every extend made up to that moment. PCR-state markers for PCRs changed after that
(a second finalize) go at the end of the EFI final events table, which the kernel reads last. Its events:

- a carried userspace record: PCR n, EV_EVENT_TAG, TCG_PCClientTaggedEvent with
  taggedEventID :data:`CARRIED_RECORD_TAG`; the digests are the record's, the tagged data is
  the record's text (systemd's CEL-JSON record from tpm2-measure.log);
- a PCR-state marker (:data:`SIG_PCR_STATE`): EV_NO_ACTION (never extended), PCR n; the log
  cannot explain PCR n's value, and from this point PCR n holds the values the marker gives;
- a not-measured marker (:data:`SIG_NOT_MEASURED`): EV_NO_ACTION, PCR 4 (the boundary's): of
  the events after the section (boundary first), only the first ``measured`` were extended
  into the TPM;
- an unlogged-extends marker (:data:`SIG_UNLOGGED`): EV_NO_ACTION, PCR n: ``count`` of the
  payload's extends of PCR n (after the boundary) are in the TPM but not in this log (the
  payload asked EFI_TCG2_EXTEND_ONLY, or the log area or the final events table was full);
- padding (:data:`SIG_PADDING`): EV_NO_ACTION, PCR 0, filling the section to its size while
  the payload runs; the kernel after the kexec never sees it (the section is written compactly
  into the payload's copy of the log, and the copy's size field is lowered).

EV_NO_ACTION events carry zero digests and are never extended (TCG PC Client PFP §10.4.1).
Some replay tools extend them anyway (tpm2-tools before 5.6, fwupd): a marker therefore sits on
the PCR it is about (PCR-state: a PCR the log cannot replay anyway; not-measured: the boundary's
PCR 4, which the unmeasured boundary leaves unreplayable), so such a tool is wrong only where
the log already says it cannot be right. The layout of their data follows the PFP's own
EV_NO_ACTION events (a 16-byte NUL-padded signature first):

    PCR state:    signature "VmrunPcrState" · UINT32 reason · UINT32 numberOfDigests ·
                  numberOfDigests × { UINT16 algorithmId, UINT16 digestSize,
                                      BYTE logValue[digestSize], BYTE tpmValue[digestSize] }
    not measured: signature "VmrunUnmeasured" · UINT32 reason · UINT32 measured · UINT32 total
    unlogged:     signature "VmrunUnlogged" · UINT32 count
    padding:      signature "VmrunPadding" · zero bytes

All integers little-endian, as the rest of the log.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

from hostsvc import tpm as T

BOUNDARY_PCR = 4
BOUNDARY_TYPE = T.EV_EFI_ACTION
BOUNDARY_DATA = b"vmrun: kexec boundary"

CARRIED_RECORD_TAG = 0x564D5201          # "VMR" 1
SIG_PCR_STATE = b"VmrunPcrState\0\0\0"
SIG_NOT_MEASURED = b"VmrunUnmeasured\0"
SIG_PADDING = b"VmrunPadding\0\0\0\0"
SIG_UNLOGGED = b"VmrunUnlogged\0\0\0"

# PCR-state reasons
UNEXPLAINED = 1      # extends with no record (or records that do not add up)
IMA = 2              # PCR 10: IMA's own measurement list, not carried into this log
LATE = 3             # changed after the kexec was finalized (at the end of the final events table)
STATE_REASONS = {UNEXPLAINED: "unexplained", IMA: "ima", LATE: "after_finalize"}

# not-measured reasons
NOT_FINALIZED = 1    # kexec'd without vmrun extending the TPM (e.g. `kexec -e` alone)
CRASH_KERNEL = 2     # a kdump kernel: nothing is extended when the crash kernel starts
PARTIAL = 3          # the TPM refused an extend part-way
NOT_MEASURED_REASONS = {NOT_FINALIZED: "not_finalized", CRASH_KERNEL: "crash_kernel", PARTIAL: "partial"}

#: default size of the carried section (room for about 90 carried records and 24 markers)
DEFAULT_SECTION_SIZE = 64 << 10


class SectionFull(ValueError):
    pass


@dataclass
class PcrState:
    pcr: int
    reason: int
    log_values: dict[str, bytes]     # what the log before this marker replays to
    tpm_values: dict[str, bytes]     # what the TPM holds

    def to_json(self) -> dict:
        return {"pcr": self.pcr, "reason": STATE_REASONS.get(self.reason, str(self.reason)),
                "log": {b: v.hex() for b, v in self.log_values.items()},
                "tpm": {b: v.hex() for b, v in self.tpm_values.items()}}


def _zero(banks: Iterable[str]) -> dict[str, bytes]:
    return {b: bytes(T.ALGS[b].size) for b in banks}


def carried_record(pcr: int, digests: Mapping[str, bytes], text: bytes, banks: Iterable[str]) -> T.Event:
    banks = list(banks)
    return T.Event(pcr, T.EV_EVENT_TAG, {b: bytes(digests[b]) for b in banks},
                   T.tagged_event(CARRIED_RECORD_TAG, bytes(text)))


def pcr_state(state: PcrState, banks: Iterable[str]) -> T.Event:
    banks = list(banks)
    body = [SIG_PCR_STATE, struct.pack("<II", state.reason, len(banks))]
    for b in banks:
        a = T.ALGS[b]
        body.append(struct.pack("<HH", a.alg_id, a.size) + state.log_values[b] + state.tpm_values[b])
    return T.Event(state.pcr, T.EV_NO_ACTION, _zero(banks), b"".join(body))


def not_measured(reason: int, measured: int, total: int, banks: Iterable[str]) -> T.Event:
    return T.Event(BOUNDARY_PCR, T.EV_NO_ACTION, _zero(banks), SIG_NOT_MEASURED + struct.pack("<III", reason, measured, total))


def unlogged(pcr: int, count: int, banks: Iterable[str]) -> T.Event:
    return T.Event(pcr, T.EV_NO_ACTION, _zero(banks), SIG_UNLOGGED + struct.pack("<I", count))


def boundary_event(banks: Iterable[str]) -> tuple[int, int, bytes, dict[str, bytes]]:
    """(pcr, type, data, digests) of the kexec boundary: the digests hash the data."""
    return BOUNDARY_PCR, BOUNDARY_TYPE, BOUNDARY_DATA, T.hash_all(BOUNDARY_DATA, banks)


def _header_size(banks: Iterable[str]) -> int:
    return 12 + sum(2 + T.ALGS[b].size for b in banks) + 4


def build_section(events: list[T.Event], banks: Iterable[str], size: int) -> list[T.Event]:
    """``events`` followed by one padding event, exactly ``size`` bytes in the log; raises
    SectionFull when they do not fit with room for the padding."""
    banks = list(banks)
    used = sum(len(e.to_bytes()) for e in events)
    pad_min = _header_size(banks) + len(SIG_PADDING)
    left = size - used
    if left < pad_min:
        raise SectionFull(f"{used} bytes of carried events do not fit a {size}-byte section")
    pad = T.Event(0, T.EV_NO_ACTION, _zero(banks), SIG_PADDING + bytes(left - pad_min))
    out = list(events) + [pad]
    assert sum(len(e.to_bytes()) for e in out) == size
    return out


def fit_section(events: list[T.Event], size: int) -> list[T.Event]:
    """``events`` unpadded, after checking they fit ``size`` bytes (raises SectionFull)."""
    used = sum(len(e.to_bytes()) for e in events)
    if used > size:
        raise SectionFull(f"{used} bytes of carried events do not fit a {size}-byte section")
    return list(events)


def section_bytes(events: list[T.Event]) -> bytes:
    return b"".join(e.to_bytes() for e in events)


# --- reading them back ---------------------------------------------------------------------

def decode(ev: T.Event) -> dict | None:
    """What a vmrun event says, or None for any other event."""
    d = ev.data
    if ev.event_type == T.EV_NO_ACTION and d[:16] == SIG_PCR_STATE and len(d) >= 24:
        reason, n = struct.unpack_from("<II", d, 16)
        at, banks = 24, {}
        for _ in range(min(n, 16)):
            if at + 4 > len(d):
                return None
            alg, size = struct.unpack_from("<HH", d, at)
            at += 4
            if at + 2 * size > len(d):
                return None
            banks[T.alg_name(alg)] = (d[at:at + size], d[at + size:at + 2 * size])
            at += 2 * size
        return {"kind": "pcr_state", "pcr": ev.pcr, "reason": STATE_REASONS.get(reason, str(reason)),
                "log": {b: v[0].hex() for b, v in banks.items()}, "tpm": {b: v[1].hex() for b, v in banks.items()}}
    if ev.event_type == T.EV_NO_ACTION and d[:16] == SIG_NOT_MEASURED and len(d) >= 28:
        reason, measured, total = struct.unpack_from("<III", d, 16)
        return {"kind": "not_measured", "reason": NOT_MEASURED_REASONS.get(reason, str(reason)),
                "measured": measured, "total": total}
    if ev.event_type == T.EV_NO_ACTION and d[:16] == SIG_UNLOGGED and len(d) >= 20:
        return {"kind": "unlogged", "pcr": ev.pcr, "count": struct.unpack_from("<I", d, 16)[0]}
    if ev.event_type == T.EV_NO_ACTION and d[:16] == SIG_PADDING:
        return {"kind": "padding", "bytes": len(d)}
    if ev.event_type == BOUNDARY_TYPE and ev.pcr == BOUNDARY_PCR and d == BOUNDARY_DATA:
        return {"kind": "boundary"}
    if ev.event_type == T.EV_EVENT_TAG and len(d) >= 8 and struct.unpack_from("<I", d)[0] == CARRIED_RECORD_TAG:
        return {"kind": "carried_record", "pcr": ev.pcr, "record": d[8:].decode("utf-8", "replace")}
    return None


def describe(info: dict) -> str:
    """One line for ``vmrun eventlog``."""
    k = info["kind"]
    if k == "pcr_state":
        held = ", ".join(f"{b} {v[:16]}…" for b, v in info["tpm"].items())
        return f"vmrun PCR state: PCR {info['pcr']} {info['reason']}; from here the TPM holds {held}"
    if k == "not_measured":
        return (f"vmrun not measured ({info['reason']}): of the {info['total']} events after the boundary "
                f"(itself included), the TPM has the first {info['measured']}")
    if k == "unlogged":
        return f"vmrun unlogged: {info['count']} extend(s) of PCR {info['pcr']} after the boundary are not in this log"
    if k == "padding":
        return f"vmrun padding ({info['bytes']} bytes)"
    if k == "boundary":
        return f"vmrun kexec boundary {BOUNDARY_DATA.decode()!r}"
    return f"vmrun carried userspace record: {info['record']}"


def replay_with_markers(events: Iterable[T.Event], banks: Iterable[str]) -> dict[str, dict[int, bytes]]:
    """A replay that honours PCR-state markers (from a marker on, the PCR holds the marker's
    TPM value) — what a verifier that knows this format computes. EV_NO_ACTION events are
    otherwise not extended, as in :func:`hostsvc.tpm.replay`."""
    events = list(events)
    banks = T.canonical_banks(banks)
    pcrs = T.PcrBanks(banks, locality=T.startup_locality(events))
    for ev in events:
        if ev.sha1_format:
            continue
        if ev.event_type == T.EV_NO_ACTION:
            info = decode(ev)
            if info and info["kind"] == "pcr_state":
                for b in banks:
                    if b in info["tpm"]:
                        pcrs.pcrs[b][ev.pcr] = bytes.fromhex(info["tpm"][b])
            continue
        pcrs.extend(ev.pcr, {b: ev.digests[b] for b in banks})
    return pcrs.values()


def extend(value: bytes, digest: bytes, bank: str) -> bytes:
    return hashlib.new(bank, value + digest).digest()
