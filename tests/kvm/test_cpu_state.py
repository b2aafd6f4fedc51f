"""What a CPL-3 payload can do to the CPU state on a real /dev/kvm micro-VM, and how each ends:
control-register and MSR writes the CPU would refuse, a switch to its own page tables, string
port I/O with huge counts, breakpoints and single-steps, and AVX under this host's KVM."""

import struct
import time

import pytest

from vmrun.errors import PayloadFault, RunTimeout
from vmrun.handoff import state
from vmrun.vm import emulate, layout as L
from vmrun.vm.devices import standard_bus
from vmrun.vm.emulate import Emulator
from vmrun.vm.machine import Machine, RunLimits

pytestmark = pytest.mark.kvm

RAM = 64 << 20
FW = 0x100000
CODE = 0x200000
DATA = 0x220000
STACK_TOP = 0x300000
RO_PAGE = 0x400000      # a 2 MiB page the tests make read-only for CPL 3
SUPER_PAGE = 0x600000   # a 2 MiB page the tests make supervisor-only

RET = bytes.fromhex("c3")


@pytest.fixture
def vm():
    m = Machine([(0, RAM)], RunLimits(timeout=10))
    m.install_firmware(FW, Machine.firmware_area_size(RAM))
    m.serial = []
    bus, m.uart = standard_bus(m.serial.append)
    m.emulator = Emulator(bus)
    m.exception_handler = m.emulator.handle
    m.service_handler = lambda machine, sid, regs: 0
    m.start_watchdog()
    yield m
    m.close()


def run(vm, code: bytes, at: int = CODE) -> int:
    vm.mem.write(at, code)
    return vm.call_guest(at, (), stack_top=STACK_TOP)


def fault(vm, code: bytes) -> PayloadFault:
    with pytest.raises(PayloadFault) as e:
        run(vm, code)
    return e.value


def movabs(reg: str, value: int) -> bytes:
    """mov r64, imm64 (rax rcx rdx rbx rsp rbp rsi rdi)."""
    n = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"].index(reg)
    return bytes([0x48, 0xB8 + n]) + struct.pack("<Q", value)


def wrmsr(index: int, value: int) -> bytes:
    return (bytes([0xB9]) + struct.pack("<I", index) + bytes([0xB8]) + struct.pack("<I", value & 0xFFFFFFFF)
            + bytes([0xBA]) + struct.pack("<I", value >> 32) + bytes.fromhex("0f30"))   # mov ecx/eax/edx; wrmsr


def rdmsr(index: int) -> bytes:
    return (bytes([0xB9]) + struct.pack("<I", index) + bytes.fromhex("0f32")     # mov ecx, index; rdmsr
            + bytes.fromhex("48c1e220") + bytes.fromhex("4809d0"))               # shl rdx, 32; or rax, rdx


MOV_RAX_CR0, MOV_CR0_RAX = bytes.fromhex("0f20c0"), bytes.fromhex("0f22c0")
MOV_RAX_CR3, MOV_CR3_RAX = bytes.fromhex("0f20d8"), bytes.fromhex("0f22d8")
MOV_RAX_CR4, MOV_CR4_RAX = bytes.fromhex("0f20e0"), bytes.fromhex("0f22e0")
MOV_CR8_RAX = bytes.fromhex("440f22c0")


def or_rax(imm: int) -> bytes:
    return bytes.fromhex("480d") + struct.pack("<i", imm)        # or rax, simm32


def and_rax(imm: int) -> bytes:
    return bytes.fromhex("4825") + struct.pack("<i", imm)        # and rax, simm32


def bts_rax(bit: int) -> bytes:
    return bytes.fromhex("480fbae8") + bytes([bit])              # bts rax, bit


# --- control registers --------------------------------------------------------------------------

def test_reloading_the_current_cr3_is_a_tlb_flush(vm):
    assert run(vm, MOV_RAX_CR3 + MOV_CR3_RAX + MOV_RAX_CR3 + RET) == vm.fw.page_tables
    assert vm.emulator.counts["mov_to_cr3"] == 1


def test_switching_to_own_page_tables_is_refused(vm):
    e = fault(vm, MOV_RAX_CR3 + bytes.fromhex("480500100000") + MOV_CR3_RAX + RET)   # add rax, 0x1000
    msg = str(e)
    assert "switched to its own page tables before ExitBootServices" in msg
    assert f"{vm.fw.page_tables + 0x1000:#x}" in msg and "mov %rax,%cr3" in msg
    assert e.exit_code == 20
    assert vm.vcpu.get_sregs().cr3 == vm.fw.page_tables


