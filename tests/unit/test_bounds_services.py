"""Payload-chosen work in the host-side services is bounded and checks the run's
deadline; payload misbehaviour ends as an EFI status or a payload fault, never as a host error.

The services run against real guest memory (vmrun.vm.memory.GuestMemory, no KVM) and a
firmware stand-in with just what each service uses."""

from __future__ import annotations

import itertools
import os
import uuid
import zlib
from types import SimpleNamespace

import pytest

from hostsvc import boot_services as BS
from hostsvc import dispatch as D
from hostsvc import events as EV
from hostsvc import guids as G
from hostsvc import handles as H
from hostsvc import images as IMG
from hostsvc import status as S
from hostsvc import variables as V
from hostsvc.handles import HandleDB
from hostsvc.memmap import TargetMemoryMap
from hostsvc.memory import Allocator
from hostsvc.protocols import console as CON
from hostsvc.protocols.rng import Rng
from hostsvc.runtime_services import RuntimeServices
from hostsvc.status import EfiError
from vmrun.errors import PayloadFault, RunTimeout
from vmrun.formats import pe as PE
from vmrun.vm.kvm.abi import kvm_regs
from vmrun.vm.memory import GuestMemory

from .pebuilder import build_pe

MIB = 1 << 20
RAM = 96 * MIB


class Port:
    """The run's deadline: ``check_deadline`` counts its calls and raises RunTimeout from call
    ``expire_at`` on."""

    def __init__(self, expire_at: int | None = None):
        self.checks = 0
        self.expire_at = expire_at
        self.call_depth = 0
        self.call_guest = None

    def check_deadline(self):
        self.checks += 1
        if self.expire_at is not None and self.checks >= self.expire_at:
            raise RunTimeout("run exceeded its time limit (test)")

    def stack_pointer(self):
        return 0x1000

    def describe_rip(self, rip):
        return ""


class Fw:
    """What BootServices, images, Rng, the console and the variable services use of a Firmware."""

    def __init__(self, port: Port | None = None):
        self.mem = GuestMemory()
        self.mem.add_region(0, RAM)
        self.port = port or Port()
        self.table = D.ServiceTable(self.mem)
        self.alloc = Allocator(TargetMemoryMap.from_text(f"0x100000 {RAM - 1:#x} System RAM\n"), 1 << 40)
        self.config = SimpleNamespace(entries=[])
        self.images: dict = {}
        self.console_dropped = 0
        self.variables = V.VariableStore()
        self.system_table = 0x2000
        self.console_text: list[str] = []
        counter = itertools.count(0x10000, 16)
        self.events = EV.Events(call_notify=self.notify, new_handle=lambda: next(counter),
                                free_handle=lambda h: None)
        self.handles = HandleDB(new_handle=lambda: self.pool(16), read_device_path=self._read_device_path,
                                signal_event=self.events.signal, free_handle=lambda h: None)
        self.notify_calls = []

    def notify(self, function, event, context):
        self.notify_calls.append(function)
        if self.on_notify:
            self.on_notify(function, event, context)

    on_notify = None

    def pool(self, size, mem_type=4):
        addr = self.alloc.allocate_pool(mem_type, size, owner="firmware")
        self.mem.fill(addr, size, 0)
        return addr

    def _read_device_path(self, addr):
        return bytes((0x7F, 0xFF, 4, 0))

    def set_config_table(self, guid, table):
        entries = self.config.entries
        idx = next((i for i, (g, _) in enumerate(entries) if g == guid), None)
        if idx is None:
            entries.append((guid, table))
        else:
            entries[idx] = (guid, table)

    def console_write(self, text, stream="stdout"):
        self.console_text.append(text)


@pytest.fixture
def fw():
    return Fw()


def efi_status(fn, *args, **kw) -> int:
    with pytest.raises(EfiError) as e:
        fn(*args, **kw)
    return e.value.status


