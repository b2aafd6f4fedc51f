"""Real kexec, in a QEMU (TCG) guest running Debian's kernel: the handoff path vmrun relies on.

vmrun hands a frozen payload over as an ELF64 ET_EXEC whose PT_LOAD segments sit at physical
addresses, loaded with ``kexec -l X.elf -t elf-x86_64 --args-none``. These tests prove, with
Debian's own kexec-tools inside a real Linux guest, that such an ELF is placed at p_paddr and
entered in long mode, and they read the guest's e820 map (what vmrun's ``--memmap`` takes to
stage a handoff for that guest).
"""

from __future__ import annotations

import re
import shutil
import struct
import sys
import subprocess

import pytest

from hostsvc.memmap import TargetMemoryMap
from tests.e2e import qemu

pytestmark = [pytest.mark.slow, pytest.mark.payloads]

MiB = 1 << 20
GUEST_MB = 1536


@pytest.fixture(scope="session", autouse=True)
def _tools():
    missing = [t for t in (qemu.QEMU, "as", "ld", "gcc", "ldd") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup", pytrace=False)


@pytest.fixture(scope="session")
def hello_elf(tmp_path_factory):
    return qemu.build_kexec_hello(tmp_path_factory.mktemp("kexec") / "hello.elf")


def test_hello_elf_is_one_segment_at_its_physical_address(hello_elf):
    data = hello_elf.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELFCLASS64
    e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIQQ", data, 16)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    assert (e_type, e_machine) == (2, 62)  # ET_EXEC, EM_X86_64
    loads = [struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
             for i in range(e_phnum)]
    loads = [p for p in loads if p[0] == 1]  # PT_LOAD
    assert len(loads) == 1
    _, _, _, vaddr, paddr, filesz, memsz, _ = loads[0]
    assert paddr == vaddr == e_entry == qemu.KEXEC_HELLO_BASE
    assert paddr % 4096 == 0 and 0 < filesz <= memsz


def test_initramfs_is_a_deterministic_newc_archive(tmp_path):
    a = qemu.build_initramfs(tmp_path / "a.cpio", {"staged.elf": b"x" * 5}, "#!/bin/sh\n")
    b = qemu.build_initramfs(tmp_path / "b.cpio", {"staged.elf": b"x" * 5}, "#!/bin/sh\n")
    assert a.read_bytes() == b.read_bytes()
    if shutil.which("cpio") is None:  # the reference reader: never skipped
        pytest.fail("no cpio(1) to read the archive back (scripts/setup installs cpio)", pytrace=False)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=a.read_bytes(),
                             capture_output=True, check=True).stdout.decode().splitlines()
    by_name = {line.split(" -> ")[0].split()[-1]: line for line in listing}
    for want in ("init", "bin/busybox", "bin/sh", "sbin/kexec", "dev/console", "staged.elf",
                 "lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6",
                 "lib/x86_64-linux-gnu/libxenctrl.so.4.17"):
        assert want in by_name, "\n".join(listing)
    assert by_name["dev/console"].startswith("crw"), by_name["dev/console"]
    assert " 5,   1 " in by_name["dev/console"], by_name["dev/console"]


@pytest.mark.timeout(180)
def test_guest_e820_is_parsed(bookworm_kernel):
    text = qemu.guest_e820(bookworm_kernel, GUEST_MB)
    lines = text.splitlines()
    assert lines and all(line.startswith("BIOS-e820: [mem 0x") for line in lines), text
    assert any(line.endswith("] usable") for line in lines), text
    m = TargetMemoryMap.from_text(text, source="qemu guest")
    assert abs(m.ram_bytes() - GUEST_MB * MiB) < 4 * MiB, m.canonical_text()
    # the hello ELF's segment is RAM in that guest
    assert any(r.start <= qemu.KEXEC_HELLO_BASE < r.end for r in m.ram())


