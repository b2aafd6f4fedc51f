"""Hand-assembled guests on a real /dev/kvm micro-VM: hypercalls, nested guest calls,
privileged-instruction emulation, port I/O devices, and every way a payload can fail."""

import struct
import time

import pytest

from hostsvc.events import EVT_TIMER, TIMER_RELATIVE, TPL_HIGH_LEVEL, Events
from vmrun.errors import PayloadFault, PayloadHalted, RunTimeout
from vmrun.vm import layout as L
from vmrun.vm.devices import standard_bus
from vmrun.vm.emulate import Emulator
from vmrun.vm.machine import Machine, RunLimits

pytestmark = pytest.mark.kvm

RAM = 64 << 20
FW = 0x100000
CODE = 0x200000
CODE2 = 0x201000
STACK_TOP = 0x300000


@pytest.fixture
def vm():
    m = Machine([(0, RAM)], RunLimits(timeout=10))
    m.install_firmware(FW, Machine.firmware_area_size(RAM))
    m.serial = []
    bus, m.uart = standard_bus(m.serial.append)
    m.emulator = Emulator(bus)
    m.exception_handler = m.emulator.handle
    m.calls = []

    def handler(machine, sid, regs):
        machine.calls.append((sid, regs.rcx, regs.rdx))
        return getattr(machine, "svc_result", 0)

    m.service_handler = handler
    m.start_watchdog()
    yield m
    m.close()


def run(vm, code: bytes, at: int = CODE) -> int:
    vm.mem.write(at, code)
    return vm.call_guest(at, (), stack_top=STACK_TOP)


def test_service_thunk_reaches_host_and_returns_rax(vm):
    thunk = vm.fw.thunk(5)
    code = (bytes.fromhex("b934120000")            # mov ecx, 0x1234
            + bytes.fromhex("ba78560000")          # mov edx, 0x5678
            + bytes.fromhex("ff1501000000")        # call [rip+1]
            + bytes.fromhex("c3")                  # ret
            + struct.pack("<Q", thunk))            # the thunk's address
    vm.svc_result = 0x8000000000000003
    assert run(vm, code) == 0x8000000000000003
    assert vm.calls == [(5, 0x1234, 0x5678)]


def test_nested_call_into_guest_from_a_service(vm):
    inner = bytes.fromhex("488d4101") + bytes.fromhex("c3")   # lea rax, [rcx+1] ; ret
    vm.mem.write(CODE2, inner)

    def handler(machine, sid, regs):
        return machine.call_guest(CODE2, (41,)) * 2              # the guest computes 42

    vm.service_handler = handler
    code = (bytes.fromhex("ff1502000000")          # call [rip+2]
            + bytes.fromhex("c3")                  # ret (returns the service's RAX)
            + b"\x90"                              # nop (padding)
            + struct.pack("<Q", vm.fw.thunk(1)))
    assert run(vm, code) == 84


def test_mov_from_cr0_is_emulated(vm):
    cr0 = run(vm, bytes.fromhex("0f20c0")          # mov rax, cr0   (#GP at CPL 3, emulated)
              + bytes.fromhex("c3"))               # ret
    assert cr0 & L.CR0_PG and cr0 & L.CR0_PE
    assert vm.emulator.counts["mov_from_cr0"] == 1


def test_mov_to_cr4_keeps_paging_and_can_be_read_back(vm):
    code = (bytes.fromhex("0f20e0")                # mov rax, cr4
            + bytes.fromhex("480d80000000")        # or rax, 0x80 (PGE)
            + bytes.fromhex("0f22e0")              # mov cr4, rax
            + bytes.fromhex("0f20e0")              # mov rax, cr4
            + bytes.fromhex("c3"))                 # ret
    assert run(vm, code) & 0x80
    assert vm.vcpu.get_sregs().cr4 & 0x80


def test_rdmsr_efer_shows_long_mode(vm):
    code = (bytes.fromhex("b9800000c0")            # mov ecx, 0xc0000080 (EFER)
            + bytes.fromhex("0f32")                # rdmsr
            + bytes.fromhex("c3"))                 # ret (EAX = low half)
    efer = run(vm, code)
    assert efer & L.EFER_LME and efer & L.EFER_LMA


