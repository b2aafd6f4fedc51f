"""The UEFI (and TCG) data structures the firmware writes into guest memory, each described once,
as ctypes structures in the C layout (little-endian, natural alignment unless the specification
packs the structure), and the constants that go with them (signatures, revisions, EFI_MEMORY_TYPE,
EFI_ALLOCATE_TYPE, memory attributes).

Every structure carries its specification name, so that ``tests/unit/test_uefi_types.py``
can check ``sizeof`` and every field offset against the C definitions the EFI test applications
are built with (``tests/efi/include/efi.h``, compiled by mingw-w64). Call sites read and write
them with :meth:`vmrun.vm.memory.GuestMemory.read_struct` / ``write_struct`` instead of raw
offsets and ``struct`` format strings.

Guest addresses (pointers, EFI_HANDLE, EFI_EVENT) and function pointers are plain 64-bit
integers here. A table of functions lists its slots in spec order in ``FUNCTIONS``; the
firmware points each at a service thunk (:meth:`hostsvc.firmware.Firmware.interface`), and the
ordered name lists the services are registered with are derived from it (:func:`function_names`).

References: UEFI 2.10 (section numbers below); TCG EFI Protocol Specification rev 00.13 §6
(EFI_TCG2_*), TCG PC Client Platform Firmware Profile 1.05 §10.2 (event log structures).
"""

from __future__ import annotations

import ctypes
import enum
import uuid

# --- 2.3.1 data types ---------------------------------------------------------------------------
UINT8 = ctypes.c_uint8
UINT16 = ctypes.c_uint16
UINT32 = ctypes.c_uint32
UINT64 = ctypes.c_uint64
INT16 = ctypes.c_int16
INT32 = ctypes.c_int32
BOOLEAN = ctypes.c_uint8
CHAR16 = ctypes.c_uint16
UINTN = UINT64
#: A guest address: VOID *, EFI_HANDLE, EFI_EVENT, a pointer to a table or a string.
POINTER = UINT64
EFI_PHYSICAL_ADDRESS = UINT64
#: An EFIAPI function pointer (the address of a service thunk).
FUNCTION = UINT64


class Struct(ctypes.LittleEndianStructure):
    """A C structure with the layout of its UEFI definition (natural alignment)."""

    def __repr__(self) -> str:
        parts = []
        for name, *_ in self._fields_:
            v = getattr(self, name)
            parts.append(f"{name}={v:#x}" if isinstance(v, int) else f"{name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class PackedStruct(ctypes.LittleEndianStructure):
    """A structure the specification declares inside ``#pragma pack(1)``."""

    _pack_ = 1
    __repr__ = Struct.__repr__


def functions(*names: str) -> list[tuple[str, type]]:
    """``_fields_`` entries for a run of EFIAPI function pointers, in the order given."""
    return [(n, FUNCTION) for n in names]


def function_names(table: type) -> list[str]:
    """The function-pointer slots of a table or protocol interface, in spec order."""
    return list(table.FUNCTIONS)


# --- 4.2 EFI table header ------------------------------------------------------------------------
EFI_2_70_SYSTEM_TABLE_REVISION = (2 << 16) | 70


class EFI_TABLE_HEADER(Struct):
    _fields_ = [
        ("Signature", UINT64),
        ("Revision", UINT32),
        ("HeaderSize", UINT32),
        ("CRC32", UINT32),
        ("Reserved", UINT32),
    ]


def table_header(table: type, revision: int = EFI_2_70_SYSTEM_TABLE_REVISION) -> EFI_TABLE_HEADER:
    """The header of ``table`` (a structure with SIGNATURE): signature, revision, its size; the
    CRC32 is computed once the table is in guest memory (:func:`hostsvc.firmware.write_crc`)."""
    return EFI_TABLE_HEADER(Signature=table.SIGNATURE, Revision=revision, HeaderSize=ctypes.sizeof(table))


class EFI_GUID(Struct):
    """Appendix A: {UINT32, UINT16, UINT16, UINT8[8]}, i.e. :attr:`uuid.UUID.bytes_le`."""

    _fields_ = [
        ("Data1", UINT32),
        ("Data2", UINT16),
        ("Data3", UINT16),
        ("Data4", UINT8 * 8),
    ]

    @classmethod
    def from_uuid(cls, value: uuid.UUID | str) -> "EFI_GUID":
        return cls.from_buffer_copy((value if isinstance(value, uuid.UUID) else uuid.UUID(value)).bytes_le)

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(self))

    def __repr__(self) -> str:
        return f"EFI_GUID({self.uuid})"


