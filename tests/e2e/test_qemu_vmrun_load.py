"""``vmrun load`` + ``vmrun exec`` for real, inside a QEMU (TCG) guest running Debian's kernel.

test_qemu_kexec.py proves the handoff with kexec-tools; here vmrun's own kexec_load(2) path
(``vmrun/kexec.py``) does the job: the guest mounts this machine's root read-only over virtio
9p (the modules come from the cached kernel package, see ``scripts/fetch-payloads``), and its
/init runs, chrooted there, this checkout's vmrun with the interpreter running these tests.
``vmrun load`` checks the handoff's memory-map digest against the guest's own
``/sys/firmware/memmap``, so the handoff is staged for that guest's e820 map (read from its
boot messages by ``qemu.guest_e820``): the same file is accepted by a guest with that memory
size and refused, before any kexec, by one with another.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun.kexec import HandoffMismatch
from tests.e2e import qemu

pytestmark = [pytest.mark.slow, pytest.mark.kvm, pytest.mark.payloads]

REPO = Path(__file__).resolve().parents[2]
GUEST_MB = 1536
OTHER_MB = 1024
CMDLINE = "console=ttyS0,115200 panic=-1 vmrun.load=e2e"
# vmrun as these tests run it: this interpreter, this checkout (paths seen unchanged in the
# guest through the shared root)
VMRUN = [sys.executable, "-m", "vmrun.cli"]
VMRUN_ENV = {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module", autouse=True)
def _tools():
    missing = [t for t in (qemu.QEMU, "gcc", "ldd") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup", pytrace=False)


@pytest.fixture(scope="module")
def modules(bookworm_kernel):
    try:
        return qemu.ninep_modules(bookworm_kernel)
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def staged(bookworm_kernel, test_initrd, modules, tmp_path_factory):
    """The bookworm kernel staged for the GUEST_MB guest (the one with the 9p device, whose
    e820 map and RSDP it reads first)."""
    d = tmp_path_factory.mktemp("vmrun-load")
    memmap = d / "guest.e820"
    memmap.write_text(qemu.guest_e820(bookworm_kernel, GUEST_MB, extra_args=qemu.hostroot_args()))
    rsdp = qemu.guest_acpi_rsdp(bookworm_kernel, GUEST_MB, extra_args=qemu.hostroot_args())
    # ACPI 6.5 §5.2.5.1: on a legacy BIOS (SeaBIOS) the RSDP is on a 16-byte boundary in the
    # BIOS read-only area 0xE0000-0xFFFFF
    assert rsdp is not None and 0xE0000 <= rsdp <= 0xFFFF0 and rsdp % 16 == 0, rsdp
    out = d / "staged.elf"
    st = subprocess.run([*VMRUN, "-q", "stage", str(bookworm_kernel), "-o", str(out),
                         "--memmap", str(memmap), "--acpi-rsdp", hex(rsdp), "--cmdline", CMDLINE,
                         "--initrd", str(test_initrd)],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert st.returncode == 0 and out.is_file(), st.stdout + st.stderr
    return out


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[-1].split(end, 1)[0]


@pytest.mark.timeout(240)
def test_vmrun_load_and_exec_in_the_guest(bookworm_kernel, staged):
    r = qemu.vmrun_load_boot(bookworm_kernel, staged, VMRUN, env=VMRUN_ENV,
                             memory_mb=GUEST_MB, timeout=150)
    assert not r.failed and not r.timed_out, str(r)
    s = r.serial
    assert qemu.VMRUN_LOAD_OK in s, str(r)
    load_output = _between(s, "VMRUN-LOAD-BEGIN", "VMRUN-LOAD-END")
    assert f"loaded {staged}" in load_output and "vmrun exec" in load_output, str(r)
    assert re.search(r"VMRUN-LOAD-END \S+ kexec_loaded=1\b", s), str(r)
    after = s.split(qemu.VMRUN_EXEC, 1)[-1]
    assert re.search(r"Linux version \S+", after), str(r)  # the second kernel's banner
    assert re.search(r"efi: EFI v[0-9.]+ by vmrun", after), str(r)
    assert "VMRUN-INITRD-OK" in after, str(r)
    assert CMDLINE in after.split("VMRUN-INITRD-OK", 1)[1], str(r)
    assert "reboot: Power down" in after and r.returncode == 0, str(r)


@pytest.mark.timeout(240)
def test_vmrun_load_refuses_a_handoff_for_another_memory_size(bookworm_kernel, staged):
    r = qemu.vmrun_load_boot(bookworm_kernel, staged, VMRUN, env=VMRUN_ENV,
                             memory_mb=OTHER_MB, timeout=150)
    assert not r.failed and not r.timed_out, str(r)
    s = r.serial
    assert f"{qemu.VMRUN_LOAD_FAILED} rc={HandoffMismatch.exit_code}" in s, str(r)
    load_output = _between(s, "VMRUN-LOAD-BEGIN", "VMRUN-LOAD-END")
    assert "another memory map" in load_output, str(r)
    assert re.search(r"VMRUN-LOAD-END \S+ kexec_loaded=0\b", s), str(r)  # nothing loaded
    assert qemu.VMRUN_LOAD_OK not in s and qemu.VMRUN_EXEC not in s, str(r)
    assert s.count("Linux version") == 1, str(r)  # no second kernel
    assert "reboot: Power down" in s and r.returncode == 0, str(r)  # the /init's poweroff
