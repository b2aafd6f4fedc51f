"""Run one EFI payload in a fresh micro-VM until ExitBootServices (or a fault, a timeout, or the
payload returning), and describe what happened.

``run_payload`` is the whole job behind ``vmrun run``; the CLI only formats its
:class:`RunResult`.
"""

from __future__ import annotations

import hashlib
import pathlib
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from hostsvc import guids as G
from hostsvc import status as S
from hostsvc.boot_services import ExitBootServicesCalled
from hostsvc.firmware import Firmware
from hostsvc.images import ImageExit, load_image, start_image
from hostsvc.memmap import TargetMemoryMap
from hostsvc.protocols import tcg2 as TCG2
from hostsvc.runtime_services import ResetSystemCalled
from hostsvc.setup import FirmwareSpec, build_firmware
from hostsvc.status import EfiError
from vmrun.errors import (BadOptionError, InputFileError, MalformedImageError, MemoryCapExceeded,
                          PayloadFault, PayloadHalted, RunTimeout, VmrunError)
from vmrun.formats import linux
from vmrun.formats import pe as PE
from vmrun.handoff import state as handoff_state
from vmrun.vm import layout as L
from vmrun.vm.cpu import load_blob
from vmrun.vm.devices import standard_bus
from vmrun.vm.emulate import Emulator
from vmrun.vm.machine import Machine, RunLimits
from vmrun.vm.port import GuestPort

log = structlog.get_logger("vmrun.runner")

#: lines of the payload's serial (UART) output kept for the summary; each is at most 4096 bytes
MAX_SERIAL_LINES = 10_000


@dataclass
class RunOptions:
    cmdline: str = ""
    initrd: pathlib.Path | None = None
    memmap: pathlib.Path | None = None
    timeout: float = L.DEFAULT_TIMEOUT_S
    memory_cap: int = L.DEFAULT_MEMORY_CAP
    trace: bool = False
    variables: list[tuple[str, Any, bytes]] = field(default_factory=list)
    # called with the Firmware after the standard protocols exist, before the payload loads;
    # may return a dict of load_image keyword arguments (device_handle, file_path_nodes)
    hooks: list[Any] = field(default_factory=list)
    dirty_log: bool = False  # KVM dirty-page logging (staging checks for stray writes)
    esp: pathlib.Path | None = None        # folder presented as the EFI System Partition
    esp_path: str | None = None            # the payload's path on it (or on the empty volume) when outside
    esp_writable: bool = False
    esp_partuuid: Any = None               # uuid.UUID of the ESP's (or empty volume's) HD() node
    tpm: bool = True                       # EFI_TCG2_PROTOCOL with a software TPM
    tpm_banks: tuple[str, ...] = ("sha256",)
    pcr_base: dict | None = None           # bank → {index: bytes} starting values
    # the machine's own TPM mirrored (vmrun.measured: --tpm=host); replaces tpm_banks/pcr_base
    tpm_mirror: Any = None
    tpm_snapshot: Any = None               # vmrun.measured.host.Snapshot behind tpm_mirror
    # configuration tables pointing at the target's own firmware tables (physical addresses);
    # None = this host's when the target is this host (/sys/firmware/efi/systab), else omitted
    acpi_rsdp: int | None = None
    smbios: int | None = None
    smbios3: int | None = None
    # the map to present, already built (a kdump crash map); overrides ``memmap``
    target: TargetMemoryMap | None = None


@dataclass
class FrozenState:
    """The guest as ExitBootServices left it: what the handoff turns into kexec segments."""
    regs: dict[str, int]
    sregs: dict[str, int]
    fpu: bytes
    image_handle: int
    map_key: int
    system_table: int
    descriptors: list
    allocations: list
    config_tables: list[tuple[str, int]]
    extended_state: list[str] = field(default_factory=list)  # XSAVE components left in use


