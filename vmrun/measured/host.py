"""Measured kexec on a machine with a TPM 2.0: stage against the real TPM, extend it just before
the kexec, and hand the next kernel a log that replays to it.

When a payload is staged (``vmrun stage``/``load`` with ``--tpm=host``, the default when
``/dev/tpmrm0`` exists), :func:`snapshot` reads the TPM's active banks and PCRs, the firmware's
event log (``binary_bios_measurements``) and systemd's userspace log, and
:func:`vmrun.measured.carry.explain` works out what the log can explain. The payload's
EFI_TCG2_PROTOCOL mirrors that TPM (:class:`hostsvc.protocols.tcg2.Mirror`): same banks, PCRs
continuing from the TPM's, a log that starts with the firmware log and the carried section,
then the kexec boundary and the payload's own measurements. Nothing is extended then: staging,
loading and arming kdump leave the PCRs as they are.

After the run, :func:`finish_stage` finds the copy of the log the payload handed on (Linux's
LINUX_EFI_TPM_EVENT_LOG configuration table) and writes the section into it, saying the events
after it were *not* measured (``not_finalized``; ``crash_kernel`` for kdump), so a kexec that
does not go through vmrun still boots a log that tells the truth. The plan saved with the handoff
(:func:`plan`) lists the boundary and every extend the payload made.

Just before the kexec (``vmrun exec``, ``vmrun kexec -e``, the service's Exec, or systemd's
system-shutdown hook after every unit has stopped), :func:`finalize` reads the TPM again,
re-explains its PCRs (userspace extends made since staging, e.g. at shutdown, are carried now),
extends the TPM with the planned events in order, rewrites the section (without the
not-measured marker; with a ``partial`` one if the TPM refused part-way), loads the handoff
again with kexec_load(2), and reads the PCRs back to check them against the prediction.
"""

from __future__ import annotations

import datetime
import hashlib
import struct
from dataclasses import dataclass

import structlog

from hostsvc import guids as G
from hostsvc import kexeclog as KL
from hostsvc import tpm as T
from vmrun.errors import VmrunError
from vmrun.measured import userlog
from vmrun.measured.carry import Explanation, explain
from vmrun.measured.hosttpm import HostTpm, PartialExtend, TpmBankMismatch, TpmError

log = structlog.get_logger("vmrun.measured")

FIRMWARE_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
MAX_FIRMWARE_LOG = 16 << 20
#: struct linux_efi_tpm_eventlog (include/linux/efi.h): u32 size, u32 final_events_preboot_size,
#: u8 version, then the log
LINUX_LOG_HEADER = 9


class MeasuredError(VmrunError):
    """A measured kexec cannot be prepared or finished (the log, the plan, the handoff)."""
    exit_code = 65
    kind = "measured"


@dataclass
class Sources:
    tcti: str
    firmware_log: str = FIRMWARE_LOG
    userspace_log: str = userlog.DEFAULT_PATH

    def to_json(self) -> dict:
        return {"tcti": self.tcti, "firmware_log": self.firmware_log, "userspace_log": self.userspace_log}

    @classmethod
    def from_json(cls, d: dict) -> "Sources":
        return cls(d["tcti"], d.get("firmware_log", FIRMWARE_LOG), d.get("userspace_log", userlog.DEFAULT_PATH))


@dataclass
class Snapshot:
    sources: Sources
    banks: tuple[str, ...]
    pcrs: dict[str, dict[int, bytes]]
    firmware_log: bytes
    firmware_events: list[T.Event]
    records: list[userlog.Record]
    explanation: Explanation
    manufacturer: int | None

    @property
    def firmware_log_sha256(self) -> str:
        return hashlib.sha256(self.firmware_log).hexdigest()


