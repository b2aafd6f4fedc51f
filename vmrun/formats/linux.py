"""What a Linux x86 EFI stub handed its kernel: ``struct boot_params`` found in guest memory.

Offsets are from Linux ``arch/x86/include/uapi/asm/bootparam.h`` and
``Documentation/arch/x86/zero-page.rst``. The stub fills ``efi_info`` and the e820 table in its
ExitBootServices callback, so at the freeze they hold what the next kernel will read.
"""

from __future__ import annotations

import struct

from vmrun.errors import GuestMemoryError
from vmrun.vm.layout import PAGE_SIZE

BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_EFI_INFO = 0x1C0
BP_E820_ENTRIES = 0x1E8
BP_HDR_VERSION = 0x206
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_CMD_LINE_PTR = 0x228
BP_E820_TABLE = 0x2D0
E820_MAX = 128
E820_TYPES = {1: "ram", 2: "reserved", 3: "acpi", 4: "nvs", 5: "unusable", 7: "pmem", 12: "pram"}


def find_boot_params(mem, allocations, system_table: int) -> int | None:
    """The payload page holding a boot_params: efi_info carries the "EL64" loader signature and
    points at our system table (newer stubs do not copy the "HdrS" magic into it)."""
    for a in allocations:
        if a.owner == "firmware":
            continue
        for off in range(0, min(a.pages, 16) * PAGE_SIZE, PAGE_SIZE):
            base = a.start + off
            try:
                sig, lo = struct.unpack("<4sI", mem.read(base + BP_EFI_INFO, 8))
                hi = struct.unpack("<I", mem.read(base + BP_EFI_INFO + 24, 4))[0]
            except GuestMemoryError:
                break
            if sig == b"EL64" and (lo | hi << 32) == system_table:
                return base
    return None


def describe_boot_params(mem, allocations, system_table: int) -> dict | None:
    base = find_boot_params(mem, allocations, system_table)
    if base is None:
        return None
    rd = mem.read
    u32 = lambda off: struct.unpack_from("<I", rd(base + off, 4))[0]  # noqa: E731
    cmd_ptr = u32(BP_CMD_LINE_PTR) | (u32(BP_EXT_CMD_LINE_PTR) << 32)
    cmdline = mem.read_cstr(cmd_ptr, 65536).decode("utf-8", "replace") if cmd_ptr else ""
    ramdisk = u32(BP_RAMDISK_IMAGE) | (u32(BP_EXT_RAMDISK_IMAGE) << 32)
    ramdisk_size = u32(BP_RAMDISK_SIZE) | (u32(BP_EXT_RAMDISK_SIZE) << 32)
    sig, systab, desc_size, desc_ver, mmap, mmap_size, systab_hi, mmap_hi = struct.unpack(
        "<4sIIIIIII", rd(base + BP_EFI_INFO, 32))
    n = min(rd(base + BP_E820_ENTRIES, 1)[0], E820_MAX)
    e820 = []
    for i in range(n):
        addr, size, typ = struct.unpack("<QQI", rd(base + BP_E820_TABLE + 20 * i, 20))
        e820.append({"addr": addr, "size": size, "type": E820_TYPES.get(typ, str(typ))})
    return {
        "boot_params": base,
        "protocol": f"{u32(BP_HDR_VERSION) >> 8 & 0xFF}.{u32(BP_HDR_VERSION) & 0xFF:02d}",
        "cmdline": cmdline,
        "cmd_line_ptr": cmd_ptr,
        "ramdisk_image": ramdisk,
        "ramdisk_size": ramdisk_size,
        "efi_loader_signature": sig.decode("latin-1"),
        "efi_systab": systab | (systab_hi << 32),
        "efi_systab_matches": (systab | (systab_hi << 32)) == system_table,
        "efi_memmap": mmap | (mmap_hi << 32),
        "efi_memmap_size": mmap_size,
        "efi_memdesc_size": desc_size,
        "efi_memdesc_version": desc_ver,
        "e820": e820,
    }