# --- SetMem / CopyMem / CalculateCrc32 ---------------------------------------------------------
def test_set_mem_works_in_chunks_and_checks_the_deadline(fw, monkeypatch):
    monkeypatch.setattr(BS, "MEM_CHUNK", 1 * MIB)
    bs = BS.BootServices(fw)
    bs.set_mem(0x200000, 8 * MIB, 0xAB)
    assert fw.port.checks >= 8
    assert fw.mem.read(0x200000, 16) == b"\xab" * 16 and fw.mem.read(0x200000 + 8 * MIB - 1, 2) == b"\xab\x00"
    # the deadline expiring in the middle ends the call (RunTimeout), not after gigabytes
    fw.port = Port(expire_at=3)
    with pytest.raises(RunTimeout):
        BS.BootServices(fw).set_mem(0x200000, 8 * MIB, 0)
    assert fw.port.checks == 3


def test_set_mem_outside_guest_memory_is_invalid_parameter(fw):
    bs = BS.BootServices(fw)
    assert efi_status(bs.set_mem, 0x1000, (1 << 64) - 1, 0) == S.INVALID_PARAMETER
    assert efi_status(bs.set_mem, RAM - 16, 1 << 40, 0) == S.INVALID_PARAMETER


@pytest.mark.parametrize("delta", [-3 * 4096 - 5, -1, 1, 4096 + 7, 3 * 4096 + 5])
def test_copy_mem_overlapping_in_chunks_is_memmove(fw, monkeypatch, delta):
    monkeypatch.setattr(BS, "MEM_CHUNK", 4096)
    src, n = 0x400000, 5 * 4096 + 123
    pattern = os.urandom(n + 2 * 16384)
    fw.mem.write(src - 16384, pattern)
    expect = bytearray(pattern)
    off = 16384
    expect[off + delta:off + delta + n] = pattern[off:off + n]
    BS.BootServices(fw).copy_mem(src + delta, src, n)
    assert fw.mem.read(src - 16384, len(pattern)) == bytes(expect)
    assert fw.port.checks >= 6


def test_calculate_crc32_in_chunks(fw, monkeypatch):
    monkeypatch.setattr(BS, "MEM_CHUNK", 64 * 1024)
    data = os.urandom(300 * 1024 + 17)
    fw.mem.write(0x300000, data)
    BS.BootServices(fw).calculate_crc32(0x300000, len(data), 0x280000)
    assert fw.mem.read_u32(0x280000) == zlib.crc32(data)
    assert fw.port.checks >= 5
    assert efi_status(BS.BootServices(fw).calculate_crc32, 0x300000, 1 << 63, 0x280000) == S.INVALID_PARAMETER


# --- WaitForEvent, InstallConfigurationTable, events -----------------------------------------------
def test_wait_for_event_refuses_a_huge_event_count(fw):
    bs = BS.BootServices(fw)
    assert efi_status(bs.wait_for_event, (1 << 64) - 1, 0x300000, 0x280000) == S.INVALID_PARAMETER
    assert efi_status(bs.wait_for_event, BS.MAX_WAIT_EVENTS + 1, 0x300000, 0x280000) == S.INVALID_PARAMETER


def test_wait_for_event_checks_the_deadline_while_waiting(fw):
    fw.port = Port(expire_at=3)
    bs = BS.BootServices(fw)
    h = fw.events.create(EV.EVT_TIMER, 0, 0, 0)  # never set: never signaled
    fw.mem.write_u64(0x300000, h)
    with pytest.raises(RunTimeout):
        bs.wait_for_event(1, 0x300000, 0x280000)


def test_install_configuration_table_is_bounded(fw, monkeypatch):
    monkeypatch.setattr(BS, "MAX_CONFIG_TABLES", 8)
    bs = BS.BootServices(fw)
    guids = [uuid.uuid4() for _ in range(9)]
    for g in guids[:8]:
        bs.install_configuration_table(g, 0x1000)
    assert efi_status(bs.install_configuration_table, guids[8], 0x1000) == S.OUT_OF_RESOURCES
    bs.install_configuration_table(guids[0], 0x2000)  # replacing an entry is still fine
    assert len(fw.config.entries) == 8 and fw.config.entries[0] == (guids[0], 0x2000)