def read_firmware_log(path: str) -> tuple[bytes, list[T.Event]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FIRMWARE_LOG + 1)
    except FileNotFoundError:
        raise MeasuredError(f"no firmware event log at {path} (is securityfs mounted at /sys/kernel/security, "
                            "and did the firmware hand one on?); use --tpm=software to measure into a "
                            "software TPM instead") from None
    except OSError as e:
        raise MeasuredError(f"cannot read the firmware event log {path}: {e.strerror}") from None
    if len(data) > MAX_FIRMWARE_LOG:
        raise MeasuredError(f"the firmware event log {path} is larger than {MAX_FIRMWARE_LOG >> 20} MiB")
    try:
        events = T.parse(data)
    except ValueError as e:
        raise MeasuredError(f"the firmware event log {path} is not a TCG crypto-agile log: {e}") from None
    return data, events


ACPI_TPM2 = "/sys/firmware/acpi/tables/TPM2"


def acpi_log_area(table: str = ACPI_TPM2, devmem: str = "/dev/mem") -> str | None:
    """Why the next kernel would read another log than vmrun's, or None. Linux reads the TPM
    event log from the ACPI TPM2 table's log area (LAML, LASA; TCG ACPI spec) *before* the EFI
    one (drivers/char/tpm/eventlog/common.c), and the next kernel gets this machine's ACPI
    tables: if that area holds a crypto-agile log, vmrun's would never be read."""
    try:
        with open(table, "rb") as f:
            t = f.read(4096)
    except OSError:
        return None
    if len(t) < 76:
        return None
    laml, lasa = struct.unpack_from("<IQ", t, 64)
    if not laml or not lasa:
        return None
    try:
        with open(devmem, "rb") as f:
            f.seek(lasa)
            head = f.read(64)
    except OSError:
        return None   # unreadable: nothing known (QEMU's area is empty; real firmware rarely fills it)
    if head[32:48] == T.SPEC_ID_SIGNATURE:
        return (f"this machine's ACPI TPM2 table points at a TPM event log at {lasa:#x} ({laml} bytes), which "
                "Linux reads before the EFI one: the next kernel would see the first boot's log, not vmrun's")
    return None


def snapshot(sources: Sources, tpm: HostTpm | None = None, *, manufacturer: bool = True) -> Snapshot:
    """The TPM, the firmware log and systemd's log now, explained. ``manufacturer``: also ask
    the TPM its manufacturer (for the payload's GetCapability; finalize does not need it)."""
    tpm = tpm or HostTpm(sources.tcti)
    if sources.firmware_log == FIRMWARE_LOG:   # this machine's own log: is it the one Linux reads?
        why = acpi_log_area()
        if why:
            raise MeasuredError(f"{why}; use --tpm=software (the kexec is then not measured into the TPM)")
    banks = tpm.active_banks()
    pcrs = tpm.read_pcrs(banks)
    data, events = read_firmware_log(sources.firmware_log)
    spec = T.SpecId.parse(events[0].data)
    logged = {T.alg_name(a) for a, _ in spec.algorithms}
    if logged != set(banks):
        raise TpmBankMismatch(f"the firmware event log {sources.firmware_log} records the banks "
                              f"{', '.join(sorted(logged))}, the TPM has {', '.join(banks)} active: its PCRs "
                              "cannot be replayed from that log (use --tpm=software)")
    try:
        records = userlog.read(sources.userspace_log)
    except userlog.UserLogError as e:
        raise MeasuredError(f"systemd's measurement log {sources.userspace_log}: {e}") from None
    maker = None
    if manufacturer:
        try:
            maker = tpm.manufacturer()
        except TpmError:
            pass
    try:
        expl = explain(events, records, pcrs, banks)
    except (KeyError, ValueError) as e:   # an event without a digest for a bank, a PCR index > 23
        raise MeasuredError(f"the firmware event log {sources.firmware_log} cannot be replayed: "
                            f"{e.args[0] if e.args else e}") from None
    return Snapshot(sources, banks, pcrs, data, events, records, expl, maker)


def mirror(snap: Snapshot):
    """The payload's TCG2 view of the machine's TPM, with the section as the payload sees it
    (finish_stage writes the one the next kernel reads, with the right not-measured reason)."""
    from hostsvc.protocols.tcg2 import Mirror
    section = _section(snap, KL.not_measured(KL.NOT_FINALIZED, 0, 0, snap.banks))
    return Mirror(snap.banks, snap.pcrs, snap.firmware_log, section, snap.manufacturer)


