"""EFI_BOOT_SERVICES (UEFI 2.10 §4.4, §7): one method per service, declared with @efiapi.

The table is :class:`hostsvc.uefi_types.EFI_BOOT_SERVICES`, its slots in the spec's order
(``EFI_BOOT_SERVICES.FUNCTIONS``); a name without a method here gets an explicit EFI_UNSUPPORTED
stub from the dispatcher.
"""

from __future__ import annotations

import ctypes
import time
import uuid
import zlib

import structlog

from hostsvc import guids as G
from hostsvc import images as IMG
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.dispatch import (BOOL, EVENT, GUIDPTR, HANDLE, OPTGUIDPTR, OPTPTR, PTR, TPL, U32, U64,
                              UINTN, efiapi, size_in_out)
from hostsvc.events import TPL_APPLICATION
from hostsvc.handles import TEST_PROTOCOL, AlreadyStartedError
from hostsvc.protocols import tcg2 as TCG2
from hostsvc.memory import DESCRIPTOR_SIZE, DESCRIPTOR_VERSION, MemType
from hostsvc.status import EfiError
from vmrun.errors import PayloadFault, RunTimeout, VmrunError
from vmrun.formats import pe as PE

log = structlog.get_logger("hostsvc.boot_services")

EFI_NATIVE_INTERFACE = 0
MAX_VARIADIC_PAIRS = 64

# Bounds on work whose size the payload chooses (the time limit holds and the host's
# memory stays bounded whatever the payload asks for). README "Security model" lists them.
#: SetMem, CopyMem and CalculateCrc32 work through guest memory in chunks of this many bytes and
#: check the run's deadline between chunks (a chunk takes a few ms on these machines)
MEM_CHUNK = 16 << 20
#: InstallConfigurationTable refuses a new GUID beyond this many entries (EFI_OUT_OF_RESOURCES)
MAX_CONFIG_TABLES = 1024
#: LoadImage refuses a SourceBuffer larger than this (EFI_LOAD_ERROR): the host copies, parses
#: and hashes it (a Linux bzImage is ~10 MiB, a UKI with its initrd some 100 MiB)
MAX_LOAD_IMAGE_SIZE = 512 << 20
#: at most this many images loaded and not unloaded at once (EFI_OUT_OF_RESOURCES beyond)
MAX_LOADED_IMAGES = 256
#: WaitForEvent refuses a NumberOfEvents above this (EFI_INVALID_PARAMETER)
MAX_WAIT_EVENTS = 4096


def chunks(start: int, length: int, chunk: int | None = None):
    """(address, size) pieces of ``length`` bytes from ``start``, ``chunk`` (default
    :data:`MEM_CHUNK`) bytes at most each."""
    chunk = chunk or MEM_CHUNK
    done = 0
    while done < length:
        n = min(chunk, length - done)
        yield start + done, n
        done += n


class ExitBootServicesCalled(Exception):
    """ExitBootServices succeeded: the run ends here, frozen (the caller builds the state)."""
    trace_status = "SUCCESS"

    def __init__(self, image_handle: int, map_key: int):
        super().__init__(f"ExitBootServices(map key {map_key}) succeeded")
        self.image_handle = image_handle
        self.map_key = map_key


