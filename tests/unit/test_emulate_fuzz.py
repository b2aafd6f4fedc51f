"""The privileged-instruction emulator against fuzzed instructions and register values, without
KVM: whatever bytes and registers a payload chooses, ``Emulator.handle`` either emulates the
instruction or ends the run as a payload outcome (PayloadFault, PayloadHalted, RunTimeout) —
never another exception. Also: a KVM refusal on the payload's behalf becomes a PayloadFault."""

import ctypes
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmrun.errors import KvmError, PayloadFault, PayloadHalted, RunTimeout
from vmrun.vm import cpu, emulate, layout as L
from vmrun.vm.devices import standard_bus
from vmrun.vm.emulate import Emulator
from vmrun.vm.kvm import abi
from vmrun.vm.machine import Frame
from vmrun.vm.memory import GuestMemory

RAM = 16 << 20
PT = 0x200000          # page tables, in a 2 MiB page the payload may not touch (U/S clear)
CODE = 0x400000
OUTCOMES = (PayloadFault, PayloadHalted, RunTimeout)


class FakeVcpu:
    """get/set sregs and MSRs like KVM's, refusing what ``refuse`` names (to test the backstop)."""

    def __init__(self, refuse_sregs: bool = False, refuse_msrs: tuple[int, ...] = ()):
        self.sregs = abi.kvm_sregs()
        s = self.sregs
        s.cr0, s.cr3, s.cr4, s.efer = L.INITIAL_CR0, PT, L.INITIAL_CR4, L.INITIAL_EFER
        self.msrs = {0x277: L.PAT_DEFAULT, 0x2FF: 0x806, 0x10: 12345, 0xFE: 0x508}
        self.refuse_sregs = refuse_sregs
        self.refuse_msrs = refuse_msrs
        self.regs = None

    def get_sregs(self):
        return abi.kvm_sregs.from_buffer_copy(self.sregs)

    def set_sregs(self, sregs):
        if self.refuse_sregs:
            raise KvmError("KVM ioctl failed: KVM_SET_SREGS: Invalid argument (errno EINVAL)")
        ctypes.memmove(ctypes.addressof(self.sregs), ctypes.addressof(sregs), ctypes.sizeof(sregs))

    def get_msrs(self, indices):
        return {i: self.msrs[i] for i in indices if i in self.msrs}

    def set_msrs(self, values):
        for i, v in values.items():
            if i in self.refuse_msrs:
                raise KvmError(f"KVM_SET_MSRS refused MSR {i:#x}")
            self.msrs[i] = v

    def set_regs(self, regs):
        self.regs = regs

    def cpuid_leaf(self, function, index=0):
        if function == 0x80000008:
            return abi.kvm_cpuid_entry2(function=function, eax=48)
        return None


class FakeMachine:
    def __init__(self, mem, vcpu, timeout=5.0):
        self.mem = mem
        self.vcpu = vcpu
        self.deadline = time.monotonic() + timeout

    def describe_rip(self, rip):
        return ""

    def check_deadline(self):
        if time.monotonic() > self.deadline:
            raise RunTimeout("run exceeded its time limit")


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory()
    m.add_region(0, RAM)
    tables = bytearray(cpu.build_page_tables(PT, 4 * L.GIB))
    pd0 = 2 * L.PAGE_SIZE + 8 * (PT >> 21)
    tables[pd0] &= ~cpu.PTE_US                       # the page tables' 2 MiB page: supervisor-only
    m.write(PT, bytes(tables))
    yield m
    m.close()


def frame(vector=13, rip=CODE, rflags=L.RFLAGS_FIXED, error_code=0):
    return Frame(addr=0, vector=vector, error_code=error_code, rip=rip, cs=L.SEL_USER_CS, rflags=rflags,
                 rsp=0x300000, ss=L.SEL_USER_DS)


def handle(mem, code: bytes, regs: dict | None = None, vcpu=None, fr=None, timeout=5.0):
    vcpu = vcpu or FakeVcpu()
    machine = FakeMachine(mem, vcpu, timeout)
    fr = fr or frame()
    if fr.rip < RAM - 16:
        mem.write(fr.rip, code)
    r = abi.kvm_regs()
    for k, v in (regs or {}).items():
        setattr(r, k, v)
    bus, _ = standard_bus(lambda line: None)
    Emulator(bus).handle(machine, fr, r)
    return r, vcpu, fr


