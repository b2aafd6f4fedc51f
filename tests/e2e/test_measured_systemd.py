"""Measured kexec under systemd: systemd 252 as PID 1 on a UEFI target with a TPM 2.0
(tests/e2e/systemd_target.py, swtpm), vmrun's units and its system-shutdown hook installed by
scripts/install-units.

A userspace measurement with a record in systemd's measurement log (PCR 15) comes first; then
`vmrun kexec -l UKI` is served by the socket-activated vmrun.service, which stages the UKI
against the TPM (nothing extended); a unit whose ExecStop extends PCR 11 with a record stands
for systemd's own shutdown-time measurements; `systemctl kexec` stops every unit (that extend
among them), and systemd-shutdown runs vmrun's hook with the verb ``kexec`` just before
reboot(LINUX_REBOOT_CMD_KEXEC): `vmrun finalize` extends the TPM with the kexec boundary and the
UKI's measurements and reloads it with the final event log. The UKI's initramfs is the reference
one (tests/e2e/ovmf_tpm.py): the kexec'd kernel's TPM and event log must agree, PCR by PCR in
every bank, as tpm2-tools' tpm2_eventlog replays the log.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from hostsvc import tpm as HT
from tests.e2e import ovmf_tpm
from tests.e2e import systemd_target as S
from tests.e2e import target as T
from tests.e2e.test_measured_kexec import IMA_PCR, RECORD, _markers, _reference
from tests.e2e.uki import build_uki
from tests.unit.test_tpm import tpm2_eventlog_pcrs

pytestmark = [pytest.mark.slow, pytest.mark.payloads]

ESP = "/boot/efi"
SHUTDOWN_STRING = "shutdown:vmrun-test"
MEASURE_UNIT = "vmrun-test-shutdown-measure.service"
HOOK = "/usr/lib/systemd/system-shutdown/vmrun.shutdown"
# Stopped in the shutdown transaction, like the units that make systemd's own shutdown-time
# measurements: an extend of PCR 11 with its record in systemd's measurement log.
MEASURE_UNIT_TEXT = f"""\
[Unit]
Description=vmrun test: a recorded PCR 11 measurement at shutdown

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c {shlex.quote(f"{RECORD} --pcr 11 --string {SHUTDOWN_STRING} --event-type phase")}
StandardOutput=journal+console
StandardError=journal+console
"""


def _json(serial: str, step: str) -> dict:
    text, rc = T.step_output(serial, step)
    assert rc == 0, f"step {step} exited {rc}:\n{text}"
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


@pytest.mark.timeout(500)
def test_measured_kexec_through_systemd(bookworm_kernel, payload_cache, tmp_path):
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.measured=systemd"
    initrd = ovmf_tpm.make_reference_initrd(tmp_path / "ref.cpio")
    uki = build_uki(payload_cache / "stubs" / "257" / "linuxx64.efi.stub", tmp_path / "uki.efi",
                    linux=bookworm_kernel, initrd=initrd, cmdline=cmdline)
    guest_uki = f"{ESP}/EFI/Linux/uki.efi"
    r = S.systemd_boot(bookworm_kernel, [
        T.Step("recorded", f"{RECORD} --pcr 15 --string machine-id:4711 --event-type machine-id"),
        T.Step("load", f"{S.VMRUN_BIN} kexec -l {guest_uki} --esp={ESP}"),
        T.Step("status", f"{S.VMRUN_BIN} -q status --json"),
        T.Step("hook", f"stat -c '%a %n' {HOOK} && cat {HOOK}"),
        T.Step("arm", f"systemctl start {MEASURE_UNIT}"),
        T.Step("kexec", "systemctl kexec && sleep 600"),
    ], root_files={guest_uki: uki, f"/etc/systemd/system/{MEASURE_UNIT}": MEASURE_UNIT_TEXT.encode()},
        tpm=True, shutdown_hooks=True, timeout=440, until=re.escape(ovmf_tpm.END_MARKER))
    assert not r.failed and not r.timed_out, str(r)
    assert "VMRUN-SYSTEMD-PID1 systemd" in r.serial, str(r)
    load, _ = T.step_output(r.serial, "load")
    assert "loaded:   uki.efi into the normal slot by the vmrun service" in load, str(r)
    st = _json(r.serial, "status")
    plan = st["normal"]["record"]["measured"]
    banks = plan["banks"]
    assert set(banks) == {"sha1", "sha256", "sha384", "sha512"}, plan["banks"]   # OVMF + swtpm: all four
    assert plan.get("state", "staged") == "staged", plan     # nothing extended at load
    assert [c["pcr"] for c in plan["at_stage"]["carried"]] == [15], plan
    hook, _ = T.step_output(r.serial, "hook")   # install-units put it where systemd-shutdown looks
    assert f"755 {HOOK}" in hook and f"exec {S.VMRUN_BIN} finalize --if-kexec" in hook, hook

    # the shutdown: the unit's extend, then systemd-shutdown's hook finalizes, then the kexec
    after = r.serial.split("VMRUN-STEP-BEGIN kexec", 1)[1]
    assert "Starting systemd-kexec.service" in after and "Rebooting with kexec" in after, str(r)
    shutdown = after.split("kexec_core: Starting new kernel", 1)[0]
    extended = shutdown.index(f"extended PCR 11 (sha1, sha256, sha384, sha512) with '{SHUTDOWN_STRING}' (recorded)")
    n = len(plan["extends"])
    # vmrun's hook sends `vmrun finalize`'s report to the kernel log (systemd-shutdown gives hooks
    # /dev/null for stderr), which the console shows
    report = re.search(rf"measured: extended {n} of {n} events into the TPM", shutdown)
    assert report, shutdown[-6000:]
    assert extended < report.start() < shutdown.index("Rebooting with kexec"), shutdown[-6000:]

    # the kexec'd kernel: its TPM and event log
    assert re.search(r"efi: EFI v[0-9.]+ by vmrun", after), str(r)
    tpm, log = _reference(r.serial, "VMRUN-STEP-BEGIN kexec")
    assert set(tpm) == set(banks), tpm.keys()
    path = tmp_path / "next.log"
    path.write_bytes(log)
    replayed, text = tpm2_eventlog_pcrs(path)
    events = HT.parse(log)
    kinds = _markers(events)
    marked = {m["pcr"]: m for _, m in kinds if m["kind"] == "pcr_state"}
    assert set(marked) <= {IMA_PCR}, marked
    if IMA_PCR in marked:
        assert marked[IMA_PCR]["reason"] == "ima", marked
    for b in banks:
        for i in range(16):
            if i == IMA_PCR:
                continue
            assert replayed[b].get(i, bytes(len(tpm[b][i]))) == tpm[b][i], f"{b} PCR {i}: log and TPM differ"
    carried = [(m["pcr"], m["record"]) for _, m in kinds if m["kind"] == "carried_record"]
    assert [p for p, _ in carried] == [15, 11], kinds
    assert "machine-id:4711" in carried[0][1] and SHUTDOWN_STRING in carried[1][1], carried
    assert not [m for _, m in kinds if m["kind"] == "not_measured"], kinds   # finalized: no such marker
    boundary = [i for i, m in kinds if m["kind"] == "boundary"]
    assert len(boundary) == 1, kinds
    assert [i for i, m in kinds if m["kind"] == "carried_record"][-1] < boundary[0]
    after_boundary = events[boundary[0] + 1:]
    assert after_boundary[0].pcr == 4 and after_boundary[0].event_type == HT.EV_EFI_BOOT_SERVICES_APPLICATION
    assert any(e.pcr == 11 and ".linux".encode("utf-16-le") in e.data for e in after_boundary), \
        "the UKI's PCR 11 events are missing"
    assert "vmrun: kexec boundary" in text