# --- 4.5 EFI_RUNTIME_SERVICES ---------------------------------------------------------------------
class EFI_RUNTIME_SERVICES(Struct):
    SIGNATURE = 0x56524553544E5552  # "RUNTSERV"
    FUNCTIONS = (
        "GetTime", "SetTime", "GetWakeupTime", "SetWakeupTime",
        "SetVirtualAddressMap", "ConvertPointer",
        "GetVariable", "GetNextVariableName", "SetVariable",
        "GetNextHighMonotonicCount", "ResetSystem",
        "UpdateCapsule", "QueryCapsuleCapabilities", "QueryVariableInfo",
    )
    _fields_ = [("Hdr", EFI_TABLE_HEADER), *functions(*FUNCTIONS)]


# --- 4.4 EFI_BOOT_SERVICES -------------------------------------------------------------------------
class EFI_BOOT_SERVICES(Struct):
    """``Reserved`` is a VOID * in the spec; vmrun points it at a thunk too (a call answers
    EFI_UNSUPPORTED and is traced, rather than jumping to NULL)."""

    SIGNATURE = 0x56524553544F4F42  # "BOOTSERV"
    FUNCTIONS = (
        "RaiseTPL", "RestoreTPL",
        "AllocatePages", "FreePages", "GetMemoryMap", "AllocatePool", "FreePool",
        "CreateEvent", "SetTimer", "WaitForEvent", "SignalEvent", "CloseEvent", "CheckEvent",
        "InstallProtocolInterface", "ReinstallProtocolInterface", "UninstallProtocolInterface",
        "HandleProtocol", "Reserved", "RegisterProtocolNotify", "LocateHandle", "LocateDevicePath",
        "InstallConfigurationTable",
        "LoadImage", "StartImage", "Exit", "UnloadImage", "ExitBootServices",
        "GetNextMonotonicCount", "Stall", "SetWatchdogTimer",
        "ConnectController", "DisconnectController",
        "OpenProtocol", "CloseProtocol", "OpenProtocolInformation",
        "ProtocolsPerHandle", "LocateHandleBuffer", "LocateProtocol",
        "InstallMultipleProtocolInterfaces", "UninstallMultipleProtocolInterfaces",
        "CalculateCrc32", "CopyMem", "SetMem", "CreateEventEx",
    )
    _fields_ = [("Hdr", EFI_TABLE_HEADER), *functions(*FUNCTIONS)]


# --- 4.6 EFI_CONFIGURATION_TABLE, 4.6.2 EFI_RT_PROPERTIES_TABLE -------------------------------------
class EFI_CONFIGURATION_TABLE(Struct):
    _fields_ = [
        ("VendorGuid", EFI_GUID),
        ("VendorTable", POINTER),
    ]


class EFI_RT_PROPERTIES_TABLE(Struct):
    VERSION = 0x1  # EFI_RT_PROPERTIES_TABLE_VERSION
    _fields_ = [
        ("Version", UINT16),
        ("Length", UINT16),
        ("RuntimeServicesSupported", UINT32),
    ]


# --- 4.3 EFI_SYSTEM_TABLE ---------------------------------------------------------------------------
class EFI_SYSTEM_TABLE(Struct):
    SIGNATURE = 0x5453595320494249  # "IBI SYST"
    _fields_ = [
        ("Hdr", EFI_TABLE_HEADER),
        ("FirmwareVendor", POINTER),
        ("FirmwareRevision", UINT32),
        ("ConsoleInHandle", POINTER),
        ("ConIn", POINTER),
        ("ConsoleOutHandle", POINTER),
        ("ConOut", POINTER),
        ("StandardErrorHandle", POINTER),
        ("StdErr", POINTER),
        ("RuntimeServices", POINTER),
        ("BootServices", POINTER),
        ("NumberOfTableEntries", UINTN),
        ("ConfigurationTable", POINTER),
    ]


# --- 7.2 memory allocation services -------------------------------------------------------------------
class MemType(enum.IntEnum):
    """EFI_MEMORY_TYPE (§7.2.1 AllocatePages, Related Definitions)."""

    ReservedMemoryType = 0
    LoaderCode = 1
    LoaderData = 2
    BootServicesCode = 3
    BootServicesData = 4
    RuntimeServicesCode = 5
    RuntimeServicesData = 6
    ConventionalMemory = 7
    UnusableMemory = 8
    ACPIReclaimMemory = 9
    ACPIMemoryNVS = 10
    MemoryMappedIO = 11
    MemoryMappedIOPortSpace = 12
    PalCode = 13
    PersistentMemory = 14
    UnacceptedMemoryType = 15


