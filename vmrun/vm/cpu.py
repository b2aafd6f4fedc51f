"""Pure builders for the guest's CPU tables (GDT, IDT, TSS, page tables) and initial state.

Nothing here touches KVM: every function returns bytes or plain values, so the unit tests can
check the descriptors bit by bit against the Intel SDM.
"""

from __future__ import annotations

import json
import pathlib
import struct
from dataclasses import dataclass

from vmrun.vm import layout as L

GUEST_DIR = pathlib.Path(__file__).resolve().parents[2] / "guest"


@dataclass(frozen=True)
class Blob:
    code: bytes
    symbols: dict[str, int]


def load_blob() -> Blob:
    """guest/firmware.bin with its symbol offsets (built by ``python -m guest.build``)."""
    code = (GUEST_DIR / "firmware.bin").read_bytes()
    symbols = json.loads((GUEST_DIR / "firmware.sym.json").read_text())
    return Blob(code, symbols)


def seg_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte code/data segment descriptor (SDM Vol. 3 §3.4.5)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((access & 0xFF) << 40)
            | (((limit >> 16) & 0xF) << 48) | ((flags & 0xF) << 52) | (((base >> 24) & 0xFF) << 56))


def build_gdt(tss_base: int) -> bytes:
    """null · ring-0 code64 · ring-0 data · ring-3 data · ring-3 code64 · 64-bit TSS (16 bytes)."""
    entries = [
        0,
        seg_descriptor(0, 0xFFFFF, 0x9A, 0xA),  # P DPL0 code exec/read, G L
        seg_descriptor(0, 0xFFFFF, 0x92, 0xC),  # P DPL0 data r/w, G D/B
        seg_descriptor(0, 0xFFFFF, 0xF2, 0xC),  # P DPL3 data r/w
        seg_descriptor(0, 0xFFFFF, 0xFA, 0xA),  # P DPL3 code exec/read, L
    ]
    tss_low = seg_descriptor(tss_base & 0xFFFFFFFF, 103, 0x89, 0x0)  # P, 64-bit TSS available
    tss_high = tss_base >> 32
    raw = b"".join(struct.pack("<Q", e) for e in entries)
    return raw + struct.pack("<QQ", tss_low, tss_high)


def build_tss(rsp0: int) -> bytes:
    """A 64-bit TSS (SDM Vol. 3 §8.7) with RSP0 set and no I/O bitmap."""
    tss = bytearray(104)
    struct.pack_into("<Q", tss, 4, rsp0)
    struct.pack_into("<H", tss, 102, 104)  # I/O map base beyond the limit: no bitmap
    return bytes(tss)


def idt_gate(handler: int, selector: int = L.SEL_KERNEL_CS, dpl: int = 0, ist: int = 0) -> bytes:
    """A 16-byte 64-bit interrupt gate (SDM Vol. 3 §6.14.1)."""
    type_attr = 0x80 | (dpl << 5) | 0xE
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, type_attr,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)


def build_idt(blob_base: int, symbols: dict[str, int]) -> bytes:
    """Vectors 0-31 go to their own stubs (16 bytes apart); 32-255 to the spurious stub."""
    stubs = blob_base + symbols["exc_stubs"]
    spurious = blob_base + symbols["exc_spurious"]
    gates = []
    for vec in range(256):
        if vec < 32:
            # int3 and into may be raised from CPL 3 on purpose (breakpoints)
            gates.append(idt_gate(stubs + 16 * vec, dpl=3 if vec in (3, 4) else 0))
        else:
            gates.append(idt_gate(spurious))
    return b"".join(gates)


PTE_P, PTE_RW, PTE_US, PTE_PS = 1, 2, 4, 0x80


def page_table_pages(limit: int) -> int:
    """Pages needed by :func:`build_page_tables` to identity-map [0, limit)."""
    gibs = max(1, (limit + L.GIB - 1) // L.GIB)
    return 2 + gibs


def build_page_tables(base: int, limit: int) -> bytes:
    """4-level tables at ``base`` identity-mapping [0, limit) with 2 MiB pages, U/S set.

    Layout: PML4 at base, one PDPT at base+4K, then one PD per GiB. (No 1 GiB pages: this
    host's nested KVM (PVM, ``/sys/module/kvm_pvm``) leaves CPUID 0x80000001 EDX.Page1GB clear,
    and a guest whose identity map uses a 1 GiB page triple-faults: measured. 2 MiB pages with
    U/S=1 let the CPL-3 payload use them.)
    """
    if limit > L.MAX_IDENTITY_MAP:
        raise ValueError(f"cannot identity-map {limit:#x}: more than one PDPT covers")
    gibs = max(1, (limit + L.GIB - 1) // L.GIB)
    flags = PTE_P | PTE_RW | PTE_US
    out = bytearray(page_table_pages(limit) * L.PAGE_SIZE)
    pdpt = base + L.PAGE_SIZE
    struct.pack_into("<Q", out, 0, pdpt | flags)
    for g in range(gibs):
        pd = base + (2 + g) * L.PAGE_SIZE
        struct.pack_into("<Q", out, L.PAGE_SIZE + 8 * g, pd | flags)
        off = (2 + g) * L.PAGE_SIZE
        for i in range(512):
            phys = g * L.GIB + i * L.PAGE_2M
            struct.pack_into("<Q", out, off + 8 * i, phys | flags | PTE_PS)
    return bytes(out)
