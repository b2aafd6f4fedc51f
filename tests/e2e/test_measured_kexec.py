"""Measured kexec on a UEFI target with a TPM 2.0 (README "Measured kexec").

OVMF boots the first kernel with a fresh swtpm (so PCR 0-7 and the firmware event log are
OVMF's own); userspace extends the TPM once with a record in systemd's measurement log and once
without; `vmrun load` stages a systemd-stub UKI for the machine against that TPM, another
recorded extend follows (as systemd makes at shutdown), and `vmrun exec` extends the TPM and
kexecs. The UKI's initramfs is the reference one (tests/e2e/ovmf_tpm.py): it prints the TPM's
PCRs, every bank, and the event log the kernel has. The log is replayed by tpm2-tools'
tpm2_eventlog, an independent parser, and compared with the TPM PCR by PCR in every bank.

The kdump variant arms a crash UKI the same way: arming leaves the PCRs unchanged, and the
crash kernel's log says, with a not-measured marker, that what follows it is not in the TPM;
everything before the marker replays to the TPM.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from hostsvc import kexeclog as KL
from hostsvc import tpm as HT
from tests.e2e import ovmf_tpm
from tests.e2e import qemu as Q
from tests.e2e import target as T
from tests.e2e.uki import build_uki
from tests.unit.test_tpm import pcr_listing, tpm2_eventlog_pcrs

pytestmark = [pytest.mark.slow, pytest.mark.payloads]

REPO = Path(__file__).resolve().parents[2]
RECORD = f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} -m tests.e2e.measure_record"
PCRREAD = "tpm2_pcrread sha1:all+sha256:all+sha384:all+sha512:all"
CRASHKERNEL = "crashkernel=256M"
#: PCR 8: extended without a record (nothing can explain it); PCR 10 is IMA's
UNRECORDED_PCR = 8
IMA_PCR = 10


def _json(serial: str, step: str) -> dict:
    text, rc = T.step_output(serial, step)
    assert rc == 0, f"step {step} exited {rc}:\n{text}"
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def _reference(serial: str, after: str):
    """The reference initramfs' PCRs and event log, from the part of the session after ``after``."""
    assert after in serial, serial[-3000:]
    pcrs, log, _cmdline, errors = ovmf_tpm.parse_reference_output(serial.split(after, 1)[1])
    assert not errors, errors
    assert log, "the kexec'd kernel has no event log"
    return {b: {i: bytes.fromhex(v) for i, v in vals.items()} for b, vals in pcrs.items()}, log


def _pcrread(serial: str, step: str) -> dict[str, dict[int, str]]:
    """What `tpm2_pcrread` printed in ``step``: bank -> PCR -> hex."""
    text, rc = T.step_output(serial, step)
    assert rc == 0, text
    return {b: {i: v.hex() for i, v in vals.items()} for b, vals in pcr_listing(text).items()}


def _markers(events) -> list[tuple[int, dict]]:
    return [(i, KL.decode(e)) for i, e in enumerate(events) if KL.decode(e)]


def _uki(payload_cache, tmp_path, name: str, cmdline: str) -> tuple[Path, Path]:
    esp = tmp_path / "esp"
    (esp / "EFI" / "Linux").mkdir(parents=True, exist_ok=True)
    initrd = ovmf_tpm.make_reference_initrd(tmp_path / "ref.cpio")
    uki = build_uki(payload_cache / "stubs" / "257" / "linuxx64.efi.stub", esp / "EFI" / "Linux" / name,
                    linux=payload_cache / "kernels" / "bookworm" / "vmlinuz", initrd=initrd, cmdline=cmdline)
    return uki, esp