MAX_MEMORY_TYPE = 16  # EfiMaxMemoryType
OEM_RESERVED_MIN = 0x7000_0000  # 0x70000000..0x7FFFFFFF: OEM; 0x80000000..0xFFFFFFFF: OS loaders
MEMORY_TYPE_MAX_VALUE = 0xFFFF_FFFF


class AllocType(enum.IntEnum):
    """EFI_ALLOCATE_TYPE (§7.2.1)."""

    AnyPages = 0
    MaxAddress = 1
    Address = 2


MAX_ALLOCATE_TYPE = 3

# Memory attribute definitions (§7.2.3 GetMemoryMap).
EFI_MEMORY_UC = 0x1
EFI_MEMORY_WC = 0x2
EFI_MEMORY_WT = 0x4
EFI_MEMORY_WB = 0x8
EFI_MEMORY_UCE = 0x10
EFI_MEMORY_WP = 0x1000
EFI_MEMORY_RP = 0x2000
EFI_MEMORY_XP = 0x4000
EFI_MEMORY_NV = 0x8000
EFI_MEMORY_MORE_RELIABLE = 0x10000
EFI_MEMORY_RO = 0x20000
EFI_MEMORY_SP = 0x40000
EFI_MEMORY_CPU_CRYPTO = 0x80000
EFI_MEMORY_ISA_VALID = 1 << 62
EFI_MEMORY_RUNTIME = 1 << 63

EFI_MEMORY_DESCRIPTOR_VERSION = 1


class EFI_MEMORY_DESCRIPTOR(Struct):
    _fields_ = [
        ("Type", UINT32),
        ("PhysicalStart", EFI_PHYSICAL_ADDRESS),
        ("VirtualStart", UINT64),
        ("NumberOfPages", UINT64),
        ("Attribute", UINT64),
    ]


# --- 7.3 protocol handler services ----------------------------------------------------------------------
class EFI_OPEN_PROTOCOL_INFORMATION_ENTRY(Struct):
    _fields_ = [
        ("AgentHandle", POINTER),
        ("ControllerHandle", POINTER),
        ("Attributes", UINT32),
        ("OpenCount", UINT32),
    ]


# --- 8.3 time services ------------------------------------------------------------------------------
class EFI_TIME(Struct):
    _fields_ = [
        ("Year", UINT16),
        ("Month", UINT8),
        ("Day", UINT8),
        ("Hour", UINT8),
        ("Minute", UINT8),
        ("Second", UINT8),
        ("Pad1", UINT8),
        ("Nanosecond", UINT32),
        ("TimeZone", INT16),
        ("Daylight", UINT8),
        ("Pad2", UINT8),
    ]


EFI_UNSPECIFIED_TIMEZONE = 0x07FF


class EFI_TIME_CAPABILITIES(Struct):
    _fields_ = [
        ("Resolution", UINT32),
        ("Accuracy", UINT32),
        ("SetsToZero", BOOLEAN),
    ]


# --- 9.1 EFI_LOADED_IMAGE_PROTOCOL -------------------------------------------------------------------
class EFI_LOADED_IMAGE_PROTOCOL(Struct):
    REVISION = 0x1000  # EFI_LOADED_IMAGE_PROTOCOL_REVISION
    _fields_ = [
        ("Revision", UINT32),
        ("ParentHandle", POINTER),
        ("SystemTable", POINTER),
        ("DeviceHandle", POINTER),
        ("FilePath", POINTER),
        ("Reserved", POINTER),
        ("LoadOptionsSize", UINT32),
        ("LoadOptions", POINTER),
        ("ImageBase", POINTER),
        ("ImageSize", UINT64),
        ("ImageCodeType", UINT32),
        ("ImageDataType", UINT32),
        ("Unload", FUNCTION),
    ]


# --- 10.2 EFI_DEVICE_PATH_PROTOCOL (the node header) -------------------------------------------------
class EFI_DEVICE_PATH_PROTOCOL(Struct):
    _fields_ = [
        ("Type", UINT8),
        ("SubType", UINT8),
        ("Length", UINT8 * 2),
    ]

    @property
    def length(self) -> int:
        return self.Length[0] | self.Length[1] << 8


class EFI_DEVICE_PATH_TO_TEXT_PROTOCOL(Struct):  # 10.6.2
    FUNCTIONS = ("ConvertDeviceNodeToText", "ConvertDevicePathToText")
    _fields_ = functions(*FUNCTIONS)


class EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL(Struct):  # 10.6.3
    FUNCTIONS = ("ConvertTextToDeviceNode", "ConvertTextToDevicePath")
    _fields_ = functions(*FUNCTIONS)


