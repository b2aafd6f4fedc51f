"""EFI_TCG2_PROTOCOL without KVM: real GuestMemory, Allocator, ServiceTable and HandleDB behind
a small stand-in for Firmware; calls go through ServiceTable.dispatch with MS-x64 registers."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import textwrap

import pytest

from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import tpm as T
from hostsvc.dispatch import ServiceTable
from hostsvc.handles import HandleDB
from hostsvc.memmap import TargetMemoryMap
from hostsvc.memory import Allocator, MemType
from hostsvc.protocols import tcg2 as TCG
from hostsvc.variables import VariableStore
from tests.unit.test_tpm import signed_sha256_digest, tpm2_eventlog_pcrs
from vmrun.vm.kvm.abi import kvm_regs
from vmrun.vm.memory import GuestMemory

MIB = 1 << 20
SCRATCH = 0x10000     # caller buffers (below the allocator's RAM)
STACK = 0x8000


class FakeFirmware:
    """What Tcg2 uses of hostsvc.firmware.Firmware: mem, alloc, interface, handles,
    set_config_table, variables."""

    def __init__(self):
        self.mem = GuestMemory()
        self.mem.add_region(0, 64 * MIB)
        self.alloc = Allocator(TargetMemoryMap.from_text("0x100000 0x3ffffff System RAM\n"), 1 << 40)
        self.table = ServiceTable(self.mem)
        counter = iter(range(0x1000, 0x8000, 16))
        self.handles = HandleDB(new_handle=lambda: next(counter), read_device_path=lambda p: b"",
                                signal_event=lambda e: None)
        self.config: dict = {}
        self.variables = VariableStore()
        self.ids: dict[str, int] = {}

    def interface(self, group, obj, names, data=b"", mem_type=MemType.BootServicesData):
        ids = self.table.register_all(group, obj, names)
        self.ids = dict(zip(names, ids))
        raw = b"".join(struct.pack("<Q", 0xFFFF0000 + 16 * i) for i in ids) + data
        addr = self.alloc.allocate_pool(mem_type, len(raw), owner="firmware")
        self.mem.write(addr, raw)
        return addr

    def set_config_table(self, guid, table):
        self.config[guid] = table

    def call(self, name, *args):
        regs = kvm_regs()
        for reg, v in zip(("rcx", "rdx", "r8", "r9"), args):
            setattr(regs, reg, v)
        regs.rsp = STACK
        for i, v in enumerate(args[4:]):
            self.mem.write_u64(STACK + 0x28 + 8 * i, v)
        return self.table.dispatch(self.ids[name], regs)


@pytest.fixture
def fw():
    f = FakeFirmware()
    yield f
    f.mem.close()


@pytest.fixture
def tcg(fw):
    t = TCG.Tcg2(fw, ("sha1", "sha256"))
    t.install()
    return t


def tcg2_event(pcr, event_type, data, *, header_size=14, header_version=1, size=None):
    body = struct.pack("<IHII", header_size, header_version, pcr, event_type)
    total = 4 + header_size + len(data) if size is None else size
    return struct.pack("<I", total) + body + bytes(header_size - 14) + data


def put(fw, addr, raw):
    fw.mem.write(addr, raw)
    return addr


THIS = 0x2000  # any non-NULL This


# --- install -----------------------------------------------------------------------------------

def test_install_protocol_config_table_and_areas(fw, tcg):
    assert fw.handles.handle_protocol(tcg.handle, G.TCG2) == tcg.interface_addr
    assert fw.handles.locate_protocol(G.TCG2) == tcg.interface_addr
    assert fw.config[G.EFI_TCG2_FINAL_EVENTS] == tcg.final_addr
    assert fw.tcg2 is tcg
    # 7 function pointers in the spec's order
    assert list(fw.ids) == TCG.TCG2_ORDER
    final = fw.mem.read(tcg.final_addr, 24)
    assert struct.unpack_from("<QQ", final) == (1, 0) and final[16:] == b"\xff" * 8
    log = fw.mem.read(tcg.log_addr, TCG.LOG_AREA_SIZE)
    head = T.EventLog(("sha1", "sha256")).to_bytes()
    assert log[:len(head)] == head and set(log[len(head):]) == {0xFF}
    types = sorted(a.mem_type for a in fw.alloc.allocations if a.owner == "tpm")
    assert types == sorted([MemType.BootServicesData, MemType.ACPIMemoryNVS])


# --- GetCapability -----------------------------------------------------------------------------

def _c_offsets():
    """offsetof() of EFI_TCG2_BOOT_SERVICE_CAPABILITY as a C compiler lays it out (the struct
    as MdePkg/Include/Protocol/Tcg2Protocol.h declares it)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:  # the reference layout: never skipped
        pytest.fail("no C compiler (scripts/setup installs gcc)", pytrace=False)
    src = textwrap.dedent("""
        #include <stdio.h>
        #include <stddef.h>
        #include <stdint.h>
        typedef struct { uint8_t Major, Minor; } V;
        typedef struct { uint8_t Size; V StructureVersion; V ProtocolVersion; uint32_t HashAlgorithmBitmap;
          uint32_t SupportedEventLogs; uint8_t TPMPresentFlag; uint16_t MaxCommandSize;
          uint16_t MaxResponseSize; uint32_t ManufacturerID; uint32_t NumberOfPCRBanks;
          uint32_t ActivePcrBanks; } C;
        typedef struct { uint8_t Size; V StructureVersion; V ProtocolVersion; uint32_t HashAlgorithmBitmap;
          uint32_t SupportedEventLogs; uint8_t TrEEPresentFlag; uint16_t MaxCommandSize;
          uint16_t MaxResponseSize; uint32_t ManufacturerID; } C10;
        int main(void) { printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\\n", offsetof(C, HashAlgorithmBitmap),
          offsetof(C, SupportedEventLogs), offsetof(C, TPMPresentFlag), offsetof(C, MaxCommandSize),
          offsetof(C, MaxResponseSize), offsetof(C, ManufacturerID), offsetof(C, NumberOfPCRBanks),
          offsetof(C, ActivePcrBanks), sizeof(C), sizeof(C10), offsetof(C, ProtocolVersion)); return 0; }
    """)
    return src, cc


