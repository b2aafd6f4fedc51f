"""Argument decoding and status mapping of the one dispatch path (no KVM: fake registers)."""

import uuid

import pytest

from hostsvc import status as S
from hostsvc.dispatch import GUIDPTR, OPTPTR, PTR, U32, U8, UINTN, ServiceTable, efiapi
from hostsvc.status import EfiError
from vmrun.vm.kvm.abi import kvm_regs
from vmrun.vm.memory import GuestMemory

G = uuid.UUID("12345678-9abc-def0-1122-334455667788")


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, 1 << 20)
    yield m
    m.close()


class Svc:
    def __init__(self):
        self.seen = None

    @efiapi("Six", ("a", U32), ("b", U8), ("c", PTR), ("d", OPTPTR), ("e", UINTN), ("f", GUIDPTR))
    def six(self, a, b, c, d, e, f):
        self.seen = (a, b, c, d, e, f)
        return 0x1234

    @efiapi("Fails", ("x", PTR))
    def fails(self, x):
        raise EfiError(S.NOT_FOUND, "nothing there")

    @efiapi("Reads", ("x", PTR))
    def reads(self, x):
        return self_mem[0].read_u64(x)


self_mem = []


def call(table, mem, sid, args, stack_args=()):
    regs = kvm_regs()
    for name, v in zip(("rcx", "rdx", "r8", "r9"), args):
        setattr(regs, name, v)
    regs.rsp = 0x8000
    for i, v in enumerate(stack_args):  # 5th argument at [rsp+0x28] (MS x64: return address + shadow)
        mem.write_u64(regs.rsp + 0x28 + 8 * i, v)
    return table.dispatch(sid, regs)


def test_ms_x64_arguments_registers_then_stack(mem):
    svc = Svc()
    t = ServiceTable(mem, trace_enabled=True)
    ids = t.register_all("Test", svc, ["Six", "Missing"])
    mem.write(0x3000, G.bytes_le)
    # upper halves of narrow arguments are garbage in the ABI and must be ignored
    status = call(t, mem, ids[0], [0xFFFF_FFFF_0000_0007, 0xAB_CD, 0x2000, 0], [0x1_0000_0000, 0x3000])
    assert status == 0x1234
    assert svc.seen == (7, 0xCD, 0x2000, 0, 0x1_0000_0000, G)
    assert t.trace[-1].args["a"] == "7" and t.trace[-1].args["c"] == "0x2000"


def test_null_required_pointer_is_invalid_parameter(mem):
    svc = Svc()
    t = ServiceTable(mem)
    sid = t.register_all("Test", svc, ["Six"])[0]
    assert call(t, mem, sid, [1, 2, 0, 0], [0, 0x3000]) == S.INVALID_PARAMETER
    assert svc.seen is None  # the handler never ran


def test_efi_error_becomes_the_status_and_is_traced(mem):
    t = ServiceTable(mem, trace_enabled=True)
    sid = t.register_all("Test", Svc(), ["Fails"])[0]
    assert call(t, mem, sid, [0x10]) == S.NOT_FOUND
    assert t.trace[-1].status == "NOT_FOUND" and "nothing there" in t.trace[-1].note


def test_bad_guest_pointer_is_invalid_parameter_not_a_crash(mem):
    self_mem[:] = [mem]
    t = ServiceTable(mem)
    sid = t.register_all("Test", Svc(), ["Reads"])[0]
    assert call(t, mem, sid, [0x7FFF_0000_0000]) == S.INVALID_PARAMETER


def test_unimplemented_slot_answers_unsupported_and_is_marked(mem):
    t = ServiceTable(mem, trace_enabled=True)
    ids = t.register_all("Test", Svc(), ["Missing"])
    assert call(t, mem, ids[0], []) == S.UNSUPPORTED
    assert t.unimplemented_calls["Missing"] == 1
    assert t.trace[-1].implemented is False


def test_status_values_match_the_spec():
    # UEFI 2.10 Appendix D: error codes have the high bit set
    assert S.INVALID_PARAMETER == 0x8000000000000002
    assert S.BUFFER_TOO_SMALL == 0x8000000000000005
    assert S.NOT_FOUND == 0x800000000000000E
    assert S.SECURITY_VIOLATION == 0x800000000000001A