def test_cr3_with_reserved_bits_is_a_gp_fault(vm):
    e = fault(vm, MOV_RAX_CR3 + bts_rax(62) + MOV_CR3_RAX + RET)
    assert "reserved" in str(e) and "#GP" in str(e) and "CR3" in str(e)


@pytest.mark.parametrize("bit,name,kind", [
    (20, "SMEP", "cannot honour"), (21, "SMAP", "cannot honour"), (17, "PCIDE", "cannot honour"),
    (2, "TSD", "cannot honour"), (18, "OSXSAVE", "reserved"), (14, "SMXE", "reserved"),
    (15, "bit 15", "reserved"), (13, "VMXE", "reserved")])
def test_cr4_bits_vmrun_does_not_offer_are_faults(vm, bit, name, kind):
    e = fault(vm, MOV_RAX_CR4 + bts_rax(bit) + MOV_CR4_RAX + RET)
    assert name in str(e) and kind in str(e) and "mov to CR4" in str(e)
    assert not vm.vcpu.get_sregs().cr4 >> bit & 1


def test_cr4_high_reserved_bit_is_a_gp_fault(vm):
    e = fault(vm, MOV_RAX_CR4 + bts_rax(40) + MOV_CR4_RAX + RET)
    assert "bit 40" in str(e) and "reserved" in str(e) and "#GP" in str(e)


def test_clearing_osfxsr_is_refused(vm):
    e = fault(vm, MOV_RAX_CR4 + and_rax(~L.CR4_OSFXSR) + MOV_CR4_RAX + RET)
    assert "OSFXSR" in str(e) and "cannot honour" in str(e)


def test_cr0_upper_bits_are_a_gp_fault(vm):
    e = fault(vm, MOV_RAX_CR0 + bts_rax(40) + MOV_CR0_RAX + RET)
    assert "bits 63:32 of CR0 are reserved" in str(e)


def test_clearing_cr0_pg_is_a_gp_fault(vm):
    e = fault(vm, MOV_RAX_CR0 + and_rax(0x7FFFFFFF) + MOV_CR0_RAX + RET)
    assert "leave protected/paged mode" in str(e)


def test_cr0_wp_can_be_cleared_and_is_read_back(vm):
    cr0 = run(vm, MOV_RAX_CR0 + and_rax(~L.CR0_WP) + MOV_CR0_RAX + MOV_RAX_CR0 + RET)
    assert not cr0 & L.CR0_WP and cr0 & L.CR0_PG
    assert not vm.vcpu.get_sregs().cr0 & L.CR0_WP


def test_cr0_low_reserved_bits_are_ignored(vm):
    cr0 = run(vm, MOV_RAX_CR0 + or_rax(1 << 8) + MOV_CR0_RAX + MOV_RAX_CR0 + RET)
    assert not cr0 & (1 << 8) and cr0 & L.CR0_PG


def test_cr8_reserved_bits_are_a_gp_fault(vm):
    e = fault(vm, bytes.fromhex("b810000000") + MOV_CR8_RAX + RET)    # mov eax, 0x10; mov cr8, rax
    assert "CR8" in str(e) and "reserved" in str(e)


# --- MSRs -------------------------------------------------------------------------------------

def test_fs_base_round_trip(vm):
    assert run(vm, wrmsr(emulate.MSR_FS_BASE, 0x12345000) + rdmsr(emulate.MSR_FS_BASE) + RET) == 0x12345000


@pytest.mark.parametrize("index", [emulate.MSR_FS_BASE, emulate.MSR_GS_BASE, emulate.MSR_KERNEL_GS_BASE])
def test_non_canonical_segment_base_is_a_gp_fault(vm, index):
    e = fault(vm, wrmsr(index, 0x8000000000000000) + RET)
    assert "not a canonical" in str(e) and f"MSR {index:#x}" in str(e) and "0x8000000000000000" in str(e)


def test_efer_bits_not_offered_are_a_gp_fault(vm):
    e = fault(vm, wrmsr(emulate.MSR_EFER, L.INITIAL_EFER | (1 << 12)) + RET)
    assert "SVME" in str(e) and "#GP" in str(e)


