"""The paravirtual firmware: owns the allocator, handle database, events, variables, images and
the EFI_SYSTEM_TABLE in guest memory (UEFI 2.10 §4 EFI System Table).

Tables are written in spec order (§4.3 EFI_SYSTEM_TABLE, §4.4 EFI_BOOT_SERVICES, §4.5
EFI_RUNTIME_SERVICES); each function pointer is a thunk from ``guest/firmware.S`` that exits to
:class:`hostsvc.dispatch.ServiceTable`.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field

import structlog

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import status as S
from hostsvc.dispatch import ServiceTable
from hostsvc.events import Events
from hostsvc.handles import HandleDB
from hostsvc.memmap import TargetMemoryMap
from hostsvc.memory import AllocType, Allocator, MemType
from hostsvc.status import EfiError
from hostsvc.variables import VariableStore
from vmrun.vm import layout as L
from vmrun.vm.port import GuestPort

log = structlog.get_logger("hostsvc.firmware")

EFI_2_70 = (2 << 16) | 70
SYSTEM_TABLE_SIGNATURE = 0x5453595320494249  # "IBI SYST"
BOOT_SERVICES_SIGNATURE = 0x56524553544F4F42  # "BOOTSERV"
RUNTIME_SERVICES_SIGNATURE = 0x56524553544E5552  # "RUNTSERV"
HEADER_SIZE = 24
SYSTEM_TABLE_SIZE = 120
FIRMWARE_VENDOR = "vmrun"
FIRMWARE_REVISION = 0x00010000
CONFIG_TABLE_ENTRY = 24


def table_header(signature: int, revision: int, size: int) -> bytes:
    return struct.pack("<QIIII", signature, revision, size, 0, 0)


def write_crc(mem, addr: int) -> None:
    """Recompute the CRC32 of an EFI_TABLE_HEADER'ed table at ``addr`` (§4.2)."""
    size = mem.read_u32(addr + 12)
    mem.write_u32(addr + 16, 0)
    mem.write_u32(addr + 16, zlib.crc32(mem.read(addr, size)))


@dataclass
class FirmwareOptions:
    cmdline: str = ""
    trace: bool = False
    memory_cap: int = L.DEFAULT_MEMORY_CAP


@dataclass
class ConfigTables:
    entries: list[tuple[uuid.UUID, int]] = field(default_factory=list)