def test_rdmsr_outside_the_allow_list_is_a_fault(vm):
    code = (bytes.fromhex("b9310101c0")            # mov ecx, 0xc0010131 (SEV status)
            + bytes.fromhex("0f32")                # rdmsr
            + bytes.fromhex("c3"))                 # ret
    with pytest.raises(PayloadFault, match="rdmsr"):
        run(vm, code)


def test_uart_output_reaches_the_console_log(vm):
    code = (bytes.fromhex("66baf803")              # mov dx, 0x3f8
            + bytes.fromhex("b04f")                # mov al, 'O'
            + bytes.fromhex("ee")                  # out dx, al
            + bytes.fromhex("b04b")                # mov al, 'K'
            + bytes.fromhex("ee")                  # out dx, al
            + bytes.fromhex("b00a")                # mov al, '\n'
            + bytes.fromhex("ee")                  # out dx, al
            + bytes.fromhex("c3"))                 # ret
    run(vm, code)
    assert vm.serial == ["OK"]


def test_cmos_seconds_are_bcd(vm):
    code = (bytes.fromhex("b000")                  # mov al, 0 (seconds register)
            + bytes.fromhex("e670")                # out 0x70, al
            + bytes.fromhex("e471")                # in al, 0x71
            + bytes.fromhex("480fb6c0")            # movzx rax, al
            + bytes.fromhex("c3"))                 # ret
    v = run(vm, code)
    assert v >> 4 <= 5 and v & 0xF <= 9


def test_cli_sti_hlt_wbinvd_are_emulated(vm):
    code = (bytes.fromhex("fa")                    # cli
            + bytes.fromhex("fb")                  # sti
            + bytes.fromhex("f4")                  # hlt
            + bytes.fromhex("0f09")                # wbinvd
            + bytes.fromhex("0f0138")              # invlpg [rax]
            + bytes.fromhex("b807000000")          # mov eax, 7
            + bytes.fromhex("c3"))                 # ret
    assert run(vm, code) == 7
    for what in ("cli", "sti", "hlt", "wbinvd", "invlpg"):
        assert vm.emulator.counts[what] == 1


def test_unsupported_privileged_instruction_is_a_payload_fault(vm):
    code = bytes.fromhex("0f0118")                 # lidt [rax]
    with pytest.raises(PayloadFault) as e:
        run(vm, code)
    msg = str(e.value)
    assert "#GP" in msg and "lidt" in msg and "0f 01 18" in msg and f"{CODE:#x}" in msg


def test_unknown_port_is_a_payload_fault(vm):
    code = bytes.fromhex("e4ab")                   # in al, 0xab
    with pytest.raises(PayloadFault, match="not an instruction vmrun emulates"):
        run(vm, code)


def test_page_fault_reports_the_address(vm):
    code = bytes.fromhex("48a100000000007f0000")   # movabs rax, [0x7f0000000000] (never mapped)
    with pytest.raises(PayloadFault, match=r"#PF.*address 0x7f0000000000"):
        run(vm, code)


def test_access_to_unbacked_physical_memory_is_a_payload_fault(vm):
    code = (bytes.fromhex("b80000d0fe")            # mov eax, 0xfed00000 (HPET: no RAM there)
            + bytes.fromhex("8b00"))               # mov eax, [rax]
    with pytest.raises(PayloadFault, match="unbacked guest-physical address 0xfed00000"):
        run(vm, code)


def test_spinning_guest_hits_the_time_limit(vm):
    vm.limits.timeout = 1.0
    vm.start_watchdog()
    with pytest.raises(RunTimeout, match="time limit of 1 s"):
        run(vm, bytes.fromhex("ebfe"))             # jmp $


