"""Firmware set-up in one place: everything vmrun installs before the payload runs, and the
switch of the runtime services when the handoff freezes the run.

:func:`build_firmware` turns a :class:`FirmwareSpec` (what the run options decided: variables to
seed, configuration tables to publish, TPM, initrd) into a ready :class:`hostsvc.firmware.Firmware`,
in the order real firmware would have them when it starts an OS loader:

1. the variables firmware without enrolled Secure Boot keys publishes (UEFI 2.10 §3.3:
   SecureBoot = 0, SetupMode = 1), then the caller's seeds, which override them;
2. EFI_BOOT_SERVICES and EFI_RUNTIME_SERVICES (§4.4, §4.5), the console protocols (§12.3,
   §12.4) and EFI_SYSTEM_TABLE (§4.3) pointing at them;
3. what remains after ExitBootServices: a RuntimeServicesCode page holding guest code that
   returns EFI_UNSUPPORTED, and an EFI_RT_PROPERTIES_TABLE (§4.6.2) saying no runtime service
   is supported;
4. the target's ACPI/SMBIOS configuration tables (§4.6);
5. EFI_RNG_PROTOCOL, the device-path text protocols, EFI_TCG2_PROTOCOL (with its starting PCR
   values) and the Linux initrd's LoadFile2, as asked.

:func:`finalize_runtime_services` is the runtime switch: when a frozen run is staged, every
runtime service slot points at the EFI_UNSUPPORTED code, because after ExitBootServices no host
is left to answer.
"""

from __future__ import annotations

import ctypes
import uuid
from dataclasses import dataclass, field
from typing import Any

from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import tpm as T
from hostsvc import uefi_types as U
from hostsvc.boot_services import BootServices
from hostsvc.firmware import Firmware, FirmwareOptions, write_crc
from hostsvc.memmap import TargetMemoryMap
from hostsvc.memory import AllocType, MemType
from hostsvc.protocols.console import TextInput, TextOutput
from hostsvc.protocols.devicepath_text import DevicePathText
from hostsvc.protocols.initrd import InitrdLoadFile2
from hostsvc.protocols.rng import Rng
from hostsvc.protocols import tcg2 as TCG2
from hostsvc.runtime_services import RuntimeServices
from hostsvc.variables import BOOTSERVICE_ACCESS, RUNTIME_ACCESS
from vmrun.vm import layout as L
from vmrun.vm.port import GuestPort


@dataclass
class FirmwareSpec:
    """What the firmware is to offer, decided from the run options by the caller."""
    cmdline: str = ""
    trace: bool = False
    memory_cap: int = L.DEFAULT_MEMORY_CAP
    variables: list[tuple[str, Any, bytes]] = field(default_factory=list)  # (name, guid, data[, attrs])
    config_tables: list[tuple[uuid.UUID, int]] = field(default_factory=list)  # the target's own tables
    rt_unsupported_code: bytes = b""       # guest code returning EFI_UNSUPPORTED (from the firmware blob)
    tpm: bool = True
    tpm_banks: tuple[str, ...] = ("sha256",)
    pcr_base: dict | None = None
    tpm_mirror: TCG2.Mirror | None = None  # the machine's own TPM (measured kexec) instead of a fresh one
    initrd: bytes | None = None


