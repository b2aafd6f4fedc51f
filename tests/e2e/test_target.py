"""vmrun on the UEFI machine that kexecs: Debian's kernel booted by OVMF in QEMU (TCG), with
its own memory map, system table, variables and a nested /dev/kvm (see tests/e2e/target.py).

Every vmrun command here runs inside that guest with no cross-staging option (no --memmap,
--acpi-rsdp, --smbios): what it stages is for the machine it runs on. Each test boots the
target with 5-level paging (``-cpu max``) or 4-level paging (``-cpu max,la57=off``); kexec
then enters vmrun's purgatory in that mode.

The last tests boot the target with systemd as PID 1 (tests/e2e/systemd_target.py): vmrun's
units installed by scripts/install-units, `vmrun kexec -l` through the socket-activated
service then `systemctl kexec`, and vmrun-kdump.service arming a crash UKI at boot.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid

import pytest

from tests.e2e import qemu as Q
from tests.e2e import systemd_target as S
from tests.e2e import target as T
from tests.e2e.efiapps import build_apps
from tests.e2e.uki import build_uki

pytestmark = [pytest.mark.slow, pytest.mark.payloads]

PAGING = {"la57": "VMRUN-PAGING-5-LEVEL", "no-la57": "VMRUN-PAGING-4-LEVEL"}


def _after_exec(r, cpu: str) -> str:
    """The second kernel's part of the session, after checking the first one's paging mode."""
    assert PAGING[cpu] in r.serial, str(r)
    assert "VMRUN-STEP-BEGIN exec" in r.serial, str(r)
    after = r.serial.split("VMRUN-STEP-BEGIN exec", 1)[1]
    assert re.search(r"Linux version \S+", after), str(r)          # the second kernel's banner
    assert re.search(r"efi: EFI v[0-9.]+ by vmrun", after), str(r)   # booted through vmrun's tables
    return after


def _status(r, step: str) -> dict:
    text, rc = T.step_output(r.serial, step)
    assert rc == 0, str(r)
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("cpu", ["la57", "no-la57"])
def test_self_staged_kernel_boots_after_kexec(cpu, bookworm_kernel, test_initrd):
    """`vmrun stage` for the machine itself, `vmrun load STAGED` (its memory-map check passes:
    same machine), `vmrun status`, `vmrun exec`: the staged kernel boots with its initrd and
    the staged command line."""
    cmdline = f"console=ttyS0,115200 panic=-1 vmrun.target=stage-{cpu}"
    r = T.target_boot(bookworm_kernel, [
        T.Step("stage", f"{T.VMRUN} -q stage {bookworm_kernel} --initrd {test_initrd} "
                        f"--cmdline '{cmdline}' -o /run/staged.elf"),
        T.Step("load", f"{T.VMRUN} -q load /run/staged.elf"),
        T.Step("status", f"{T.VMRUN} -q status --json"),
        T.Step("exec", f"{T.VMRUN} -q exec"),
    ], cpu=cpu)
    assert not r.failed and not r.timed_out, str(r)
    st = _status(r, "status")
    assert st["normal"]["loaded"] and st["normal"]["by_vmrun"] and not st["normal"]["stale"], st
    assert st["normal"]["record"]["source"] == {"kind": "staged file", "path": "/run/staged.elf"}, st
    assert st["normal"]["record"]["cmdline"] == cmdline, st
    assert not st["crash"]["loaded"], st
    after = _after_exec(r, cpu)
    assert "VMRUN-INITRD-OK" in after, str(r)
    assert cmdline in after.split("VMRUN-INITRD-OK", 1)[1], str(r)
    assert "reboot: Power down" in after, str(r)  # ACPI found through the target's own RSDP


@pytest.mark.timeout(400)
@pytest.mark.parametrize("cpu,stub", [("la57", "257"), ("no-la57", "252")])
def test_uki_loaded_in_one_step_boots_after_kexec(cpu, stub, bookworm_kernel, payload_cache, test_initrd,
                                                   tmp_path):
    """`vmrun load UKI` (run, stage in memory, kexec_load; no file): after `vmrun exec` the
    kernel boots with the UKI's own .cmdline and .initrd."""
    cmdline = f"console=ttyS0,115200 panic=-1 vmrun.target=uki-{stub}-{cpu}"
    esp = tmp_path / "esp"
    (esp / "EFI" / "Linux").mkdir(parents=True)
    uki = build_uki(payload_cache / "stubs" / stub / "linuxx64.efi.stub", esp / "EFI" / "Linux" / "uki.efi",
                    linux=bookworm_kernel, initrd=test_initrd, cmdline=cmdline)
    r = T.target_boot(bookworm_kernel, [
        T.Step("load", f"{T.VMRUN} -q load {uki} --esp {esp}"),
        T.Step("status", f"{T.VMRUN} -q status --json"),
        T.Step("exec", f"{T.VMRUN} -q exec"),
    ], cpu=cpu)
    assert not r.failed and not r.timed_out, str(r)
    load_text, _ = T.step_output(r.serial, "load")
    assert "loaded:   uki.efi as the kexec image" in load_text, str(r)
    st = _status(r, "status")
    rec = st["normal"]["record"]
    assert st["normal"]["by_vmrun"] and rec["source"]["kind"] == "payload", st
    assert rec["source"]["path"] == str(uki) and rec["payload"]["name"] == "uki.efi", st
    assert rec["pcrs"]["sha256"]["11"] != "00" * 32, st  # systemd-stub measured the UKI into PCR 11
    after = _after_exec(r, cpu)
    assert "VMRUN-INITRD-OK" in after, str(r)
    assert cmdline in after.split("VMRUN-INITRD-OK", 1)[1], str(r)  # the UKI's .cmdline