def test_stack_alignment_at_entry_follows_the_ms_x64_abi(vm):
    # at entry RSP+8 must be 16-byte aligned: a movaps to [rsp+8] only works then
    code = (bytes.fromhex("0f57c0")                # xorps xmm0, xmm0
            + bytes.fromhex("0f29442408")          # movaps [rsp+8], xmm0  (#GP when misaligned)
            + bytes.fromhex("4889e0")              # mov rax, rsp
            + bytes.fromhex("c3"))                 # ret
    rsp = run(vm, code)
    assert (rsp + 8) % 16 == 0
    vm.mem.write(CODE2, code)

    def handler(machine, sid, regs):               # the same holds for nested calls
        return machine.call_guest(CODE2, ())

    vm.service_handler = handler
    outer = (bytes.fromhex("4883ec28")             # sub rsp, 40 (shadow space + alignment)
             + bytes.fromhex("ff1506000000")       # call [rip+6]
             + bytes.fromhex("4883c428")           # add rsp, 40
             + bytes.fromhex("c3")                 # ret
             + b"\x90" * 1                         # nop (padding)
             + struct.pack("<Q", vm.fw.thunk(2)))
    assert (run(vm, outer, at=CODE + 0x800) + 8) % 16 == 0


# --- hlt: waits for an interrupt; with interrupts disabled none can come ------------------------

def timer_events(vm, due_in_100ns: int | None) -> Events:
    """The firmware's event database as the vCPU's interrupt source, one timer armed."""
    handles = iter(range(0x9000, 0x10000, 16))
    ev = Events(call_notify=lambda *a: None, new_handle=lambda: next(handles), free_handle=lambda h: None)
    if due_in_100ns is not None:
        ev.set_timer(ev.create(EVT_TIMER, 0, 0, 0), TIMER_RELATIVE, due_in_100ns)
    vm.emulator.interrupts = ev
    return ev


HALT_FOREVER = (bytes.fromhex("fa")                # cli
                + bytes.fromhex("f4")              # hlt
                + bytes.fromhex("ebfc"))           # jmp back to cli (never reached on hardware)


def test_cli_hlt_ends_the_run_at_once(vm):
    vm.limits.timeout = 60
    vm.start_watchdog()
    t0 = time.monotonic()
    with pytest.raises(PayloadHalted) as e:
        run(vm, HALT_FOREVER)
    assert time.monotonic() - t0 < 2
    assert e.value.kind == "halted" and e.value.exit_code == 25
    assert "interrupts disabled" in str(e.value) and f"rip {CODE + 1:#x}" in str(e.value)   # the hlt


def test_cli_hlt_halts_even_with_a_timer_pending(vm):
    # a masked interrupt never wakes a halted CPU: the timer event cannot help
    timer_events(vm, 100_000)                      # due in 10 ms
    with pytest.raises(PayloadHalted) as e:
        run(vm, HALT_FOREVER)
    assert e.value.kind == "halted" and e.value.exit_code == 25          # README: exit codes
    assert "interrupts disabled" in str(e.value) and f"rip {CODE + 1:#x}" in str(e.value)   # the hlt


def test_hlt_at_tpl_high_level_halts(vm):
    # UEFI 2.10 §7.1: interrupts are disabled at TPL_HIGH_LEVEL
    ev = timer_events(vm, 100_000)
    ev.raise_tpl(TPL_HIGH_LEVEL)
    with pytest.raises(PayloadHalted, match="TPL_HIGH_LEVEL"):
        run(vm, bytes.fromhex("fb") + bytes.fromhex("f4") + bytes.fromhex("c3"))   # sti; hlt; ret


def test_sti_hlt_with_a_timer_pending_is_a_pause(vm):
    timer_events(vm, 300_000)                      # due in 30 ms
    code = (bytes.fromhex("fb")                    # sti
            + bytes.fromhex("f4")                  # hlt (resumes at the next interrupt)
            + bytes.fromhex("f4")                  # hlt
            + bytes.fromhex("b807000000")          # mov eax, 7
            + bytes.fromhex("c3"))                 # ret
    assert run(vm, code) == 7
    assert vm.emulator.counts["hlt"] == 2


def test_sti_hlt_loop_runs_until_the_time_limit(vm):
    # interrupts enabled: the firmware's timer tick resumes every hlt, so a hlt loop is no halt
    vm.limits.timeout = 1.0
    vm.start_watchdog()
    with pytest.raises(RunTimeout, match="time limit of 1 s"):
        run(vm, bytes.fromhex("fb") + bytes.fromhex("f4") + bytes.fromhex("ebfd"))   # sti; hlt; jmp hlt
    assert vm.emulator.counts["hlt"] > 1