# --- fuzzing: only payload outcomes ------------------------------------------------------------

TEMPLATES = [
    "0f20", "0f22", "440f20", "440f22", "0f32", "0f30", "e4", "e6", "e5", "e7", "ec", "ed", "ee", "ef",
    "66ed", "66ef", "6c", "6d", "6e", "6f", "f36c", "f36d", "f36e", "f36f", "f3666f", "67f36e", "64f36e",
    "65f36e", "fa", "fb", "f4", "0f09", "0f08", "0f0138", "0f01d0", "0f01d1", "cc", "cd03", "0f0b", "f1",
]
INTERESTING = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 1, 0x80, 0x3F8, 0x3FD, 0x40, 0x43, 0x61, 0x70, 0x71, 0x277, 0x2FF, 0x200, 0x201,
                     0xC0000080, 0xC0000100, 0xC0000101, 0xC0000102, 0x1B, 0x8B, 0x10, 0xFE, 0x1A0,
                     CODE, PT, RAM - 1, RAM - 2, 0xFFF, 0x1000, 1 << 40, (1 << 64) - 1, 0x8000000000000000,
                     0x00007FFFFFFFFFFF, 0xFFFF800000000000, L.INITIAL_CR0, L.INITIAL_CR4, PT | 0x18]))
REG_NAMES = ["rax", "rcx", "rdx", "rsi", "rdi", "r8"]


@settings(max_examples=3000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(TEMPLATES), tail=st.binary(min_size=0, max_size=12),
       prefix=st.sampled_from([b"", b"\x66", b"\x67", b"\x48", b"\xf0", b"\x2e", b"\x64", b"\xf2"]),
       values=st.lists(INTERESTING, min_size=len(REG_NAMES), max_size=len(REG_NAMES)),
       vector=st.sampled_from([13] * 12 + [1, 3, 6, 14, 0xFF]),
       rip=st.sampled_from([CODE] * 10 + [CODE + 0xFFE, RAM - 3, PT + 8, 0x7F0000000000,
                            0x8000000000000000, 0, 1]),
       rflags=st.sampled_from([L.RFLAGS_FIXED, L.RFLAGS_FIXED | emulate.RFLAGS_DF,
                               L.RFLAGS_FIXED | emulate.RFLAGS_TF]))
def test_fuzzed_instructions_end_only_in_payload_outcomes(mem, template, tail, prefix, values, vector, rip,
                                                         rflags):
    code = prefix + bytes.fromhex(template) + tail
    regs = dict(zip(REG_NAMES, values))
    regs["rcx"] = regs["rcx"] if regs["rcx"] < 64 or regs["rcx"] > 1 << 32 else regs["rcx"] & 0xFFF
    fr = frame(vector=vector, rip=rip, rflags=rflags)
    mem.write(CODE - 16, bytes(16))                  # what lies before the instruction (for #BP)
    try:
        handle(mem, code, regs, fr=fr, timeout=0.5)
    except OUTCOMES as e:
        assert str(e), "a payload outcome has a message"


def test_in_and_out_to_every_port(mem):
    machine = FakeMachine(mem, FakeVcpu())
    bus, _ = standard_bus(lambda line: None)
    em = Emulator(bus)
    refused = 0
    ops = [bytes.fromhex(op) for op in ("ec", "ef")]                       # in al, dx; out dx, eax
    for port in range(0x10000):
        for op in ops + ([bytes.fromhex(f"e5{port:02x}"), bytes.fromhex(f"e6{port:02x}")] if port < 256 else []):
            mem.write(CODE, op)
            r = abi.kvm_regs(rdx=port, rax=0x41)
            try:
                em.handle(machine, frame(), r)
            except PayloadFault as e:
                assert "not an instruction vmrun emulates" in str(e)
                refused += 1
    assert refused == 2 * (0x10000 - 16) + 2 * (256 - 8)   # 16 ports are emulated, 8 of them below 256