@dataclass
class RunResult:
    outcome: str
    seconds: float
    payload: dict
    services: dict[str, int]
    unimplemented: dict[str, int]
    console: str
    serial: str
    exit_status: int | None = None
    error: dict | None = None
    image: dict | None = None
    emulated: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    variables: list[dict] = field(default_factory=list)
    config_tables: list[dict] = field(default_factory=list)
    linux: dict | None = None
    pcrs: dict | None = None
    event_log: bytes | None = None
    trace: list[dict] | None = None
    trace_dropped: int = 0  # calls past hostsvc.dispatch.MAX_TRACE_ENTRIES, not in ``trace``
    frozen: FrozenState | None = None
    machine: Machine | None = None
    firmware: Firmware | None = None

    @property
    def calls(self) -> int:
        return sum(self.services.values())

    def to_json(self) -> dict:
        d = {
            "outcome": self.outcome,
            "seconds": round(self.seconds, 4),
            "calls": self.calls,
            "services": dict(sorted(self.services.items())),
            "unimplemented": dict(sorted(self.unimplemented.items())),
            "payload": self.payload,
            "image": self.image,
            "exit_status": None if self.exit_status is None else S.name(self.exit_status),
            "error": self.error,
            "console": self.console,
            "serial": self.serial,
            "emulated": dict(sorted(self.emulated.items())),
            "stats": self.stats,
            "memory": self.memory,
            "variables": self.variables,
            "config_tables": self.config_tables,
            "linux": self.linux,
            "pcrs": self.pcrs,
        }
        if self.frozen is not None:
            f = self.frozen
            d["frozen"] = {"rip": hex(f.regs["rip"]), "rsp": hex(f.regs["rsp"]), "cr3": hex(f.sregs["cr3"]),
                           "map_key": f.map_key, "system_table": hex(f.system_table)}
            if f.extended_state:
                d["frozen"]["extended_state"] = f.extended_state
        if self.trace is not None:
            d["trace"] = self.trace
            if self.trace_dropped:
                d["trace_dropped"] = self.trace_dropped
        return d


SYSTAB = pathlib.Path("/sys/firmware/efi/systab")


def host_firmware_tables(systab: pathlib.Path = SYSTAB) -> dict[str, int]:
    """This machine's ACPI/SMBIOS table addresses as its firmware published them
    (``ACPI20=0x…`` lines of /sys/firmware/efi/systab); empty when it did not boot with EFI."""
    out = {}
    try:
        for line in systab.read_text().splitlines():
            key, _, value = line.partition("=")
            if key in ("ACPI20", "ACPI", "SMBIOS", "SMBIOS3"):
                out[key] = int(value, 16)
    except (OSError, ValueError):
        return {}
    return out


DMI_TABLES = pathlib.Path("/sys/firmware/dmi/tables")


def host_smbios_tables(systab: pathlib.Path = SYSTAB, dmi: pathlib.Path = DMI_TABLES) -> list[tuple[int, bytes]]:
    """This machine's SMBIOS entry point and structure table at their physical addresses
    (``smbios_entry_point`` and ``DMI`` under /sys/firmware/dmi/tables, readable by root), so a
    payload that reads them (systemd-stub reads SMBIOS type 11 strings) finds them in the VM
    where the configuration table says. SMBIOS 3.x (``_SM3_``): the table address is the u64 at
    offset 0x10; 2.x (``_SM_``): the u32 at offset 0x18 (DMTF DSP0134 §5.2). Empty when
    unknown or unreadable (logged)."""
    addrs = host_firmware_tables(systab)
    try:
        entry = (dmi / "smbios_entry_point").read_bytes()
        table = (dmi / "DMI").read_bytes()
    except OSError as e:
        if addrs.get("SMBIOS") or addrs.get("SMBIOS3"):
            log.warning("smbios.unreadable", error=str(e),
                        why="a payload that reads the SMBIOS tables will fault (run as root)")
        return []
    if entry[:5] == b"_SM3_" and len(entry) >= 0x18 and addrs.get("SMBIOS3"):
        return [(addrs["SMBIOS3"], entry), (struct.unpack_from("<Q", entry, 0x10)[0], table)]
    if entry[:4] == b"_SM_" and len(entry) >= 0x1C and addrs.get("SMBIOS"):
        return [(addrs["SMBIOS"], entry), (struct.unpack_from("<I", entry, 0x18)[0], table)]
    return []