def test_efer_lme_cannot_be_cleared(vm):
    e = fault(vm, wrmsr(emulate.MSR_EFER, L.EFER_NXE) + RET)
    assert "LME" in str(e)


def test_pat_with_an_invalid_memory_type_is_a_gp_fault(vm):
    e = fault(vm, wrmsr(emulate.MSR_PAT, 0x0007040600070402) + RET)
    assert "PA0" in str(e) and "memory type" in str(e)


def test_valid_pat_is_written(vm):
    assert run(vm, wrmsr(emulate.MSR_PAT, 0x0007010600070406) + rdmsr(emulate.MSR_PAT) + RET) == 0x0007010600070406


@pytest.mark.parametrize("index,value,text", [
    (0x2FF, 0x1806, "reserved bits 0x1000"), (0x2FF, 0x802, "default type 2"),
    (0x200, 0x3, "type 3"), (0x200, 0x100, "reserved bits 0x100"), (0x201, 0x1, "reserved bits 0x1"),
    (0x201, 1 << 60, "reserved bits 0x1000000000000000")])
def test_mtrr_values_the_cpu_refuses_are_gp_faults(vm, index, value, text):
    e = fault(vm, wrmsr(index, value) + RET)
    assert text in str(e) and "wrmsr" in str(e)


# --- string port I/O ---------------------------------------------------------------------------

def test_rep_outsb_longer_than_one_batch_sends_everything(vm):
    n = 3 * emulate.STRING_IO_PER_EXIT + 5
    vm.mem.write(DATA, b"A" * (n - 1) + b"\n")
    code = (movabs("rsi", DATA) + movabs("rcx", n) + bytes.fromhex("66baf803")   # mov dx, 0x3f8
            + bytes.fromhex("f36e")                                               # rep outsb
            + bytes.fromhex("4889f0") + RET)                                      # mov rax, rsi
    assert run(vm, code) == DATA + n
    assert bytes(vm.uart.output) == b"A" * (n - 1) + b"\n"
    assert "".join(vm.serial) == "A" * (n - 1)
    assert max(map(len, vm.serial)) <= vm.uart.LINE_MAX


def test_rep_outsb_backwards_with_df(vm):
    vm.mem.write(DATA, b"xyz\n")
    code = (bytes.fromhex("fd")                                                   # std
            + movabs("rsi", DATA + 2) + movabs("rcx", 3) + bytes.fromhex("66baf803")
            + bytes.fromhex("f36e") + bytes.fromhex("fc")                         # rep outsb; cld
            + bytes.fromhex("4889f0") + RET)
    assert run(vm, code) == DATA - 1
    assert bytes(vm.uart.output) == b"zyx"


def test_rep_outsb_with_a_huge_count_ends_at_the_time_limit(vm):
    vm.limits.timeout = 1.0
    vm.start_watchdog()
    code = (movabs("rsi", DATA) + movabs("rcx", 1 << 40) + bytes.fromhex("66ba8000")  # mov dx, 0x80
            + bytes.fromhex("f36e") + RET)
    t0 = time.monotonic()
    with pytest.raises(RunTimeout):
        run(vm, code)
    assert time.monotonic() - t0 < 2.0


def _clear_pd_flag(vm, va: int, flag: int) -> None:
    pd = vm.fw.page_tables + 2 * L.PAGE_SIZE + 8 * (va >> 21)      # PD of GiB 0, 2 MiB entry
    vm.mem.write_u64(pd, vm.mem.read_u64(pd) & ~flag)


def test_rep_insb_into_a_read_only_page_is_a_fault_not_a_host_write(vm):
    _clear_pd_flag(vm, RO_PAGE, 2)                                   # R/W clear
    vm.mem.write(RO_PAGE, b"\x55" * 16)
    code = (movabs("rdi", RO_PAGE) + movabs("rcx", 16) + bytes.fromhex("66baf803")
            + bytes.fromhex("f36c") + RET)                              # rep insb
    e = fault(vm, code)
    assert "not writable at CPL 3" in str(e) and f"{RO_PAGE:#x}" in str(e)
    assert vm.mem.read(RO_PAGE, 16) == b"\x55" * 16