class BootServices:
    def __init__(self, fw):
        self.fw = fw
        self.mem = fw.mem

    # --- §7.1 Event, Timer, and Task Priority Services ----------------------------------------
    @efiapi("RaiseTPL", ("new_tpl", TPL))
    def raise_tpl(self, new_tpl):
        """Returns the previous TPL (an EFI_TPL, not a status)."""
        return self.fw.events.raise_tpl(new_tpl)

    @efiapi("RestoreTPL", ("old_tpl", TPL))
    def restore_tpl(self, old_tpl):
        self.fw.events.restore_tpl(old_tpl)
        return 0

    @efiapi("CreateEvent", ("type", U32), ("notify_tpl", TPL), ("notify_function", OPTPTR),
            ("notify_context", OPTPTR), ("event", PTR))
    def create_event(self, type, notify_tpl, notify_function, notify_context, event):
        h = self.fw.events.create(type, notify_tpl, notify_function, notify_context)
        self.mem.write_u64(event, h)

    @efiapi("CreateEventEx", ("type", U32), ("notify_tpl", TPL), ("notify_function", OPTPTR),
            ("notify_context", OPTPTR), ("event_group", OPTGUIDPTR), ("event", PTR))
    def create_event_ex(self, type, notify_tpl, notify_function, notify_context, event_group, event):
        h = self.fw.events.create(type, notify_tpl, notify_function, notify_context, event_group)
        self.mem.write_u64(event, h)

    @efiapi("SetTimer", ("event", EVENT), ("type", U32), ("trigger_time", U64))
    def set_timer(self, event, type, trigger_time):
        self.fw.events.set_timer(event, type, trigger_time)

    @efiapi("SignalEvent", ("event", EVENT))
    def signal_event(self, event):
        self.fw.events.signal(event)

    @efiapi("CloseEvent", ("event", EVENT))
    def close_event(self, event):
        self.fw.events.close(event)
        self.fw.handles.unregister_event(event)

    @efiapi("CheckEvent", ("event", EVENT))
    def check_event(self, event):
        self.fw.events.poll_timers()
        return S.SUCCESS if self.fw.events.check(event) else S.NOT_READY

    @efiapi("WaitForEvent", ("number_of_events", UINTN), ("event", PTR), ("index", PTR))
    def wait_for_event(self, number_of_events, event, index):
        ev = self.fw.events
        if number_of_events == 0:
            raise EfiError(S.INVALID_PARAMETER, "NumberOfEvents is 0")
        if ev.tpl != TPL_APPLICATION:
            raise EfiError(S.UNSUPPORTED, f"WaitForEvent at TPL {ev.tpl}")
        if number_of_events > MAX_WAIT_EVENTS:
            raise EfiError(S.INVALID_PARAMETER, f"NumberOfEvents {number_of_events} is more than vmrun "
                                                f"waits for at once ({MAX_WAIT_EVENTS})")
        handles = list(self.mem.read_struct(event, ctypes.c_uint64 * number_of_events))
        while True:
            ev.poll_timers()
            for i, h in enumerate(handles):
                try:
                    hit = ev.check(h)
                except EfiError:
                    self.mem.write_u64(index, i)
                    raise
                if hit:
                    self.mem.write_u64(index, i)
                    return
            self.fw.port.check_deadline()
            nxt = ev.next_deadline()
            delay = 0.01 if nxt is None else min(max(nxt - time.monotonic(), 0), 0.01)
            time.sleep(delay)

    # --- §7.2 Memory Allocation Services ---------------------------------------------------
    @efiapi("AllocatePages", ("type", U32), ("memory_type", U32), ("pages", UINTN), ("memory", PTR))
    def allocate_pages(self, type, memory_type, pages, memory):
        address = self.mem.read_u64(memory)
        got = self.fw.alloc.allocate_pages(type, memory_type, pages, address)
        self.mem.write_u64(memory, got)

    @efiapi("FreePages", ("memory", U64), ("pages", UINTN))
    def free_pages(self, memory, pages):
        self.fw.alloc.free_pages(memory, pages)

    @efiapi("GetMemoryMap", ("memory_map_size", PTR), ("memory_map", OPTPTR), ("map_key", OPTPTR),
            ("descriptor_size", OPTPTR), ("descriptor_version", OPTPTR))
    def get_memory_map(self, memory_map_size, memory_map, map_key, descriptor_size, descriptor_version):
        raw = self.fw.alloc.encode_map()
        if descriptor_size:
            self.mem.write_u64(descriptor_size, DESCRIPTOR_SIZE)
        if descriptor_version:
            self.mem.write_u32(descriptor_version, DESCRIPTOR_VERSION)
        size_in_out(self.mem, memory_map_size, len(raw), "the memory map")
        if not memory_map:
            raise EfiError(S.INVALID_PARAMETER, "MemoryMap is NULL")
        if not map_key:
            raise EfiError(S.INVALID_PARAMETER, "MapKey is NULL")
        self.mem.write(memory_map, raw)
        self.mem.write_u64(map_key, self.fw.alloc.map_key)

    @efiapi("AllocatePool", ("pool_type", U32), ("size", UINTN), ("buffer", PTR))
    def allocate_pool(self, pool_type, size, buffer):
        self.mem.write_u64(buffer, self.fw.alloc.allocate_pool(pool_type, size))

    @efiapi("FreePool", ("buffer", PTR))
    def free_pool(self, buffer):
        self.fw.alloc.free_pool(buffer)

    # --- §7.3 Protocol Handler Services ---------------------------------------------------
    @efiapi("InstallProtocolInterface", ("handle", PTR), ("protocol", GUIDPTR),
            ("interface_type", U32), ("interface", OPTPTR))
    def install_protocol_interface(self, handle, protocol, interface_type, interface):
        if interface_type != EFI_NATIVE_INTERFACE:
            raise EfiError(S.INVALID_PARAMETER, f"InterfaceType {interface_type}")
        h = self.mem.read_u64(handle)
        new = self.fw.handles.install(h or None, protocol, interface)
        self.mem.write_u64(handle, new)

    @efiapi("ReinstallProtocolInterface", ("handle", HANDLE), ("protocol", GUIDPTR),
            ("old_interface", OPTPTR), ("new_interface", OPTPTR))
    def reinstall_protocol_interface(self, handle, protocol, old_interface, new_interface):
        self.fw.handles.reinstall(handle, protocol, old_interface, new_interface)

    @efiapi("UninstallProtocolInterface", ("handle", HANDLE), ("protocol", GUIDPTR), ("interface", OPTPTR))
    def uninstall_protocol_interface(self, handle, protocol, interface):
        self.fw.handles.uninstall(handle, protocol, interface)

    @efiapi("HandleProtocol", ("handle", HANDLE), ("protocol", GUIDPTR), ("interface", PTR))
    def handle_protocol(self, handle, protocol, interface):
        self.mem.write_u64(interface, self.fw.handles.handle_protocol(handle, protocol))

    @efiapi("RegisterProtocolNotify", ("protocol", GUIDPTR), ("event", EVENT), ("registration", PTR))
    def register_protocol_notify(self, protocol, event, registration):
        self.fw.events.get(event)
        self.mem.write_u64(registration, self.fw.handles.register_protocol_notify(protocol, event))

    @efiapi("LocateHandle", ("search_type", U32), ("protocol", OPTGUIDPTR), ("search_key", OPTPTR),
            ("buffer_size", PTR), ("buffer", OPTPTR))
    def locate_handle(self, search_type, protocol, search_key, buffer_size, buffer):
        # a size probe must not consume the next ByRegisterNotify handle
        found = self.fw.handles.locate_handle(search_type, protocol, search_key, consume=False)
        size_in_out(self.mem, buffer_size, ctypes.sizeof(U.POINTER * len(found)), f"{len(found)} handles")
        if not buffer:
            raise EfiError(S.INVALID_PARAMETER, "Buffer is NULL")
        found = self.fw.handles.locate_handle(search_type, protocol, search_key)
        self.mem.write_struct(buffer, (U.POINTER * len(found))(*found))

    @efiapi("LocateHandleBuffer", ("search_type", U32), ("protocol", OPTGUIDPTR), ("search_key", OPTPTR),
            ("no_handles", PTR), ("buffer", PTR))
    def locate_handle_buffer(self, search_type, protocol, search_key, no_handles, buffer):
        found = self.fw.handles.locate_handle(search_type, protocol, search_key)
        handles = (U.POINTER * len(found))(*found)
        addr = self.fw.alloc.allocate_pool(MemType.BootServicesData, ctypes.sizeof(handles))  # caller frees
        self.mem.write_struct(addr, handles)
        self.mem.write_u64(no_handles, len(found))
        self.mem.write_u64(buffer, addr)

    @efiapi("LocateDevicePath", ("protocol", GUIDPTR), ("device_path", PTR), ("device", PTR))
    def locate_device_path(self, protocol, device_path, device):
        path_ptr = self.mem.read_u64(device_path)
        if not path_ptr:
            raise EfiError(S.INVALID_PARAMETER, "*DevicePath is NULL")
        raw = self.fw._read_device_path(path_ptr)
        handle, offset = self.fw.handles.locate_device_path(protocol, raw)
        self.mem.write_u64(device, handle)
        self.mem.write_u64(device_path, path_ptr + offset)

    @efiapi("OpenProtocol", ("handle", HANDLE), ("protocol", GUIDPTR), ("interface", OPTPTR),
            ("agent_handle", HANDLE), ("controller_handle", HANDLE), ("attributes", U32))
    def open_protocol(self, handle, protocol, interface, agent_handle, controller_handle, attributes):
        if not interface and attributes != TEST_PROTOCOL:  # TEST_PROTOCOL may pass NULL
            raise EfiError(S.INVALID_PARAMETER, "Interface is NULL")
        try:
            value = self.fw.handles.open_protocol(handle, protocol, agent_handle, controller_handle, attributes)
        except AlreadyStartedError as e:  # the spec still returns the interface
            if interface and attributes != TEST_PROTOCOL:
                self.mem.write_u64(interface, e.interface)
            raise
        except EfiError as e:
            if interface and e.status == S.UNSUPPORTED:
                self.mem.write_u64(interface, 0)
            raise
        if interface and attributes != TEST_PROTOCOL:
            self.mem.write_u64(interface, value)

    @efiapi("CloseProtocol", ("handle", HANDLE), ("protocol", GUIDPTR), ("agent_handle", HANDLE),
            ("controller_handle", HANDLE))
    def close_protocol(self, handle, protocol, agent_handle, controller_handle):
        self.fw.handles.close_protocol(handle, protocol, agent_handle, controller_handle)

    @efiapi("OpenProtocolInformation", ("handle", HANDLE), ("protocol", GUIDPTR), ("entry_buffer", PTR),
            ("entry_count", PTR))
    def open_protocol_information(self, handle, protocol, entry_buffer, entry_count):
        infos = self.fw.handles.open_protocol_information(handle, protocol)
        entries = (U.EFI_OPEN_PROTOCOL_INFORMATION_ENTRY * len(infos))(
            *(U.EFI_OPEN_PROTOCOL_INFORMATION_ENTRY(i.agent, i.controller, i.attributes, i.open_count)
              for i in infos))
        addr = self.fw.alloc.allocate_pool(MemType.BootServicesData, max(ctypes.sizeof(entries), 1))
        self.mem.write_struct(addr, entries)
        self.mem.write_u64(entry_buffer, addr)
        self.mem.write_u64(entry_count, len(infos))

    @efiapi("ProtocolsPerHandle", ("handle", HANDLE), ("protocol_buffer", PTR), ("protocol_buffer_count", PTR))
    def protocols_per_handle(self, handle, protocol_buffer, protocol_buffer_count):
        guids = self.fw.handles.protocols_per_handle(handle)
        # an array of EFI_GUID* pointing at GUID copies in the same pool buffer
        n = len(guids)

        class Buffer(U.Struct):
            _fields_ = [("pointers", U.POINTER * n), ("guids", U.EFI_GUID * n)]

        addr = self.fw.alloc.allocate_pool(MemType.BootServicesData, ctypes.sizeof(Buffer) or 1)
        buf = Buffer()
        for i, g in enumerate(guids):
            buf.guids[i] = U.EFI_GUID.from_uuid(g)
            buf.pointers[i] = addr + Buffer.guids.offset + ctypes.sizeof(U.EFI_GUID) * i
        if n:
            self.mem.write_struct(addr, buf)
        self.mem.write_u64(protocol_buffer, addr)
        self.mem.write_u64(protocol_buffer_count, n)

    @efiapi("LocateProtocol", ("protocol", GUIDPTR), ("registration", OPTPTR), ("interface", PTR))
    def locate_protocol(self, protocol, registration, interface):
        try:
            value = self.fw.handles.locate_protocol(protocol, registration or None)
        except EfiError:
            self.mem.write_u64(interface, 0)
            raise
        self.mem.write_u64(interface, value)

    def _variadic_pairs(self, call, first: int) -> list[tuple[uuid.UUID, int]]:
        pairs = []
        i = first
        while True:
            gptr = call.raw_arg(i)
            if gptr == 0:
                return pairs
            if len(pairs) >= MAX_VARIADIC_PAIRS:
                raise EfiError(S.INVALID_PARAMETER, "no NULL terminator in the argument list")
            pairs.append((self.mem.read_struct(gptr, U.EFI_GUID).uuid, call.raw_arg(i + 1)))
            i += 2

    @efiapi("InstallMultipleProtocolInterfaces", ("handle", PTR), variadic=True)
    def install_multiple(self, handle, call):
        pairs = self._variadic_pairs(call, 1)
        h = self.mem.read_u64(handle)
        new = self.fw.handles.install_multiple(h or None, pairs)
        self.mem.write_u64(handle, new)

    @efiapi("UninstallMultipleProtocolInterfaces", ("handle", HANDLE), variadic=True)
    def uninstall_multiple(self, handle, call):
        self.fw.handles.uninstall_multiple(handle, self._variadic_pairs(call, 1))

    @efiapi("ConnectController", ("controller_handle", HANDLE), ("driver_image_handle", OPTPTR),
            ("remaining_device_path", OPTPTR), ("recursive", BOOL))
    def connect_controller(self, controller_handle, driver_image_handle, remaining_device_path, recursive):
        if not self.fw.handles.is_handle(controller_handle):
            raise EfiError(S.INVALID_PARAMETER, "ControllerHandle is not a handle")
        raise EfiError(S.NOT_FOUND, "no drivers to connect")

    @efiapi("DisconnectController", ("controller_handle", HANDLE), ("driver_image_handle", OPTPTR),
            ("child_handle", OPTPTR))
    def disconnect_controller(self, controller_handle, driver_image_handle, child_handle):
        if not self.fw.handles.is_handle(controller_handle):
            raise EfiError(S.INVALID_PARAMETER, "ControllerHandle is not a handle")

    # --- §7.4 Image Services ------------------------------------------------------------
    @efiapi("LoadImage", ("boot_policy", BOOL), ("parent_image_handle", HANDLE), ("device_path", OPTPTR),
            ("source_buffer", OPTPTR), ("source_size", UINTN), ("image_handle", PTR))
    def load_image(self, boot_policy, parent_image_handle, device_path, source_buffer, source_size, image_handle):
        """§7.4 LoadImage: from SourceBuffer, or (SourceBuffer NULL) from the file the device path
        names on a SimpleFileSystem volume (the --esp folder)."""
        from hostsvc import devicepath as DP
        if parent_image_handle not in self.fw.images:
            raise EfiError(S.INVALID_PARAMETER, "ParentImageHandle is not an image")
        if len(self.fw.images) >= MAX_LOADED_IMAGES:
            raise EfiError(S.OUT_OF_RESOURCES, f"{len(self.fw.images)} images are loaded, vmrun's limit "
                                               "(UnloadImage frees one)")
        nodes, device_handle, file_nodes = [], 0, []
        if device_path:
            raw = self.fw._read_device_path(device_path)
            nodes = DP.parse(raw)
        if source_buffer:
            if source_size == 0:
                raise EfiError(S.LOAD_ERROR, "SourceSize is 0")
            if source_size > MAX_LOAD_IMAGE_SIZE:
                raise EfiError(S.LOAD_ERROR, f"SourceSize {source_size:#x} is larger than the "
                                             f"{MAX_LOAD_IMAGE_SIZE >> 20} MiB vmrun loads")
            data = self.mem.read(source_buffer, source_size)
            name = f"image@{source_buffer:#x}"
            file_nodes = nodes
        else:
            if not device_path:
                raise EfiError(S.INVALID_PARAMETER, "neither SourceBuffer nor DevicePath")
            device_handle, offset = self.fw.handles.locate_device_path(G.SIMPLE_FILE_SYSTEM, raw)
            volume = self.fw.volumes.get(device_handle)
            if volume is None:
                raise EfiError(S.NOT_FOUND, "no file system provides that device path")
            file_nodes = DP.parse(raw[offset:])
            path = IMG.file_path_text(file_nodes)
            data = volume.read_file(path, max_size=MAX_LOAD_IMAGE_SIZE)
            name = path.rsplit("\\", 1)[-1]
        try:
            pe = PE.parse_pe(data, name, allowed_subsystems=tuple(PE.EFI_SUBSYSTEMS))
        except VmrunError as e:
            raise EfiError(S.UNSUPPORTED if "subsystem" in e.kind else S.LOAD_ERROR, str(e)) from None
        try:
            img = IMG.load_image(self.fw, pe, name, parent_image_handle, device_handle=device_handle,
                                 file_path_nodes=file_nodes, source_address=source_buffer)
        except VmrunError as e:
            if e.kind in ("fault", "timeout", "memory_cap", "halted"):
                raise  # a run outcome, not a property of the image
            raise EfiError(S.LOAD_ERROR, str(e)) from None
        self.mem.write_u64(image_handle, img.handle)

    @efiapi("StartImage", ("image_handle", HANDLE), ("exit_data_size", OPTPTR), ("exit_data", OPTPTR))
    def start_image(self, image_handle, exit_data_size, exit_data):
        img = self.fw.images.get(image_handle)
        if img is None:
            raise EfiError(S.INVALID_PARAMETER, "not an image handle")
        status = IMG.start_image(self.fw, img)
        if exit_data_size:
            self.mem.write_u64(exit_data_size, img.exit_data[0])
        if exit_data:
            self.mem.write_u64(exit_data, img.exit_data[1])
        return status

    @efiapi("Exit", ("image_handle", HANDLE), ("exit_status", U64), ("exit_data_size", UINTN),
            ("exit_data", OPTPTR))
    def exit(self, image_handle, exit_status, exit_data_size, exit_data):
        img = self.fw.images.get(image_handle)
        if img is None:
            raise EfiError(S.INVALID_PARAMETER, "not an image handle")
        if not img.started:
            self.fw.unload_image(img)
            return S.SUCCESS
        if not img.running:  # EDK2 CoreExit: only the image that is running may exit
            raise EfiError(S.INVALID_PARAMETER, f"{img.name} is not running")
        raise IMG.ImageExit(image_handle, exit_status, exit_data_size, exit_data)

    @efiapi("UnloadImage", ("image_handle", HANDLE))
    def unload_image(self, image_handle):
        img = self.fw.images.get(image_handle)
        if img is None:
            raise EfiError(S.INVALID_PARAMETER, "not an image handle")
        if img.started:
            raise EfiError(S.UNSUPPORTED, "started images have no Unload function here")
        self.fw.unload_image(img)

    @efiapi("ExitBootServices", ("image_handle", HANDLE), ("map_key", UINTN))
    def exit_boot_services(self, image_handle, map_key):
        """§7.4 ExitBootServices: a success freezes the run for the handoff, whose purgatory
        returns EFI_SUCCESS from this very call on the target machine.

        Called from an event notify function it is a payload fault: a notify function is a
        callback that returns into the firmware's event dispatch, and on the target there is no
        firmware left to return to (vmrun can hand off only a call made by the running image's
        own code, which never needs to return into firmware). An image started with StartImage
        (systemd-stub's LoadImage+StartImage of the Linux stub) is the running image and may call
        it: its return path is its own code, as for the top-level image."""
        if self.fw.events.notify_depth:
            caller = self.mem.read_u64(self.fw.port.stack_pointer())  # the thunk's return address
            raise PayloadFault(f"ExitBootServices called from an event notify function (rip {caller:#x}"
                               f"{self.fw.port.describe_rip(caller)}): vmrun can hand off only a call "
                               "made by the running image, not one that must return into the "
                               "firmware's event dispatch", rip=caller)
        if map_key != self.fw.alloc.map_key:
            TCG2.exit_boot_services(self.fw, success=False)
            raise EfiError(S.INVALID_PARAMETER, f"stale map key {map_key} (current {self.fw.alloc.map_key})")
        if image_handle not in self.fw.images:
            raise EfiError(S.INVALID_PARAMETER, "ImageHandle is not an image")
        self.fw.events.signal_group(G.EVENT_GROUP_BEFORE_EXIT_BOOT_SERVICES)
        self.fw.events.signal_group(G.EVENT_GROUP_EXIT_BOOT_SERVICES)
        self.fw.events.dispatch()
        TCG2.exit_boot_services(self.fw, success=True)
        raise ExitBootServicesCalled(image_handle, map_key)

    # --- §7.5 Miscellaneous Boot Services ------------------------------------------------
    @efiapi("SetWatchdogTimer", ("timeout", UINTN), ("watchdog_code", U64), ("data_size", UINTN),
            ("watchdog_data", OPTPTR))
    def set_watchdog_timer(self, timeout, watchdog_code, data_size, watchdog_data):
        if watchdog_code <= 0xFFFF and watchdog_code != 0 and timeout:
            raise EfiError(S.INVALID_PARAMETER, "codes 0x0001-0xFFFF are reserved for firmware")
        self.fw.watchdog = timeout  # the run's own --timeout bounds everything anyway

    @efiapi("Stall", ("microseconds", UINTN))
    def stall(self, microseconds):
        port = self.fw.port
        end = time.monotonic() + microseconds / 1e6
        if end > port.deadline:
            # Stall is a busy wait that nothing cuts short: the time limit would expire inside it
            # (as in a payload that stalls forever after a fatal error), so it expires now
            left = max(port.deadline - time.monotonic(), 0.0)
            caller = self.mem.read_u64(port.stack_pointer())  # the thunk's return address
            raise RunTimeout(f"Stall({microseconds} µs) called from rip {caller:#x}{port.describe_rip(caller)} "
                             f"cannot return within the run's time limit of {port.timeout:g} s "
                             f"({left:.1f} s left): the run ends now", rip=caller)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            self.fw.port.check_deadline()
            time.sleep(min(left, 0.05))

    @efiapi("CopyMem", ("destination", OPTPTR), ("source", OPTPTR), ("length", UINTN))
    def copy_mem(self, destination, source, length):
        """§7.5 CopyMem (memmove semantics), in :data:`MEM_CHUNK` pieces with the deadline
        checked between them; overlapping buffers are copied back to front when the
        destination lies above the source, so each piece reads bytes not yet overwritten."""
        if not length or destination == source:
            return 0
        for what, addr in (("Source", source), ("Destination", destination)):
            if not self.mem.contains(addr, length):
                raise EfiError(S.INVALID_PARAMETER, f"{what} {addr:#x}+{length:#x} is outside guest memory")
        pieces = list(chunks(0, length))
        if source < destination < source + length:
            pieces.reverse()
        port = self.fw.port
        for off, n in pieces:
            port.check_deadline()
            self.mem.copy(destination + off, source + off, n)
        return 0

    @efiapi("SetMem", ("buffer", OPTPTR), ("size", UINTN), ("value", "u8"))
    def set_mem(self, buffer, size, value):
        """§7.5 SetMem, in :data:`MEM_CHUNK` pieces with the deadline checked between them."""
        if not size:
            return 0
        if not self.mem.contains(buffer, size):
            raise EfiError(S.INVALID_PARAMETER, f"Buffer {buffer:#x}+{size:#x} is outside guest memory")
        port = self.fw.port
        for addr, n in chunks(buffer, size):
            port.check_deadline()
            self.mem.fill(addr, n, value)
        return 0

    @efiapi("GetNextMonotonicCount", ("count", PTR))
    def get_next_monotonic_count(self, count):
        self.fw.monotonic_count += 1
        self.mem.write_u64(count, self.fw.monotonic_count)

    @efiapi("InstallConfigurationTable", ("guid", GUIDPTR), ("table", OPTPTR))
    def install_configuration_table(self, guid, table):
        """§7.5: EFI_OUT_OF_RESOURCES when a new GUID would make more than
        :data:`MAX_CONFIG_TABLES` entries (the spec's "not enough memory" case)."""
        entries = self.fw.config.entries
        if table and len(entries) >= MAX_CONFIG_TABLES and all(g != guid for g, _ in entries):
            raise EfiError(S.OUT_OF_RESOURCES, f"the configuration table already has {len(entries)} "
                                               f"entries, vmrun's limit")
        self.fw.set_config_table(guid, table)

    @efiapi("CalculateCrc32", ("data", PTR), ("data_size", UINTN), ("crc32", PTR))
    def calculate_crc32(self, data, data_size, crc32):
        if data_size == 0:
            raise EfiError(S.INVALID_PARAMETER, "DataSize is 0")
        if not self.mem.contains(data, data_size):
            raise EfiError(S.INVALID_PARAMETER, f"Data {data:#x}+{data_size:#x} is outside guest memory")
        crc = 0
        port = self.fw.port
        for addr, n in chunks(data, data_size):  # views, no copy of the guest's bytes
            port.check_deadline()
            view = self.mem.view(addr, n)
            try:
                crc = zlib.crc32(view, crc)
            finally:
                view.release()
        self.mem.write_u32(crc32, crc)

