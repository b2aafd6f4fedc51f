"""The handoff's pure parts: state-block layout (vs. guest/purgatory.S), segment planning, ELF."""

import re
import struct

import iced_x86 as X
import pytest

from vmrun.handoff import elf, state
from vmrun.handoff.stage import MAX_SEGMENTS, StageError, plan_segments
from vmrun.vm.kvm import abi

SRC = (state.GUEST_DIR / "purgatory.S").read_text()


def test_state_offsets_match_the_assembly():
    consts = {m[0]: int(m[1], 0) for m in re.findall(r"\.set\s+(\w+),\s*(0x[0-9a-fA-F]+|\d+)", SRC)}
    for name in ("ST_GDTR", "ST_IDTR", "ST_CR0", "ST_CR3", "ST_CR4", "ST_EFER", "ST_RFLAGS", "ST_RSP",
                 "ST_FS_BASE", "ST_GS_BASE", "ST_GPRS", "ST_FXSAVE"):
        assert consts[name] == getattr(state, name), name
    assert consts["STATE"] == state.STATE
    assert consts["STACK_TOP"] == state.PURGATORY_SIZE


def test_purgatory_restores_gprs_in_the_documented_order():
    code, syms = state.load_purgatory()
    dec = X.Decoder(64, code, ip=0)
    loads = {}
    for ins in dec:
        if ins.mnemonic == X.Mnemonic.MOV and ins.op1_kind == X.OpKind.MEMORY and \
                ins.memory_base == X.Register.RSI and ins.op0_kind == X.OpKind.REGISTER:
            loads[ins.memory_displacement] = ins.op0_register
    for i, name in enumerate(state.GPR_ORDER):
        reg = getattr(X.Register, name.upper())
        assert loads[state.ST_GPRS + 8 * i] == reg, name
    last = list(X.Decoder(64, code, ip=0))
    assert last[-1].mnemonic == X.Mnemonic.RET
    assert last[-2].op0_register == X.Register.RSI  # the base register is restored last


def test_state_block_fields():
    fpu = abi.kvm_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    fpu.xmm[6][0] = 0xAB  # XMM6 is callee-saved in the MS x64 ABI
    regs = {n: 0x1000 + i for i, n in enumerate(state.GPR_ORDER)}
    regs.update(rsp=0x7FF00, rflags=0x3246)  # IOPL 3 and IF set at CPL 3 in the VM
    sregs = {"cr0": 0x80010033, "cr3": 0x1234000, "cr4": 0x620, "efer": 0xD00}
    base = 0x9000_0000
    st = state.build_state(base, regs, sregs, fpu, rax=0)
    assert st[:8] == b"VMRUNST1"
    cr0, cr3, cr4, efer, rflags, rsp = struct.unpack_from("<6Q", st, state.ST_CR0)
    assert (cr0, cr3, efer, rsp) == (0x80010033, 0x1234000, 0xD00, 0x7FF00)
    assert cr4 & 0x620 == 0x620
    assert rflags & (1 << 9) == 0 and rflags & (3 << 12) == 0 and rflags & 0x46 == 0x46
    gprs = struct.unpack_from("<15Q", st, state.ST_GPRS)
    assert gprs[0] == 0  # RAX = EFI_SUCCESS
    assert gprs[1:] == tuple(regs[n] for n in state.GPR_ORDER[1:])
    fx = st[state.ST_FXSAVE:state.ST_FXSAVE + 512]
    assert struct.unpack_from("<H", fx, 0)[0] == 0x37F and struct.unpack_from("<I", fx, 24)[0] == 0x1F80
    assert fx[160 + 16 * 6] == 0xAB
    limit, gdt = struct.unpack_from("<HQ", st, state.ST_GDTR)
    assert gdt == base + state.STATE + state.ST_GDT and limit == 31
    code64, data, code32 = struct.unpack_from("<3Q", st, state.ST_GDT + 8)
    # Intel SDM Vol. 3 §3.4.5: access byte at bits 40-47, L = bit 53, D/B = bit 54
    assert (code64 >> 40) & 0xFF == 0x9A and (code64 >> 53) & 1  # ring-0 64-bit code
    assert (data >> 40) & 0xFF == 0x92
    assert (code32 >> 40) & 0xFF == 0x9A and not (code32 >> 53) & 1 and (code32 >> 54) & 1  # 32-bit code
    assert struct.unpack_from("<Q", st, state.ST_PAT)[0] == 0x0007040600070406  # power-on PAT


