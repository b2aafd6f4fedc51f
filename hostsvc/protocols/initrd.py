"""The Linux initrd through EFI_LOAD_FILE2_PROTOCOL (UEFI 2.10 §13.2) on a handle whose device
path is VenMedia(LINUX_EFI_INITRD_MEDIA) — how Linux ≥5.8 and systemd-stub find the initrd."""

from __future__ import annotations

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.dispatch import BOOL, OPTPTR, PTR, efiapi, size_in_out
from hostsvc.status import EfiError


class InitrdLoadFile2:
    def __init__(self, fw, data: bytes):
        self.fw = fw
        self.mem = fw.mem
        self.data = data

    def install(self) -> int:
        iface = self.fw.interface("LoadFile2(initrd)", self, U.EFI_LOAD_FILE2_PROTOCOL)
        path = self.fw.device_path([DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)])
        return self.fw.handles.install_multiple(None, [(G.DEVICE_PATH, path), (G.LOAD_FILE2, iface)])

    @efiapi("LoadFile", ("this", PTR), ("file_path", OPTPTR), ("boot_policy", BOOL),
            ("buffer_size", PTR), ("buffer", OPTPTR))
    def load_file(self, this, file_path, boot_policy, buffer_size, buffer):
        if boot_policy:
            raise EfiError(S.UNSUPPORTED, "BootPolicy must be FALSE for LoadFile2")
        if not buffer:  # a NULL Buffer is a size query (§13.2), whatever *BufferSize says
            self.mem.write_u64(buffer_size, len(self.data))
            raise EfiError(S.BUFFER_TOO_SMALL, f"initrd is {len(self.data)} bytes")
        size_in_out(self.mem, buffer_size, len(self.data), "the initrd")
        self.mem.write(buffer, self.data)