def build_firmware(port: GuestPort, target: TargetMemoryMap, spec: FirmwareSpec) -> Firmware:
    """A firmware with every table and protocol of ``spec`` installed (steps in the module
    docstring)."""
    fw = Firmware(port, target, FirmwareOptions(cmdline=spec.cmdline, trace=spec.trace,
                                                memory_cap=spec.memory_cap))
    fw.variables.seed("SecureBoot", G.EFI_GLOBAL_VARIABLE, b"\x00", BOOTSERVICE_ACCESS | RUNTIME_ACCESS)
    fw.variables.seed("SetupMode", G.EFI_GLOBAL_VARIABLE, b"\x01", BOOTSERVICE_ACCESS | RUNTIME_ACCESS)
    for name, guid, value, *attrs in spec.variables:
        fw.variables.seed(name, guid, value, *attrs)

    bs = fw.service_table("BootServices", BootServices(fw), U.EFI_BOOT_SERVICES, MemType.BootServicesData)
    rt = fw.service_table("RuntimeServices", RuntimeServices(fw), U.EFI_RUNTIME_SERVICES,
                          MemType.RuntimeServicesData)
    fw.boot_services_table, fw.runtime_services_table = bs, rt
    con_out = TextOutput(fw)
    out_handle, out_iface = con_out.install("stdout")
    err_handle, err_iface = con_out.install("stderr")
    in_handle, in_iface = TextInput(fw).install()
    fw.build_system_table(bs, rt, in_handle, in_iface, out_handle, out_iface, err_handle, err_iface)

    _install_runtime_after_ebs(fw, spec.rt_unsupported_code)
    for guid, addr in spec.config_tables:
        fw.set_config_table(guid, addr)

    Rng(fw).install()
    DevicePathText(fw).install()
    if spec.tpm:
        tpm = TCG2.install(fw, spec.tpm_banks, mirror=spec.tpm_mirror)
        if spec.pcr_base and spec.tpm_mirror is None:
            tpm.pcrs = T.PcrBanks(tpm.banks, base=spec.pcr_base)
    if spec.initrd is not None:
        InitrdLoadFile2(fw, spec.initrd).install()
    return fw


def _install_runtime_after_ebs(fw: Firmware, code: bytes) -> None:
    """A RuntimeServicesCode page with ``code`` (the rest int3), and an EFI_RT_PROPERTIES_TABLE
    (UEFI 2.10 §4.6.2) saying no runtime service is supported."""
    page = fw.alloc.allocate_pages(AllocType.MaxAddress, MemType.RuntimeServicesCode, 1, L.FIRMWARE_BELOW - 1,
                                   owner="firmware")
    fw.mem.fill(page, L.PAGE_SIZE, 0xCC)
    fw.mem.write(page, code)
    fw.rt_unsupported = page
    props = U.EFI_RT_PROPERTIES_TABLE(Version=U.EFI_RT_PROPERTIES_TABLE.VERSION,
                                      Length=ctypes.sizeof(U.EFI_RT_PROPERTIES_TABLE), RuntimeServicesSupported=0)
    table = fw.pool(ctypes.sizeof(props), MemType.RuntimeServicesData)
    fw.mem.write_struct(table, props)
    fw.set_config_table(G.EFI_RT_PROPERTIES_TABLE, table)


def finalize_runtime_services(fw: Firmware) -> None:
    """Point every runtime service at guest code that returns EFI_UNSUPPORTED: after
    ExitBootServices there is no host to answer (the EFI_RT_PROPERTIES_TABLE says so)."""
    rt = fw.mem.read_struct(fw.runtime_services_table, U.EFI_RUNTIME_SERVICES)
    for name in U.function_names(U.EFI_RUNTIME_SERVICES):
        setattr(rt, name, fw.rt_unsupported)
    fw.mem.write_struct(fw.runtime_services_table, rt)
    write_crc(fw.mem, fw.runtime_services_table)
    # What is left of the boot services on the target gets a defined behaviour too: a boot
    # service called after ExitBootServices (undefined by the spec) returns EFI_UNSUPPORTED
    # instead of exiting to a host that is not there, and an image returning from its entry point
    # after a successful ExitBootServices (a child image returning to its parent's StartImage,
    # or the top-level image to the firmware) halts the CPU with interrupts off: on the target
    # there is no firmware to return to.
    unsupported = b"\x48\xb8" + S.UNSUPPORTED.to_bytes(8, "little") + b"\xc3"   # movabs rax, …; ret
    first = fw.port.thunk(0)
    for sid in range(L.NR_SVC_THUNKS):
        fw.mem.write(first + L.SVC_THUNK_SIZE * sid, unsupported.ljust(L.SVC_THUNK_SIZE, b"\xcc"))
    fw.mem.write(fw.port.sym("ret_thunk"), b"\xfa\xf4\xeb\xfd")                  # cli; 1: hlt; jmp 1b