@pytest.mark.efiapps
@pytest.mark.timeout(300)
def test_host_vars_are_the_targets_variables(bookworm_kernel):
    """`vmrun run --host-vars` on the target: every variable in the target's efivarfs (as its
    kernel reads them from OVMF's runtime services) reaches the payload through
    GetNextVariableName/GetVariable with the same vendor GUID, attributes and data. The target
    has a TPM (swtpm): its kernel offers /dev/tpmrm0 and OVMF's event log in securityfs."""
    apps = build_apps()
    dump = ('for f in /sys/firmware/efi/efivars/*; do printf "EFIVARFS %s " "${f##*/}"; '
            'od -An -v -tx1 "$f" | tr -d " \\n"; echo; done')
    r = T.target_boot(bookworm_kernel, [
        T.Step("efivarfs", dump),
        T.Step("varlist", f"{T.VMRUN} -q run --host-vars {apps / 'varlist.efi'}", may_fail=True),
        T.Step("tpm", "ls /dev/tpmrm0 && head -c 4 /sys/kernel/security/tpm0/binary_bios_measurements "
                      "| od -An -tx1"),
    ], cpu="la57", tpm=True)
    assert not r.failed and not r.timed_out, str(r)
    tpm_text, rc = T.step_output(r.serial, "tpm")
    # TCG PC Client log: the first event is SHA1-format, PCR 0 (a little-endian u32 0)
    assert rc == 0 and "/dev/tpmrm0" in tpm_text and "00 00 00 00" in tpm_text, str(r)
    ref_text, rc = T.step_output(r.serial, "efivarfs")
    assert rc == 0, str(r)
    target = {}
    for m in re.finditer(r"^EFIVARFS (\S+)-([0-9a-f-]{36}) ([0-9a-f]+)\s*$", ref_text, re.M):
        raw = bytes.fromhex(m[3])
        target[(m[1], uuid.UUID(m[2]))] = (int.from_bytes(raw[:4], "little"), raw[4:])
    assert len(target) >= 5 and ("BootOrder", uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")) in target, ref_text
    out, rc = T.step_output(r.serial, "varlist")
    assert rc == 23, str(r)  # the app returns: outcome payload_returned
    seen = {}
    for m in re.finditer(r"VAR ([0-9a-f]{32}) (\S+) attrs=0x([0-9a-f]+) size=(\d+) data=([0-9a-f]*)", out):
        seen[(m[2], uuid.UUID(bytes_le=bytes.fromhex(m[1])))] = (int(m[3], 16), int(m[4]), bytes.fromhex(m[5]))
    for key, (attrs, data) in target.items():
        assert key in seen, f"{key} missing from what the payload saw:\n{out}"
        got_attrs, got_size, got_head = seen[key]
        assert (got_attrs, got_size, got_head) == (attrs, len(data), data[:64]), key


# --------------------------------------------------------------------------
# kdump standby
# --------------------------------------------------------------------------

CRASHKERNEL = "crashkernel=256M"
KDUMP_DONE = "VMRUN-KDUMP-DONE"
# The kdump kernel's /init: what /proc/vmcore begins with (ELF magic, e_type), the VMCOREINFO
# note's OSRELEASE (in the merged note segment right after the headers), its command line.
KDUMP_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if [ -r /proc/vmcore ]; then
    magic=$(head -c 4 /proc/vmcore | od -An -tx1 | tr -d ' \\n')
    etype=$(head -c 18 /proc/vmcore | tail -c 2 | od -An -tx1 | tr -d ' \\n')
    osrel=$(head -c 4194304 /proc/vmcore | strings | grep -m1 '^OSRELEASE=')
    echo "VMRUN-VMCORE magic=$magic etype=$etype $osrel size=$(stat -c %s /proc/vmcore)"
else
    echo VMRUN-VMCORE-MISSING
fi
echo "VMRUN-KDUMP-CMDLINE $(cat /proc/cmdline)"
grep -E "System RAM|Crash kernel" /proc/iomem | sed 's/^/VMRUN-KDUMP-IOMEM /'
echo """ + KDUMP_DONE + """
poweroff -f
"""


@pytest.fixture(scope="module")
def kdump_initrd(tmp_path_factory):
    return Q.build_initramfs(tmp_path_factory.mktemp("kdump") / "kdump.cpio", {}, KDUMP_INIT,
                             with_kexec=False)


def _kdump_session(kernel, load_args: str, cmdline: str, cpu: str) -> None:
    """Boot a target with crashkernel=256M, `vmrun load --crash LOAD_ARGS`, `vmrun status`,
    crash it, and check what the kdump kernel found."""
    r = T.target_boot(kernel, [
        T.Step("uname", "uname -r"),
        T.Step("load", f"{T.VMRUN} -q load --crash {load_args}"),
        T.Step("status", f"{T.VMRUN} -q status --json"),
        T.Step("crash", "echo c > /proc/sysrq-trigger"),
    ], cpu=cpu, append=f"{Q.DEFAULT_APPEND} {CRASHKERNEL}", until=KDUMP_DONE)
    _check_kdump(r, cmdline)


def _check_kdump(r, cmdline: str) -> None:
    assert not r.failed and not r.timed_out and KDUMP_DONE in r.serial, str(r)
    first_release, rc = T.step_output(r.serial, "uname")
    assert rc == 0, str(r)
    st = _status(r, "status")
    assert st["crash"]["loaded"] and st["crash"]["by_vmrun"] and not st["crash"]["stale"], st
    assert not st["normal"]["loaded"], st
    crash = st["crash"]["crash_regions"]
    assert len(crash) == 1, st
    start, end = int(crash[0]["start"], 16), int(crash[0]["end"], 16) + 1
    assert end - start == 256 << 20, st  # crashkernel=256M
    kd = st["crash"]["record"]["kdump"]
    hdr = int(kd["elfcorehdr"]["addr"], 16)
    assert start <= hdr < end, kd
    for seg in st["crash"]["record"]["segments"]:  # every segment inside the reservation
        assert start <= int(seg["paddr"], 16) and int(seg["paddr"], 16) + seg["memsz"] <= end, st
    after = r.serial.split("VMRUN-STEP-BEGIN crash", 1)[1]
    assert "sysrq: Trigger a crash" in after, str(r)
    m = re.search(r"VMRUN-VMCORE magic=(\w+) etype=(\w+) OSRELEASE=(\S+) size=(\d+)", after)
    assert m, str(r)
    assert m[1] == "7f454c46" and m[2] == "0400", m[0]   # ELF, ET_CORE (little endian)
    assert m[3] == first_release.strip().splitlines()[-1], (m[0], first_release)  # the crashed kernel's
    assert int(m[4]) > 1 << 30, m[0]  # the crashed kernel's RAM (2 GiB guest less 256 MiB) is dumped
    kcmd = re.search(r"VMRUN-KDUMP-CMDLINE (.*)", after)[1].strip()
    assert kcmd.startswith(cmdline), kcmd  # the payload's own command line first
    assert f"elfcorehdr={kd['elfcorehdr']['size']:#x}@{hdr:#x}" in kcmd.split(), kcmd
    for word in ("reset_devices", "nr_cpus=1", "irqpoll"):
        assert word in kcmd.split(), kcmd
    assert "crashkernel=" not in kcmd, kcmd
    ram = re.findall(r"VMRUN-KDUMP-IOMEM ([0-9a-f]+)-([0-9a-f]+) : System RAM", after)
    assert ram, str(r)
    for s, e in ram:  # the kdump kernel's RAM: the reservation and the low MiB only
        s, e = int(s, 16), int(e, 16) + 1
        assert (start <= s and e <= end) or e <= 1 << 20, (hex(s), hex(e))


@pytest.mark.timeout(400)
def test_kdump_uki(bookworm_kernel, payload_cache, kdump_initrd, tmp_path):
    """`vmrun load --crash UKI` on a target booted with crashkernel=256M, then a crash: the
    UKI's kernel boots in the reservation, with its own .cmdline plus the kdump additions, and
    its /proc/vmcore is the crashed kernel's (ELF core, VMCOREINFO with its OSRELEASE)."""
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.kdump=uki"
    esp = tmp_path / "esp"
    (esp / "EFI" / "Linux").mkdir(parents=True)
    uki = build_uki(payload_cache / "stubs" / "257" / "linuxx64.efi.stub", esp / "EFI" / "Linux" / "kdump.efi",
                    linux=bookworm_kernel, initrd=kdump_initrd, cmdline=cmdline)
    _kdump_session(bookworm_kernel, f"{uki} --esp {esp}", cmdline, cpu="la57")


@pytest.mark.timeout(400)
def test_kdump_efi_stub_kernel(bookworm_kernel, kdump_initrd):
    """The same with a plain EFI-stub kernel, `--cmdline` and `--initrd`, on a 4-level target."""
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.kdump=kernel"
    _kdump_session(bookworm_kernel, f"{bookworm_kernel} --initrd {kdump_initrd} --cmdline '{cmdline}'",
                   cmdline, cpu="no-la57")


@pytest.mark.timeout(300)
def test_kdump_errors_on_the_target(bookworm_kernel, kdump_initrd):
    """No reservation: a clear error naming crashkernel=, exit 50. A reservation too small for
    the payload: the sizes, exit 52. Neither arms anything."""
    r = T.target_boot(bookworm_kernel, [
        T.Step("none", f"{T.VMRUN} -q load --crash {bookworm_kernel} --initrd {kdump_initrd}", may_fail=True),
    ], cpu="no-la57")
    out, rc = T.step_output(r.serial, "none")
    assert rc == 50 and "crashkernel=" in out and "Traceback" not in out, str(r)
    r = T.target_boot(bookworm_kernel, [
        T.Step("small", f"{T.VMRUN} -q load --crash {bookworm_kernel} --initrd {kdump_initrd}", may_fail=True),
        T.Step("status", f"{T.VMRUN} -q status --json"),
    ], cpu="no-la57", append=f"{Q.DEFAULT_APPEND} crashkernel=48M")
    out, rc = T.step_output(r.serial, "small")
    assert rc == 52 and "crash kernel reservation" in out and "MiB" in out and "Traceback" not in out, str(r)
    assert not _status(r, "status")["crash"]["loaded"], str(r)


# --------------------------------------------------------------------------
# systemd as PID 1: vmrun's units (tests/e2e/systemd_target.py)
# --------------------------------------------------------------------------

ESP = "/boot/efi"


@pytest.mark.timeout(400)
def test_systemd_kexec_through_the_socket_activated_service(bookworm_kernel, payload_cache, test_initrd,
                                                            tmp_path):
    """systemd 252 as PID 1, vmrun's units installed by scripts/install-units and vmrun.socket
    enabled: `vmrun kexec -l UKI` is served by vmrun.service, which the socket starts on
    demand; `systemctl kexec` shuts the system down in order and boots the UKI, whose
    initramfs prints its marker and the UKI's .cmdline."""
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.target=systemd-kexec"
    uki = build_uki(payload_cache / "stubs" / "257" / "linuxx64.efi.stub", tmp_path / "uki.efi",
                    linux=bookworm_kernel, initrd=test_initrd, cmdline=cmdline)
    guest_uki = f"{ESP}/EFI/Linux/uki.efi"
    r = S.systemd_boot(bookworm_kernel, [
        T.Step("idle", "systemctl is-active vmrun.socket && ! systemctl is-active vmrun.service"),
        T.Step("load", f"{S.VMRUN_BIN} kexec -l {guest_uki} --esp={ESP}"),
        T.Step("service", "systemctl is-active vmrun.service && journalctl -u vmrun.service -o json --no-pager"),
        T.Step("status", f"{S.VMRUN_BIN} -q status --json"),
        T.Step("kexec", "systemctl kexec && sleep 600"),
    ], root_files={guest_uki: uki})
    assert not r.failed and not r.timed_out, str(r)
    assert "VMRUN-SYSTEMD-PID1 systemd" in r.serial, str(r)
    idle, _ = T.step_output(r.serial, "idle")
    assert idle.split()[:2] == ["active", "inactive"], idle   # socket listening, service not started yet
    load, _ = T.step_output(r.serial, "load")
    assert "loaded:   uki.efi into the normal slot by the vmrun service" in load, str(r)
    service, _ = T.step_output(r.serial, "service")
    journal = [json.loads(line) for line in service.splitlines() if line.startswith("{")]
    vmrun_records = [e for e in journal if e.get("SYSLOG_IDENTIFIER") == "vmrun"]
    # structured journal fields (systemd-python): who asked for what, and what came of it
    assert any(e["MESSAGE"].startswith("daemon.start") and e.get("VMRUN_SOCKET") == "socket-activated"
               for e in vmrun_records), service
    assert any(e["MESSAGE"].startswith("request ") and e.get("VMRUN_METHOD") == "Load"
               and e.get("VMRUN_PAYLOAD") == guest_uki and e.get("VMRUN_CALLER_UID") == "0" for e in vmrun_records), service
    sha = hashlib.sha256(uki.read_bytes()).hexdigest()
    assert any(e["MESSAGE"].startswith("reply ") and e.get("VMRUN_METHOD") == "Load" and e.get("VMRUN_SHA256") == sha
               and e.get("VMRUN_EXIT_CODE") == "0" for e in vmrun_records), service
    st = _status(r, "status")
    rec = st["normal"]["record"]
    assert st["normal"]["loaded"] and st["normal"]["by_vmrun"] and rec["source"]["path"] == guest_uki, st
    after = r.serial.split("VMRUN-STEP-BEGIN kexec", 1)[1]
    # systemd's orderly way: its kexec service, then systemd-shutdown's reboot(LINUX_REBOOT_CMD_KEXEC)
    assert "Starting systemd-kexec.service" in after and "Rebooting with kexec" in after, str(r)
    assert after.index("Stopping vmrun.service") < after.index("kexec_core: Starting new kernel"), str(r)
    assert re.search(r"efi: EFI v[0-9.]+ by vmrun", after), str(r)
    assert "VMRUN-INITRD-OK" in after, str(r)
    assert cmdline in after.split("VMRUN-INITRD-OK", 1)[1], str(r)   # the UKI's .cmdline


@pytest.mark.timeout(400)
def test_systemd_kdump_service_arms_the_crash_uki_at_boot(bookworm_kernel, payload_cache, kdump_initrd,
                                                          tmp_path):
    """systemd as PID 1 on a target booted with crashkernel=256M, /etc/vmrun/kdump.conf naming a
    UKI and vmrun-kdump.service enabled: the service arms it during boot, `systemctl status`
    shows what is armed, and a sysrq crash boots the UKI's kernel in the reservation with the
    crashed kernel's /proc/vmcore."""
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.kdump=systemd"
    uki = build_uki(payload_cache / "stubs" / "257" / "linuxx64.efi.stub", tmp_path / "kdump.efi",
                    linux=bookworm_kernel, initrd=kdump_initrd, cmdline=cmdline)
    guest_uki = f"{ESP}/EFI/Linux/kdump.efi"
    conf = f'payload = "{guest_uki}"\nesp = "{ESP}"\n'
    r = S.systemd_boot(bookworm_kernel, [
        T.Step("uname", "uname -r"),
        T.Step("unit", "systemctl status vmrun-kdump.service --no-pager --full"),
        T.Step("status", f"{S.VMRUN_BIN} -q status --json"),
        T.Step("crash", "echo c > /proc/sysrq-trigger"),
    ], root_files={guest_uki: uki, "/etc/vmrun/kdump.conf": conf.encode()},
        enable=("vmrun.socket", "vmrun-kdump.service"), append=CRASHKERNEL, until=KDUMP_DONE)
    _check_kdump(r, cmdline)
    unit, _ = T.step_output(r.serial, "unit")
    assert "vmrun-kdump.service; enabled" in unit and "active (exited)" in unit, unit
    assert f"armed: {guest_uki} (sha256 " in unit and "as the crash kernel" in unit, unit
    assert r.serial.index("Finished vmrun-kdump.service") < r.serial.index(T.READY), str(r)  # at boot
