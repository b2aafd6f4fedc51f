"""``vmrun load`` / ``unload`` / ``status``: arm a kexec slot from a PE payload or a staged file.

Two slots, as the kernel has them: the normal one (``kexec -l``; ``vmrun exec`` reboots into
it) and the crash one (``kexec -p``; the kernel jumps there when it panics). ``vmrun load
PAYLOAD.efi`` runs the payload for this machine, stages the handoff in memory and calls
kexec_load(2) without writing a file; ``vmrun load STAGED`` loads a file written by ``vmrun
stage`` after checking it was staged for this machine.

What was loaded is recorded in ``/run/vmrun/<slot>.json`` (``$VMRUN_STATE_DIR``), tagged with
the boot id, so that ``vmrun status`` can say from which payload and options, since when, and
whether the memory it was staged for still looks the same (memory hotplug makes a kdump arm
stale: its ELF core header lists the RAM of the moment it was armed).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import shutil

import structlog

from vmrun import kexec

log = structlog.get_logger("vmrun.loader")

SLOTS = ("normal", "crash")
SUMMARY_PCRS = (4, 5, 7, 9, 11, 12, 13)  # the ones a payload's boot changes (all are in --json)


def state_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VMRUN_STATE_DIR", "/run/vmrun"))


def boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def iomem_ram_digest(iomem: str | None = None) -> str:
    """SHA-256 of this machine's top-level System RAM ranges in /proc/iomem (what memory
    hotplug changes); empty when /proc/iomem shows no addresses (not root)."""
    from vmrun.kdump import KdumpError, parse_iomem
    try:
        entries = parse_iomem(iomem if iomem is not None else pathlib.Path("/proc/iomem").read_text())
    except (OSError, KdumpError):
        return ""
    ram = [(e.start, e.end) for e in entries if e.depth == 0 and e.name == "System RAM"]
    if not ram or all(s == 0 for s, _ in ram):
        return ""
    return hashlib.sha256("".join(f"{s:x}-{e:x}\n" for s, e in ram).encode()).hexdigest()


def record(slot: str, metadata: dict, source: dict, handoff: dict | None = None) -> None:
    """Remember what was loaded into ``slot`` (best effort: a failure is logged, not fatal)."""
    entry = {
        "slot": slot,
        "loaded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "boot_id": boot_id(),
        "source": source,
        "payload": metadata.get("payload"),
        "cmdline": metadata.get("cmdline"),
        "memmap": metadata.get("memmap"),
        "iomem_ram_sha256": iomem_ram_digest(),
        "entry": metadata.get("entry"),
        "segments": metadata.get("segments"),
        "pcrs": metadata.get("pcrs"),
        "kdump": metadata.get("kdump"),
        "measured": metadata.get("measured"),
        "handoff": handoff,
    }
    _write_record(slot, entry)


def _write_record(slot: str, entry: dict, *, strict: bool = False) -> None:
    """Write the slot's record atomically; a failure is logged, or with ``strict`` raised (the
    measured-kexec state that must be on record before the TPM is extended)."""
    try:
        d = state_dir()
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = d / f".{slot}.json.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(json.dumps(entry, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / f"{slot}.json")
    except OSError as e:
        if strict:
            from vmrun.measured.host import MeasuredError
            raise MeasuredError(f"cannot record the measured kexec's state in {state_dir()} ({e.strerror}): "
                                "nothing was extended") from None
        log.warning("status.record_failed", slot=slot, error=str(e))


def forget(slot: str) -> None:
    try:
        (state_dir() / f"{slot}.json").unlink()
    except OSError:
        pass


def _recorded(slot: str) -> dict | None:
    try:
        entry = json.loads((state_dir() / f"{slot}.json").read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("boot_id") == boot_id() else None


def status() -> dict:
    """Both slots: what the kernel says (/sys/kernel/kexec_loaded, kexec_crash_loaded,
    kexec_crash_size) and what vmrun recorded loading there, with staleness checks."""
    out: dict = {}
    crash_size = None
    try:
        crash_size = int(pathlib.Path("/sys/kernel/kexec_crash_size").read_text().strip())
    except (OSError, ValueError):
        pass
    ram_now = iomem_ram_digest()
    for slot in SLOTS:
        loaded = kexec.loaded(crash=slot == "crash")
        rec = _recorded(slot)
        s: dict = {"loaded": loaded, "by_vmrun": bool(loaded and rec), "stale": [], "record": None}
        if slot == "crash":
            s["crash_kernel_bytes"] = crash_size
            s["crash_regions"] = [{"start": hex(a), "end": hex(b - 1)} for a, b in kexec.crash_regions()]
        if loaded and rec:
            s["record"] = rec
            if rec.get("iomem_ram_sha256") and ram_now and rec["iomem_ram_sha256"] != ram_now:
                s["stale"].append("System RAM in /proc/iomem changed since it was loaded (memory hotplug?): "
                                  "load it again")
            if slot == "normal" and rec.get("memmap", {}).get("digest"):
                from hostsvc.memmap import TargetMemoryMap
                try:
                    if TargetMemoryMap.from_host().digest() != rec["memmap"]["digest"]:
                        s["stale"].append("this machine's memory map differs from the one it was staged for")
                except Exception as e:  # noqa: BLE001 - status must not fail on an unreadable map
                    s["stale"].append(f"cannot read this machine's memory map: {e}")
        elif loaded:
            s["note"] = "loaded by another tool (no vmrun record for this boot)"
        out[slot] = s
    return out


def format_status(st: dict) -> str:
    lines = []
    for slot in SLOTS:
        s = st[slot]
        head = f"{slot}: {'loaded' if s['loaded'] else 'empty'}"
        if slot == "crash":
            regions = ", ".join(f"{r['start']}-{r['end']}" for r in s["crash_regions"]) or "none"
            head += f" (crash kernel reservation: {regions})"
        lines.append(head)
        rec = s.get("record")
        if rec:
            p = rec.get("payload") or {}
            lines.append(f"  payload:  {p.get('path', p.get('name', '?'))} (sha256 {str(p.get('sha256', '?'))[:16]}…)")
            lines.append(f"  since:    {rec['loaded_at']} (from {rec['source'].get('kind')})")
            lines.append(f"  cmdline:  {rec.get('cmdline')!r}")
            if rec.get("kdump"):
                k = rec["kdump"]
                lines.append(f"  kdump:    elfcorehdr {k.get('elfcorehdr')}, cmdline {k.get('cmdline')!r}")
            for bank, vals in (rec.get("pcrs") or {}).items():
                shown = sorted((int(i), v) for i, v in vals.items() if int(i) in SUMMARY_PCRS)
                lines.append(f"  pcrs:     {bank}: " + ", ".join(f"{i}={v[:16]}…" for i, v in shown))
            m = rec.get("measured")
            if m:
                lines.append("  measured: " + _measured_line(m))
                unexplained = (m.get("finalized") or {}).get("unexplained", m["at_stage"]["unexplained"])
                for u in unexplained:
                    lines.append(f"            PCR {u['pcr']}: {u['reason']} (the log cannot replay it; marked in it)")
        elif s.get("note"):
            lines.append(f"  {s['note']}")
        for why in s["stale"]:
            lines.append(f"  STALE:    {why}")
    return "\n".join(lines) + "\n"


def _measured_line(m: dict) -> str:
    n = len(m.get("extends", []))
    if m.get("slot") == "crash":
        return (f"host TPM ({', '.join(m['banks'])}); a crash kernel is never measured: its log says so "
                f"before its {n} events")
    state = m.get("state", "staged")
    if state == "finalized":
        f = m.get("finalized") or {}
        return f"host TPM: extended {f.get('extended')} of {f.get('total')} events at {f.get('finalized_at')}"
    if state == "failed":
        return f"host TPM: FAILED ({(m.get('finalized') or {}).get('error')})"
    return (f"host TPM ({', '.join(m['banks'])}): {n} events to extend just before the kexec "
            "(vmrun exec, vmrun kexec -e, or systemd's shutdown hook)")


def load_file(path: pathlib.Path, *, crash: bool) -> dict:
    """``vmrun load STAGED``: the file flow, with its memory-map check. A measured handoff is
    loaded as staged (its log says the kexec was not measured) and copied to the state folder
    (``normal.handoff``), from which it is finalized before the kexec."""
    meta = kexec.load(path, crash=crash)
    kept = None
    if meta.get("measured") and not crash:
        kept = _keep_handoff(lambda tmp: shutil.copyfile(path, tmp))
    elif not crash:
        _drop_handoff()
    record("crash" if crash else "normal", meta, {"kind": "staged file", "path": str(path)}, kept)
    return meta


def load_handoff(handoff, *, crash: bool, source: dict) -> dict:
    """kexec_load(2) a handoff staged in memory (``vmrun load PAYLOAD``). A measured one is also
    written to the state folder (``normal.handoff``): the kexec is finalized from it."""
    kexec.load_segments(handoff.entry, handoff.segments, crash=crash,
                        name=handoff.metadata.get("payload", {}).get("name", "the payload"))
    kept = None
    if handoff.metadata.get("measured") and not crash:
        kept = _keep_handoff(handoff.write)
    elif not crash:
        _drop_handoff()
    record("crash" if crash else "normal", handoff.metadata, source, kept)
    return handoff.metadata


def _handoff_path() -> pathlib.Path:
    return state_dir() / "normal.handoff"


def _keep_handoff(write) -> dict | None:
    """The measured handoff in the state folder (mode 0600 from the start; /run stays mounted
    until systemd-shutdown's hooks have run), or None when it cannot be written (logged: the
    kexec then cannot be measured, and its log says so)."""
    path = _handoff_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        state_dir().mkdir(parents=True, exist_ok=True, mode=0o755)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        write(tmp)
        os.replace(tmp, path)
        return {"path": str(path), "sha256": _file_sha256(path)}
    except OSError as e:
        log.warning("measured.handoff_not_kept", path=str(path), error=str(e),
                    why="the kexec cannot be measured; its log says so")
        try:
            tmp.unlink()
        except OSError:
            pass
        return None


def _drop_handoff() -> None:
    try:
        _handoff_path().unlink()
    except OSError:
        pass


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finalize_measured() -> dict | None:
    """Finish a measured kexec just before it happens: extend the TPM with the loaded payload's
    measurements and reload it with the final event log (vmrun.measured.host.finalize). None
    when the normal slot holds no measured kexec of this boot. When it was finalized already,
    nothing is extended again: PCRs changed since are marked at the end of the log
    (host.late_changes). One finalize at a time (a lock in the state folder); the state is
    written (and must be) before the first extend."""
    from vmrun.measured import host

    rec = _recorded("normal")
    if not rec or not rec.get("measured") or not kexec.loaded():
        return None   # nothing to do, and nothing written (the state folder may be read-only)
    try:
        state_dir().mkdir(parents=True, exist_ok=True, mode=0o755)
        lock = os.open(state_dir() / "normal.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise host.MeasuredError(f"cannot lock {state_dir()}/normal.lock: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _finalize_locked(host)
    finally:
        os.close(lock)


def _finalize_locked(host) -> dict | None:
    from vmrun.handoff import elf

    rec = _recorded("normal")
    if not rec or not rec.get("measured") or not kexec.loaded():
        return None
    m = rec["measured"]
    state = m.get("state")
    if state == "extending":
        raise host.MeasuredError("an earlier finalize of this kexec was interrupted while extending the TPM: "
                                 "its PCRs are not known to match any log; load the payload again")
    if state == "failed":
        raise host.MeasuredError("an earlier finalize of this kexec extended the TPM but did not finish "
                                 f"({(m.get('finalized') or {}).get('error')}); load the payload again")
    kept = rec.get("handoff")
    if not kept:
        raise host.MeasuredError("the measured handoff was not kept (see the load's log): the kexec cannot be "
                                 "measured; load the payload again")
    path = pathlib.Path(kept["path"])
    try:
        changed = _file_sha256(path) != kept["sha256"]
    except OSError as e:
        raise host.MeasuredError(f"cannot read the kept handoff {path}: {e.strerror}") from None
    if changed:
        raise host.MeasuredError(f"{path} changed since it was loaded: load the payload again")
    data, h = kexec.read_handoff(path)
    view = memoryview(data)
    segments = [elf.LoadSegment(paddr, view[off:off + filesz], memsz) for off, filesz, paddr, memsz in h.segments]
    name = (rec.get("payload") or {}).get("name", path.name)

    def load(entry, segs):
        kexec.load_segments(entry, segs, name=name)

    if state == "finalized":
        report = host.late_changes(m, m["finalized"], segments, h.entry, load=load)
        if report.get("late"):
            m["finalized"] = report
            _write_record("normal", rec, strict=True)
        return report
    m["state"] = "extending"
    _write_record("normal", rec, strict=True)   # never extend without this on record
    try:
        report = host.finalize(m, segments, h.entry, load=load, unload=lambda: kexec.unload())
    except BaseException as e:
        # an error with a report came after the first extend: never again for this load
        report = getattr(e, "report", None)
        m["state"] = "failed" if report is not None else "staged"
        if report is not None:
            m["finalized"] = report
        _write_record("normal", rec)
        raise
    m["state"] = "finalized"
    m["finalized"] = report
    _write_record("normal", rec)
    log.info("measured.finalized", extended=report["extended"], total=report["total"],
             unexplained=",".join(str(s["pcr"]) for s in report.get("unexplained", [])) or "none")
    return report


def unload(*, crash: bool) -> None:
    kexec.unload(crash=crash)
    forget("crash" if crash else "normal")
    if not crash:
        _drop_handoff()


def is_staged_file(path: pathlib.Path) -> bool:
    """A handoff ELF (``vmrun stage``'s output) rather than a PE payload."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False

