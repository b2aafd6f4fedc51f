"""The paravirtual firmware: owns the allocator, handle database, events, variables, images and
the EFI_SYSTEM_TABLE in guest memory (UEFI 2.10 §4 EFI System Table).

Tables are the structures of :mod:`hostsvc.uefi_types` (§4.3 EFI_SYSTEM_TABLE, §4.4
EFI_BOOT_SERVICES, §4.5 EFI_RUNTIME_SERVICES, protocol interfaces); each function pointer is a
thunk from ``guest/firmware.S`` that exits to :class:`hostsvc.dispatch.ServiceTable`.
"""

from __future__ import annotations

import ctypes
import uuid
import zlib
from dataclasses import dataclass, field

import structlog

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.dispatch import ServiceTable
from hostsvc.events import Events
from hostsvc.handles import HandleDB
from hostsvc.memmap import TargetMemoryMap
from hostsvc.memory import AllocType, Allocator, MemType
from hostsvc.status import EfiError
from hostsvc.variables import VariableStore
from vmrun.vm import layout as L
from vmrun.vm.port import NO_ACCESS, GuestPort

log = structlog.get_logger("hostsvc.firmware")

FIRMWARE_VENDOR = "vmrun"
FIRMWARE_REVISION = 0x00010000


def write_crc(mem, addr: int) -> None:
    """Recompute the CRC32 of an EFI_TABLE_HEADER'ed table at ``addr`` (§4.2): over HeaderSize
    bytes, with the CRC32 field zero while it is computed."""
    hdr = mem.read_struct(addr, U.EFI_TABLE_HEADER)
    hdr.CRC32 = 0
    mem.write_struct(addr, hdr)
    hdr.CRC32 = zlib.crc32(mem.read(addr, hdr.HeaderSize))
    mem.write_struct(addr, hdr)


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
        # every service call (boot, runtime, protocol) checks the run's deadline first
        self.table = ServiceTable(self.mem, trace_enabled=options.trace, check_deadline=port.check_deadline)
        self.table.before_call = self._before_call
        self.console_text: list[str] = []
        self.console_dropped = 0         # characters beyond what is kept (protocols.console)
        self.config = ConfigTables()
        self.images: dict[int, "object"] = {}
        self.boot_services_done = False
        self.monotonic_count = 0
        self.variables = VariableStore()
        self.volumes: dict[int, object] = {}  # SimpleFileSystem handle → volume (LoadImage by path)
        self.tcg2 = None
        # set by hostsvc.setup.build_firmware and the services themselves (declared here, one list)
        self.system_table = 0            # EFI_SYSTEM_TABLE (build_system_table)
        self.boot_services_table = 0     # EFI_BOOT_SERVICES
        self.runtime_services_table = 0  # EFI_RUNTIME_SERVICES
        self.rt_unsupported = 0          # guest code returning EFI_UNSUPPORTED, for after ExitBootServices
        self.watchdog = 0                # SetWatchdogTimer's last timeout (the run's own limit governs)

        fw_size = port.firmware_area_size()
        pages = (fw_size + L.PAGE_SIZE - 1) // L.PAGE_SIZE
        base = self.alloc.allocate_pages(AllocType.MaxAddress, MemType.BootServicesCode, pages,
                                         L.FIRMWARE_BELOW - 1, owner="firmware")
        port.install_firmware(base, pages * L.PAGE_SIZE)
        # the payload's stack, with a guard page below it: a runaway recursion faults there
        # instead of running into whatever lies below (vmrun.vm.paging)
        stack_pages = L.PAYLOAD_STACK_SIZE // L.PAGE_SIZE
        guard = self.alloc.allocate_pages(AllocType.MaxAddress, MemType.BootServicesData,
                                          stack_pages + 1, L.FIRMWARE_BELOW - 1, owner="firmware")
        port.protect(guard, guard + L.PAGE_SIZE, NO_ACCESS, f"the guard page below the payload's {L.PAYLOAD_STACK_SIZE >> 10} KiB stack "
                     "(the stack overflowed)")
        self.stack_base = guard + L.PAGE_SIZE
        self.stack_top = self.stack_base + L.PAYLOAD_STACK_SIZE
        # from here on the payload sees only RAM that allocations touch
        port.restrict_to_allocations([(a.start, a.end) for a in self.alloc.allocations])
        self.alloc.on_commit = port.map_allocation

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
        self.alloc.free_pool(addr, owner="firmware")

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
            hdr = self.mem.read_struct(pos, U.EFI_DEVICE_PATH_PROTOCOL)
            length = hdr.length
            if length < DP.HEADER:
                raise EfiError(S.INVALID_PARAMETER, f"device path node length {length} at {pos:#x}")
            out += self.mem.read(pos, length)
            if (hdr.Type, hdr.SubType) == (DP.END, DP.END_ENTIRE):
                return bytes(out)
            pos += length
        raise EfiError(S.INVALID_PARAMETER, "unterminated device path")

    def device_path(self, nodes: list) -> int:
        raw = DP.encode(nodes)
        addr = self.pool(len(raw))
        self.mem.write(addr, raw)
        return addr

    def functions(self, group: str, obj, layout: type) -> ctypes.Structure:
        """A ``layout`` (a :mod:`hostsvc.uefi_types` table or protocol structure) whose function
        pointers (``layout.FUNCTIONS``) are the thunks of ``obj``'s services, registered under
        ``group`` in spec order; the other fields are zero."""
        table = layout()
        ids = self.table.register_all(group, obj, U.function_names(layout))
        for name, i in zip(layout.FUNCTIONS, ids):
            setattr(table, name, self.port.thunk(i))
        return table

    def interface(self, group: str, obj, layout: type | list[str],
                  mem_type: int = MemType.BootServicesData, **fields) -> int:
        """A protocol interface in pool memory: a ``layout`` structure (see :meth:`functions`)
        with its data fields set from ``fields``. ``layout`` may also be a list of function
        names: an interface of function pointers only, in that order."""
        if not isinstance(layout, type):
            layout = type("FunctionTable", (U.Struct,),
                          {"FUNCTIONS": tuple(layout), "_fields_": U.functions(*layout)})
        table = self.functions(group, obj, layout)
        for name, value in fields.items():
            if name not in dict(layout._fields_) or name in layout.FUNCTIONS:
                raise TypeError(f"{layout.__name__} has no data field {name!r}")
            setattr(table, name, value)
        addr = self.pool(ctypes.sizeof(layout), mem_type)
        self.mem.write_struct(addr, table)
        return addr

    def service_table(self, group: str, obj, layout: type, mem_type: int) -> int:
        """EFI_BOOT_SERVICES or EFI_RUNTIME_SERVICES (``layout``) in pool memory: its header
        (signature, revision, size, CRC32) and one thunk per service of ``obj``."""
        table = self.functions(group, obj, layout)
        table.Hdr = U.table_header(layout)
        addr = self.pool(ctypes.sizeof(layout), mem_type)
        self.mem.write_struct(addr, table)
        write_crc(self.mem, addr)
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
                           con_in: int, con_out_handle: int, con_out: int, std_err_handle: int | None = None,
                           std_err: int | None = None) -> int:
        """The EFI_SYSTEM_TABLE (StdErr is ConOut unless given), without configuration tables."""
        self.vendor = self.utf16z(FIRMWARE_VENDOR, MemType.RuntimeServicesData)
        self.system_table = self.pool(ctypes.sizeof(U.EFI_SYSTEM_TABLE), MemType.RuntimeServicesData)
        st = U.EFI_SYSTEM_TABLE(
            Hdr=U.table_header(U.EFI_SYSTEM_TABLE), FirmwareVendor=self.vendor,
            FirmwareRevision=FIRMWARE_REVISION, ConsoleInHandle=con_in_handle, ConIn=con_in,
            ConsoleOutHandle=con_out_handle, ConOut=con_out,
            StandardErrorHandle=con_out_handle if std_err_handle is None else std_err_handle,
            StdErr=con_out if std_err is None else std_err,
            RuntimeServices=runtime_services, BootServices=boot_services)
        self.mem.write_struct(self.system_table, st)
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
            new = self.pool(cap * ctypes.sizeof(U.EFI_CONFIGURATION_TABLE), MemType.RuntimeServicesData)
            if self.config_array:
                self.alloc.free_pool(self.config_array, owner="firmware")
            self.config_array, self.config_capacity = new, cap
        array = (U.EFI_CONFIGURATION_TABLE * self.config_capacity)()  # unused entries stay zero
        for entry, (g, t) in zip(array, entries):
            entry.VendorGuid, entry.VendorTable = U.EFI_GUID.from_uuid(g), t
        self.mem.write_struct(self.config_array, array)
        st = self.mem.read_struct(self.system_table, U.EFI_SYSTEM_TABLE)
        st.NumberOfTableEntries = len(entries)
        st.ConfigurationTable = self.config_array if entries else 0
        self.mem.write_struct(self.system_table, st)
        write_crc(self.mem, self.system_table)
        self.events.signal_group(guid)
        self.events.dispatch()

    def unload_image(self, img) -> None:
        """Free an image that has not been started (UnloadImage, or Exit before StartImage)."""
        self.alloc.free_pages(img.base, img.pages)
        for addr in img.pools:  # LoadedImage, LoadOptions … made for it by images.load_image
            self.alloc.free_pool(addr, owner="firmware")
        img.pools = ()
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