def test_notify_nesting_is_a_payload_fault(fw):
    """A notify function that lowers the TPL inside itself lets its own event run again, nested,
    without end: a payload fault at MAX_NOTIFY_NESTING, not a RecursionError."""
    ev = fw.events
    h = ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 0xF00, 0)

    def notify(function, event, context):
        ev.signal(event)                 # queued: it runs at TPL_CALLBACK already
        ev.restore_tpl(EV.TPL_APPLICATION)  # … and now dispatched, nested

    fw.on_notify = notify
    with pytest.raises(PayloadFault, match="nested deeper than 32"):
        ev.signal(h)
    assert len(fw.notify_calls) == EV.MAX_NOTIFY_NESTING
    assert ev.notify_depth == 0


def test_signal_from_own_notify_is_not_recursive(fw):
    ev = fw.events
    h = ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 0xF00, 0)
    fw.on_notify = lambda f, e, c: ev.signal(e) if len(fw.notify_calls) < 5 else None
    ev.signal(h)
    assert len(fw.notify_calls) == 5 and ev.notify_depth == 0


def test_wait_notify_checking_its_own_event_does_not_recurse(fw):
    """Inside its notify function (at its TPL) CheckEvent on the event queues the notify again
    (EDK2 CoreCheckEvent) instead of calling it nested: it runs after the first returns."""
    ev = fw.events
    h = ev.create(EV.EVT_NOTIFY_WAIT, EV.TPL_CALLBACK, 0xF00, 0)
    depths = []

    def notify(f, e, c):
        depths.append(ev.notify_depth)
        if len(depths) < 3:
            assert ev.check(e) is False

    fw.on_notify = notify
    assert ev.check(h) is False
    assert depths == [1, 1, 1]


def test_events_are_bounded(fw, monkeypatch):
    monkeypatch.setattr(EV, "MAX_EVENTS", 4)
    for _ in range(4):
        fw.events.create(0, 0, 0, 0)
    assert efi_status(fw.events.create, 0, 0, 0, 0) == S.OUT_OF_RESOURCES


def test_exit_boot_services_from_a_notify_function_is_a_fault(fw):
    ev = fw.events
    h = ev.create(EV.EVT_NOTIFY_SIGNAL, EV.TPL_CALLBACK, 0xF00, 0)
    bs = BS.BootServices(fw)
    fw.images[0x5000] = object()
    fw.on_notify = lambda f, e, c: bs.exit_boot_services(0x5000, fw.alloc.map_key)
    with pytest.raises(PayloadFault, match="ExitBootServices called from an event notify function"):
        ev.signal(h)
    # the running image itself (here: no notify on the stack) may
    with pytest.raises(BS.ExitBootServicesCalled):
        bs.exit_boot_services(0x5000, fw.alloc.map_key)


# --- GetRNG -------------------------------------------------------------------------------------
def test_get_rng_absurd_lengths_are_invalid_parameter_not_memory_error(fw):
    rng = Rng(fw)
    for length in ((1 << 64) - 1, 1 << 40, RAM):
        assert efi_status(rng.get_rng, 0x1000, None, length, 0x300000) == S.INVALID_PARAMETER
    rng.get_rng(0x1000, None, 3 * MIB, 0x300000)
    assert fw.port.checks >= 3 and fw.mem.read(0x300000, 4096) != bytes(4096)


# --- console, trace -----------------------------------------------------------------------------
def test_console_keeps_a_bounded_amount(fw, monkeypatch):
    monkeypatch.setattr(CON, "MAX_CONSOLE_CHARS", 100)
    out = CON.TextOutput.__new__(CON.TextOutput)
    out.fw, out.mem, out.streams, out.kept = fw, fw.mem, {0x77: "stdout"}, 0
    out.column = out.row = 0
    out.attribute, out.cursor_visible, out.mode_addr = 7, True, fw.pool(64)
    fw.mem.write(0x300000, ("x" * 60 + "\0").encode("utf-16-le"))
    for _ in range(5):
        out.output_string(0x77, 0x300000)
    assert sum(map(len, fw.console_text)) == 100
    assert fw.console_dropped == 5 * 60 - 100
    # an unterminated string across memory is refused, not read without end
    fw.mem.fill(0x400000, 4 * MIB, 0x41)
    with pytest.raises(Exception) as e:
        out.output_string(0x77, 0x400000)
    assert "unterminated" in str(e.value)


