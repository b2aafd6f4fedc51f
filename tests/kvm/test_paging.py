"""What the CPL-3 payload may touch, on a real /dev/kvm micro-VM (vmrun.vm.paging): the firmware
area is out of its reach, RAM no allocation covers is not present (for the guest and for host
writes on its behalf), the frames it maps are counted against the memory cap, a guard page stops
a runaway stack, and host work on its behalf cannot outlast the time limit."""

import struct
import time

import pytest

from vmrun.errors import GuestMemoryError, MemoryCapExceeded, PayloadFault, RunTimeout
from vmrun.vm import layout as L
from vmrun.vm import paging
from vmrun.vm.devices import standard_bus
from vmrun.vm.emulate import Emulator
from vmrun.vm.machine import Machine, RunLimits

pytestmark = pytest.mark.kvm

RAM = 256 << 20
FW = 0x100000
CODE = 0x200000          # one allocated page of code …
STACK = 0x400000         # … and an allocated stack frame
STACK_TOP = 0x500000
FAR = 0x1000000          # 16 MiB: RAM that no allocation covers


@pytest.fixture
def vm():
    m = Machine([(0, RAM)], RunLimits(timeout=5, memory_cap=16 << 20))
    m.install_firmware(FW, Machine.firmware_area_size(RAM))
    bus, _ = standard_bus(lambda _b: None)
    m.exception_handler = Emulator(bus).handle
    m.service_handler = lambda machine, sid, regs: 0
    m.restrict_to_allocations([(FW, FW + Machine.firmware_area_size(RAM)), (CODE, CODE + 0x1000),
                               (STACK, STACK_TOP)])
    m.start_watchdog()
    yield m
    m.close()


def run(vm, code: bytes) -> int:
    vm.mem.write(CODE, code)
    return vm.call_guest(CODE, (), stack_top=STACK_TOP)


def store_to(addr: int) -> bytes:
    """mov rax, addr ; mov byte [rax], 0xcc ; ret"""
    return b"\x48\xb8" + struct.pack("<Q", addr) + b"\xc6\x00\xcc" + b"\xc3"


def load_from(addr: int) -> bytes:
    """mov rax, addr ; mov rax, [rax] ; ret"""
    return b"\x48\xb8" + struct.pack("<Q", addr) + b"\x48\x8b\x00" + b"\xc3"


@pytest.mark.parametrize("offset,what", [
    (L.FW_IDT, "IDT"), (L.FW_GDT, "GDT"), (L.FW_TSS, "TSS"),
    (L.FW_BLOB, "service thunks"), (L.FW_MONITOR_STACK, "monitor stack"), (L.FW_PAGE_TABLES, "page tables"),
])
def test_payload_cannot_write_the_firmware_area(vm, offset, what):
    before = vm.mem.read(FW + offset, 16)
    with pytest.raises(PayloadFault) as e:
        run(vm, store_to(FW + offset))
    assert "#PF" in str(e.value)
    assert what in str(e.value), "the fault names what the payload hit"
    assert vm.mem.read(FW + offset, 16) == before, f"the {what} changed"


def test_payload_may_read_the_thunks(vm):
    # the thunks are user read-only: readable (and callable), unlike the system pages above
    assert run(vm, load_from(vm.fw.thunk(0))) == int.from_bytes(vm.mem.read(vm.fw.thunk(0), 8), "little")


def test_payload_cannot_read_the_idt(vm):
    with pytest.raises(PayloadFault):
        run(vm, load_from(FW + L.FW_IDT))


def test_ram_no_allocation_covers_is_not_present(vm):
    # the host does not write there on the payload's behalf …
    with pytest.raises(GuestMemoryError):
        vm.mem.write(FAR, b"x")
    # … nor can the payload
    with pytest.raises(PayloadFault) as e:
        run(vm, store_to(FAR))
    assert f"{FAR:#x} is memory no allocation covers" in str(e.value)


def test_an_allocation_makes_ram_present(vm):
    vm.map_allocation(FAR, FAR + 0x1000)
    vm.mem.write(FAR + 8, b"host")
    run(vm, store_to(FAR))
    assert vm.mem.read(FAR, 1) == b"\xcc"


def test_null_page_is_not_present(vm):
    with pytest.raises(PayloadFault):
        run(vm, load_from(0))


def test_frames_count_against_the_memory_cap(vm):
    # cap 16 MiB + FRAME_SLACK: single pages in distinct 2 MiB frames cost a frame each
    frames = (16 << 20) // L.PAGE_2M + L.FRAME_SLACK // L.PAGE_2M
    with pytest.raises(MemoryCapExceeded):
        for i in range(frames + 8):
            addr = 0x2000000 + i * L.PAGE_2M
            assert addr < RAM, "the test VM's RAM is too small for the cap"
            vm.map_allocation(addr, addr + 0x1000)


def test_stack_guard_page_stops_recursion(vm):
    vm.protect(STACK, STACK + 0x1000, paging.NONE, "the guard page below the payload's stack")
    code = bytes.fromhex("e8fbffffff")         # l: call l  (recurses until the stack runs out)
    with pytest.raises(PayloadFault) as e:
        run(vm, code)
    assert "guard page below the payload's stack" in str(e.value)
    assert vm.mem.read(STACK, 0x1000) == bytes(0x1000)


def test_handoff_restores_the_plain_identity_map(vm):
    run(vm, b"\xc3")  # the outermost call ends: end_run
    pd = vm.fw.page_tables + 2 * L.PAGE_SIZE
    for frame in (0, FAR >> 21, FW >> 21):
        pde = vm.mem.read_u64(pd + 8 * frame)
        assert pde == (frame << 21) | paging.USER_RW | paging.PTE_PS
    vm.mem.write(FAR, b"staging writes anywhere")


def test_host_work_on_the_payloads_behalf_cannot_outlast_the_limit(vm):
    vm.limits.timeout = 1.0
    vm.start_watchdog()

    def busy(machine, sid, regs):
        while True:   # a host loop that never checks the deadline
            pass

    vm.service_handler = busy
    code = (bytes.fromhex("ff1502000000") + b"\xc3\x90" + struct.pack("<Q", vm.fw.thunk(1)))
    t0 = time.monotonic()
    with pytest.raises(RunTimeout) as e:
        run(vm, code)
    assert time.monotonic() - t0 < 1.0 + L.WATCHDOG_GRACE_S + 0.5
    assert "on the payload's behalf" in str(e.value)


@pytest.mark.parametrize("offset", [L.FW_IDT, L.FW_BLOB, L.FW_MONITOR_STACK, L.FW_PAGE_TABLES])
def test_host_does_not_write_vmruns_pages_for_the_payload(vm, offset):
    """A service writing through a pointer the payload passed (GetTime's Capabilities into the
    PML4, once found by the service fuzzer) is refused like the payload's own write."""
    before = vm.mem.read(FW + offset, 16)
    with pytest.raises(GuestMemoryError):
        vm.mem.write_u64(FW + offset, 0x4141414141414141)
    assert vm.mem.read(FW + offset, 16) == before
    vm.mem.write_u64(CODE, 1)   # the payload's own page: fine