def test_state_block_refuses_what_a_5_level_entry_cannot_reach():
    fpu = abi.kvm_fpu()
    regs = {n: 0 for n in state.GPR_ORDER} | {"rsp": 0x7FF00, "rflags": 2}
    sregs = {"cr0": 0x80010033, "cr3": 0x1_0000_0000, "cr4": 0x620, "efer": 0xD00}
    with pytest.raises(ValueError, match="CR3 0x100000000 is not below 4 GiB"):
        state.build_state(0x9000_0000, regs, sregs, fpu)
    sregs["cr3"] = 0x1234000
    with pytest.raises(ValueError, match="not below 4 GiB"):
        state.build_state(0xFFFF_F000, regs, sregs, fpu)


def _decode(bitness: int, code: bytes, start: int, end: int):
    return list(X.Decoder(bitness, code[start:end], ip=start))


def test_purgatory_switches_a_5_level_entry_to_4_level_paging():
    """The compatibility-mode step: paging off, CR4.LA57 off, the frozen CR3, EFER, paging on, then a
    far return to the 64-bit code selector (Intel SDM Vol. 3 §9.8.5: IA-32e mode is left and
    entered with CR0.PG while in compatibility mode; CR4.LA57 only changes with paging off)."""
    code, syms = state.load_purgatory()
    head = _decode(64, code, syms["purgatory_entry"], syms["purgatory_compat32"])
    # before the switch: CR4 reduced to PAE|LA57, then LA57 tested, then a far return to 0x18
    ands = [i for i in head if i.mnemonic == X.Mnemonic.AND and i.op1_kind == X.OpKind.IMMEDIATE32]
    assert ands and ands[0].immediate32 == 0x20 | 0x1000
    tests = [i for i in head if i.mnemonic == X.Mnemonic.TEST]
    assert tests and tests[-1].immediate32 == 0x1000
    pushes = [i for i in head if i.mnemonic == X.Mnemonic.PUSH and i.op0_kind != X.OpKind.REGISTER]
    assert pushes[-1].immediate32to64 == 0x18  # the 32-bit code selector
    assert head[-1].mnemonic == X.Mnemonic.RETF

    mid = _decode(32, code, syms["purgatory_compat32"], syms["purgatory_long64"])
    writes = []
    for ins in mid:
        if ins.mnemonic == X.Mnemonic.MOV and ins.op0_kind == X.OpKind.REGISTER and \
                ins.op0_register in (X.Register.CR0, X.Register.CR3, X.Register.CR4):
            writes.append(ins.op0_register)
        elif ins.mnemonic == X.Mnemonic.WRMSR:
            writes.append("wrmsr")
        elif ins.mnemonic == X.Mnemonic.AND and ins.op1_kind == X.OpKind.IMMEDIATE32:
            writes.append(("and", ins.immediate32))
        elif ins.mnemonic == X.Mnemonic.OR and ins.op1_kind == X.OpKind.IMMEDIATE32:
            writes.append(("or", ins.immediate32))
    assert writes == [("and", 0x7FFFFFFF), X.Register.CR0,      # paging off: long mode inactive
                      ("and", 0xFFFFEFFF), X.Register.CR4,      # LA57 off
                      X.Register.CR3,                           # the frozen 4-level tables
                      ("and", 0xFFFFFBFF), "wrmsr",             # EFER as frozen, LMA masked
                      ("or", 0x80000000), X.Register.CR0]       # paging on: long mode again
    assert mid[-1].mnemonic == X.Mnemonic.RETF
    far = [i for i in mid if i.mnemonic == X.Mnemonic.PUSH and i.op0_kind != X.OpKind.REGISTER]
    assert far[-1].immediate32 == 0x08  # back to the 64-bit code selector


def test_plan_segments_coalesces_within_ram_ranges_only():
    ram = [(0x100000, 0x8000_0000), (0x1_0000_0000, 0x2_0000_0000)]
    ranges = [(0x100000 + i * 0x10000, 0x100000 + i * 0x10000 + 0x1000) for i in range(40)]
    ranges.append((0x1_0000_0000, 0x1_0400_0000))
    segs = plan_segments(ranges, ram)
    assert len(segs) <= MAX_SEGMENTS
    assert (0x1_0000_0000, 0x1_0400_0000) in segs
    for s, e in ranges:  # every range still covered
        assert any(a <= s and e <= b for a, b in segs)
    for a, b in segs:    # no segment bridges the RAM hole
        assert any(rs <= a and b <= re_ for rs, re_ in ram)