def target_config_tables(options: "RunOptions", target_is_host: bool) -> list[tuple]:
    """ACPI/SMBIOS configuration tables pointing at the target machine's own tables, so the next
    kernel finds them; omitted when unknown (a kernel then scans as it would without EFI)."""
    host = host_firmware_tables() if target_is_host else {}
    acpi20 = options.acpi_rsdp if options.acpi_rsdp is not None else host.get("ACPI20")
    acpi1 = host.get("ACPI") if options.acpi_rsdp is None else None
    smbios = options.smbios if options.smbios is not None else host.get("SMBIOS")
    smbios3 = options.smbios3 if options.smbios3 is not None else host.get("SMBIOS3")
    return [(guid, addr) for guid, addr in ((G.ACPI_20_TABLE, acpi20), (G.ACPI_TABLE, acpi1),
                                            (G.SMBIOS_TABLE, smbios), (G.SMBIOS3_TABLE, smbios3)) if addr]


def _freeze(fw: Firmware, machine: Machine, e: ExitBootServicesCalled) -> FrozenState:
    vcpu = machine.vcpu
    regs = vcpu.get_regs()
    regs.rax = S.SUCCESS  # what ExitBootServices returns on the real machine
    sregs = vcpu.get_sregs()
    r = {n: getattr(regs, n) for n, _ in regs._fields_}
    sr = {n: getattr(sregs, n) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")}
    sr["pat"] = vcpu.get_msrs([L.MSR_PAT]).get(L.MSR_PAT, L.PAT_DEFAULT)
    # AVX state the payload used runs on this host's CPU although the CPU it was shown has none
    # (vmrun.handoff.state explains why it is reported, not carried)
    used = handoff_state.extended_state_in_use(vcpu.get_xsave())
    if used:
        log.warning("handoff.extended_state", message=handoff_state.extended_state_warning(used))
    return FrozenState(
        extended_state=used,
        regs=r, sregs=sr, fpu=bytes(vcpu.get_fpu()), image_handle=e.image_handle, map_key=e.map_key,
        system_table=fw.system_table, descriptors=fw.alloc.descriptors(),
        allocations=list(fw.alloc.allocations),
        config_tables=[(str(g), t) for g, t in fw.config.entries])


def run_payload(path: str | pathlib.Path, options: RunOptions, *, keep: bool = False) -> RunResult:
    """Run ``path`` to ExitBootServices. Input errors raise; run outcomes are returned.

    With ``keep`` the machine stays alive in the result (for staging a handoff or for tests
    that inspect guest memory); the caller must then call ``result.machine.close()``.
    """
    path = pathlib.Path(path)
    image = PE.load_file(path)
    data = image.data
    initrd = None
    if options.initrd is not None:
        try:
            initrd = pathlib.Path(options.initrd).read_bytes()
        except OSError as e:
            raise InputFileError(f"cannot read initrd {options.initrd}: {e.strerror}") from None
    if options.target is not None:
        target = options.target
    else:
        target = TargetMemoryMap.from_file(options.memmap) if options.memmap else TargetMemoryMap.from_host()

    payload_info = {"path": str(path), "name": path.name, "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "signed": image.signed}
    t0 = time.monotonic()
    target_is_host = options.memmap is None
    tables = host_smbios_tables() if target_is_host and options.smbios is None and options.smbios3 is None else []
    machine = Machine([(r.start, r.end) for r in target.ram()],
                      RunLimits(timeout=options.timeout, memory_cap=options.memory_cap),
                      dirty_log=options.dirty_log, tables=tables)
    fw = None
    serial_lines: list[str] = []
    outcome, error, exit_status, frozen = "", None, None, None
    emulator = None
    try:
        blob = load_blob()  # the same guest/firmware.bin the machine installs
        fw = build_firmware(GuestPort(machine), target, FirmwareSpec(
            cmdline=options.cmdline, trace=options.trace, memory_cap=options.memory_cap,
            variables=list(options.variables), config_tables=target_config_tables(options, target_is_host),
            rt_unsupported_code=blob.code[blob.symbols["rt_unsupported"]:blob.symbols["svc_thunks"]],
            tpm=options.tpm, tpm_banks=options.tpm_banks, pcr_base=options.pcr_base,
            tpm_mirror=options.tpm_mirror, initrd=initrd))

        def uart_line(line: str) -> None:
            if len(serial_lines) < MAX_SERIAL_LINES:  # the UART's output is bounded too
                serial_lines.append(line)
                log.info("serial", text=line)

        bus, uart = standard_bus(uart_line)
        emulator = Emulator(bus, fw.events)
        machine.exception_handler = emulator.handle
        load_kwargs: dict = {}
        hooks = list(options.hooks)
        if options.esp is not None:
            from hostsvc.protocols.filesystem import esp_hook
            hooks.insert(0, esp_hook(options.esp, path, options.esp_path, writable=options.esp_writable,
                                     partuuid=options.esp_partuuid))
        for hook in hooks:
            load_kwargs.update(hook(fw) or {})
        if not load_kwargs.get("device_handle"):
            # firmware always loads an image from some device: without --esp, an empty read-only one
            from hostsvc.protocols.filesystem import empty_volume_hook
            load_kwargs.update(empty_volume_hook(path, options.esp_path, partuuid=options.esp_partuuid)(fw))
        TCG2.separators(fw)  # ReadyToBoot: PCR 0-7 separators before the OS loader is measured
        try:
            img = load_image(fw, image, path.name, 0, load_options=options.cmdline, **load_kwargs)
        except EfiError as e:
            # the parser accepted it, but placing it failed: relocations or the Authenticode
            # hash (with a TPM) refused the file, or there is no room for it
            if e.status == S.LOAD_ERROR:
                raise MalformedImageError(f"{path.name} cannot be loaded: {e.why}") from None
            raise BadOptionError(f"{path.name} cannot be loaded in the target's memory: "
                                 f"{S.name(e.status)} ({e.why})") from None
        log.info("run.start", payload=path.name, entry=hex(img.entry), timeout=options.timeout)
        machine.start_watchdog()
        try:
            exit_status = start_image(fw, img)
            outcome = "payload_returned"
            error = {"kind": "payload_returned",
                     "message": f"{path.name} returned {S.name(exit_status)} without calling ExitBootServices"}
        except ExitBootServicesCalled as e:
            frozen = _freeze(fw, machine, e)
            outcome = "exit_boot_services"
        except ImageExit as e:
            exit_status = e.status
            outcome = "payload_returned"
            error = {"kind": "payload_returned",
                     "message": f"{path.name} called Exit({S.name(e.status)}) without calling ExitBootServices"}
        except ResetSystemCalled as e:
            outcome = "reset"
            error = {"kind": "reset", "message": f"payload called ResetSystem(type {e.reset_type}, "
                                                 f"{S.name(e.status)})"}
        except (PayloadFault, RunTimeout, MemoryCapExceeded, PayloadHalted) as e:
            # each error's kind is its outcome: fault, timeout, memory_cap, halted
            message = str(e)
            if e.kind in ("halted", "timeout"):
                uart.flush()
                last = last_console_line(fw.console, serial_lines)
                message += f"; last console line: {last!r}" if last else "; the console stayed empty"
            outcome, error = e.kind, {"kind": e.kind, "message": message, **_jsonable(e.details)}
        finally:
            machine.stop_watchdog()
            uart.flush()
        seconds = time.monotonic() - t0
        result = RunResult(
            outcome=outcome, seconds=seconds, payload=payload_info,
            services=dict(fw.table.counts), unimplemented=dict(fw.table.unimplemented_calls),
            console=_console_text(fw), serial="\n".join(serial_lines), exit_status=exit_status, error=error,
            image={"base": hex(img.base), "entry": hex(img.entry), "size": img.size,
                   "handle": hex(img.handle)},
            emulated=dict(emulator.counts),
            stats={"exits": machine.stats.exits, "hypercalls": machine.stats.hypercalls,
                   "exceptions": machine.stats.exceptions,
                   "host_service_seconds": round(fw.table.host_seconds, 4)},
            memory={"target": target.source, "target_digest": target.digest(),
                    "allocated_bytes": fw.alloc.allocated_bytes(), "cap_bytes": options.memory_cap},
            variables=fw.variables.summary(),
            config_tables=[{"guid": str(g), "name": G.guid_name(g), "address": hex(t)}
                           for g, t in fw.config.entries],
            trace=[vars(t) for t in fw.table.trace] if options.trace else None,
            trace_dropped=fw.table.trace_dropped,
            frozen=frozen, machine=machine, firmware=fw)
        result.uart = uart
        if fw.tcg2 is not None:
            result.pcrs = {bank: {str(i): v.hex() for i, v in enumerate(vals)}
                           for bank, vals in fw.tcg2.pcrs.pcrs.items()}
            result.event_log = fw.tcg2.log_bytes()
        if frozen is not None:
            result.linux = linux.describe_boot_params(fw.mem, fw.alloc.allocations, fw.system_table)
        log.info("run.end", outcome=outcome, seconds=round(seconds, 3), calls=result.calls)
        return result
    finally:
        if not keep:
            machine.close()


def _console_text(fw: Firmware) -> str:
    """What the payload wrote to ConOut/StdErr, as kept (hostsvc.protocols.console.MAX_CONSOLE_CHARS),
    with a note of how much was dropped."""
    dropped = fw.console_dropped
    return fw.console + (f"\n[… {dropped} characters of console output dropped]" if dropped else "")


def last_console_line(console: str, serial: list[str]) -> str:
    """The last non-empty line the payload wrote to ConOut/StdErr, else to the serial port."""
    for text in (console, "\n".join(serial)):
        lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
        if lines:
            return lines[-1]
    return ""


def _jsonable(d: dict) -> dict:
    return {k: (hex(v) if isinstance(v, int) and k in ("rip", "address") else v) for k, v in d.items()}


def continue_after_ebs(result: RunResult, seconds: float = 10.0) -> VmrunError:
    """Resume a frozen run as if ExitBootServices had returned EFI_SUCCESS, until the payload
    does something only the real machine can do (for a Linux stub: the first privileged
    instruction of the kernel proper). Returns that fault (or a timeout, or a halt).

    A diagnostic: it shows what the stub does after EBS (e.g. the e820 table it builds) and
    that it accepted our ExitBootServices. Boot service calls after EBS are a fault.
    """
    if result.frozen is None or result.machine is None:
        raise ValueError("continue_after_ebs needs a frozen run kept alive (run_payload(keep=True))")
    m, fw = result.machine, result.firmware
    regs = m.vcpu.get_regs()
    regs.rax = S.SUCCESS
    m.vcpu.set_regs(regs)

    def after_ebs(machine, sid, regs):
        name = fw.table.services[sid].name if sid < len(fw.table.services) else str(sid)
        raise PayloadFault(f"{name} called after ExitBootServices (rip {regs.rip:#x})", rip=regs.rip,
                           service=name)

    m.service_handler = after_ebs
    m.limits.timeout = seconds
    m.start_watchdog()
    try:
        m._loop()
    except (PayloadFault, RunTimeout, PayloadHalted) as e:
        return e
    finally:
        m.stop_watchdog()
    return PayloadFault("the payload returned to the firmware after ExitBootServices")