def test_trace_keeps_the_first_entries_and_counts_the_rest(monkeypatch):
    monkeypatch.setattr(D, "MAX_TRACE_ENTRIES", 10)
    mem = GuestMemory()
    mem.add_region(0, 1 * MIB)
    t = D.ServiceTable(mem, trace_enabled=True)
    sid = t.register("Test", D.efiapi("Nop")(lambda: None))
    for _ in range(25):
        assert t.dispatch(sid, kvm_regs()) == S.SUCCESS
    assert len(t.trace) == 10 and t.trace_dropped == 15 and t.counts["Nop"] == 25


def test_every_service_call_checks_the_deadline(fw):
    port = Port(expire_at=2)
    table = D.ServiceTable(fw.mem, check_deadline=port.check_deadline)  # as hostsvc.firmware wires it
    sid = table.register("Test", D.efiapi("Nop")(lambda: None))
    assert table.dispatch(sid, kvm_regs()) == S.SUCCESS
    with pytest.raises(RunTimeout):
        table.dispatch(sid, kvm_regs())


# --- variables ----------------------------------------------------------------------------------
NV_BS = V.NON_VOLATILE | V.BOOTSERVICE_ACCESS


def test_set_variable_enforces_the_advertised_limits(fw):
    rt = RuntimeServices(fw)
    g = uuid.uuid4()
    store = fw.variables
    assert efi_status(store.set, "Big", g, NV_BS, bytes(V.MAX_VARIABLE_SIZE)) == S.INVALID_PARAMETER
    store.set("Ok", g, NV_BS, bytes(V.MAX_VARIABLE_SIZE - 2 * 3))  # name "Ok\0" + data: exactly the max
    assert efi_status(store.set, "Ok", g, NV_BS | V.APPEND_WRITE, b"x") == S.INVALID_PARAMETER
    assert efi_status(store.set, "N" * (V.MAX_NAME_CHARS + 1), g, NV_BS, b"x") == S.INVALID_PARAMETER
    # the service refuses DataSize beyond the maximum before copying anything
    fw.mem.write(0x300000, "Huge\0".encode("utf-16-le"))
    fw.mem.write(0x300100, g.bytes_le)
    assert efi_status(rt.set_variable, 0x300000, g, NV_BS, 1 << 62, 0x400000) == S.INVALID_PARAMETER
    # fill the storage: OUT_OF_RESOURCES, and QueryVariableInfo says what remains
    i = 0
    with pytest.raises(EfiError) as e:
        while True:
            store.set(f"V{i}", g, NV_BS, bytes(30000))
            i += 1
    assert e.value.status == S.OUT_OF_RESOURCES
    assert store.used_bytes <= store.storage_size
    rt.query_variable_info(NV_BS, 0x280000, 0x280008, 0x280010)
    assert fw.mem.read_u64(0x280000) == store.storage_size
    assert fw.mem.read_u64(0x280008) == store.remaining_bytes < 30000 + 2 * 8 + V.VARIABLE_OVERHEAD
    assert fw.mem.read_u64(0x280010) == V.MAX_VARIABLE_SIZE
    # deleting makes room again
    store.set("V0", g, NV_BS, b"")
    store.set("Again", g, NV_BS, bytes(20000))


def test_seeds_do_not_eat_the_payloads_storage(fw):
    store = fw.variables
    store.seed("db", uuid.uuid4(), bytes(300 * 1024))  # a large --host-vars seed
    assert store.remaining_bytes >= V.STORAGE_SIZE - 1
    store.set("Mine", uuid.uuid4(), NV_BS, bytes(1000))


def test_variable_summary_counts_writes_without_a_list(fw):
    store = fw.variables
    g = uuid.uuid4()
    for i in range(1000):
        store.set("Counter", g, NV_BS, i.to_bytes(4, "big"))
    assert store.summary() == [{"name": "Counter", "guid": str(g), "writes": 1000, "attributes": NV_BS,
                                "size": 4, "data": (999).to_bytes(4, "big").hex()}]


