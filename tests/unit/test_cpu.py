"""CPU tables checked bit by bit against the Intel SDM's descriptor formats."""

import struct

from vmrun.vm import cpu, layout as L


def _desc(raw: bytes, sel: int) -> int:
    return struct.unpack_from("<Q", raw, sel & ~7)[0]


def test_gdt_segments():
    gdt = cpu.build_gdt(0x12345678_9ABC0000)
    assert len(gdt) == 8 * L.GDT_ENTRIES
    kcs = _desc(gdt, L.SEL_KERNEL_CS)
    ucs = _desc(gdt, L.SEL_USER_CS)
    uds = _desc(gdt, L.SEL_USER_DS)
    # access byte (bits 40-47): P=1, DPL, S=1, type; flags: L (bit 53) for 64-bit code
    assert (kcs >> 40) & 0xFF == 0x9A and (kcs >> 53) & 1 == 1 and (kcs >> 54) & 1 == 0
    assert (ucs >> 40) & 0xFF == 0xFA and (ucs >> 45) & 3 == 3 and (ucs >> 53) & 1 == 1
    assert (uds >> 40) & 0xFF == 0xF2 and (uds >> 45) & 3 == 3
    lo, hi = struct.unpack_from("<QQ", gdt, L.SEL_TSS)
    base = ((lo >> 16) & 0xFFFFFF) | (((lo >> 56) & 0xFF) << 24) | (hi << 32)
    assert base == 0x12345678_9ABC0000
    assert (lo >> 40) & 0xF == 0x9 and (lo >> 47) & 1 == 1  # available 64-bit TSS, present
    assert lo & 0xFFFF == 103


def test_tss_rsp0_and_no_iomap():
    tss = cpu.build_tss(0xDEAD000)
    assert struct.unpack_from("<Q", tss, 4)[0] == 0xDEAD000
    assert struct.unpack_from("<H", tss, 102)[0] >= 104


def test_idt_gates_point_at_stubs():
    syms = {"exc_stubs": 0x0, "exc_spurious": 0x200}
    idt = cpu.build_idt(0x40_0000, syms)
    assert len(idt) == 256 * 16
    for vec in (0, 13, 14, 31, 32, 255):
        lo, mid, hi = struct.unpack_from("<HxxxxHI", idt, 16 * vec)
        target = lo | (mid << 16) | (hi << 32)
        expect = 0x40_0000 + (16 * vec if vec < 32 else 0x200)
        assert target == expect
        sel, ist, attr = struct.unpack_from("<HBB", idt, 16 * vec + 2)
        assert sel == L.SEL_KERNEL_CS and ist == 0
        assert attr & 0x8F == 0x8E  # present, 64-bit interrupt gate


def test_page_tables_identity_map():
    base = 0x100000
    limit = 5 * L.GIB + 12345
    pt = cpu.build_page_tables(base, limit)
    assert len(pt) == cpu.page_table_pages(limit) * 4096 == (2 + 6) * 4096

    def walk(va):
        pml4e = struct.unpack_from("<Q", pt, 8 * ((va >> 39) & 511))[0]
        assert pml4e & 7 == 7
        pdpt = (pml4e & ~0xFFF) - base
        pdpte = struct.unpack_from("<Q", pt, pdpt + 8 * ((va >> 30) & 511))[0]
        assert pdpte & 7 == 7 and not pdpte & 0x80  # no 1 GiB pages (they triple-fault here)
        pd = (pdpte & ~0xFFF) - base
        pde = struct.unpack_from("<Q", pt, pd + 8 * ((va >> 21) & 511))[0]
        assert pde & 0x87 == 0x87  # present, writable, user, 2 MiB
        return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)

    for va in (0, 0x1234567, L.GIB - 1, 4 * L.GIB + 0x200123, 5 * L.GIB + 100):
        assert walk(va) == va
