"""EFI_DEVICE_PATH_TO_TEXT_PROTOCOL and EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL (UEFI 2.10 §10.6),
for the node types hostsvc.devicepath knows. Results are pool allocations the caller frees;
failures return NULL (these functions return pointers, not EFI_STATUS)."""

from __future__ import annotations

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import uefi_types as U
from hostsvc.dispatch import BOOL, OPTPTR, efiapi
from hostsvc.memory import MemType
from hostsvc.status import EfiError


class DevicePathText:
    def __init__(self, fw):
        self.fw = fw
        self.mem = fw.mem

    def install(self) -> int:
        to_text = self.fw.interface("DevicePathToText", self, U.EFI_DEVICE_PATH_TO_TEXT_PROTOCOL)
        from_text = self.fw.interface("DevicePathFromText", self, U.EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL)
        return self.fw.handles.install_multiple(None, [(G.DEVICE_PATH_TO_TEXT, to_text),
                                                       (G.DEVICE_PATH_FROM_TEXT, from_text)])

    def _string(self, text: str) -> int:
        raw = (text + "\0").encode("utf-16-le")
        addr = self.fw.alloc.allocate_pool(MemType.BootServicesData, len(raw))
        self.mem.write(addr, raw)
        return addr

    def _path(self, nodes: list) -> int:
        raw = DP.encode(nodes)
        addr = self.fw.alloc.allocate_pool(MemType.BootServicesData, len(raw))
        self.mem.write(addr, raw)
        return addr

    @efiapi("ConvertDeviceNodeToText", ("device_node", OPTPTR), ("display_only", BOOL),
            ("allow_shortcuts", BOOL))
    def node_to_text(self, device_node, display_only, allow_shortcuts):
        if not device_node:
            return 0
        hdr = self.mem.read_struct(device_node, U.EFI_DEVICE_PATH_PROTOCOL)
        if hdr.length < DP.HEADER:
            return 0
        node = DP.Node(hdr.Type, hdr.SubType, self.mem.read(device_node + DP.HEADER, hdr.length - DP.HEADER))
        return self._string(DP.node_to_text(node))

    @efiapi("ConvertDevicePathToText", ("device_path", OPTPTR), ("display_only", BOOL),
            ("allow_shortcuts", BOOL))
    def path_to_text(self, device_path, display_only, allow_shortcuts):
        if not device_path:
            return 0
        try:
            nodes = DP.parse(self.fw._read_device_path(device_path))
        except EfiError:
            return 0
        return self._string(DP.to_text(nodes))

    @efiapi("ConvertTextToDeviceNode", ("text_device_node", OPTPTR))
    def text_to_node(self, text_device_node):
        if not text_device_node:
            return 0
        try:
            nodes = DP.from_text(self.mem.read_utf16z(text_device_node))
        except (EfiError, ValueError):
            return 0
        if len(nodes) != 1:
            return 0
        raw = nodes[0].to_bytes()
        addr = self.fw.alloc.allocate_pool(MemType.BootServicesData, len(raw))
        self.mem.write(addr, raw)
        return addr

    @efiapi("ConvertTextToDevicePath", ("text_device_path", OPTPTR))
    def text_to_path(self, text_device_path):
        if not text_device_path:
            return 0
        try:
            return self._path(DP.from_text(self.mem.read_utf16z(text_device_path)))
        except (EfiError, ValueError):
            return 0