class Firmware:
    def __init__(self, port: GuestPort, target: TargetMemoryMap, options: FirmwareOptions):
        self.port = port
        self.mem = port.mem
        self.target = target
        self.options = options
        self.alloc = Allocator(target, options.memory_cap)
        self.table = ServiceTable(self.mem, trace_enabled=options.trace)
        self.table.before_call = self._before_call
        self.console_text: list[str] = []
        self.config = ConfigTables()
        self.images: dict[int, "object"] = {}
        self.boot_services_done = False
        self.monotonic_count = 0
        self.variables = VariableStore()
        self.volumes: dict[int, object] = {}  # SimpleFileSystem handle → volume (LoadImage by path)
        self.tcg2 = None

        fw_size = port.firmware_area_size()
        pages = (fw_size + L.PAGE_SIZE - 1) // L.PAGE_SIZE
        base = self.alloc.allocate_pages(AllocType.MaxAddress, MemType.BootServicesCode, pages,
                                         L.FIRMWARE_BELOW - 1, owner="firmware")
        port.install_firmware(base, pages * L.PAGE_SIZE)
        stack_pages = L.PAYLOAD_STACK_SIZE // L.PAGE_SIZE
        self.stack_base = self.alloc.allocate_pages(AllocType.MaxAddress, MemType.BootServicesData,
                                                    stack_pages, L.FIRMWARE_BELOW - 1, owner="firmware")
        self.stack_top = self.stack_base + L.PAYLOAD_STACK_SIZE

        self.events = Events(call_notify=self._call_notify, new_handle=self._new_object,
                             free_handle=self._free_object)
        self.handles = HandleDB(new_handle=self._new_object, read_device_path=self._read_device_path,
                                signal_event=self.events.signal, free_handle=self._free_object)
        port.on_service_call(self.table.dispatch)
        port.on_locate_rip(self.locate_rip)

    # --- guest objects ------------------------------------------------------------------------
    def pool(self, size: int, mem_type: int = MemType.BootServicesData) -> int:
        addr = self.alloc.allocate_pool(mem_type, size, owner="firmware")
        self.mem.fill(addr, size, 0)
        return addr

    def _new_object(self) -> int:
        """A unique guest address used as an opaque EFI_HANDLE / EFI_EVENT."""
        return self.pool(16)

    def _free_object(self, addr: int) -> None:
        self.alloc.free_pool(addr)

    def utf16z(self, text: str, mem_type: int = MemType.BootServicesData) -> int:
        raw = (text + "\0").encode("utf-16-le")
        addr = self.pool(len(raw), mem_type)
        self.mem.write(addr, raw)
        return addr

    def _read_device_path(self, addr: int) -> bytes:
        # read node by node up to the end node (bounded)
        out = bytearray()
        pos = addr
        while len(out) < 65536:
            hdr = self.mem.read(pos, 4)
            length = hdr[2] | (hdr[3] << 8)
            if length < 4:
                raise EfiError(S.INVALID_PARAMETER, f"device path node length {length} at {pos:#x}")
            out += self.mem.read(pos, length)
            if hdr[0] == 0x7F and hdr[1] == 0xFF:
                return bytes(out)
            pos += length
        raise EfiError(S.INVALID_PARAMETER, "unterminated device path")

    def device_path(self, nodes: list) -> int:
        raw = DP.encode(nodes)
        addr = self.pool(len(raw))
        self.mem.write(addr, raw)
        return addr

    def interface(self, group: str, obj, names: list[str], data: bytes = b"",
                  mem_type: int = MemType.BootServicesData) -> int:
        """A protocol interface struct: one thunk pointer per function name, then ``data``."""
        ids = self.table.register_all(group, obj, names)
        raw = b"".join(struct.pack("<Q", self.port.thunk(i)) for i in ids) + data
        addr = self.pool(len(raw), mem_type)
        self.mem.write(addr, raw)
        return addr

    # --- calls back into the guest ----------------------------------------------------------
    def _call_notify(self, function: int, event: int, context: int) -> None:
        self.port.call_guest(function, (event, context))

    def _before_call(self) -> None:
        self.events.poll_timers()

    def locate_rip(self, rip: int) -> str:
        for img in self.images.values():
            if img.base <= rip < img.base + img.size:
                return f" ({img.name}+{rip - img.base:#x})"
        span = self.port.firmware_span()
        if span and span[0] <= rip < span[0] + span[1]:
            return f" (vmrun firmware+{rip - span[0]:#x})"
        return ""

    # --- the system table -------------------------------------------------------------------
    def build_system_table(self, boot_services: int, runtime_services: int, con_in_handle: int,
                           con_in: int, con_out_handle: int, con_out: int) -> int:
        self.vendor = self.utf16z(FIRMWARE_VENDOR, MemType.RuntimeServicesData)
        self.system_table = self.pool(SYSTEM_TABLE_SIZE, MemType.RuntimeServicesData)
        st = table_header(SYSTEM_TABLE_SIGNATURE, EFI_2_70, SYSTEM_TABLE_SIZE) + struct.pack(
            "<QI4xQQQQQQQQQQ", self.vendor, FIRMWARE_REVISION, con_in_handle, con_in,
            con_out_handle, con_out, con_out_handle, con_out, runtime_services, boot_services, 0, 0)
        assert len(st) == SYSTEM_TABLE_SIZE
        self.mem.write(self.system_table, st)
        write_crc(self.mem, self.system_table)
        self.config_array = 0
        self.config_capacity = 0
        return self.system_table

    def set_config_table(self, guid: uuid.UUID, table: int) -> None:
        """InstallConfigurationTable semantics (§7.5): add, replace, or (table == 0) remove."""
        entries = self.config.entries
        idx = next((i for i, (g, _) in enumerate(entries) if g == guid), None)
        if table == 0:
            if idx is None:
                raise EfiError(S.NOT_FOUND, f"no configuration table {G.guid_name(guid)}")
            del entries[idx]
        elif idx is None:
            entries.append((guid, table))
        else:
            entries[idx] = (guid, table)
        if len(entries) > self.config_capacity:
            cap = max(16, 2 * len(entries))
            new = self.pool(cap * CONFIG_TABLE_ENTRY, MemType.RuntimeServicesData)
            if self.config_array:
                self.alloc.free_pool(self.config_array)
            self.config_array, self.config_capacity = new, cap
        raw = b"".join(G.guid_to_bytes(g) + struct.pack("<Q", t) for g, t in entries)
        self.mem.fill(self.config_array, self.config_capacity * CONFIG_TABLE_ENTRY, 0)
        self.mem.write(self.config_array, raw)
        st = self.system_table
        self.mem.write_u64(st + 104, len(entries))
        self.mem.write_u64(st + 112, self.config_array if entries else 0)
        write_crc(self.mem, st)
        self.events.signal_group(guid)
        self.events.dispatch()

    def unload_image(self, img) -> None:
        """Free an image that has not been started (UnloadImage, or Exit before StartImage)."""
        self.alloc.free_pages(img.base, img.pages)
        self.handles.close_all_by_agent(img.handle)
        for guid in (G.LOADED_IMAGE_DEVICE_PATH, G.LOADED_IMAGE):
            iface = self.handles.handle_protocol(img.handle, guid)
            self.handles.uninstall(img.handle, guid, iface)
        del self.images[img.handle]

    def console_write(self, text: str, stream: str = "stdout") -> None:
        self.console_text.append(text)
        buf = getattr(self, "_console_line", "") + text
        *lines, rest = buf.replace("\r\n", "\n").replace("\r", "").split("\n")
        for line in lines:
            log.info("console", stream=stream, text=line)
        self._console_line = rest

    @property
    def console(self) -> str:
        return "".join(self.console_text)