@pytest.mark.timeout(500)
def test_measured_kexec_log_replays_to_the_tpm(bookworm_kernel, payload_cache, tmp_path):
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.measured=kexec"
    uki, esp = _uki(payload_cache, tmp_path, "uki.efi", cmdline)
    r = T.target_boot(bookworm_kernel, [
        T.Step("recorded", f"{RECORD} --pcr 15 --string machine-id:4711 --event-type machine-id"),
        T.Step("unrecorded", f"{RECORD} --pcr {UNRECORDED_PCR} --string not-in-any-log --no-record"),
        T.Step("load", f"{T.VMRUN} -q load {uki} --esp {esp} --json --pcrlock /run/kexec.pcrlock"),
        T.Step("pcrlock", "cat /run/kexec.pcrlock"),
        T.Step("late", f"{RECORD} --pcr 11 --string shutdown --event-type phase"),
        T.Step("before", PCRREAD),
        T.Step("finalize", f"{T.VMRUN} -q finalize --json"),
        T.Step("status", f"{T.VMRUN} -q status --json"),
        T.Step("exec", f"{T.VMRUN} -q exec"),   # finalized already: extends nothing again
    ], cpu="la57", tpm=True, timeout=420)
    assert not r.failed and not r.timed_out, str(r)
    load = _json(r.serial, "load")
    plan = load["load"]["metadata"]["measured"]
    banks = plan["banks"]
    assert set(banks) == {"sha1", "sha256", "sha384", "sha512"}, plan["banks"]   # OVMF + swtpm: all four
    assert plan["log_copy"], plan
    assert [s["pcr"] for s in plan["at_stage"]["unexplained"] if s["pcr"] != IMA_PCR] == [UNRECORDED_PCR], plan
    assert [c["pcr"] for c in plan["at_stage"]["carried"]] == [15], plan
    pcrlock = json.loads(T.step_output(r.serial, "pcrlock")[0].strip())
    assert pcrlock["records"][0]["pcr"] == KL.BOUNDARY_PCR and len(pcrlock["records"]) == len(plan["extends"])

    report = _json(r.serial, "finalize")
    assert report["extended"] == report["total"] == len(plan["extends"]) and report["mismatch"] == [], report
    assert [c["pcr"] for c in report["carried"]] == [15, 11], report   # the late record is carried now
    rec = _json(r.serial, "status")["normal"]["record"]
    assert rec["measured"]["state"] == "finalized" and rec["handoff"]["path"].endswith("normal.handoff"), rec
    exec_text, _ = T.step_output(r.serial, "exec")
    assert re.search(rf"extended {len(plan['extends'])} of {len(plan['extends'])} events", exec_text), exec_text
    tpm, log = _reference(r.serial, "VMRUN-STEP-BEGIN exec")
    assert set(tpm) == set(banks), tpm.keys()
    path = tmp_path / "next.log"
    path.write_bytes(log)
    (tmp_path / "next-tpm.json").write_text(json.dumps({b: {i: v.hex() for i, v in vals.items()}
                                                        for b, vals in tpm.items()}, indent=1))
    replayed, text = tpm2_eventlog_pcrs(path)
    events = HT.parse(log)

    # every PCR 0-15 in every bank replays to the TPM, except the one extended without a
    # record (and IMA's PCR 10 when IMA extended it): those carry a marker stating the TPM's value
    marked = {m["pcr"]: m for _, m in _markers(events) if m["kind"] == "pcr_state"}
    assert UNRECORDED_PCR in marked and marked[UNRECORDED_PCR]["reason"] == "unexplained", marked
    for b in banks:
        for i in range(16):
            if i in marked:
                continue
            assert replayed[b].get(i, bytes(len(tpm[b][i]))) == tpm[b][i], f"{b} PCR {i}: log and TPM differ"
    # a marker states the TPM's value just before the kexec (tpm2_pcrread then); for the PCR
    # extended without a record, replaying from there leads to the next kernel's TPM. PCR 10 goes
    # on with the next kernel's own IMA measurements (IMA's list, not this log)
    before = _pcrread(r.serial, "before")
    with_markers = KL.replay_with_markers(events, banks)
    for b in banks:
        for i, m in marked.items():
            assert m["tpm"][b] == before[b][i], f"{b} PCR {i}: the marker does not state the TPM's value"
            assert replayed[b].get(i) != tpm[b][i]  # tpm2_eventlog alone cannot explain it: hence the marker
        assert with_markers[b][UNRECORDED_PCR] == tpm[b][UNRECORDED_PCR], f"{b} PCR {UNRECORDED_PCR}"
    assert set(marked) <= {UNRECORDED_PCR, IMA_PCR}, marked
    if IMA_PCR in marked:
        assert marked[IMA_PCR]["reason"] == "ima", marked

    # the log's story: firmware log, carried section (the PCR 15 record, the late PCR 11 one),
    # the boundary, then the UKI's own measurements (PCR 4 image, PCR 11 sections, PCR 5 EBS)
    kinds = _markers(events)
    carried = [m["pcr"] for _, m in kinds if m["kind"] == "carried_record"]
    assert carried == [15, 11], kinds
    assert not [m for _, m in kinds if m["kind"] == "not_measured"], kinds   # finalized: no such marker
    boundary = [i for i, m in kinds if m["kind"] == "boundary"]
    assert len(boundary) == 1, kinds
    after = events[boundary[0] + 1:]
    assert after[0].pcr == 4 and after[0].event_type == HT.EV_EFI_BOOT_SERVICES_APPLICATION
    assert any(e.pcr == 11 and ".linux".encode("utf-16-le") in e.data for e in after), \
        "the UKI's PCR 11 events are missing"
    assert [e.data for e in after if e.pcr == 5][-2:] == [HT.EXIT_BOOT_SERVICES_INVOCATION,
                                                          HT.EXIT_BOOT_SERVICES_SUCCEEDED]
    assert "vmrun: kexec boundary" in text   # tpm2_eventlog shows the EV_EFI_ACTION string

    # the prediction made at load time holds for every PCR the late extend did not touch (PCR 10
    # goes on with the next kernel's IMA measurements)
    for b in banks:
        for i in range(16):
            if i not in (11, IMA_PCR):
                assert plan["predicted"][b][str(i)] == tpm[b][i].hex(), f"{b} PCR {i}: prediction differs"