def _section(snap: Snapshot, marker: T.Event | None, size: int = KL.DEFAULT_SECTION_SIZE, *,
             pad: bool = True, extra: list[T.Event] = ()) -> list[T.Event]:
    """The carried section for ``snap``: exactly ``size`` bytes with ``pad``, else at most
    ``size``. When the records do not all fit, the last ones are left out and the PCRs they
    would have explained get PCR-state markers instead: the section may say less, never
    something false."""
    tail = list(extra) + ([marker] if marker is not None else [])
    records = snap.records
    while True:
        expl = snap.explanation if records is snap.records else \
            explain(snap.firmware_events, records, snap.pcrs, snap.banks)
        try:
            if pad:
                return KL.build_section(expl.section_events() + tail, snap.banks, size)
            return KL.fit_section(expl.section_events() + tail, size)
        except KL.SectionFull:
            if not records:
                raise MeasuredError(f"the carried section ({size} bytes) cannot hold even the PCR "
                                    "markers") from None
            log.warning("measured.section_full", records=len(records), size=size)
            records = records[:len(records) * 3 // 4]


# --- after the run: the section in the payload's copy of the log, and the plan --------------

def log_copy(result) -> tuple[int, int] | None:
    """(address of the log in the payload's LINUX_EFI_TPM_EVENT_LOG table, its size), or None
    when the payload handed on no log."""
    fw = result.firmware
    for guid, addr in fw.config.entries:
        if guid == G.LINUX_EFI_TPM_EVENT_LOG:
            size, _preboot, version = struct.unpack("<IIB", fw.mem.read(addr, LINUX_LOG_HEADER))
            if version != 2:   # EFI_TCG2_EVENT_LOG_FORMAT_TCG_2
                return None
            return addr + LINUX_LOG_HEADER, size
    return None


def _unlogged_events(unlogged: list[int], banks) -> list[T.Event]:
    counts: dict[int, int] = {}
    for pcr in unlogged:
        counts[pcr] = counts.get(pcr, 0) + 1
    return [KL.unlogged(pcr, n, banks) for pcr, n in sorted(counts.items())]


def _skip_bytes(events: list[T.Event], nbytes: int) -> list[T.Event]:
    """``events`` after the first ``nbytes`` bytes of them (the stub's final_events_preboot_size
    counts bytes of the final events table)."""
    done = 0
    for i, e in enumerate(events):
        if done >= nbytes:
            return events[i:]
        done += len(e.to_bytes())
    return []


def finish_stage(result, snap: Snapshot, *, crash: bool) -> dict:
    """Write the section into the payload's copy of the log, compactly (the copy's size field is
    lowered by the padding left out), saying how many events follow it unmeasured and which
    extends the next kernel's log lacks; set ``result.event_log`` to the log the next kernel
    will read; return the plan for the handoff's metadata."""
    tcg2 = result.firmware.tcg2
    mem = tcg2.mem
    extends = tcg2.extends
    reason = KL.CRASH_KERNEL if crash else KL.NOT_FINALIZED
    off, reserve = tcg2.section_offset, tcg2.section_size
    copy = log_copy(result)
    where = None
    copied_to = 0            # log-area offsets below this are in the payload's copy
    if copy is None:
        log.warning("measured.no_log_copy", why="the payload handed on no event log "
                    "(no LINUX_EFI_TPM_EVENT_LOG table): the next kernel will have no firmware event log")
    else:
        addr, size = copy
        cur = mem.read(addr, size)
        if size >= off + reserve and cur[:off] == tcg2.log.to_bytes()[:off]:
            where = {"table": hex(addr - LINUX_LOG_HEADER), "capacity": size, "section_offset": off,
                     "section_reserve": reserve}
            copied_to = size
        else:
            log.warning("measured.log_copy_differs", address=hex(addr),
                        why="the payload's copy of the event log does not start with the firmware log")
    unlogged = [pcr for (pcr, _d, _t), (at, final) in zip(extends, tcg2.extend_logged)
                if not final and (at is None or at >= copied_to)]
    if unlogged:
        log.warning("measured.unlogged", pcrs=",".join(map(str, sorted(set(unlogged)))),
                    why="the payload extended PCRs without events the next kernel's log will show "
                        "(EFI_TCG2_EXTEND_ONLY, or a full log); the log marks them")
    if where is not None:
        marker = KL.not_measured(reason, 0, len(extends), snap.banks)
        blob = KL.section_bytes(_section(snap, marker, reserve, pad=False, extra=_unlogged_events(unlogged, snap.banks)))
        new = cur[:off] + blob + cur[off + reserve:]
        mem.write(addr - LINUX_LOG_HEADER, struct.pack("<I", len(new)))
        mem.write(addr, new + bytes(size - len(new)))
        where["section_length"] = len(blob)
        preboot = struct.unpack("<I", mem.read(addr - LINUX_LOG_HEADER + 4, 4))[0]
        result.event_log = new + b"".join(e.to_bytes() for e in _skip_bytes(tcg2.final_events, preboot))
    return {
        "tpm": "host",
        "slot": "crash" if crash else "normal",
        "sources": snap.sources.to_json(),
        "banks": list(snap.banks),
        "firmware_log_sha256": snap.firmware_log_sha256,
        "log_copy": where,
        "final_events_table": hex(tcg2.final_addr),
        "final_events_size": tcg2.final_size,
        "boundary": {"pcr": KL.BOUNDARY_PCR, "type": T.event_type_name(KL.BOUNDARY_TYPE),
                     "data": KL.BOUNDARY_DATA.decode()},
        "extends": [{"pcr": pcr, "type": T.event_type_name(etype), "digests": {b: d.hex() for b, d in dg.items()}}
                    for pcr, dg, etype in extends],
        "unlogged": unlogged,
        "at_stage": {"pcrs": _hex_pcrs(snap.pcrs), **snap.explanation.to_json()},
        "predicted": _hex_pcrs(tcg2.pcrs.values()),
        "not_measured": KL.NOT_MEASURED_REASONS[reason],
    }


def _hex_pcrs(values) -> dict:
    return {b: {str(i): v.hex() for i, v in sorted(vals.items())} for b, vals in values.items()}


def pcrlock(plan: dict) -> dict:
    """The kexec's measurements in systemd-pcrlock's ``.pcrlock`` format (a JSON object with a
    ``records`` array of CEL-JSON-style records: pcr, digests[hashAlg, digest])."""
    return {"records": [{"pcr": e["pcr"], "digests": [{"hashAlg": b, "digest": d} for b, d in e["digests"].items()]}
                        for e in plan["extends"]]}


# --- just before the kexec ----------------------------------------------------------------

def patch_segments(segments, paddr: int, blob: bytes):
    """The segments with ``blob`` written at physical ``paddr`` (which must lie inside one)."""
    from vmrun.handoff.elf import LoadSegment
    out = []
    done = False
    for sg in segments:
        if sg.paddr <= paddr and paddr + len(blob) <= sg.paddr + sg.memsz:
            data = bytearray(sg.data)
            off = paddr - sg.paddr
            if off + len(blob) > len(data):   # trailing zero pages were left to memsz
                data += bytes(off + len(blob) - len(data))
            data[off:off + len(blob)] = blob
            out.append(LoadSegment(sg.paddr, data, sg.memsz))
            done = True
        else:
            out.append(sg)
    if not done:
        raise MeasuredError(f"the event log section at {paddr:#x} is in no segment of the handoff")
    return out


def read_segments(segments, paddr: int, n: int) -> bytes:
    """``n`` bytes at physical ``paddr`` as the handoff would load them (zeros past filesz)."""
    for sg in segments:
        if sg.paddr <= paddr and paddr + n <= sg.paddr + sg.memsz:
            off = paddr - sg.paddr
            data = bytes(sg.data[off:off + n])
            return data + bytes(n - len(data))
    raise MeasuredError(f"the event log at {paddr:#x} is in no segment of the handoff")


def rewrite_log_copy(segments, copy: dict, blob: bytes):
    """The segments with the log copy's section replaced by ``blob`` (and its size field)."""
    table, capacity = int(copy["table"], 16), copy["capacity"]
    cur = read_segments(segments, table, LINUX_LOG_HEADER + capacity)
    size = struct.unpack_from("<I", cur)[0]
    if size > capacity:
        raise MeasuredError(f"the event log copy at {table:#x} says {size} bytes, more than its {capacity}")
    body = cur[LINUX_LOG_HEADER:LINUX_LOG_HEADER + size]
    off, old = copy["section_offset"], copy["section_length"]
    new = body[:off] + blob + body[off + old:]
    if len(blob) > copy["section_reserve"] or len(new) > capacity:
        raise MeasuredError("the carried section outgrew the room the payload's log copy has")
    patch = struct.pack("<I", len(new)) + cur[4:LINUX_LOG_HEADER] + new + bytes(capacity - len(new))
    return patch_segments(segments, table, patch)


class ExtendInterrupted(MeasuredError):
    """Something failed after the first extend was sent: how far the TPM got is in ``report``."""


def finalize(plan: dict, segments, entry: int, *, load, unload=None, tpm: HostTpm | None = None) -> dict:
    """Extend the TPM with the planned events and load the handoff again with the final section.
    ``load(entry, segments)`` is kexec_load; ``unload()`` is called when that fails after the
    TPM was extended (a plain reboot then resets the TPM, instead of a kexec into a log that
    says the events were not measured). Returns the report (also for `vmrun status`).

    An error raised before the first extend has no ``report`` attribute; every error after it
    has one (``extended``: how many went in, or None when unknown)."""
    sources = Sources.from_json(plan["sources"])
    tpm = tpm or HostTpm(sources.tcti)
    snap = snapshot(sources, tpm, manufacturer=False)
    if snap.firmware_log_sha256 != plan["firmware_log_sha256"]:
        raise MeasuredError("the firmware event log changed since the payload was staged (staged in "
                            "another boot?): stage it again")
    banks = snap.banks
    if list(banks) != plan["banks"]:
        raise TpmBankMismatch(f"the TPM's active banks are {', '.join(banks)}, the payload was staged for "
                              f"{', '.join(plan['banks'])}: stage it again")
    events = [(e["pcr"], {b: bytes.fromhex(d) for b, d in e["digests"].items()}) for e in plan["extends"]]
    expected = {b: dict(v) for b, v in snap.pcrs.items()}
    for pcr, dg in events:
        for b in banks:
            expected[b][pcr] = KL.extend(expected[b][pcr], dg[b], b)
    copy = plan.get("log_copy")
    extra = _unlogged_events(plan.get("unlogged", []), banks)
    final_segments = None
    if copy:   # built before anything is extended: an error here changes nothing
        blob = KL.section_bytes(_section(snap, None, copy["section_reserve"], pad=False, extra=extra))
        final_segments = rewrite_log_copy(segments, copy, blob)
    report = {
        "finalized_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extended": None, "total": len(events),
        "before": _hex_pcrs(snap.pcrs), **snap.explanation.to_json(),
    }
    partial = None
    log.info("measured.extend", events=len(events), banks=",".join(banks))
    try:
        try:
            report["extended"] = tpm.extend_events(events)
        except PartialExtend as e:
            partial = e
            report["extended"] = e.done
            if copy:
                marker = KL.not_measured(KL.PARTIAL, e.done, len(events), banks)
                blob = KL.section_bytes(_section(snap, marker, copy["section_reserve"], pad=False, extra=extra))
                final_segments = rewrite_log_copy(segments, copy, blob)
        if final_segments is not None:
            try:
                load(entry, final_segments)
            except VmrunError as e:
                what = f"the TPM was extended with {report['extended']} of {len(events)} events, but loading the " \
                       f"handoff with the final event log failed ({e})"
                if unload is not None:
                    try:
                        unload()
                        what += "; the kexec image was unloaded (a reboot resets the TPM)"
                    except VmrunError as e2:
                        what += f"; unloading it failed too ({e2}): its log says the events were not measured"
                raise MeasuredError(what) from None
            report["log"] = "rewritten"
        else:
            report["log"] = "none: the payload handed on no event log vmrun could rewrite"
        try:
            after = tpm.read_pcrs(banks)
            report["after"] = _hex_pcrs(after)
            if partial is None:
                # PCR 10: IMA may measure the programs finalize runs
                wrong = [f"{b}:{i}" for b in banks for i in range(T.NUM_PCRS)
                         if i != 10 and after[b][i] != expected[b][i]]
                report["mismatch"] = wrong
                if wrong:
                    log.warning("measured.mismatch", pcrs=",".join(wrong),
                                why="the TPM changed while vmrun extended it (another process extending?)")
        except (TpmError, ValueError) as e:
            report["after_error"] = str(e)
    except BaseException as e:
        report["error"] = str(e) or type(e).__name__
        if isinstance(e, VmrunError):
            e.report = report
            raise
        err = ExtendInterrupted(f"finalize stopped after extending the TPM began: {report['error']}")
        err.report = report
        raise err from e
    if partial is not None:
        report["error"] = str(partial)
        partial.report = report
        raise partial
    return report


def late_changes(plan: dict, report: dict, segments, entry: int, *, load, tpm: HostTpm | None = None) -> dict:
    """After a finalize, again (e.g. `vmrun finalize`, then systemd's shutdown extends, then the
    shutdown hook): PCRs that changed since get PCR-state markers (reason ``after_finalize``) at
    the end of the final events table, which the next kernel reads last, and the handoff is
    loaded again. Nothing is extended. Returns the report with ``late`` added."""
    sources = Sources.from_json(plan["sources"])
    tpm = tpm or HostTpm(sources.tcti)
    banks = tuple(plan["banks"])
    now = tpm.read_pcrs(banks)
    seen = {b: {int(i): bytes.fromhex(v) for i, v in vals.items()} for b, vals in report.get("after", {}).items()}
    changed = sorted({i for b in banks for i in range(T.NUM_PCRS) if i != 10 and seen.get(b, {}).get(i) != now[b][i]})
    out = dict(report)
    out["late"] = [{"pcr": i, "tpm": {b: now[b][i].hex() for b in banks}} for i in changed]
    if not changed:
        return out
    markers = [KL.pcr_state(KL.PcrState(i, KL.LATE, {b: seen.get(b, {}).get(i, bytes(T.ALGS[b].size)) for b in banks},
                                        {b: now[b][i] for b in banks}), banks) for i in changed]
    load(entry, append_final_events(segments, plan, markers))
    out["after"] = _hex_pcrs(now)
    log.warning("measured.late_changes", pcrs=",".join(map(str, changed)),
                why="PCRs changed after the kexec was finalized: marked at the end of the log")
    return out


def append_final_events(segments, plan: dict, events: list[T.Event]):
    """The segments with ``events`` appended to the EFI final events table (and its count)."""
    fe, cap = int(plan["final_events_table"], 16), plan.get("final_events_size", 0x8000)
    head = read_segments(segments, fe, cap)
    _version, count = struct.unpack_from("<QQ", head)
    spec = T.Event(0, T.EV_NO_ACTION, {"sha1": bytes(20)},
                   T.SpecId([(T.ALGS[b].alg_id, T.ALGS[b].size) for b in plan["banks"]]).to_bytes(), sha1_format=True)
    raw = spec.to_bytes()
    try:
        existing = T.parse(raw + head[16:])[1:1 + count]
    except ValueError as e:
        raise MeasuredError(f"the final events table at {fe:#x} cannot be read: {e}") from None
    used = 16 + sum(len(e.to_bytes()) for e in existing)
    add = b"".join(e.to_bytes() for e in events)
    if used + len(add) > cap:
        raise MeasuredError(f"the final events table at {fe:#x} has no room for {len(add)} more bytes")
    patch = struct.pack("<QQ", _version, count + len(events)) + head[16:used] + add
    return patch_segments(segments, fe, patch)