def test_capability_layout_matches_c_compiler(tmp_path):
    src, cc = _c_offsets()
    (tmp_path / "c.c").write_text(src)
    subprocess.run([cc, "-o", str(tmp_path / "c"), str(tmp_path / "c.c")], check=True)
    out = subprocess.run([str(tmp_path / "c")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(x) for x in out] == [8, 12, 16, 18, 20, 24, 28, 32, 36, 28, 3]
    assert TCG.CAPABILITY_SIZE_1_1 == 36 and TCG.CAPABILITY_SIZE_1_0 == 28


def test_get_capability_full(fw, tcg):
    buf = SCRATCH
    fw.mem.fill(buf, 64, 0xCC)
    fw.mem.write_u8(buf, 36)
    assert fw.call("GetCapability", THIS, buf) == S.SUCCESS
    b = fw.mem.read(buf, 40)
    assert b[0] == 36
    assert b[1:3] == b"\x01\x01" and b[3:5] == b"\x01\x01"          # structure 1.1, protocol 1.1
    assert struct.unpack_from("<I", b, 8)[0] == 0x3                  # sha1 | sha256
    assert struct.unpack_from("<I", b, 12)[0] == 0x2                 # EFI_TCG2_EVENT_LOG_FORMAT_TCG_2
    assert b[16] == 1                                                # TPMPresentFlag
    assert struct.unpack_from("<HH", b, 18) == (4096, 4096)
    assert struct.unpack_from("<III", b, 24) == (0x49424D00, 2, 0x3)
    assert b[36:40] == b"\xcc" * 4                                   # nothing past Size


def test_get_capability_1_0_caller(fw, tcg):
    fw.mem.fill(SCRATCH, 40, 0xCC)
    fw.mem.write_u8(SCRATCH, 28)
    assert fw.call("GetCapability", THIS, SCRATCH) == S.SUCCESS
    b = fw.mem.read(SCRATCH, 36)
    assert b[0] == 28 and b[1:5] == b"\x01\x00\x01\x00"
    assert b[16] == 1 and struct.unpack_from("<I", b, 24)[0] == 0x49424D00
    assert b[28:36] == b"\xcc" * 8


@pytest.mark.parametrize("size", [0, 1, 27])
def test_get_capability_too_small(fw, tcg, size):
    fw.mem.fill(SCRATCH, 40, 0xCC)
    fw.mem.write_u8(SCRATCH, size)
    assert fw.call("GetCapability", THIS, SCRATCH) == S.BUFFER_TOO_SMALL
    b = fw.mem.read(SCRATCH, 8)
    assert b[0] == 36 and b[1:] == b"\xcc" * 7


def test_get_capability_null(fw, tcg):
    assert fw.call("GetCapability", THIS, 0) == S.INVALID_PARAMETER


# --- GetEventLog -------------------------------------------------------------------------------

def test_get_event_log(fw, tcg):
    loc, last, trunc = SCRATCH, SCRATCH + 8, SCRATCH + 16
    fw.mem.fill(SCRATCH, 24, 0xAA)
    assert fw.call("GetEventLog", THIS, 2, loc, last, trunc) == S.SUCCESS
    assert fw.mem.read_u64(loc) == tcg.log_addr
    assert fw.mem.read_u64(last) == tcg.log_addr  # only the Spec ID event so far
    assert fw.mem.read_u8(trunc) == 0
    ev = tcg2_event(8, T.EV_IPL, b"cmdline")
    put(fw, SCRATCH + 0x100, ev)
    put(fw, SCRATCH + 0x200, b"console=ttyS0")
    assert fw.call("HashLogExtendEvent", THIS, 0, SCRATCH + 0x200, 13, SCRATCH + 0x100) == S.SUCCESS
    assert fw.call("GetEventLog", THIS, 2, loc, last, 0) == S.SUCCESS
    events = T.parse(fw.mem.read(tcg.log_addr, TCG.LOG_AREA_SIZE))
    assert fw.mem.read_u64(last) == tcg.log_addr + events[-1].offset
    assert events[-1].data == b"cmdline" and events[-1].pcr == 8


@pytest.mark.parametrize("fmt", [1, 0, 3, 4])
def test_get_event_log_other_formats(fw, tcg, fmt):
    assert fw.call("GetEventLog", THIS, fmt, SCRATCH, SCRATCH + 8, SCRATCH + 16) == S.INVALID_PARAMETER
    assert not tcg.get_event_log_called


# --- HashLogExtendEvent ------------------------------------------------------------------------

def _extend(fw, pcr, etype, data, hashed, flags=0, **kw):
    ev_addr, data_addr = SCRATCH + 0x1000, SCRATCH + 0x2000
    put(fw, ev_addr, tcg2_event(pcr, etype, data, **kw))
    put(fw, data_addr, hashed)
    return fw.call("HashLogExtendEvent", THIS, flags, data_addr, len(hashed), ev_addr)


def test_hash_log_extend_event_extends_and_logs(fw, tcg):
    assert _extend(fw, 8, T.EV_IPL, b"event data", b"hello") == S.SUCCESS
    for alg, size in (("sha1", 20), ("sha256", 32)):
        expect = hashlib.new(alg, bytes(size) + hashlib.new(alg, b"hello").digest()).digest()
        assert tcg.pcrs.read(8, alg) == expect
    ev = T.parse(fw.mem.read(tcg.log_addr, TCG.LOG_AREA_SIZE))[-1]
    assert (ev.pcr, ev.event_type, ev.data) == (8, T.EV_IPL, b"event data")
    assert ev.digests == {"sha1": hashlib.sha1(b"hello").digest(), "sha256": hashlib.sha256(b"hello").digest()}
    # before GetEventLog nothing goes to the final events table
    assert fw.mem.read_u64(tcg.final_addr + 8) == 0


def test_final_events_after_get_event_log(fw, tcg):
    _extend(fw, 8, T.EV_IPL, b"before", b"1")
    assert fw.call("GetEventLog", THIS, 2, SCRATCH, 0, 0) == S.SUCCESS
    _extend(fw, 9, T.EV_EVENT_TAG, T.tagged_event(0x8F3B22ED, b"Linux initrd\0"), b"initrd")
    _extend(fw, 9, T.EV_EVENT_TAG, T.tagged_event(0x8F3B22EC, b"LoadOptions\0"), b"opts")
    version, n = struct.unpack("<QQ", fw.mem.read(tcg.final_addr, 16))
    assert (version, n) == (1, 2)
    log = T.parse(tcg.log_bytes())
    assert tcg.final_events_bytes()[16:] == b"".join(e.to_bytes() for e in log[-2:])
    assert fw.mem.read(tcg.final_addr + len(tcg.final_events_bytes()), 4) == b"\xff" * 4


@pytest.mark.parametrize("kw,why", [
    (dict(header_version=0), "header version"),
    (dict(header_version=2), "header version"),
    (dict(header_size=13 + 1, size=4 + 14 - 1), "size below header"),
    (dict(size=3), "size below header"),
])
def test_hash_log_extend_event_bad_header(fw, tcg, kw, why):
    before = tcg.pcrs.values(), tcg.log.size
    assert _extend(fw, 8, T.EV_IPL, b"x", b"data", **kw) == S.INVALID_PARAMETER, why
    assert (tcg.pcrs.values(), tcg.log.size) == before


def test_hash_log_extend_event_bad_header_size(fw, tcg):
    raw = bytearray(tcg2_event(8, T.EV_IPL, b"x"))
    raw[4:8] = (10).to_bytes(4, "little")  # HeaderSize < sizeof(EFI_TCG2_EVENT_HEADER)
    put(fw, SCRATCH + 0x1000, bytes(raw))
    put(fw, SCRATCH + 0x2000, b"data")
    assert fw.call("HashLogExtendEvent", THIS, 0, SCRATCH + 0x2000, 4, SCRATCH + 0x1000) == S.INVALID_PARAMETER


def test_hash_log_extend_event_pcr_range_and_nulls(fw, tcg):
    assert _extend(fw, 24, T.EV_IPL, b"x", b"d") == S.INVALID_PARAMETER
    assert _extend(fw, 23, T.EV_IPL, b"x", b"d") == S.SUCCESS
    put(fw, SCRATCH + 0x1000, tcg2_event(8, T.EV_IPL, b"x"))
    assert fw.call("HashLogExtendEvent", THIS, 0, 0, 4, SCRATCH + 0x1000) == S.INVALID_PARAMETER
    assert fw.call("HashLogExtendEvent", THIS, 0, SCRATCH, 4, 0) == S.INVALID_PARAMETER
    assert tcg.pcrs.read(8) == bytes(32)


def test_extend_only_does_not_log(fw, tcg):
    size = tcg.log.size
    assert _extend(fw, 8, T.EV_IPL, b"x", b"d", flags=TCG.EFI_TCG2_EXTEND_ONLY) == S.SUCCESS
    assert tcg.log.size == size
    assert tcg.pcrs.read(8) == hashlib.sha256(bytes(32) + hashlib.sha256(b"d").digest()).digest()


def test_no_action_logs_zero_digests_without_extending(fw, tcg):
    put(fw, SCRATCH + 0x1000, tcg2_event(0, T.EV_NO_ACTION, b"note"))
    assert fw.call("HashLogExtendEvent", THIS, 0, 0, 0, SCRATCH + 0x1000) == S.SUCCESS
    ev = tcg.log.events[-1]
    assert ev.event_type == T.EV_NO_ACTION and ev.digests == {"sha1": bytes(20), "sha256": bytes(32)}
    assert tcg.pcrs.read(0) == bytes(32)


def test_pe_coff_image_flag_measures_authenticode(fw, tcg, bookworm_kernel):
    pe = bookworm_kernel.read_bytes()
    addr = fw.alloc.allocate_pages(0, MemType.LoaderData, (len(pe) + 4095) // 4096, owner="test")
    fw.mem.write(addr, pe)
    put(fw, SCRATCH + 0x1000, tcg2_event(4, T.EV_EFI_BOOT_SERVICES_APPLICATION, b"img"))
    assert fw.call("HashLogExtendEvent", THIS, TCG.PE_COFF_IMAGE, addr, len(pe), SCRATCH + 0x1000) == S.SUCCESS
    signed = signed_sha256_digest(pe)
    assert tcg.log.events[-1].digests["sha256"] == signed
    assert tcg.pcrs.read(4) == hashlib.sha256(bytes(32) + signed).digest()
    # not a PE image -> EFI_UNSUPPORTED, nothing extended
    put(fw, SCRATCH + 0x2000, b"not a PE image at all" * 10)
    assert fw.call("HashLogExtendEvent", THIS, TCG.PE_COFF_IMAGE, SCRATCH + 0x2000, 210,
                   SCRATCH + 0x1000) == S.UNSUPPORTED
    assert tcg.pcrs.read(4) == hashlib.sha256(bytes(32) + signed).digest()


def test_full_log_still_extends(fw):
    t = TCG.Tcg2(fw, ("sha256",), log_size=0x1000)
    t.install()
    big = b"E" * 3000
    assert _extend(fw, 8, T.EV_IPL, big, b"1") == S.SUCCESS
    assert _extend(fw, 8, T.EV_IPL, big, b"2") == S.VOLUME_FULL
    assert fw.call("GetEventLog", THIS, 2, SCRATCH, SCRATCH + 8, SCRATCH + 16) == S.SUCCESS
    assert fw.mem.read_u8(SCRATCH + 16) == 1
    expect = bytes(32)
    for d in (b"1", b"2"):
        expect = hashlib.sha256(expect + hashlib.sha256(d).digest()).digest()
    assert t.pcrs.read(8) == expect
    assert len(T.parse(t.log_bytes())) == 2


# --- the rest of the protocol ----------------------------------------------------------------

def test_submit_command_and_banks(fw, tcg):
    assert fw.call("SubmitCommand", THIS, 10, SCRATCH, 10, SCRATCH + 64) == S.UNSUPPORTED
    fw.mem.write_u32(SCRATCH, 0)
    assert fw.call("GetActivePcrBanks", THIS, SCRATCH) == S.SUCCESS
    assert fw.mem.read_u32(SCRATCH) == 0x3
    assert fw.call("GetActivePcrBanks", THIS, 0) == S.INVALID_PARAMETER
    assert fw.call("SetActivePcrBanks", THIS, 0x3) == S.SUCCESS
    assert fw.call("SetActivePcrBanks", THIS, 0x2) == S.UNSUPPORTED
    assert fw.call("SetActivePcrBanks", THIS, 0x0) == S.INVALID_PARAMETER
    assert fw.call("SetActivePcrBanks", THIS, 0x8) == S.INVALID_PARAMETER
    assert fw.call("GetResultOfSetActivePcrBanks", THIS, SCRATCH, SCRATCH + 4) == S.UNSUPPORTED


# --- a whole boot's worth of firmware measurements -------------------------------------------

def test_boot_sequence_matches_tpm2_eventlog_and_hand_values(fw, tmp_path, bookworm_kernel):
    t = TCG.install(fw, TCG.DEFAULT_BANKS)
    fw.variables.seed("SecureBoot", G.EFI_GLOBAL_VARIABLE, b"\x00")
    pe = bookworm_kernel.read_bytes()
    TCG.separators(fw)
    dp = bytes.fromhex("7fff0400")
    TCG.measure_image(fw, 0x7E000000, len(pe), pe, dp)
    assert fw.call("GetEventLog", THIS, 2, SCRATCH, SCRATCH + 8, 0) == S.SUCCESS
    _extend(fw, 9, T.EV_EVENT_TAG, T.tagged_event(0x8F3B22ED, b"Linux initrd\0"), b"initrd")
    TCG.exit_boot_services(fw, success=False)
    TCG.exit_boot_services(fw, success=True)

    # the log as the OS finds it: main log + final events
    main = t.log_bytes()
    path = tmp_path / "log.bin"
    path.write_bytes(main)
    theirs, text = tpm2_eventlog_pcrs(path)
    ours = t.pcrs.values()
    for b in TCG.DEFAULT_BANKS:
        for i in range(24):
            if i in theirs[b]:
                assert theirs[b][i] == ours[b][i], (b, i)
    assert set(theirs["sha256"]) == {0, 1, 2, 3, 4, 5, 6, 7, 9}
    assert text.count("EventNum:") == len(t.log.events)
    final = T.parse(main[:32 + len(T.SpecId.parse(t.log.events[0].data).to_bytes())]
                    + t.final_events_bytes()[16:])
    assert [e.pcr for e in final[1:]] == [9, 5, 5, 5, 5]

    # hand-computed values (sha256)
    sep = hashlib.sha256(b"\0\0\0\0").digest()
    h = lambda x: hashlib.sha256(x).digest()  # noqa: E731
    assert ours["sha256"][4] == chain256([h(T.CALLING_EFI_APPLICATION), sep, signed_sha256_digest(pe)])
    assert ours["sha256"][5] == chain256([sep, h(b"Exit Boot Services Invocation"),
                                          h(b"Exit Boot Services Returned with Failure"),
                                          h(b"Exit Boot Services Invocation"),
                                          h(b"Exit Boot Services Returned with Success")])
    for i in (0, 1, 2, 3, 6):
        assert ours["sha256"][i] == chain256([sep])
    guid = G.guid_to_bytes(G.EFI_GLOBAL_VARIABLE)
    dbg = G.guid_to_bytes(G.EFI_IMAGE_SECURITY_DATABASE)

    def var(g, name, data):
        return g + struct.pack("<QQ", len(name), len(data)) + name.encode("utf-16-le") + data
    assert ours["sha256"][7] == chain256([h(var(guid, "SecureBoot", b"\0")), h(var(guid, "PK", b"")),
                                          h(var(guid, "KEK", b"")), h(var(dbg, "db", b"")),
                                          h(var(dbg, "dbx", b"")), sep])
    # the image event's data: UEFI_IMAGE_LOAD_EVENT
    img = [e for e in t.log.events if e.event_type == T.EV_EFI_BOOT_SERVICES_APPLICATION][0]
    assert img.pcr == 4
    assert img.data == struct.pack("<QQQQ", 0x7E000000, len(pe), 0, 4) + dp


def chain256(digests):
    v = bytes(32)
    for d in digests:
        v = hashlib.sha256(v + d).digest()
    return v


def test_call_sites_are_no_ops_without_tpm(fw):
    TCG.separators(fw)
    TCG.measure_image(fw, 0, 0, b"", b"")
    TCG.exit_boot_services(fw)
    assert not hasattr(fw, "tcg2")