# --- handles ------------------------------------------------------------------------------------
def test_handle_database_bounds(fw, monkeypatch):
    monkeypatch.setattr(H, "MAX_INTERFACES", 5)
    monkeypatch.setattr(H, "MAX_OPENS", 3)
    monkeypatch.setattr(H, "MAX_REGISTRATIONS", 2)
    db = fw.handles
    base = len(db.handles())
    hs = [db.install(None, uuid.uuid4(), 0) for _ in range(5 - base)]
    assert efi_status(db.install, None, uuid.uuid4(), 0) == S.OUT_OF_RESOURCES
    assert efi_status(db.install_multiple, None, [(uuid.uuid4(), 0)]) == S.OUT_OF_RESOURCES
    g = next(iter(db._handles[hs[0]]))
    for controller in range(3):
        db.open_protocol(hs[0], g, hs[1], controller, H.GET_PROTOCOL)
    assert efi_status(db.open_protocol, hs[0], g, hs[1], 99, H.GET_PROTOCOL) == S.OUT_OF_RESOURCES
    db.register_protocol_notify(g, 0x10)
    db.register_protocol_notify(g, 0x20)
    assert efi_status(db.register_protocol_notify, g, 0x30) == S.OUT_OF_RESOURCES
    db.uninstall(hs[2], next(iter(db._handles[hs[2]])), 0)
    db.install(None, uuid.uuid4(), 0)  # room again


# --- images -------------------------------------------------------------------------------------
class RefusingTpm:
    """A TPM whose measurement of the image fails after the image was placed."""

    def image_digests(self, data):
        return {}

    def measure_image(self, *a, **kw):
        raise EfiError(S.LOAD_ERROR, "PE image hash: test refusal")


def test_load_image_failure_frees_everything(fw):
    fw.tcg2 = RefusingTpm()
    pe = PE.parse_pe(build_pe().data, "t.efi")
    parent = fw.handles.install(None, G.LOADED_IMAGE, 0)
    allocations = [(a.start, a.end) for a in fw.alloc.allocations]
    handles = fw.handles.handles()
    used = fw.alloc.allocated_bytes()
    for _ in range(3):
        assert efi_status(IMG.load_image, fw, pe, "t.efi", parent, load_options="x") == S.LOAD_ERROR
    assert [(a.start, a.end) for a in fw.alloc.allocations] == allocations
    assert fw.handles.handles() == handles and fw.alloc.allocated_bytes() == used and not fw.images


def test_load_image_of_an_unhashable_image_is_load_error_before_allocating(fw):
    from hostsvc.protocols.tcg2 import Tcg2
    tpm = Tcg2.__new__(Tcg2)
    tpm.fw, tpm.banks = fw, ("sha256",)
    fw.tcg2 = tpm
    built = build_pe()
    # a section whose raw data runs past the end of the file: the parser is not asked, the hash fails
    pe = PE.parse_pe(built.data, "t.efi")
    pe = PE.PEImage(**{**vars(pe), "data": built.data[:built.size_of_headers + 16]})
    used = fw.alloc.allocated_bytes()
    assert efi_status(IMG.load_image, fw, pe, "t.efi", 0) == S.LOAD_ERROR
    assert fw.alloc.allocated_bytes() == used and not fw.images


def test_load_image_service_bounds(fw, monkeypatch):
    bs = BS.BootServices(fw)
    fw.images[0x5000] = object()
    assert efi_status(bs.load_image, False, 0x5000, 0, 0x300000, BS.MAX_LOAD_IMAGE_SIZE + 1,
                      0x280000) == S.LOAD_ERROR
    monkeypatch.setattr(BS, "MAX_LOADED_IMAGES", 1)
    assert efi_status(bs.load_image, False, 0x5000, 0, 0x300000, 4096, 0x280000) == S.OUT_OF_RESOURCES


def test_image_that_starts_copies_of_itself_is_a_fault(fw):
    pe = PE.parse_pe(build_pe().data, "self.efi")
    starts = []

    def call_guest(entry, args, stack_top=None):
        fw.port.call_depth += 1
        try:
            starts.append(args[0])
            child = IMG.load_image(fw, pe, "self.efi", args[0])
            return IMG.start_image(fw, child)
        finally:
            fw.port.call_depth -= 1

    fw.port.call_guest = call_guest
    fw.stack_top = 0x90000
    top = IMG.load_image(fw, pe, "self.efi", 0)
    with pytest.raises(PayloadFault, match="more than vmrun's limit of 32"):
        IMG.start_image(fw, top)
    assert len(starts) == IMG.MAX_IMAGE_NESTING
    assert not any(i.running for i in fw.images.values())