# --- 12.3 / 12.4 simple text input / output ---------------------------------------------------------
class EFI_SIMPLE_TEXT_INPUT_PROTOCOL(Struct):
    FUNCTIONS = ("Reset", "ReadKeyStroke")
    _fields_ = [*functions(*FUNCTIONS), ("WaitForKey", POINTER)]


class SIMPLE_TEXT_OUTPUT_MODE(Struct):
    _fields_ = [
        ("MaxMode", INT32),
        ("Mode", INT32),
        ("Attribute", INT32),
        ("CursorColumn", INT32),
        ("CursorRow", INT32),
        ("CursorVisible", BOOLEAN),
    ]


class EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL(Struct):
    FUNCTIONS = ("Reset", "OutputString", "TestString", "QueryMode", "SetMode", "SetAttribute",
                 "ClearScreen", "SetCursorPosition", "EnableCursor")
    _fields_ = [*functions(*FUNCTIONS), ("Mode", POINTER)]


# --- 13.2 EFI_LOAD_FILE2_PROTOCOL ----------------------------------------------------------------------
class EFI_LOAD_FILE2_PROTOCOL(Struct):
    FUNCTIONS = ("LoadFile",)
    _fields_ = functions(*FUNCTIONS)


# --- 13.4 / 13.5 file system ---------------------------------------------------------------------------
class EFI_SIMPLE_FILE_SYSTEM_PROTOCOL(Struct):
    REVISION = 0x00010000  # EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_REVISION
    FUNCTIONS = ("OpenVolume",)
    _fields_ = [("Revision", UINT64), *functions(*FUNCTIONS)]


class EFI_FILE_PROTOCOL(Struct):
    """The revision-2 layout (OpenEx … FlushEx present); ``Revision`` says 1, as vmrun implements
    none of the asynchronous functions."""

    REVISION = 0x00010000  # EFI_FILE_PROTOCOL_REVISION
    FUNCTIONS = ("Open", "Close", "Delete", "Read", "Write", "GetPosition", "SetPosition", "GetInfo",
                 "SetInfo", "Flush", "OpenEx", "ReadEx", "WriteEx", "FlushEx")
    _fields_ = [("Revision", UINT64), *functions(*FUNCTIONS)]


class EFI_FILE_INFO(Struct):
    """§13.5.16; ``FileName`` (CHAR16[], NUL-terminated) follows at SIZE_OF_EFI_FILE_INFO."""

    _fields_ = [
        ("Size", UINT64),
        ("FileSize", UINT64),
        ("PhysicalSize", UINT64),
        ("CreateTime", EFI_TIME),
        ("LastAccessTime", EFI_TIME),
        ("ModificationTime", EFI_TIME),
        ("Attribute", UINT64),
        ("FileName", CHAR16 * 0),
    ]


SIZE_OF_EFI_FILE_INFO = EFI_FILE_INFO.FileName.offset


class EFI_FILE_SYSTEM_INFO(Struct):
    """§13.5.17; ``VolumeLabel`` (CHAR16[]) follows at SIZE_OF_EFI_FILE_SYSTEM_INFO."""

    _fields_ = [
        ("Size", UINT64),
        ("ReadOnly", BOOLEAN),
        ("VolumeSize", UINT64),
        ("FreeSpace", UINT64),
        ("BlockSize", UINT32),
        ("VolumeLabel", CHAR16 * 0),
    ]


SIZE_OF_EFI_FILE_SYSTEM_INFO = EFI_FILE_SYSTEM_INFO.VolumeLabel.offset


# --- 37.5 EFI_RNG_PROTOCOL ----------------------------------------------------------------------------
class EFI_RNG_PROTOCOL(Struct):
    FUNCTIONS = ("GetInfo", "GetRNG")
    _fields_ = functions(*FUNCTIONS)


# --- TCG EFI Protocol Specification §6: EFI_TCG2_PROTOCOL ---------------------------------------------
class EFI_TCG2_PROTOCOL(Struct):
    FUNCTIONS = ("GetCapability", "GetEventLog", "HashLogExtendEvent", "SubmitCommand",
                 "GetActivePcrBanks", "SetActivePcrBanks", "GetResultOfSetActivePcrBanks")
    _fields_ = functions(*FUNCTIONS)


class EFI_TCG2_VERSION(Struct):
    _fields_ = [("Major", UINT8), ("Minor", UINT8)]