@pytest.mark.timeout(500)
def test_measured_kdump_arm_changes_no_pcr(bookworm_kernel, payload_cache, tmp_path):
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.measured=kdump"
    uki, esp = _uki(payload_cache, tmp_path, "kdump.efi", cmdline)
    r = T.target_boot(bookworm_kernel, [
        T.Step("recorded", f"{RECORD} --pcr 15 --string machine-id:4711 --event-type machine-id"),
        T.Step("before", PCRREAD),
        T.Step("arm", f"{T.VMRUN} -q load --crash {uki} --esp {esp} --json"),
        T.Step("after", PCRREAD),
        T.Step("crash", "echo c > /proc/sysrq-trigger"),
    ], cpu="la57", tpm=True, timeout=420, append=f"{Q.DEFAULT_APPEND} {CRASHKERNEL}",
        until=ovmf_tpm.END_MARKER)
    assert not r.timed_out and "VMRUN-STEP-BEGIN crash" in r.serial, str(r)
    before, after = _pcrread(r.serial, "before"), _pcrread(r.serial, "after")
    assert before and before == after, "arming the crash kernel changed PCRs"
    plan = _json(r.serial, "arm")["load"]["metadata"]["measured"]
    assert plan["slot"] == "crash" and plan["not_measured"] == "crash_kernel", plan
    tpm, log = _reference(r.serial, "VMRUN-STEP-BEGIN crash")
    events = HT.parse(log)
    kinds = _markers(events)
    nm = [(i, m) for i, m in kinds if m["kind"] == "not_measured"]
    assert len(nm) == 1 and nm[0][1]["reason"] == "crash_kernel" and nm[0][1]["measured"] == 0, kinds
    assert nm[0][1]["total"] == len(plan["extends"]) > 0, (nm, len(plan["extends"]))
    # the events before the marker replay to the TPM (tpm2_eventlog on that prefix of the log)
    cut = events[nm[0][0]].offset
    path = tmp_path / "prefix.log"
    path.write_bytes(log[:cut])
    replayed, _ = tpm2_eventlog_pcrs(path)
    marked = {m["pcr"] for _, m in kinds if m["kind"] == "pcr_state"}
    for b in tpm:
        for i in range(16):
            if i not in marked:
                assert replayed[b].get(i, bytes(len(tpm[b][i]))) == tpm[b][i], f"{b} PCR {i}"
    # and the TPM is what it was when the crash kernel was armed (but PCR 10, which the crash
    # kernel's IMA extends)
    for b in tpm:
        for i in range(16):
            if i != IMA_PCR:
                assert tpm[b][i].hex() == before[b][i], f"{b} PCR {i} changed between arming and the crash"