def test_rdmsr_and_wrmsr_of_many_indices(mem):
    indices = list(range(0, 0x300)) + list(range(0xC0000000, 0xC0000110)) + [0xFFFFFFFF, 0x40000000]
    for index in indices:
        for code, rax, rdx in (("0f32", 0, 0), ("0f30", 0, 0), ("0f30", 0xFFFFFFFF, 0xFFFFFFFF),
                               ("0f30", 0x06, 0x0)):
            try:
                handle(mem, bytes.fromhex(code), {"rcx": index, "rax": rax, "rdx": rdx})
            except PayloadFault as e:
                assert "rdmsr" in str(e) or "wrmsr" in str(e)


# --- directed checks ---------------------------------------------------------------------------

def test_kvm_refusing_sregs_becomes_a_payload_fault_naming_the_write(mem):
    with pytest.raises(PayloadFault) as e:
        handle(mem, bytes.fromhex("0f22c0"), {"rax": L.INITIAL_CR0}, vcpu=FakeVcpu(refuse_sregs=True))
    msg = str(e.value)
    assert f"mov to CR0 of {L.INITIAL_CR0:#x}" in msg and "KVM refused" in msg and "KVM_SET_SREGS" in msg


def test_kvm_refusing_an_msr_becomes_a_payload_fault_naming_the_write(mem):
    with pytest.raises(PayloadFault) as e:
        handle(mem, bytes.fromhex("0f30"), {"rcx": 0x277, "rax": 0x00070406, "rdx": 0x00070406},
               vcpu=FakeVcpu(refuse_msrs=(0x277,)))
    assert "wrmsr of 0x7040600070406 to MSR 0x277 (PAT)" in str(e.value) and "KVM refused" in str(e.value)


def test_rdmsr_kvm_does_not_provide_is_a_payload_fault(mem):
    with pytest.raises(PayloadFault, match=r"rdmsr of 0x1a0 \(MISC_ENABLE\): KVM does not provide"):
        handle(mem, bytes.fromhex("0f32"), {"rcx": 0x1A0})


def test_rep_outsb_is_emulated_in_batches_and_reexecuted(mem):
    r, _, fr = handle(mem, bytes.fromhex("f36e"), {"rcx": 10_000, "rdx": 0x80, "rsi": CODE})
    n = emulate.STRING_IO_PER_EXIT
    assert fr.rip == CODE                                       # the CPU executes it again
    assert (r.rcx, r.rsi) == (10_000 - n, CODE + n)
    r, _, fr = handle(mem, bytes.fromhex("f36e"), {"rcx": 3, "rdx": 0x80, "rsi": CODE})
    assert fr.rip == CODE + 2 and r.rcx == 0 and r.rsi == CODE + 3


def test_rep_insw_with_32_bit_addresses_wraps_edi(mem):
    r, _, fr = handle(mem, bytes.fromhex("67f3666d"), {"rcx": 0x1_0000_0002, "rdx": 0x3F8, "rdi": 0x1_0040_0000})
    assert r.rcx == 0 and r.rdi == 0x0040_0004 and fr.rip == CODE + 4


def test_rep_outsb_past_the_deadline_is_a_timeout(mem):
    with pytest.raises(RunTimeout):
        handle(mem, bytes.fromhex("f36e"), {"rcx": 1 << 40, "rdx": 0x80, "rsi": CODE}, timeout=-1)


def test_rep_insb_into_supervisor_page_tables_is_refused(mem):
    before = mem.read(PT, 64)
    with pytest.raises(PayloadFault, match="not user-accessible"):
        handle(mem, bytes.fromhex("f36c"), {"rcx": 64, "rdx": 0x3F8, "rdi": PT})
    assert mem.read(PT, 64) == before


def test_instruction_fetch_crossing_into_unbacked_memory(mem):
    with pytest.raises(PayloadFault, match="not an instruction|undecodable|cannot read"):
        handle(mem, b"", fr=frame(rip=RAM - 1))


def test_breakpoint_at_the_start_of_memory(mem):
    with pytest.raises(PayloadFault, match="breakpoint"):
        handle(mem, b"", fr=frame(vector=3, rip=0))
