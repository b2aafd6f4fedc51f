"""Guest-memory cap, and staging for another machine's memory map (--memmap)."""

import json
import subprocess
import sys

import pytest

from vmrun import errors as E
from vmrun.runner import RunOptions, run_payload

pytestmark = [pytest.mark.kvm, pytest.mark.payloads]

# the map QEMU's SeaBIOS gives a 1536 MiB guest (as its kernel prints BIOS-e820 lines)
QEMU_1536M = """\
[    0.000000] BIOS-provided physical RAM map:
[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable
[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved
[    0.000000] BIOS-e820: [mem 0x00000000000f0000-0x00000000000fffff] reserved
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000005ffdffff] usable
[    0.000000] BIOS-e820: [mem 0x000000005ffe0000-0x000000005fffffff] reserved
[    0.000000] BIOS-e820: [mem 0x00000000feffc000-0x00000000feffffff] reserved
[    0.000000] BIOS-e820: [mem 0x00000000fffc0000-0x00000000ffffffff] reserved
"""


def test_memory_cap_ends_the_run(bookworm_kernel):
    r = run_payload(bookworm_kernel, RunOptions(memory_cap=32 << 20, timeout=60))
    assert r.outcome == "memory_cap"
    assert "cap" in r.error["message"]
    # the kernel asks for 64 MiB (0x4000 pages) to decompress into: the run stops there
    assert r.memory["allocated_bytes"] <= 32 << 20


def test_memory_cap_exit_code(bookworm_kernel):
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(bookworm_kernel),
                        "--memory-cap", "16M"], capture_output=True, text=True, timeout=120)
    assert p.returncode == E.MemoryCapExceeded.exit_code, p.stderr


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_kernel_staged_for_a_1536m_qemu_guest(tmp_path, payload_cache, test_initrd, suite):
    m = tmp_path / "qemu-1536m.e820"
    m.write_text(QEMU_1536M)
    kernel = payload_cache / "kernels" / suite / "vmlinuz"
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(kernel), "--memmap", str(m),
                        "--initrd", str(test_initrd), "--cmdline", "console=ttyS0", "--json", "--trace"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["outcome"] == "exit_boot_services"
    assert d["memory"]["target"].endswith("qemu-1536m.e820")
    # what the stub placed lies in the target's RAM, not at this host's addresses
    assert int(d["image"]["base"], 16) + d["image"]["size"] <= 0x5FFE0000
    assert int(d["frozen"]["rsp"], 16) < 0x5FFE0000 and int(d["frozen"]["system_table"], 16) < 0x5FFE0000
    lx = d["linux"]
    assert lx["boot_params"] < 0x5FFE0000
    assert lx["ramdisk_image"] + lx["ramdisk_size"] <= 0x5FFE0000
    assert 0x100000 <= lx["ramdisk_image"]
    assert lx["efi_systab"] < 0x5FFE0000 and lx["efi_memmap"] < 0x5FFE0000


def test_memmap_in_the_flash_window_is_refused(tmp_path, bookworm_kernel):
    m = tmp_path / "bad.txt"
    m.write_text("0x0 0x9fbff System RAM\n0x100000 0xffffffff System RAM\n")
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(bookworm_kernel), "--memmap",
                        str(m)], capture_output=True, text=True, timeout=60)
    assert p.returncode == E.BadOptionError.exit_code
    assert "Traceback" not in p.stderr and "bad.txt" in p.stderr


def test_seeded_secure_boot_variable_reaches_the_stub(tmp_path, bookworm_kernel):
    """--vars seeds the store; the Linux stub reads SecureBoot and says so on the console."""
    f = tmp_path / "vars.json"
    # Secure Boot on means SecureBoot=1 and SetupMode=0 (vmrun's defaults are 0 and 1: no keys)
    f.write_text(json.dumps([{"name": "SecureBoot", "data": "01", "attributes": 6},
                             {"name": "SetupMode", "data": "00", "attributes": 6}]))
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(bookworm_kernel), "--vars", str(f),
                        "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Secure Boot is enabled" in json.loads(p.stdout)["console"]
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(bookworm_kernel), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert "Secure Boot is enabled" not in json.loads(p.stdout)["console"]


def test_host_vars_without_efivarfs_is_a_clear_error(bookworm_kernel):
    import pathlib
    if pathlib.Path("/sys/firmware/efi/efivars").is_dir():
        pytest.skip("this machine has efivarfs")
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(bookworm_kernel), "--host-vars"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == E.BadOptionError.exit_code and "efivars" in p.stderr


def test_acpi_and_smbios_tables_point_at_the_target(bookworm_kernel):
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(bookworm_kernel), "--acpi-rsdp",
                        "0xf59d0", "--smbios", "0xf5800", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    tables = {t["name"]: int(t["address"], 16) for t in json.loads(p.stdout)["config_tables"]}
    assert tables["ACPI_20_TABLE"] == 0xF59D0 and tables["SMBIOS_TABLE"] == 0xF5800