class EFI_TCG2_BOOT_SERVICE_CAPABILITY(Struct):
    """Natural alignment (not packed in the spec or in EDK2). The 1.0 structure
    (TREE_BOOT_SERVICE_CAPABILITY_1_0) ends before NumberOfPCRBanks."""

    _fields_ = [
        ("Size", UINT8),
        ("StructureVersion", EFI_TCG2_VERSION),
        ("ProtocolVersion", EFI_TCG2_VERSION),
        ("HashAlgorithmBitmap", UINT32),
        ("SupportedEventLogs", UINT32),
        ("TPMPresentFlag", BOOLEAN),
        ("MaxCommandSize", UINT16),
        ("MaxResponseSize", UINT16),
        ("ManufacturerID", UINT32),
        ("NumberOfPCRBanks", UINT32),
        ("ActivePcrBanks", UINT32),
    ]


class EFI_TCG2_EVENT_HEADER(PackedStruct):
    VERSION = 1  # EFI_TCG2_EVENT_HEADER_VERSION
    _fields_ = [
        ("HeaderSize", UINT32),
        ("HeaderVersion", UINT16),
        ("PCRIndex", UINT32),
        ("EventType", UINT32),
    ]


class EFI_TCG2_EVENT(PackedStruct):
    """Packed; the event data (``Event``) follows the header."""

    _fields_ = [
        ("Size", UINT32),
        ("Header", EFI_TCG2_EVENT_HEADER),
        ("Event", UINT8 * 0),
    ]


class EFI_TCG2_FINAL_EVENTS_TABLE(Struct):
    """The header; TCG_PCR_EVENT2 records (variable-sized) follow it."""

    VERSION = 1  # EFI_TCG2_FINAL_EVENTS_TABLE_VERSION
    _fields_ = [
        ("Version", UINT64),
        ("NumberOfEvents", UINT64),
    ]


# --- TCG PC Client Platform Firmware Profile §10.2: event log records and event data -------------------
class TCG_PCR_EVENT(PackedStruct):
    """The SHA1-format record (only the log's first, Spec ID, event); the event data follows."""

    _fields_ = [
        ("PCRIndex", UINT32),
        ("EventType", UINT32),
        ("Digest", UINT8 * 20),
        ("EventSize", UINT32),
        ("Event", UINT8 * 0),
    ]


class TCG_EfiSpecIdEventAlgorithmSize(PackedStruct):
    _fields_ = [("algorithmId", UINT16), ("digestSize", UINT16)]


class TCG_EfiSpecIDEventStruct(PackedStruct):
    """"Spec ID Event03": this header, numberOfAlgorithms TCG_EfiSpecIdEventAlgorithmSize, then
    UINT8 vendorInfoSize and the vendor info."""

    _fields_ = [
        ("signature", UINT8 * 16),
        ("platformClass", UINT32),
        ("specVersionMinor", UINT8),
        ("specVersionMajor", UINT8),
        ("specErrata", UINT8),
        ("uintnSize", UINT8),
        ("numberOfAlgorithms", UINT32),
        ("digestSizes", TCG_EfiSpecIdEventAlgorithmSize * 0),
    ]


class TCG_EfiStartupLocalityEvent(PackedStruct):
    """"StartupLocality": the locality of TPM2_Startup (an EV_NO_ACTION event's data)."""

    _fields_ = [
        ("Signature", UINT8 * 16),
        ("StartupLocality", UINT8),
    ]


class TCG_PCClientTaggedEvent(PackedStruct):
    _fields_ = [
        ("taggedEventID", UINT32),
        ("taggedEventDataSize", UINT32),
        ("taggedEventData", UINT8 * 0),
    ]


class UEFI_IMAGE_LOAD_EVENT(PackedStruct):
    """EDK2's EFI_IMAGE_LOAD_EVENT (UINTN = 8); the device path follows."""

    _fields_ = [
        ("ImageLocationInMemory", EFI_PHYSICAL_ADDRESS),
        ("ImageLengthInMemory", UINT64),
        ("ImageLinkTimeAddress", UINT64),
        ("LengthOfDevicePath", UINT64),
        ("DevicePath", UINT8 * 0),
    ]


class UEFI_VARIABLE_DATA(PackedStruct):
    """The name (UnicodeNameLength CHAR16, no NUL) and then the data follow."""

    _fields_ = [
        ("VariableName", EFI_GUID),
        ("UnicodeNameLength", UINT64),
        ("VariableDataLength", UINT64),
        ("UnicodeName", CHAR16 * 0),
    ]


def structures() -> dict[str, type]:
    """Every structure defined here, by its C name."""
    return {name: obj for name, obj in globals().items()
            if isinstance(obj, type) and issubclass(obj, (Struct, PackedStruct))
            and obj not in (Struct, PackedStruct)}