@pytest.mark.timeout(180)
def test_kexec_of_a_hand_written_elf(bookworm_kernel, hello_elf):
    r = qemu.kexec_boot(bookworm_kernel, hello_elf, memory_mb=GUEST_MB, timeout=120)
    assert r.matched, str(r)
    s = r.serial
    # kexec-tools put the one segment at its p_paddr, and the jump came after the exec marker
    assert f"segment[0].mem   = {qemu.KEXEC_HELLO_BASE:#x}" in s, str(r)
    assert f"entry = {qemu.KEXEC_HELLO_BASE:#x}" in s, str(r)
    assert s.index("VMRUN-KEXEC-EXEC") < s.index(qemu.KEXEC_HELLO_MARKER), str(r)


@pytest.mark.timeout(180)
def test_kexec_load_failure_is_reported_at_once(bookworm_kernel, tmp_path):
    """A segment outside the guest's RAM: kexec -l refuses it and the run ends on the marker
    (not on the timeout), with kexec-tools' own message in the serial text."""
    elf = qemu.build_kexec_hello(tmp_path / "high.elf", base=0x7000_0000)  # past 1.5 GiB
    r = qemu.kexec_boot(bookworm_kernel, elf, memory_mb=GUEST_MB, timeout=120)
    assert r.failed and not r.matched and not r.timed_out, str(r)
    assert "kexec -l exited with" in r.serial, str(r)
    assert "Invalid memory segment 0x70000000" in r.serial, str(r)
    assert "VMRUN-KEXEC-EXEC" not in r.serial, str(r)


@pytest.mark.timeout(180)
def test_a_fault_after_kexec_is_in_the_debug_log(bookworm_kernel, tmp_path):
    """What a broken handoff looks like: the code at the entry faults with no IDT, the CPU
    triple-faults, -no-reboot ends QEMU, and debug_log's exception log names the instruction."""
    elf = qemu.build_flat_elf(".code64\n.globl _start\n_start:\n mov $0x5a5a, %eax\n ud2\n",
                              tmp_path / "ud2.elf", qemu.KEXEC_HELLO_BASE)
    r = qemu.kexec_boot(bookworm_kernel, elf, memory_mb=GUEST_MB, timeout=120, debug_log=True)
    assert not r.matched and not r.failed and not r.timed_out, str(r)
    assert r.returncode == 0 and "VMRUN-KEXEC-EXEC" in r.serial, str(r)
    ud2_at = qemu.KEXEC_HELLO_BASE + 5  # after the 5-byte mov
    assert f"v=06 e=0000 i=0 cpl=0 IP=0010:{ud2_at:016x}" in r.qemu_log, r.qemu_log[-3000:]
    assert r.qemu_log.rstrip().endswith("Triple fault"), r.qemu_log[-3000:]


