"""Measured kexec's pure parts: systemd's measurement log, what explains the TPM's PCRs, the
carried section's events (checked with tpm2_eventlog, an independent parser) and the log copy
rewrite. Expected PCR values are computed here with hashlib from the digests extended."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from hostsvc import kexeclog as KL
from hostsvc import tpm as T
from vmrun.handoff.elf import LoadSegment
from vmrun.measured import host, userlog
from vmrun.measured.carry import explain
from tests.unit.test_tpm import tpm2_eventlog_pcrs

BANKS = ("sha1", "sha256")


def H(bank: str, data: bytes) -> bytes:
    return hashlib.new(bank, data).digest()


def record(pcr: int, text: str, banks=BANKS, **extra) -> bytes:
    rec = {"pcr": pcr, "digests": [{"hashAlg": b, "digest": H(b, text.encode()).hex()} for b in banks],
           "content_type": "systemd", "content": {"string": text}, **extra}
    return b"\x1e" + json.dumps(rec).encode() + b"\n"


def firmware_log() -> tuple[list[T.Event], dict[str, dict[int, bytes]]]:
    """A two-event firmware log and the PCRs a TPM holds after it (hashlib, not replay)."""
    log = T.EventLog(BANKS)
    pcrs = {b: {i: T.initial_pcr(i, b) for i in range(24)} for b in BANKS}
    for pcr, data in ((0, b"crtm"), (4, b"Calling EFI Application from Boot Option")):
        d = {b: H(b, data) for b in BANKS}
        log.append(pcr, T.EV_EFI_ACTION, d, data)
        for b in BANKS:
            pcrs[b][pcr] = H(b, pcrs[b][pcr] + d[b])
    return T.parse(log.to_bytes()), pcrs


def extend(pcrs, pcr: int, text: str) -> None:
    for b in pcrs:
        pcrs[b][pcr] = H(b, pcrs[b][pcr] + H(b, text.encode()))


# --- systemd's log ------------------------------------------------------------------------

def test_userlog_parses_json_seq_and_keeps_bad_records_as_errors():
    data = (record(11, "enter-initrd") + b"\x1e{not json}\n" + b"\x1e" + json.dumps({"pcr": 99}).encode() + b"\n"
            + b"\x1e" + json.dumps({"pcr": 15, "digests": [{"hashAlg": "sha256", "digest": "abcd"}]}).encode()
            + b"\n" + b"\x1e" + json.dumps({"pcr": 15, "digests": [{"hashAlg": "sm3_256", "digest": "00"}]}).encode())
    recs = userlog.parse(data)
    assert [r.pcr for r in recs] == [11, None, None, 15, 15]
    assert recs[0].error is None and recs[0].digests["sha256"] == H("sha256", b"enter-initrd")
    assert recs[0].describe() == "enter-initrd"
    assert "not JSON" in recs[1].error and "PCR index" in recs[2].error
    assert "sha256 digest of 2 bytes" in recs[3].error and "no digest in a known bank" in recs[4].error


def test_userlog_absent_is_empty_and_oversized_is_refused(tmp_path):
    assert userlog.read(tmp_path / "none") == []
    big = tmp_path / "big"
    big.write_bytes(b"\n" * (userlog.MAX_LOG_BYTES + 1))
    with pytest.raises(userlog.UserLogError, match="MiB"):
        userlog.read(big)


# --- explaining the TPM ---------------------------------------------------------------------

def test_explain_carries_records_and_marks_what_nothing_explains():
    events, tpm = firmware_log()
    logdata = record(15, "machine-id") + record(11, "ready") + record(11, "never-extended") + \
        record(12, "only-sha256", banks=("sha256",))
    extend(tpm, 15, "machine-id")
    extend(tpm, 11, "ready")
    extend(tpm, 8, "no record at all")
    extend(tpm, 10, "ima boot_aggregate")
    extend(tpm, 12, "only-sha256")
    ex = explain(events, userlog.parse(logdata), tpm, BANKS)
    assert [(r.pcr, r.describe()) for r in ex.carried] == [(15, "machine-id"), (11, "ready")]
    assert [(s.pcr, s.reason) for s in ex.states] == [(8, KL.UNEXPLAINED), (10, KL.IMA), (12, KL.UNEXPLAINED)]
    s8 = ex.states[0]
    assert s8.tpm_values == {b: tpm[b][8] for b in BANKS} and s8.log_values == {b: bytes(T.ALGS[b].size) for b in BANKS}
    why = {r.describe(): w for r, w in ex.ignored}
    assert "not in the TPM" in why["never-extended"] and "sha1" in why["only-sha256"]
    # the firmware log + the section events replay to the TPM; PCR 8, 10, 12 only with the markers
    section = ex.section_events()
    plain = T.replay(events + section, BANKS)
    marked = KL.replay_with_markers(events + section, BANKS)
    for b in BANKS:
        for i in range(24):
            assert marked[b][i] == tpm[b][i], (b, i)
            assert (plain[b][i] == tpm[b][i]) == (i not in (8, 10, 12)), (b, i)


def test_section_is_exact_size_and_tpm2_eventlog_replays_through_it(tmp_path):
    events, tpm = firmware_log()
    extend(tpm, 15, "machine-id")
    ex = explain(events, userlog.parse(record(15, "machine-id")), tpm, BANKS)
    section = KL.build_section(ex.section_events() + [KL.not_measured(KL.NOT_FINALIZED, 0, 3, BANKS)], BANKS, 4096)
    assert len(KL.section_bytes(section)) == 4096
    with pytest.raises(KL.SectionFull):
        KL.build_section(ex.section_events(), BANKS, 100)
    assert KL.fit_section(ex.section_events(), 4096) == ex.section_events()
    log = T.EventLog(BANKS)
    raw = log.to_bytes() + b"".join(e.to_bytes() for e in events[1:]) + KL.section_bytes(ex.section_events())
    path = tmp_path / "log"
    path.write_bytes(raw)
    theirs, text = tpm2_eventlog_pcrs(path)
    for b in BANKS:
        for i in (0, 4, 15):
            assert theirs[b][i] == tpm[b][i], (b, i)
    assert [KL.decode(e)["kind"] for e in section] == ["carried_record", "not_measured", "padding"]
    nm = KL.decode(section[1])
    assert nm == {"kind": "not_measured", "reason": "not_finalized", "measured": 0, "total": 3}
    assert section[1].pcr == KL.BOUNDARY_PCR


def test_boundary_event_hashes_its_data():
    pcr, etype, data, digests = KL.boundary_event(BANKS)
    assert (pcr, etype, data) == (4, T.EV_EFI_ACTION, b"vmrun: kexec boundary")
    assert digests == {b: H(b, data) for b in BANKS}
    assert KL.decode(T.Event(pcr, etype, digests, data)) == {"kind": "boundary"}


# --- the log copy in the handoff ------------------------------------------------------------

def test_rewrite_log_copy_replaces_the_section_and_the_size_field():
    fw = b"F" * 40
    old = b"S" * 10
    rest = b"R" * 30
    capacity = len(fw) + 64 + len(rest)
    body = fw + old + rest
    table = 0x10000 - 9 + 0x20
    mem = bytearray(0x3000)
    at = table - 0x10000
    mem[at:at + 9] = struct.pack("<IIB", len(body), 7, 2)
    mem[at + 9:at + 9 + len(body)] = body
    seg = LoadSegment(0x10000, bytes(mem[:at + 9 + len(body)]), 0x3000)   # trailing zeros left to memsz
    copy = {"table": hex(table), "capacity": capacity, "section_offset": len(fw), "section_length": len(old),
            "section_reserve": 64}
    out = host.rewrite_log_copy([seg], copy, b"N" * 50)
    data = host.read_segments(out, table, 9 + capacity)
    size, preboot, version = struct.unpack_from("<IIB", data)
    assert (size, preboot, version) == (len(fw) + 50 + len(rest), 7, 2)
    assert data[9:9 + size] == fw + b"N" * 50 + rest and data[9 + size:] == bytes(capacity - size)
    with pytest.raises(host.MeasuredError, match="outgrew"):
        host.rewrite_log_copy([seg], copy, b"N" * 65)
    with pytest.raises(host.MeasuredError, match="no segment"):
        host.patch_segments([seg], 0x90000, b"x")


def test_pcrlock_lists_the_planned_extends():
    plan = {"extends": [{"pcr": 4, "type": "EV_EFI_ACTION", "digests": {"sha256": "aa" * 32}}]}
    assert host.pcrlock(plan) == {"records": [{"pcr": 4, "digests": [{"hashAlg": "sha256", "digest": "aa" * 32}]}]}


def test_acpi_log_area_that_linux_would_read_first(tmp_path):
    table, mem = tmp_path / "TPM2", tmp_path / "mem"
    t = bytearray(76)
    struct.pack_into("<IQ", t, 64, 0x10000, 0x1000)    # LAML, LASA (TCG ACPI TPM2 table)
    table.write_bytes(bytes(t))
    m = bytearray(0x2000)
    mem.write_bytes(bytes(m))
    assert host.acpi_log_area(str(table), str(mem)) is None          # an empty area: Linux ignores it
    m[0x1000 + 32:0x1000 + 48] = T.SPEC_ID_SIGNATURE                   # a crypto-agile log there
    mem.write_bytes(bytes(m))
    assert "reads before the EFI one" in host.acpi_log_area(str(table), str(mem))
    table.write_bytes(bytes(64))                                       # no log area fields
    assert host.acpi_log_area(str(table), str(mem)) is None


def test_unlogged_marker_and_preboot_bytes():
    ev = KL.unlogged(16, 2, BANKS)
    assert ev.event_type == T.EV_NO_ACTION and ev.pcr == 16
    assert KL.decode(ev) == {"kind": "unlogged", "pcr": 16, "count": 2}
    assert "2 extend(s) of PCR 16" in KL.describe(KL.decode(ev))
    events = [T.Event(5, T.EV_EFI_ACTION, {b: H(b, bytes([i])) for b in BANKS}, bytes([i]) * (i + 1)) for i in range(3)]
    first = len(events[0].to_bytes())
    assert host._skip_bytes(events, 0) == events
    assert host._skip_bytes(events, first) == events[1:]
    assert host._skip_bytes(events, first + len(events[1].to_bytes())) == events[2:]


def test_append_final_events_keeps_the_table_and_adds_at_its_end():
    banks = list(BANKS)
    fe = 0x4000
    old = [T.Event(5, T.EV_EFI_ACTION, {b: H(b, b"x") for b in banks}, b"Exit Boot Services Invocation")]
    table = struct.pack("<QQ", 1, 1) + old[0].to_bytes()
    seg = LoadSegment(fe, table, 0x8000)
    marker = KL.pcr_state(KL.PcrState(11, KL.LATE, {b: bytes(T.ALGS[b].size) for b in banks},
                                      {b: H(b, b"late") for b in banks}), banks)
    out = host.append_final_events([seg], {"final_events_table": hex(fe), "final_events_size": 0x8000,
                                           "banks": banks}, [marker])
    data = host.read_segments(out, fe, 0x8000)
    assert struct.unpack_from("<QQ", data) == (1, 2)
    n = len(old[0].to_bytes())
    assert data[16:16 + n] == old[0].to_bytes() and data[16 + n:16 + n + len(marker.to_bytes())] == marker.to_bytes()
    assert KL.decode(marker)["reason"] == "after_finalize"