def test_plan_segments_refuses_too_many_ram_ranges():
    ram = [(i * 0x200000, i * 0x200000 + 0x100000) for i in range(20)]
    ranges = [(s, s + 0x1000) for s, _ in ram]
    with pytest.raises(StageError, match="at most 16"):
        plan_segments(ranges, ram)


def test_plan_segments_refuses_memory_outside_ram():
    with pytest.raises(StageError, match="not inside the target's RAM"):
        plan_segments([(0x5000, 0x6000)], [(0x100000, 0x200000)])


def test_elf_round_trip(tmp_path):
    segs = [elf.LoadSegment(0x100000, b"\x01" * 5000, 0x3000), elf.LoadSegment(0x200000, b"\x02" * 10, 0x1000)]
    p = tmp_path / "h.elf"
    elf.write_elf(p, 0x100123, segs, [(elf.NOTE_METADATA, b'{"a": 1}')])
    h = elf.read_elf(p.read_bytes())
    assert h.entry == 0x100123
    assert [(paddr, filesz, memsz) for _o, filesz, paddr, memsz in h.segments] == [
        (0x100000, 5000, 0x3000), (0x200000, 10, 0x1000)]
    data = p.read_bytes()
    off, filesz, _p, _m = h.segments[0]
    assert data[off:off + filesz] == b"\x01" * 5000 and off % 4096 == 0
    assert h.notes[elf.NOTE_METADATA] == b'{"a": 1}'


def test_host_firmware_tables_from_systab(tmp_path):
    from vmrun.runner import host_firmware_tables
    f = tmp_path / "systab"
    f.write_text("ACPI20=0x7ffe8014\nACPI=0x7ffe8000\nSMBIOS=0x7fe4f000\nSMBIOS3=0x7fe4e000\nTPMFinalLog=0x1\n")
    assert host_firmware_tables(f) == {"ACPI20": 0x7FFE8014, "ACPI": 0x7FFE8000, "SMBIOS": 0x7FE4F000,
                                       "SMBIOS3": 0x7FE4E000}
    assert host_firmware_tables(tmp_path / "missing") == {}


def test_eperm_explanations(tmp_path):
    from vmrun.kexec import _explain_eperm
    (tmp_path / "sys" / "kernel").mkdir(parents=True)
    (tmp_path / "sys" / "kernel" / "kexec_load_disabled").write_text("1\n")
    sec = tmp_path / "security"
    sec.mkdir()
    (sec / "lockdown").write_text("none [integrity] confidentiality\n")
    why = _explain_eperm(euid=1000, proc=str(tmp_path), security=str(sec))
    assert "not running as root" in why and "kexec_load_disabled=1" in why and "lockdown is active (integrity)" in why
    (tmp_path / "sys" / "kernel" / "kexec_load_disabled").write_text("0\n")
    (sec / "lockdown").write_text("[none] integrity confidentiality\n")
    assert _explain_eperm(euid=0, proc=str(tmp_path), security=str(sec)) == "operation not permitted"


def test_handoff_file_keeps_zero_pages_as_holes_and_reads_back_exactly(tmp_path):
    page = 4096
    data = bytearray(64 * page)
    data[0] = 1
    data[10 * page + 5] = 2
    data[11 * page] = 3
    data[63 * page + page - 1] = 4
    assert elf.nonzero_runs(data) == [(0, page), (10 * page, 12 * page), (63 * page, 64 * page)]
    seg = elf.LoadSegment(0x100000, memoryview(data), 64 * page)
    path = tmp_path / "h.elf"
    size = elf.write_elf(path, 0x100000, [seg], [])
    raw = path.read_bytes()
    assert len(raw) == size
    h = elf.read_elf(raw)
    off, filesz, paddr, memsz = h.segments[0]
    assert (filesz, paddr, memsz) == (len(data), 0x100000, 64 * page)
    assert raw[off:off + filesz] == data  # holes read back as the zero pages they stand for
    assert path.stat().st_blocks * 512 < len(data) // 2  # and take no space (ext4/tmpfs/xfs)