@pytest.mark.kvm
@pytest.mark.timeout(240)
@pytest.mark.parametrize("release,cpu", [("bookworm", "qemu64"), ("trixie", "qemu64"), ("bookworm", "max")])
def test_vmrun_staged_kernel_boots_after_kexec(release, cpu, request, test_initrd, tmp_path):
    """The whole handoff, for real: vmrun runs Debian's kernel to ExitBootServices against the
    QEMU guest's own memory map and ACPI RSDP, writes the handoff ELF; inside that guest,
    kexec-tools loads it and jumps to the purgatory, which returns from ExitBootServices; the
    kernel boots, runs the test initrd's /init (marker and command line) and powers off.
    The first kernel (the one that runs kexec) is the same release. With ``-cpu max`` the first
    kernel runs with 5-level paging (LA57), so kexec enters the purgatory with CR4.LA57 set."""
    kernel = request.getfixturevalue(f"{release}_kernel")
    cpu_args = ["-cpu", cpu]
    memmap = tmp_path / "guest.e820"
    memmap.write_text(qemu.guest_e820(kernel, GUEST_MB, extra_args=cpu_args))
    rsdp = qemu.guest_acpi_rsdp(kernel, GUEST_MB, extra_args=cpu_args)
    # ACPI 6.5 §5.2.5.1: on a legacy BIOS (SeaBIOS) the RSDP is on a 16-byte boundary in the
    # BIOS read-only area 0xE0000-0xFFFFF
    assert rsdp is not None and 0xE0000 <= rsdp <= 0xFFFF0 and rsdp % 16 == 0, rsdp
    cmdline = "console=ttyS0,115200 panic=-1 vmrun.handoff=e2e"
    staged = tmp_path / "staged.elf"
    st = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "stage", str(kernel),
                         "-o", str(staged), "--memmap", str(memmap), "--acpi-rsdp", hex(rsdp),
                         "--cmdline", cmdline, "--initrd", str(test_initrd)],
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and staged.is_file(), st.stdout + st.stderr
    r = qemu.kexec_boot(kernel, staged, memory_mb=GUEST_MB, timeout=150, until=None, extra_args=cpu_args)
    assert not r.failed and not r.timed_out, str(r)
    before, after = r.serial.split("VMRUN-KEXEC-EXEC", 1)
    # with -cpu max the first kernel really ran with 5-level paging
    assert ("VMRUN-PAGING-5-LEVEL" if cpu == "max" else "VMRUN-PAGING-4-LEVEL") in before, str(r)
    assert re.search(r"Linux version \S+", after), str(r)  # the second kernel's banner
    assert re.search(r"efi: EFI v[0-9.]+ by vmrun", after), str(r)  # the second kernel, booted through us
    assert "VMRUN-INITRD-OK" in after, str(r)
    assert cmdline in after.split("VMRUN-INITRD-OK", 1)[1], str(r)
    assert "reboot: Power down" in after and r.returncode == 0, str(r)  # ACPI found: RSDP ok


@pytest.mark.kvm
@pytest.mark.timeout(240)
@pytest.mark.parametrize("stub", ["252", "257"])
def test_vmrun_staged_uki_boots_after_kexec(stub, bookworm_kernel, payload_cache, test_initrd, tmp_path):
    """A UKI (Debian's systemd-stub around the bookworm kernel and the test initrd) staged from
    an ESP folder: after kexec the kernel boots with the UKI's own command line and initrd."""
    from tests.e2e.uki import build_uki
    memmap = tmp_path / "guest.e820"
    memmap.write_text(qemu.guest_e820(bookworm_kernel, GUEST_MB))
    rsdp = qemu.guest_acpi_rsdp(bookworm_kernel, GUEST_MB)
    assert rsdp is not None and 0xE0000 <= rsdp <= 0xFFFF0 and rsdp % 16 == 0, rsdp  # ACPI §5.2.5.1
    cmdline = f"console=ttyS0,115200 panic=-1 vmrun.uki={stub}-e2e"
    esp = tmp_path / "esp"
    (esp / "EFI" / "Linux").mkdir(parents=True)
    uki = build_uki(payload_cache / "stubs" / stub / "linuxx64.efi.stub", esp / "EFI" / "Linux" / "uki.efi",
                    linux=bookworm_kernel, initrd=test_initrd, cmdline=cmdline)
    staged = tmp_path / "staged.elf"
    st = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "stage", str(uki), "--esp", str(esp),
                         "-o", str(staged), "--memmap", str(memmap), "--acpi-rsdp", hex(rsdp)],
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and staged.is_file(), st.stdout + st.stderr
    r = qemu.kexec_boot(bookworm_kernel, staged, memory_mb=GUEST_MB, timeout=150, until=None)
    assert not r.failed and not r.timed_out, str(r)
    after = r.serial.split("VMRUN-KEXEC-EXEC", 1)[-1]
    assert re.search(r"Linux version 6\.1\.", after), str(r)
    assert "VMRUN-INITRD-OK" in after, str(r)
    assert cmdline in after.split("VMRUN-INITRD-OK", 1)[1], str(r)  # the UKI's .cmdline, not ours
    assert "reboot: Power down" in after and r.returncode == 0, str(r)