def test_rep_outsb_from_a_supervisor_page_is_a_fault(vm):
    _clear_pd_flag(vm, SUPER_PAGE, 4)                                # U/S clear
    code = (movabs("rsi", SUPER_PAGE) + movabs("rcx", 4) + bytes.fromhex("66ba8000")
            + bytes.fromhex("f36e") + RET)
    assert "not user-accessible" in str(fault(vm, code))


def test_rep_outsb_from_unbacked_memory_is_a_fault(vm):
    code = (movabs("rsi", RAM - 2) + movabs("rcx", 8) + bytes.fromhex("66ba8000")
            + bytes.fromhex("f36e") + RET)
    e = fault(vm, code)
    assert "not backed by guest memory" in str(e) and f"{RAM:#x}" in str(e)


# --- breakpoints and single-steps ----------------------------------------------------------------

def test_int3_reports_its_own_address(vm):
    e = fault(vm, bytes.fromhex("90") + bytes.fromhex("cc") + RET)
    assert e.details["rip"] == CODE + 1 and f"rip {CODE + 1:#x}" in str(e)
    assert "#BP" in str(e) and "breakpoint" in str(e) and "int3" in str(e)


def test_int_3_long_form_reports_its_own_address(vm):
    e = fault(vm, bytes.fromhex("90") + bytes.fromhex("cd03") + RET)
    assert e.details["rip"] == CODE + 1 and "breakpoint" in str(e)


def test_single_step_says_after_which_instruction(vm):
    code = (bytes.fromhex("9c")                      # pushfq
            + bytes.fromhex("48810c2400010000")      # or qword [rsp], 0x100 (TF)
            + bytes.fromhex("9d")                    # popfq
            + bytes.fromhex("90")                    # nop: traps after it
            + bytes.fromhex("90") + RET)
    e = fault(vm, code)
    assert e.details["vector"] == 1 and "single-step trap" in str(e)
    assert f"ends at rip {CODE + 11:#x}" in str(e)


# --- AVX under this host's KVM (measured; state.py's docstring) ------------------------------------

VPCMPEQB_YMM0 = bytes.fromhex("c5fd74c0")          # vpcmpeqb ymm0, ymm0, ymm0: all ones
VEXTRACT_HI_RAX = bytes.fromhex("c4e37d39c001") + bytes.fromhex("c4e1f97ec0")  # vextracti128 xmm0,ymm0,1; vmovq rax,xmm0
VZEROUPPER = bytes.fromhex("c5f877")


def test_avx_at_cpl3_is_either_refused_or_seen_by_the_freeze_check(vm):
    """CPUID hides AVX. Where the CPU refuses it (#UD) that is a payload fault; where the host
    lets CPL-3 code use it anyway (PVM: the host's CR4.OSXSAVE/XCR0 apply), the YMM upper halves
    must survive exits to the host and KVM_GET_XSAVE must show them, so that the handoff's check
    (state.extended_state_in_use) sees a payload that leaves AVX state in use."""
    try:
        upper = run(vm, VPCMPEQB_YMM0 + MOV_RAX_CR0 + VEXTRACT_HI_RAX + RET)   # a host round trip between
    except PayloadFault as e:
        assert "#UD" in str(e) and "invalid opcode" in str(e)
        return
    assert upper == 0xFFFFFFFFFFFFFFFF
    assert state.extended_state_in_use(vm.vcpu.get_xsave()) == []   # the VEX vmovq cleared the upper half
    run(vm, VPCMPEQB_YMM0 + RET)
    used = state.extended_state_in_use(vm.vcpu.get_xsave())
    assert used == ["AVX (YMM upper halves)"]
    assert "carries only x87/SSE" in state.extended_state_warning(used)
    run(vm, VZEROUPPER + RET)
    assert state.extended_state_in_use(vm.vcpu.get_xsave()) == []


def test_guest_xcr0_stays_x87_only(vm):
    # what KVM believes the guest's XCR0 is: XSAVE is hidden, so only x87 (whatever CPL-3 code sees)
    assert vm.vcpu.get_xcrs().get(0) == 1


def test_xsetbv_is_a_payload_fault(vm):
    e = fault(vm, bytes.fromhex("31c9") + bytes.fromhex("b807000000") + bytes.fromhex("31d2")
              + bytes.fromhex("0f01d1") + RET)        # xor ecx,ecx; mov eax,7; xor edx,edx; xsetbv
    assert "xsetbv" in str(e)
