"""Real Debian EFI-stub kernels run to ExitBootServices in the micro-VM.

What the stub handed its kernel is read from guest memory (struct boot_params) and checked
against independent sources: the initrd file's bytes, the command line we passed, and the
target memory map read straight from /sys/firmware/memmap by this test.
"""

import hashlib
import pathlib
import struct

import pytest

from hostsvc.memory import DESCRIPTOR_SIZE
from vmrun.formats import linux
from vmrun.runner import RunOptions, continue_after_ebs, run_payload

pytestmark = [pytest.mark.kvm, pytest.mark.payloads]

CMDLINE = "console=ttyS0 vmrun.test=åäö-42 root=/dev/vda1 quiet"


def sysfs_ram() -> list[tuple[int, int]]:
    """RAM ranges [start, end) of this host, read directly (not through vmrun)."""
    out = []
    for d in sorted(pathlib.Path("/sys/firmware/memmap").iterdir(), key=lambda p: int(p.name)):
        if (d / "type").read_text().strip() == "System RAM":
            out.append((int((d / "start").read_text(), 16), int((d / "end").read_text(), 16) + 1))
    return out


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def frozen(request, payload_cache, test_initrd):
    kernel = payload_cache / "kernels" / request.param / "vmlinuz"
    if not kernel.exists():
        pytest.fail(f"{kernel} missing: run scripts/fetch-payloads")
    r = run_payload(kernel, RunOptions(cmdline=CMDLINE, initrd=test_initrd, timeout=60), keep=True)
    r.kernel_name = request.param
    r.initrd_bytes = test_initrd.read_bytes()
    yield r
    r.machine.close()


def test_reaches_exit_boot_services(frozen):
    assert frozen.outcome == "exit_boot_services", frozen.error
    assert frozen.services["ExitBootServices"] == 1
    assert frozen.services["GetMemoryMap"] >= 2  # the size-0 probe, then the real call
    assert frozen.unimplemented == {}


def test_boot_params_command_line(frozen):
    bp = frozen.linux
    assert bp is not None, "no boot_params found in guest memory"
    assert bp["cmdline"] == CMDLINE


def test_boot_params_initrd_is_our_file(frozen):
    bp = frozen.linux
    assert bp["ramdisk_size"] == len(frozen.initrd_bytes)
    got = frozen.machine.mem.read(bp["ramdisk_image"], bp["ramdisk_size"])
    assert hashlib.sha256(got).digest() == hashlib.sha256(frozen.initrd_bytes).digest()


def test_efi_info_points_at_our_system_table_and_map(frozen):
    bp = frozen.linux
    fw = frozen.firmware
    assert bp["efi_loader_signature"] == "EL64"
    assert bp["efi_systab"] == fw.system_table
    mem = frozen.machine.mem
    assert mem.read(fw.system_table, 8) == b"IBI SYST"
    assert bp["efi_memdesc_size"] == DESCRIPTOR_SIZE and bp["efi_memdesc_version"] == 1
    # the map the stub saved is the final one (the map key matched at EBS): parse it ourselves
    raw = mem.read(bp["efi_memmap"], bp["efi_memmap_size"])
    descs = [struct.unpack_from("<IxxxxQQQQ", raw, off) for off in range(0, len(raw), DESCRIPTOR_SIZE)]
    ours = fw.alloc.descriptors()
    assert [(t, s, n) for t, s, _v, n, _a in descs] == [(d.type, d.start, d.pages) for d in ours]


def test_memory_map_covers_exactly_the_hosts_ram(frozen):
    raw = frozen.machine.mem.read(frozen.linux["efi_memmap"], frozen.linux["efi_memmap_size"])
    ram_types = {1, 2, 3, 4, 5, 6, 7}  # loader/boot/runtime code+data, conventional
    ram = sysfs_ram()
    pages = set()
    for off in range(0, len(raw), DESCRIPTOR_SIZE):
        t, start, _v, n, _a = struct.unpack_from("<IxxxxQQQQ", raw, off)
        # ACPI reclaim/NVS memory allocated from RAM (the stub's config tables, the TPM's final
        # events table) is carved out of it
        from_ram = t in (9, 10) and any(s <= start and start + (n << 12) <= e for s, e in ram)
        if t in ram_types or from_ram:
            pages.update(range(start >> 12, (start >> 12) + n))
    expect = set()
    for s, e in ram:
        expect.update(range((s + 0xFFF) >> 12, e >> 12))
    expect.discard(0)  # page 0 is kept by the firmware (reported as boot services data)
    pages.discard(0)
    assert pages == expect


def test_e820_the_stub_builds_matches_the_target(frozen):
    """The x86 stub builds e820 after ExitBootServices returns: resume until it enters the
    kernel proper (its first privileged instruction), then read the table."""
    stop = continue_after_ebs(frozen, seconds=20)
    assert "lgdt" in str(stop) or "#GP" in str(stop), stop
    bp = linux.describe_boot_params(frozen.machine.mem, frozen.firmware.alloc.allocations,
                                    frozen.firmware.system_table)
    e820 = bp["e820"]
    assert e820, "the stub built no e820 table"
    ram = sysfs_ram()

    def inside_ram(a, b):
        return any(s <= a and b <= e for s, e in ram)

    for entry in e820:
        a, b = entry["addr"], entry["addr"] + entry["size"]
        if entry["type"] == "ram":
            assert inside_ram(a, b), entry
    # every RAM page of the host is e820 RAM, or firmware/runtime/ACPI-reclaim memory
    covered = sum(e["size"] for e in e820 if inside_ram(e["addr"], e["addr"] + e["size"]))
    total = sum(((e >> 12) - ((s + 0xFFF) >> 12)) << 12 for s, e in ram)
    assert covered == total
    e820_ram = sum(e["size"] for e in e820 if e["type"] == "ram")
    assert e820_ram > total - (16 << 20)  # only small firmware/runtime areas are carved out
