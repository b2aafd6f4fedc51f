"""Image services (UEFI 2.10 §7.4 LoadImage, StartImage, Exit, UnloadImage) and the
EFI_LOADED_IMAGE_PROTOCOL (§9.1) every image gets on its own handle."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import structlog

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.memory import AllocType, MemType
from hostsvc.protocols import tcg2 as TCG2
from hostsvc.status import EfiError
from vmrun.errors import PayloadFault, VmrunError
from vmrun.formats import pe as PE
from vmrun.vm import layout as L

log = structlog.get_logger("hostsvc.images")

#: EFI_LOADED_IMAGE_PROTOCOL.ImageCodeType / ImageDataType by PE subsystem (§7.4 LoadImage)
IMAGE_MEMORY_TYPES = {
    PE.SUBSYSTEM_EFI_APPLICATION: (MemType.LoaderCode, MemType.LoaderData),
    PE.SUBSYSTEM_EFI_BOOT_SERVICE_DRIVER: (MemType.BootServicesCode, MemType.BootServicesData),
    PE.SUBSYSTEM_EFI_RUNTIME_DRIVER: (MemType.RuntimeServicesCode, MemType.RuntimeServicesData),
}


#: StartImage refuses to start an image while this many images are running, nested (a payload
#: that starts a copy of itself): the run ends as a payload fault. Each level is a nested guest
#: call and a handful of host stack frames; with the notify-function bound
#: (:data:`hostsvc.events.MAX_NOTIFY_NESTING`) the guest calls nest at most 64 deep.
MAX_IMAGE_NESTING = 32


@dataclass
class Image:
    handle: int
    name: str
    pe: PE.PEImage | None  # None once loaded: the file's bytes are not kept for the whole run
    base: int
    size: int
    pages: int
    entry: int
    loaded_image: int
    started: bool = False
    exit_status: int | None = None
    exit_data: tuple[int, int] = (0, 0)
    running: bool = False         # its entry point is on the guest's call stack
    pools: tuple[int, ...] = ()   # firmware pool buffers made for it (LoadedImage, paths, options)


class ImageExit(Exception):
    """Raised by Exit(): unwinds to the StartImage that started ``handle``."""
    unwinds_guest = True
    trace_status = "EXIT"

    def __init__(self, handle: int, status: int, data_size: int, data: int):
        self.handle, self.status, self.data_size, self.data = handle, status, data_size, data


def file_path_text(nodes: list) -> str:
    """The path named by a run of FilePath nodes (§10.3.5.4), joined with backslashes."""
    parts = []
    for n in nodes:
        if (n.type, n.subtype) != (DP.MEDIA, DP.MEDIA_FILEPATH):
            raise EfiError(S.UNSUPPORTED, f"device path node {n.type}/{n.subtype} is not a file path")
        parts.append(n.data.decode("utf-16-le", "replace").rstrip("\0"))
    text = "\\".join(p.strip("\\") for p in parts if p.strip("\\"))
    return "\\" + text


def load_image(fw, pe: PE.PEImage, name: str, parent: int, load_options: str | None = None,
               device_handle: int = 0, file_path_nodes: list | None = None, source_address: int = 0) -> Image:
    """Place ``pe`` in LoaderCode pages (at its ImageBase when free, else top-down below
    4 GiB), apply relocations, and install LoadedImage + LoadedImageDevicePath on a new handle.

    All or nothing: the Authenticode hash (with a TPM) is computed before anything is
    allocated, and any failure after that frees what this call allocated and installed, so a
    LoadImage that fails leaks neither pages nor a handle (EfiError EFI_LOAD_ERROR for an
    image that cannot be hashed or relocated)."""
    digests = TCG2.image_digests(fw, pe.data)
    pages = (pe.size_of_image + L.PAGE_SIZE - 1) // L.PAGE_SIZE
    code_type, data_type = IMAGE_MEMORY_TYPES.get(pe.subsystem, IMAGE_MEMORY_TYPES[PE.SUBSYSTEM_EFI_APPLICATION])
    base = None
    if pe.image_base and pe.image_base % L.PAGE_SIZE == 0:
        try:
            base = fw.alloc.allocate_pages(AllocType.Address, code_type, pages, pe.image_base, owner=name)
        except EfiError:
            base = None
    if base is None:
        try:
            base = fw.alloc.allocate_pages(AllocType.MaxAddress, code_type, pages, L.FIRMWARE_BELOW - 1,
                                           owner=name)
        except EfiError:
            base = fw.alloc.allocate_pages(AllocType.AnyPages, code_type, pages, owner=name)
    pools: list[int] = []
    installed: list[tuple] = []  # (handle, guid, interface)

    def pool(size: int, mem_type: int = MemType.BootServicesData) -> int:
        addr = fw.pool(size, mem_type)
        pools.append(addr)
        return addr

    try:
        try:
            memimage = pe.load(base)
        except VmrunError as e:
            raise EfiError(S.LOAD_ERROR, str(e)) from None
        fw.mem.write(base, memimage)
        del memimage

        options_ptr, options_size = 0, 0
        if load_options is not None:
            raw = (load_options + "\0").encode("utf-16-le")
            options_ptr = pool(len(raw), MemType.LoaderData)
            fw.mem.write(options_ptr, raw)
            options_size = len(raw)
        nodes = file_path_nodes or []
        file_path = _device_path(fw, nodes, pool)
        li = pool(ctypes.sizeof(U.EFI_LOADED_IMAGE_PROTOCOL))
        handle = fw.handles.install(None, G.LOADED_IMAGE, li)
        installed.append((handle, G.LOADED_IMAGE, li))
        # LoadedImageDevicePath (§9.2): the device's path followed by the file path
        device_nodes = []
        if device_handle:
            dev_dp = fw.handles.get_interface(device_handle, G.DEVICE_PATH)
            if dev_dp:
                device_nodes = DP.parse(fw._read_device_path(dev_dp))
        full_path = device_nodes + nodes
        image_dp = _device_path(fw, full_path, pool)
        fw.handles.install(handle, G.LOADED_IMAGE_DEVICE_PATH, image_dp)
        installed.append((handle, G.LOADED_IMAGE_DEVICE_PATH, image_dp))
        fw.mem.write_struct(li, U.EFI_LOADED_IMAGE_PROTOCOL(
            Revision=U.EFI_LOADED_IMAGE_PROTOCOL.REVISION, ParentHandle=parent, SystemTable=fw.system_table,
            DeviceHandle=device_handle, FilePath=file_path, LoadOptionsSize=options_size,
            LoadOptions=options_ptr, ImageBase=base, ImageSize=pages * L.PAGE_SIZE, ImageCodeType=code_type,
            ImageDataType=data_type, Unload=0))
        TCG2.measure_image(fw, source_address or base, len(pe.data), pe.data, DP.encode(full_path),
                           link_time_address=pe.image_base, subsystem=pe.subsystem, digests=digests)
    except BaseException:
        for h, guid, iface in reversed(installed):
            fw.handles.uninstall(h, guid, iface)
        for addr in reversed(pools):
            fw.alloc.free_pool(addr, owner="firmware")
        fw.alloc.free_pages(base, pages)
        raise
    # the parsed image keeps the file's bytes: not needed once loaded and measured, and a payload
    # may load many images
    img = Image(handle, name, None, base, pages * L.PAGE_SIZE, pages, base + pe.entry_rva, li,
                pools=tuple(pools))
    fw.images[handle] = img
    log.info("image.loaded", name=name, base=hex(base), size=hex(img.size), entry=hex(img.entry),
             handle=hex(handle))
    return img


def _device_path(fw, nodes: list, pool) -> int:
    """``nodes`` (End node added) in a pool buffer from ``pool``."""
    raw = DP.encode(nodes)
    addr = pool(len(raw))
    fw.mem.write(addr, raw)
    return addr


def start_image(fw, img: Image) -> int:
    """Call the entry point; return its status (or Exit()'s)."""
    if img.started:
        raise EfiError(S.INVALID_PARAMETER, f"{img.name} already started")
    running = [i for i in fw.images.values() if i.running]
    if len(running) >= MAX_IMAGE_NESTING:
        raise PayloadFault(f"StartImage({img.name}) would nest {len(running) + 1} running images, more "
                           f"than vmrun's limit of {MAX_IMAGE_NESTING} (an image that starts a copy "
                           f"of itself?); running: {', '.join(i.name for i in running[:4])}, …",
                           image=img.name)
    img.started = img.running = True
    top = fw.stack_top if fw.port.call_depth == 0 else None
    try:
        status = fw.port.call_guest(img.entry, (img.handle, fw.system_table), stack_top=top)
    except ImageExit as e:
        if e.handle != img.handle:
            raise
        status = e.status
        img.exit_data = (e.data_size, e.data)
    finally:
        img.running = False
    img.exit_status = status
    fw.handles.close_all_by_agent(img.handle)
    return status
