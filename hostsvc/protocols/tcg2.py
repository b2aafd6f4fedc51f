"""EFI_TCG2_PROTOCOL (TCG EFI Protocol Specification, Family 2.0, rev 00.13 §6) over a software
TPM (:mod:`hostsvc.tpm`): PCR banks that are extended, a crypto-agile event log in guest memory
and the EFI_TCG2_FINAL_EVENTS_TABLE configuration table.

Behaviour follows EDK2's SecurityPkg/Tcg/Tcg2Dxe (what OVMF, the project's reference firmware,
runs), so that a payload sees the same log and the PCRs end with the same values:

- the log area (64 KiB, EfiBootServicesData, filled with 0xFF) starts with the Spec ID event;
  GetEventLog returns its address and the address of the last entry, and from then on every
  new event also goes to the final events table (32 KiB, EfiACPIMemoryNVS: the OS reads it after
  ExitBootServices);
- HashLogExtendEvent with PE_COFF_IMAGE measures the Authenticode digest of the PE *file* image
  at DataToHash; EFI_TCG2_EXTEND_ONLY extends without logging; EV_NO_ACTION logs zero digests
  without extending; a full log area sets EventLogTruncated and returns EFI_VOLUME_FULL (the
  extend has still happened);
- there is no TPM command interface: SubmitCommand is EFI_UNSUPPORTED, and so are bank changes.

The firmware's own measurements around a boot (``separators``, ``measure_image``,
``exit_boot_services``) are module functions taking the Firmware: they do nothing when no TPM
is installed, so call sites need no condition.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable

import structlog

from hostsvc import guids as G
from hostsvc import kexeclog as KL
from hostsvc import status as S
from hostsvc import tpm as T
from hostsvc import uefi_types as U
from hostsvc.dispatch import PTR, OPTPTR, U32, U64, efiapi
from hostsvc.memory import AllocType, MemType
from hostsvc.status import EfiError
from vmrun.formats import pe as PE
from vmrun.vm.layout import PAGE_SIZE

log = structlog.get_logger("hostsvc.tcg2")

TCG2_ORDER = U.function_names(U.EFI_TCG2_PROTOCOL)

# U.EFI_TCG2_BOOT_SERVICE_CAPABILITY: 36 bytes; the 1.0 structure (TREE_BOOT_SERVICE_CAPABILITY_1_0)
# ends after ManufacturerID: 28 bytes
CAPABILITY_SIZE_1_1 = ctypes.sizeof(U.EFI_TCG2_BOOT_SERVICE_CAPABILITY)
CAPABILITY_SIZE_1_0 = U.EFI_TCG2_BOOT_SERVICE_CAPABILITY.NumberOfPCRBanks.offset

EVENT_LOG_FORMAT_TCG_1_2 = 0x1
EVENT_LOG_FORMAT_TCG_2 = 0x2

EFI_TCG2_EXTEND_ONLY = 0x1
PE_COFF_IMAGE = 0x10

EVENT_HEADER_SIZE = ctypes.sizeof(U.EFI_TCG2_EVENT_HEADER)        # packed: 14 bytes
FINAL_EVENTS_HEADER = ctypes.sizeof(U.EFI_TCG2_FINAL_EVENTS_TABLE)  # the events follow

LOG_AREA_SIZE = 0x10000     # EDK2 PcdTcgLogAreaMinLen
FINAL_AREA_SIZE = 0x8000    # EDK2 PcdTcg2FinalLogAreaLen

# as under Debian's OVMF with swtpm: its event log and sysfs show all four SHA banks active (the
# tests/e2e/ovmf_tpm.py reference boot), and `tpm2_getcap properties-fixed` against swtpm gives
# TPM2_PT_MANUFACTURER 0x49424D00, "IBM": measured
DEFAULT_BANKS = ("sha1", "sha256", "sha384", "sha512")
SWTPM_MANUFACTURER_ID = 0x49424D00   # TPM_PT_MANUFACTURER "IBM\0"
MAX_COMMAND_SIZE = 4096
MAX_RESPONSE_SIZE = 4096
#: HashLogExtendEvent hashes plain data from guest memory in pieces of this size, checking the
#: run's deadline between them
HASH_CHUNK = 16 << 20
#: HashLogExtendEvent(PE_COFF_IMAGE) copies the image to hash it: at most this many bytes
MAX_PE_HASH_SIZE = 512 << 20
#: an event's data (EFI_TCG2_EVENT.Size) is at most this long (the whole log area is 64 KiB)
MAX_EVENT_SIZE = LOG_AREA_SIZE


@dataclass
class Mirror:
    """The machine's own TPM as a measured kexec's payload is to see it: the TPM's active banks
    and current PCR values, the firmware's event log, and the carried section
    (:mod:`hostsvc.kexeclog`) that follows it. The payload's log then continues with the kexec
    boundary instead of the first boot's ReadyToBoot separators, which the machine's firmware
    measured already."""
    banks: tuple[str, ...]
    pcrs: dict[str, dict[int, bytes]]
    firmware_log: bytes
    section: list[T.Event]
    manufacturer_id: int | None = None


class Tcg2:
    def __init__(self, fw, banks: Iterable[str] = DEFAULT_BANKS, *, log_size: int = LOG_AREA_SIZE,
                 final_size: int = FINAL_AREA_SIZE, manufacturer_id: int = SWTPM_MANUFACTURER_ID,
                 max_command_size: int = MAX_COMMAND_SIZE, max_response_size: int = MAX_RESPONSE_SIZE,
                 mirror: Mirror | None = None):
        self.fw = fw
        self.mem = fw.mem
        self.mirror = mirror
        #: every PCR extend of this run in order (pcr, {bank: digest}, event type): what a measured
        #: kexec replays into the real TPM
        self.extends: list[tuple[int, dict[str, bytes], int]] = []
        #: for each extend: (offset of its event in the log area or None, whether it reached the
        #: final events table) — what a measured kexec needs to tell which extends the next
        #: kernel's log lacks (EFI_TCG2_EXTEND_ONLY, a full log area, a full final table)
        self.extend_logged: list[tuple[int | None, bool]] = []
        self.section_offset = self.section_size = 0
        if mirror is None:
            self.banks = T.canonical_banks(banks)
            self.pcrs = T.PcrBanks(self.banks)
            self.log = T.EventLog(self.banks, max_size=log_size)
        else:
            self.banks = T.canonical_banks(mirror.banks)
            self.pcrs = T.PcrBanks(self.banks, base=mirror.pcrs)
            self.log = T.EventLog.from_bytes(mirror.firmware_log)
            if set(self.log.banks) != set(self.banks) or len(self.log.spec_id.algorithms) != len(self.banks):
                raise ValueError(f"the firmware event log records the banks "
                                 f"{', '.join(T.alg_name(a) for a, _ in self.log.spec_id.algorithms)} but the TPM "
                                 f"has {', '.join(self.banks)} active")
            self.section_offset = self.log.size
            for ev in mirror.section:
                self.log.append(ev.pcr, ev.event_type, ev.digests, ev.data)
            self.section_size = self.log.size - self.section_offset
            log_size = _pages(self.log.size + log_size) * PAGE_SIZE
            self.log.max_size = log_size
            if mirror.manufacturer_id is not None:
                manufacturer_id = mirror.manufacturer_id
        self.log_size = log_size
        self.final_size = final_size
        self.final_events: list[T.Event] = []
        self.final_used = 0
        self.final_truncated = False
        self.get_event_log_called = False
        self.manufacturer_id = manufacturer_id
        self.max_command_size = max_command_size
        self.max_response_size = max_response_size
        self.log_addr = 0
        self.final_addr = 0
        self.handle = 0
        self.interface_addr = 0

    # --- setup ------------------------------------------------------------------------------
    def install(self) -> int:
        """Allocate the log areas, install the protocol on a new handle and the final events
        configuration table; returns the handle. Also sets ``fw.tcg2``."""
        alloc = self.fw.alloc
        self.log_addr = alloc.allocate_pages(AllocType.AnyPages, MemType.BootServicesData,
                                             _pages(self.log_size), owner="tpm")
        self.mem.fill(self.log_addr, self.log_size, 0xFF)
        self.mem.write(self.log_addr, self.log.to_bytes())
        self.final_addr = alloc.allocate_pages(AllocType.AnyPages, MemType.ACPIMemoryNVS,
                                               _pages(self.final_size), owner="tpm")
        self.mem.fill(self.final_addr, self.final_size, 0xFF)
        self.mem.write_struct(self.final_addr, U.EFI_TCG2_FINAL_EVENTS_TABLE(
            Version=U.EFI_TCG2_FINAL_EVENTS_TABLE.VERSION, NumberOfEvents=0))
        self.interface_addr = self.fw.interface("Tcg2", self, TCG2_ORDER)
        self.handle = self.fw.handles.install(None, G.TCG2, self.interface_addr)
        self.fw.set_config_table(G.EFI_TCG2_FINAL_EVENTS, self.final_addr)
        self.fw.tcg2 = self
        log.info("tcg2.installed", banks=",".join(self.banks), log=hex(self.log_addr),
                 final_events=hex(self.final_addr))
        return self.handle

    def _tick(self) -> None:
        """The run's deadline check between pieces of hashing (none for a firmware without a
        port, as unit tests build it)."""
        port = getattr(self.fw, "port", None)
        if port is not None:
            port.check_deadline()

    @property
    def bitmap(self) -> int:
        return T.bank_bitmap(self.banks)

    def capability(self) -> U.EFI_TCG2_BOOT_SERVICE_CAPABILITY:
        return U.EFI_TCG2_BOOT_SERVICE_CAPABILITY(
            Size=CAPABILITY_SIZE_1_1, StructureVersion=U.EFI_TCG2_VERSION(1, 1),
            ProtocolVersion=U.EFI_TCG2_VERSION(1, 1), HashAlgorithmBitmap=self.bitmap,
            SupportedEventLogs=EVENT_LOG_FORMAT_TCG_2, TPMPresentFlag=1, MaxCommandSize=self.max_command_size,
            MaxResponseSize=self.max_response_size, ManufacturerID=self.manufacturer_id,
            NumberOfPCRBanks=len(self.banks), ActivePcrBanks=self.bitmap)

    # --- the measurement core ---------------------------------------------------------------
    def measure(self, pcr: int, event_type: int, event_data: bytes, *, data: bytes | None = None,
                digests: dict[str, bytes] | None = None, extend_only: bool = False) -> int:
        """Extend ``pcr`` with the digests of ``data`` (or the given ``digests``) and log the
        event; EV_NO_ACTION is logged with zero digests and not extended. Returns EFI_SUCCESS or
        EFI_VOLUME_FULL (the extend happened, the log is truncated)."""
        if not 0 <= pcr <= T.MAX_PCR_INDEX:
            raise EfiError(S.INVALID_PARAMETER, f"PCR index {pcr} > {T.MAX_PCR_INDEX}")
        if event_type == T.EV_NO_ACTION:
            digests = {b: bytes(T.ALGS[b].size) for b in self.banks}
        else:
            if digests is None:
                digests = T.hash_all(data if data is not None else b"", self.banks)
            if self.mirror is not None and 17 <= pcr <= 22:
                # the machine's TPM refuses these at locality 0: so does its mirror (a TPM error)
                raise EfiError(S.DEVICE_ERROR, f"PCR {pcr} cannot be extended at locality 0")
            self.pcrs.extend(pcr, digests)
            self.extends.append((pcr, {b: bytes(digests[b]) for b in self.banks}, event_type))
        if extend_only:
            if event_type != T.EV_NO_ACTION:
                self.extend_logged.append((None, False))
            return S.SUCCESS
        status, offset, in_final = self._log(pcr, event_type, digests, event_data)
        if event_type != T.EV_NO_ACTION:
            self.extend_logged.append((offset, in_final))
        return status

    def _log(self, pcr: int, event_type: int, digests: dict[str, bytes], event_data: bytes
             ) -> tuple[int, int | None, bool]:
        """Log one event: (status, its offset in the log area or None, whether it also went to
        the final events table)."""
        try:
            ev = self.log.append(pcr, event_type, digests, event_data)
        except T.EventLogFull as e:
            log.warning("tcg2.log_full", why=str(e))
            return S.VOLUME_FULL, None, False
        self.mem.write(self.log_addr + ev.offset, ev.to_bytes())
        if not self.get_event_log_called:
            return S.SUCCESS, ev.offset, False
        raw = ev.to_bytes()
        if self.final_truncated or FINAL_EVENTS_HEADER + self.final_used + len(raw) > self.final_size:
            self.final_truncated = True
            return S.VOLUME_FULL, ev.offset, False
        self.mem.write(self.final_addr + FINAL_EVENTS_HEADER + self.final_used, raw)
        self.final_used += len(raw)
        self.final_events.append(ev)
        table = self.mem.read_struct(self.final_addr, U.EFI_TCG2_FINAL_EVENTS_TABLE)
        table.NumberOfEvents = len(self.final_events)
        self.mem.write_struct(self.final_addr, table)
        return S.SUCCESS, ev.offset, True

    def final_events_bytes(self) -> bytes:
        """The EFI_TCG2_FINAL_EVENTS_TABLE as it stands in guest memory (header + events)."""
        return self.mem.read(self.final_addr, FINAL_EVENTS_HEADER + self.final_used)

    def log_bytes(self) -> bytes:
        return self.mem.read(self.log_addr, self.log.size)

    # --- what firmware measures around a boot (EDK2 Tcg2Dxe) -------------------------------
    def secure_boot_policy(self) -> None:
        """PCR 7: SecureBoot, PK, KEK, db, dbx as EV_EFI_VARIABLE_DRIVER_CONFIG (a missing
        variable measured empty), then the PCR 7 separator (MeasureSecureBootPolicy)."""
        store = getattr(self.fw, "variables", None)
        for name, guid in (("SecureBoot", G.EFI_GLOBAL_VARIABLE), ("PK", G.EFI_GLOBAL_VARIABLE),
                           ("KEK", G.EFI_GLOBAL_VARIABLE), ("db", G.EFI_IMAGE_SECURITY_DATABASE),
                           ("dbx", G.EFI_IMAGE_SECURITY_DATABASE)):
            value = b""
            if store is not None:
                try:
                    value = store.get(name, guid).data
                except EfiError:
                    value = b""
            vd = T.variable_data(name, guid, value)
            self.measure(7, T.EV_EFI_VARIABLE_DRIVER_CONFIG, vd, data=vd)
        self.measure(7, T.EV_SEPARATOR, T.SEPARATOR_DATA, data=T.SEPARATOR_DATA)

    def kexec_boundary(self) -> None:
        pcr, etype, data, digests = KL.boundary_event(self.banks)
        self.measure(pcr, etype, data, digests=digests)

    def ready_to_boot(self) -> None:
        """OnReadyToBoot (first attempt): PCR 4 "Calling EFI Application from Boot Option",
        then EV_SEPARATOR on PCR 0-6."""
        self.measure(4, T.EV_EFI_ACTION, T.CALLING_EFI_APPLICATION, data=T.CALLING_EFI_APPLICATION)
        for pcr in range(7):
            self.measure(pcr, T.EV_SEPARATOR, T.SEPARATOR_DATA, data=T.SEPARATOR_DATA)

    def image_digests(self, pe_bytes: bytes) -> dict[str, bytes]:
        """The Authenticode digests of a PE file image in every bank (what :meth:`measure_image`
        extends), hashed in pieces with the run's deadline checked between them; EFI_LOAD_ERROR
        for an image whose hash cannot be computed (§7.4 LoadImage: "the image format was
        corrupt")."""
        try:
            return T.authenticode_digests(pe_bytes, self.banks, tick=self._tick)
        except T.PeHashError as e:
            raise EfiError(S.LOAD_ERROR, f"PE image hash: {e}") from None

    def measure_image(self, image_base: int, image_size: int, pe_bytes: bytes, device_path: bytes = b"",
                      *, link_time_address: int | None = None, subsystem: int | None = None,
                      digests: dict[str, bytes] | None = None) -> int:
        """DxeTpm2MeasureBootLib's Tcg2MeasurePeImage: PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION
        (PCR 2 EV_EFI_BOOT_SERVICES_DRIVER / _RUNTIME_SERVICES_DRIVER for drivers), digest = the
        Authenticode hash of the file image (``digests`` when already computed by
        :meth:`image_digests`), data = UEFI_IMAGE_LOAD_EVENT."""
        hdr = _pe_header_fields(pe_bytes)
        if subsystem is None:
            subsystem = hdr["subsystem"]
        if link_time_address is None:
            link_time_address = hdr["image_base"]
        pcr, etype = {PE.SUBSYSTEM_EFI_APPLICATION: (4, T.EV_EFI_BOOT_SERVICES_APPLICATION),
                      PE.SUBSYSTEM_EFI_BOOT_SERVICE_DRIVER: (2, T.EV_EFI_BOOT_SERVICES_DRIVER),
                      PE.SUBSYSTEM_EFI_RUNTIME_DRIVER: (2, T.EV_EFI_RUNTIME_SERVICES_DRIVER),
                      }.get(subsystem, (None, None))
        if pcr is None:
            raise EfiError(S.UNSUPPORTED, f"PE subsystem {subsystem} is not measured")
        if digests is None:
            digests = self.image_digests(pe_bytes)
        event = T.image_load_event(image_base, image_size, link_time_address, device_path)
        return self.measure(pcr, etype, event, digests=digests)

    def exit_boot_services(self, success: bool = True) -> None:
        """OnExitBootServices / OnExitBootServicesFailed: PCR 5 EV_EFI_ACTION
        "Exit Boot Services Invocation", then "... Returned with Success" (or "... Failure")."""
        self.measure(5, T.EV_EFI_ACTION, T.EXIT_BOOT_SERVICES_INVOCATION,
                     data=T.EXIT_BOOT_SERVICES_INVOCATION)
        result = T.EXIT_BOOT_SERVICES_SUCCEEDED if success else T.EXIT_BOOT_SERVICES_FAILED
        self.measure(5, T.EV_EFI_ACTION, result, data=result)

    # --- EFI_TCG2_PROTOCOL --------------------------------------------------------------------
    @efiapi("GetCapability", ("this", PTR), ("protocol_capability", PTR))
    def get_capability(self, this, protocol_capability):
        have = self.mem.read_u8(protocol_capability)  # Size, the caller's structure size
        cap = self.capability()
        if have < CAPABILITY_SIZE_1_1:
            if have >= CAPABILITY_SIZE_1_0:
                # a 1.0 caller (EDK2: "firmware supports 1.1 but the OS only 1.0"): the structure
                # up to ManufacturerID, versions 1.0
                cap.Size = CAPABILITY_SIZE_1_0
                cap.StructureVersion = cap.ProtocolVersion = U.EFI_TCG2_VERSION(1, 0)
                self.mem.write(protocol_capability, bytes(cap)[:CAPABILITY_SIZE_1_0])
                return S.SUCCESS
            self.mem.write_u8(protocol_capability, CAPABILITY_SIZE_1_1)
            raise EfiError(S.BUFFER_TOO_SMALL, f"Size {have} < {CAPABILITY_SIZE_1_1}")
        self.mem.write_struct(protocol_capability, cap)
        return S.SUCCESS

    @efiapi("GetEventLog", ("this", PTR), ("event_log_format", U32), ("event_log_location", OPTPTR),
            ("event_log_last_entry", OPTPTR), ("event_log_truncated", OPTPTR))
    def get_event_log(self, this, event_log_format, event_log_location, event_log_last_entry,
                      event_log_truncated):
        if event_log_format != EVENT_LOG_FORMAT_TCG_2:
            what = "TCG 1.2 (SHA1) log is not kept" if event_log_format == EVENT_LOG_FORMAT_TCG_1_2 \
                else f"unknown format {event_log_format:#x}"
            raise EfiError(S.INVALID_PARAMETER, what)
        if event_log_location:
            self.mem.write_u64(event_log_location, self.log_addr)
        if event_log_last_entry:
            self.mem.write_u64(event_log_last_entry, self.log_addr + self.log.last_offset)
        if event_log_truncated:
            self.mem.write_u8(event_log_truncated, 1 if self.log.truncated else 0)
        self.get_event_log_called = True
        return S.SUCCESS

    @efiapi("HashLogExtendEvent", ("this", PTR), ("flags", U64), ("data_to_hash", U64),
            ("data_to_hash_len", U64), ("efi_tcg_event", PTR))
    def hash_log_extend_event(self, this, flags, data_to_hash, data_to_hash_len, efi_tcg_event):
        ev = self.mem.read_struct(efi_tcg_event, U.EFI_TCG2_EVENT)
        size, hdr = ev.Size, ev.Header
        header_size, header_version, pcr, event_type = hdr.HeaderSize, hdr.HeaderVersion, hdr.PCRIndex, hdr.EventType
        if header_size < EVENT_HEADER_SIZE or header_version != U.EFI_TCG2_EVENT_HEADER.VERSION:
            raise EfiError(S.INVALID_PARAMETER,
                           f"event header size {header_size} version {header_version} (need >= 14, 1)")
        if size < header_size + 4:
            raise EfiError(S.INVALID_PARAMETER, f"event Size {size} < HeaderSize {header_size} + 4")
        if size > MAX_EVENT_SIZE:
            raise EfiError(S.INVALID_PARAMETER, f"event Size {size} is larger than the event log "
                                                f"({MAX_EVENT_SIZE} bytes)")
        if event_type != T.EV_NO_ACTION and data_to_hash == 0:
            raise EfiError(S.INVALID_PARAMETER, "DataToHash is NULL")
        if pcr > T.MAX_PCR_INDEX:
            if event_type == T.EV_NO_ACTION:
                raise EfiError(S.UNSUPPORTED, f"EV_NO_ACTION to NV index {pcr:#x}: no NV indices")
            raise EfiError(S.INVALID_PARAMETER, f"PCRIndex {pcr} > {T.MAX_PCR_INDEX}")
        header_at = U.EFI_TCG2_EVENT.Header.offset  # Event follows the HeaderSize-byte header
        event_data = self.mem.read(efi_tcg_event + header_at + header_size, size - header_at - header_size)
        extend_only = bool(flags & EFI_TCG2_EXTEND_ONLY)
        if event_type == T.EV_NO_ACTION:
            return self.measure(pcr, event_type, event_data, extend_only=extend_only)
        if not self.mem.contains(data_to_hash, data_to_hash_len):
            raise EfiError(S.INVALID_PARAMETER, f"DataToHash {data_to_hash:#x}+{data_to_hash_len:#x} "
                                                "is outside guest memory")
        if flags & PE_COFF_IMAGE:
            if data_to_hash_len > MAX_PE_HASH_SIZE:
                raise EfiError(S.INVALID_PARAMETER, f"PE/COFF image of {data_to_hash_len:#x} bytes is "
                                                    f"larger than the {MAX_PE_HASH_SIZE >> 20} MiB vmrun hashes")
            buf = self.mem.read(data_to_hash, data_to_hash_len)
            try:
                digests = T.authenticode_digests(buf, self.banks, tick=self._tick)
            except T.PeHashError as e:
                raise EfiError(S.UNSUPPORTED, f"PE/COFF image: {e}") from None
            return self.measure(pcr, event_type, event_data, digests=digests, extend_only=extend_only)
        # plain data: hashed straight from guest memory in pieces, no host copy
        hashes = {b: hashlib.new(b) for b in self.banks}
        done = 0
        while done < data_to_hash_len:
            self._tick()
            n = min(HASH_CHUNK, data_to_hash_len - done)
            view = self.mem.view(data_to_hash + done, n)
            try:
                for h in hashes.values():
                    h.update(view)
            finally:
                view.release()
            done += n
        digests = {b: h.digest() for b, h in hashes.items()}
        return self.measure(pcr, event_type, event_data, digests=digests, extend_only=extend_only)

    @efiapi("SubmitCommand", ("this", PTR), ("input_parameter_block_size", U32),
            ("input_parameter_block", PTR), ("output_parameter_block_size", U32),
            ("output_parameter_block", PTR))
    def submit_command(self, this, input_parameter_block_size, input_parameter_block,
                       output_parameter_block_size, output_parameter_block):
        raise EfiError(S.UNSUPPORTED, "the software TPM has no command interface")

    @efiapi("GetActivePcrBanks", ("this", PTR), ("active_pcr_banks", PTR))
    def get_active_pcr_banks(self, this, active_pcr_banks):
        self.mem.write_u32(active_pcr_banks, self.bitmap)
        return S.SUCCESS

    @efiapi("SetActivePcrBanks", ("this", PTR), ("active_pcr_banks", U32))
    def set_active_pcr_banks(self, this, active_pcr_banks):
        if active_pcr_banks == 0 or active_pcr_banks & ~self.bitmap:
            raise EfiError(S.INVALID_PARAMETER, f"banks {active_pcr_banks:#x} not within {self.bitmap:#x}")
        if active_pcr_banks == self.bitmap:
            return S.SUCCESS  # already active (the spec's and EDK2's no-op)
        raise EfiError(S.UNSUPPORTED, "PCR banks cannot be changed (no reboot)")

    @efiapi("GetResultOfSetActivePcrBanks", ("this", PTR), ("operation_present", PTR), ("response", PTR))
    def get_result_of_set_active_pcr_banks(self, this, operation_present, response):
        raise EfiError(S.UNSUPPORTED, "PCR banks cannot be changed")


def _pages(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE


def _pe_header_fields(pe: bytes) -> dict:
    try:
        nt = struct.unpack_from("<I", pe, 0x3C)[0] if pe[:2] == b"MZ" else 0
        opt = nt + 24
        magic = struct.unpack_from("<H", pe, opt)[0]
        if magic == 0x20B:
            image_base = struct.unpack_from("<Q", pe, opt + 24)[0]
        else:
            image_base = struct.unpack_from("<I", pe, opt + 28)[0]
        subsystem = struct.unpack_from("<H", pe, opt + 68)[0]
    except struct.error:
        raise EfiError(S.UNSUPPORTED, "not a PE image") from None
    return {"image_base": image_base, "subsystem": subsystem}


# --- call sites for the lead: no-ops without a TPM -----------------------------------------------

def install(fw, banks: Iterable[str] = DEFAULT_BANKS, **kw) -> Tcg2:
    """Install EFI_TCG2_PROTOCOL (``mirror=``: :class:`Mirror` of the machine's own TPM)."""
    t = Tcg2(fw, banks, **kw)
    t.install()
    return t


def separators(fw, *, secure_boot_policy: bool = True) -> None:
    """Before the OS loader is measured: PCR 7 policy + separator, PCR 4 "Calling EFI
    Application from Boot Option", EV_SEPARATOR on PCR 0-6 (EDK2 order)."""
    t = getattr(fw, "tcg2", None)
    if t is None:
        return
    if t.mirror is not None:
        # the machine's firmware measured its separators at its own ReadyToBoot: a measured
        # kexec continues its log with the boundary instead (hostsvc.kexeclog)
        t.kexec_boundary()
        return
    if secure_boot_policy:
        t.secure_boot_policy()
    else:
        t.measure(7, T.EV_SEPARATOR, T.SEPARATOR_DATA, data=T.SEPARATOR_DATA)
    t.ready_to_boot()


def image_digests(fw, pe_bytes: bytes) -> dict[str, bytes] | None:
    """The Authenticode digests :func:`measure_image` will extend (None without a TPM); raises
    EfiError(EFI_LOAD_ERROR) for an image that cannot be hashed, before anything is allocated."""
    t = getattr(fw, "tcg2", None)
    return None if t is None else t.image_digests(pe_bytes)


def measure_image(fw, image_base: int, image_size: int, pe_bytes: bytes, device_path_bytes: bytes = b"",
                  **kw) -> None:
    t = getattr(fw, "tcg2", None)
    if t is not None:
        t.measure_image(image_base, image_size, pe_bytes, device_path_bytes, **kw)


def exit_boot_services(fw, success: bool = True) -> None:
    t = getattr(fw, "tcg2", None)
    if t is not None:
        t.exit_boot_services(success)
