/*
 * Minimal UEFI definitions for the vmrun EFI test applications.
 *
 * Written from the UEFI Specification 2.10 (chapters 4, 7, 8, 9, 10, 12, 13, 37),
 * the TCG EFI Protocol Specification (EFI_TCG2_*) and the TCG PC Client Platform
 * Firmware Profile 1.05 section 10.2 (event log structures).  What the tests in
 * tests/efi/ use, plus every structure vmrun's firmware (hostsvc/uefi_types.py)
 * writes: tests/unit/test_uefi_types.py checks that module's sizes and offsets
 * against this header.  Table layouts follow the spec order exactly: the
 * firmware under test is addressed through these offsets.
 *
 * Calling convention: UEFI x64 uses the Microsoft x64 ABI.  mingw-w64 already
 * defaults to it; EFIAPI spells it out so the header also works elsewhere.
 */
#ifndef VMRUN_TEST_EFI_H
#define VMRUN_TEST_EFI_H

#define EFIAPI __attribute__((ms_abi))
#define IN
#define OUT
#define OPTIONAL

/* ---- 2.3.1 Data types ------------------------------------------------- */
typedef unsigned char       UINT8;
typedef signed char         INT8;
typedef unsigned short      UINT16;
typedef signed short        INT16;
typedef unsigned int        UINT32;
typedef signed int          INT32;
typedef unsigned long long  UINT64;
typedef signed long long    INT64;
typedef UINT64              UINTN;
typedef INT64               INTN;
typedef UINT8               BOOLEAN;
typedef unsigned short      CHAR16;   /* UCS-2; build with -fshort-wchar */
typedef char                CHAR8;
typedef void                VOID;
typedef UINTN               EFI_STATUS;
typedef VOID               *EFI_HANDLE;
typedef VOID               *EFI_EVENT;
typedef UINTN               EFI_TPL;
typedef UINT64              EFI_LBA;
typedef UINT64              EFI_PHYSICAL_ADDRESS;
typedef UINT64              EFI_VIRTUAL_ADDRESS;

#define TRUE  ((BOOLEAN)1)
#define FALSE ((BOOLEAN)0)
#ifndef NULL
#define NULL  ((VOID *)0)
#endif

typedef struct {
    UINT32 Data1;
    UINT16 Data2;
    UINT16 Data3;
    UINT8  Data4[8];
} EFI_GUID;

/* ---- Appendix D Status codes ----------------------------------------- */
#define EFI_ERROR_BIT         0x8000000000000000ULL
#define EFIERR(a)             (EFI_ERROR_BIT | (a))
#define EFI_ERROR(s)          (((INTN)(s)) < 0)

#define EFI_SUCCESS               0ULL
#define EFI_LOAD_ERROR            EFIERR(1)
#define EFI_INVALID_PARAMETER     EFIERR(2)
#define EFI_UNSUPPORTED           EFIERR(3)
#define EFI_BAD_BUFFER_SIZE       EFIERR(4)
#define EFI_BUFFER_TOO_SMALL      EFIERR(5)
#define EFI_NOT_READY             EFIERR(6)
#define EFI_DEVICE_ERROR          EFIERR(7)
#define EFI_WRITE_PROTECTED       EFIERR(8)
#define EFI_OUT_OF_RESOURCES      EFIERR(9)
#define EFI_VOLUME_CORRUPTED      EFIERR(10)
#define EFI_VOLUME_FULL           EFIERR(11)
#define EFI_NO_MEDIA              EFIERR(12)
#define EFI_MEDIA_CHANGED         EFIERR(13)
#define EFI_NOT_FOUND             EFIERR(14)
#define EFI_ACCESS_DENIED         EFIERR(15)
#define EFI_NO_RESPONSE           EFIERR(16)
#define EFI_NO_MAPPING            EFIERR(17)
#define EFI_TIMEOUT               EFIERR(18)
#define EFI_NOT_STARTED           EFIERR(19)
#define EFI_ALREADY_STARTED       EFIERR(20)
#define EFI_ABORTED               EFIERR(21)
#define EFI_SECURITY_VIOLATION    EFIERR(26)

#define EFI_WARN_DELETE_FAILURE   2ULL

/* ---- 4.2 Table header ------------------------------------------------- */
typedef struct {
    UINT64 Signature;
    UINT32 Revision;
    UINT32 HeaderSize;
    UINT32 CRC32;
    UINT32 Reserved;
} EFI_TABLE_HEADER;

#define EFI_SYSTEM_TABLE_SIGNATURE        0x5453595320494249ULL /* "IBI SYST" */
#define EFI_BOOT_SERVICES_SIGNATURE       0x56524553544f4f42ULL /* "BOOTSERV" */
#define EFI_RUNTIME_SERVICES_SIGNATURE    0x56524553544e5552ULL /* "RUNTSERV" */
#define EFI_2_70_SYSTEM_TABLE_REVISION    ((2 << 16) | 70)

/* ---- 7.2 Memory -------------------------------------------------------- */
typedef UINT32 EFI_ALLOCATE_TYPE;
#define AllocateAnyPages    0
#define AllocateMaxAddress  1
#define AllocateAddress     2
#define MaxAllocateType     3

typedef UINT32 EFI_MEMORY_TYPE;
#define EfiReservedMemoryType       0
#define EfiLoaderCode               1
#define EfiLoaderData               2
#define EfiBootServicesCode         3
#define EfiBootServicesData         4
#define EfiRuntimeServicesCode      5
#define EfiRuntimeServicesData      6
#define EfiConventionalMemory       7
#define EfiUnusableMemory           8
#define EfiACPIReclaimMemory        9
#define EfiACPIMemoryNVS            10
#define EfiMemoryMappedIO           11
#define EfiMemoryMappedIOPortSpace  12
#define EfiPalCode                  13
#define EfiPersistentMemory         14
#define EfiUnacceptedMemoryType     15
#define EfiMaxMemoryType            16

#define EFI_PAGE_SIZE   4096
#define EFI_PAGE_MASK   0xFFF
#define EFI_SIZE_TO_PAGES(s) (((s) + EFI_PAGE_MASK) / EFI_PAGE_SIZE)

#define EFI_MEMORY_UC             0x0000000000000001ULL
#define EFI_MEMORY_WC             0x0000000000000002ULL
#define EFI_MEMORY_WT             0x0000000000000004ULL
#define EFI_MEMORY_WB             0x0000000000000008ULL
#define EFI_MEMORY_UCE            0x0000000000000010ULL
#define EFI_MEMORY_WP             0x0000000000001000ULL
#define EFI_MEMORY_RP             0x0000000000002000ULL
#define EFI_MEMORY_XP             0x0000000000004000ULL
#define EFI_MEMORY_NV             0x0000000000008000ULL
#define EFI_MEMORY_MORE_RELIABLE  0x0000000000010000ULL
#define EFI_MEMORY_RO             0x0000000000020000ULL
#define EFI_MEMORY_SP             0x0000000000040000ULL
#define EFI_MEMORY_CPU_CRYPTO     0x0000000000080000ULL
#define EFI_MEMORY_ISA_VALID      0x4000000000000000ULL
#define EFI_MEMORY_RUNTIME        0x8000000000000000ULL

#define EFI_MEMORY_DESCRIPTOR_VERSION 1
typedef struct {
    UINT32               Type;
    EFI_PHYSICAL_ADDRESS PhysicalStart;
    EFI_VIRTUAL_ADDRESS  VirtualStart;
    UINT64               NumberOfPages;
    UINT64               Attribute;
} EFI_MEMORY_DESCRIPTOR;

/* ---- 7.1 Events, timers, TPL ----------------------------------------- */
#define EVT_TIMER                          0x80000000
#define EVT_RUNTIME                        0x40000000
#define EVT_NOTIFY_WAIT                    0x00000100
#define EVT_NOTIFY_SIGNAL                  0x00000200
#define EVT_SIGNAL_EXIT_BOOT_SERVICES      0x00000201
#define EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE  0x60000202

#define TPL_APPLICATION  4
#define TPL_CALLBACK     8
#define TPL_NOTIFY       16
#define TPL_HIGH_LEVEL   31

typedef UINT32 EFI_TIMER_DELAY;
#define TimerCancel    0
#define TimerPeriodic  1
#define TimerRelative  2

typedef VOID (EFIAPI *EFI_EVENT_NOTIFY)(IN EFI_EVENT Event, IN VOID *Context);

/* ---- 7.3 Protocol handler services ----------------------------------- */
typedef UINT32 EFI_INTERFACE_TYPE;
#define EFI_NATIVE_INTERFACE 0

typedef UINT32 EFI_LOCATE_SEARCH_TYPE;
#define AllHandles        0
#define ByRegisterNotify  1
#define ByProtocol        2

#define EFI_OPEN_PROTOCOL_BY_HANDLE_PROTOCOL  0x00000001
#define EFI_OPEN_PROTOCOL_GET_PROTOCOL        0x00000002
#define EFI_OPEN_PROTOCOL_TEST_PROTOCOL       0x00000004
#define EFI_OPEN_PROTOCOL_BY_CHILD_CONTROLLER 0x00000008
#define EFI_OPEN_PROTOCOL_BY_DRIVER           0x00000010
#define EFI_OPEN_PROTOCOL_EXCLUSIVE           0x00000020

typedef struct {
    EFI_HANDLE AgentHandle;
    EFI_HANDLE ControllerHandle;
    UINT32     Attributes;
    UINT32     OpenCount;
} EFI_OPEN_PROTOCOL_INFORMATION_ENTRY;

/* ---- 10.2 Device path -------------------------------------------------- */
typedef struct {
    UINT8 Type;
    UINT8 SubType;
    UINT8 Length[2];
} EFI_DEVICE_PATH_PROTOCOL;

#define HARDWARE_DEVICE_PATH   0x01
#define HW_VENDOR_DP           0x04
#define MEDIA_DEVICE_PATH      0x04
#define END_DEVICE_PATH_TYPE   0x7F
#define END_ENTIRE_DEVICE_PATH_SUBTYPE   0xFF
#define END_INSTANCE_DEVICE_PATH_SUBTYPE 0x01

typedef struct {
    EFI_DEVICE_PATH_PROTOCOL Header;
    EFI_GUID                 Guid;
} VENDOR_DEVICE_PATH;

/* ---- 10.6 Device path to/from text --------------------------------------- */
typedef struct {
    CHAR16 *(EFIAPI *ConvertDeviceNodeToText)(IN const EFI_DEVICE_PATH_PROTOCOL *DeviceNode,
                                              IN BOOLEAN DisplayOnly, IN BOOLEAN AllowShortcuts);
    CHAR16 *(EFIAPI *ConvertDevicePathToText)(IN const EFI_DEVICE_PATH_PROTOCOL *DevicePath,
                                              IN BOOLEAN DisplayOnly, IN BOOLEAN AllowShortcuts);
} EFI_DEVICE_PATH_TO_TEXT_PROTOCOL;

typedef struct {
    EFI_DEVICE_PATH_PROTOCOL *(EFIAPI *ConvertTextToDeviceNode)(IN const CHAR16 *TextDeviceNode);
    EFI_DEVICE_PATH_PROTOCOL *(EFIAPI *ConvertTextToDevicePath)(IN const CHAR16 *TextDevicePath);
} EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL;

/* ---- 8.3 Time ------------------------------------------------------------ */
#define EFI_UNSPECIFIED_TIMEZONE 0x07FF
typedef struct {
    UINT16 Year;
    UINT8  Month;
    UINT8  Day;
    UINT8  Hour;
    UINT8  Minute;
    UINT8  Second;
    UINT8  Pad1;
    UINT32 Nanosecond;
    INT16  TimeZone;
    UINT8  Daylight;
    UINT8  Pad2;
} EFI_TIME;

typedef struct {
    UINT32  Resolution;
    UINT32  Accuracy;
    BOOLEAN SetsToZero;
} EFI_TIME_CAPABILITIES;

/* ---- 8.2 Variables ------------------------------------------------------ */
#define EFI_VARIABLE_NON_VOLATILE                           0x00000001
#define EFI_VARIABLE_BOOTSERVICE_ACCESS                     0x00000002
#define EFI_VARIABLE_RUNTIME_ACCESS                         0x00000004
#define EFI_VARIABLE_HARDWARE_ERROR_RECORD                  0x00000008
#define EFI_VARIABLE_AUTHENTICATED_WRITE_ACCESS             0x00000010
#define EFI_VARIABLE_TIME_BASED_AUTHENTICATED_WRITE_ACCESS  0x00000020
#define EFI_VARIABLE_APPEND_WRITE                           0x00000040

typedef UINT32 EFI_RESET_TYPE;
#define EfiResetCold              0
#define EfiResetWarm              1
#define EfiResetShutdown          2
#define EfiResetPlatformSpecific  3

/* ---- 12.3 / 12.4 Simple text input / output ---------------------------- */
typedef struct {
    UINT16 ScanCode;
    CHAR16 UnicodeChar;
} EFI_INPUT_KEY;

struct _EFI_SIMPLE_TEXT_INPUT_PROTOCOL;
typedef EFI_STATUS (EFIAPI *EFI_INPUT_RESET)(
    IN struct _EFI_SIMPLE_TEXT_INPUT_PROTOCOL *This, IN BOOLEAN ExtendedVerification);
typedef EFI_STATUS (EFIAPI *EFI_INPUT_READ_KEY)(
    IN struct _EFI_SIMPLE_TEXT_INPUT_PROTOCOL *This, OUT EFI_INPUT_KEY *Key);

typedef struct _EFI_SIMPLE_TEXT_INPUT_PROTOCOL {
    EFI_INPUT_RESET    Reset;
    EFI_INPUT_READ_KEY ReadKeyStroke;
    EFI_EVENT          WaitForKey;
} EFI_SIMPLE_TEXT_INPUT_PROTOCOL;

typedef struct {
    INT32   MaxMode;
    INT32   Mode;
    INT32   Attribute;
    INT32   CursorColumn;
    INT32   CursorRow;
    BOOLEAN CursorVisible;
} SIMPLE_TEXT_OUTPUT_MODE;

struct _EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL;
#define _STO struct _EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL
typedef EFI_STATUS (EFIAPI *EFI_TEXT_RESET)(IN _STO *This, IN BOOLEAN ExtendedVerification);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_STRING)(IN _STO *This, IN CHAR16 *String);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_TEST_STRING)(IN _STO *This, IN CHAR16 *String);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_QUERY_MODE)(IN _STO *This, IN UINTN ModeNumber,
                                                 OUT UINTN *Columns, OUT UINTN *Rows);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_SET_MODE)(IN _STO *This, IN UINTN ModeNumber);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_SET_ATTRIBUTE)(IN _STO *This, IN UINTN Attribute);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_CLEAR_SCREEN)(IN _STO *This);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_SET_CURSOR_POSITION)(IN _STO *This, IN UINTN Column,
                                                          IN UINTN Row);
typedef EFI_STATUS (EFIAPI *EFI_TEXT_ENABLE_CURSOR)(IN _STO *This, IN BOOLEAN Visible);

typedef struct _EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL {
    EFI_TEXT_RESET               Reset;
    EFI_TEXT_STRING              OutputString;
    EFI_TEXT_TEST_STRING         TestString;
    EFI_TEXT_QUERY_MODE          QueryMode;
    EFI_TEXT_SET_MODE            SetMode;
    EFI_TEXT_SET_ATTRIBUTE       SetAttribute;
    EFI_TEXT_CLEAR_SCREEN        ClearScreen;
    EFI_TEXT_SET_CURSOR_POSITION SetCursorPosition;
    EFI_TEXT_ENABLE_CURSOR       EnableCursor;
    SIMPLE_TEXT_OUTPUT_MODE     *Mode;
} EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL;
#undef _STO

#define EFI_BLACK      0x00
#define EFI_LIGHTGRAY  0x07
#define EFI_WHITE      0x0F
#define EFI_BACKGROUND_BLUE 0x10
#define EFI_TEXT_ATTR(fg, bg) ((fg) | ((bg) << 4))

/* ---- 4.5 Runtime services table ---------------------------------------- */
typedef struct {
    EFI_GUID CapsuleGuid;
    UINT32   HeaderSize;
    UINT32   Flags;
    UINT32   CapsuleImageSize;
} EFI_CAPSULE_HEADER;

typedef struct {
    EFI_TABLE_HEADER Hdr;
    /* Time services */
    EFI_STATUS (EFIAPI *GetTime)(OUT EFI_TIME *Time, OUT EFI_TIME_CAPABILITIES *Capabilities OPTIONAL);
    EFI_STATUS (EFIAPI *SetTime)(IN EFI_TIME *Time);
    EFI_STATUS (EFIAPI *GetWakeupTime)(OUT BOOLEAN *Enabled, OUT BOOLEAN *Pending, OUT EFI_TIME *Time);
    EFI_STATUS (EFIAPI *SetWakeupTime)(IN BOOLEAN Enable, IN EFI_TIME *Time OPTIONAL);
    /* Virtual memory services */
    EFI_STATUS (EFIAPI *SetVirtualAddressMap)(IN UINTN MemoryMapSize, IN UINTN DescriptorSize,
                                              IN UINT32 DescriptorVersion,
                                              IN EFI_MEMORY_DESCRIPTOR *VirtualMap);
    EFI_STATUS (EFIAPI *ConvertPointer)(IN UINTN DebugDisposition, IN VOID **Address);
    /* Variable services */
    EFI_STATUS (EFIAPI *GetVariable)(IN CHAR16 *VariableName, IN EFI_GUID *VendorGuid,
                                     OUT UINT32 *Attributes OPTIONAL, IN OUT UINTN *DataSize,
                                     OUT VOID *Data OPTIONAL);
    EFI_STATUS (EFIAPI *GetNextVariableName)(IN OUT UINTN *VariableNameSize,
                                             IN OUT CHAR16 *VariableName,
                                             IN OUT EFI_GUID *VendorGuid);
    EFI_STATUS (EFIAPI *SetVariable)(IN CHAR16 *VariableName, IN EFI_GUID *VendorGuid,
                                     IN UINT32 Attributes, IN UINTN DataSize, IN VOID *Data);
    /* Miscellaneous services */
    EFI_STATUS (EFIAPI *GetNextHighMonotonicCount)(OUT UINT32 *HighCount);
    VOID       (EFIAPI *ResetSystem)(IN EFI_RESET_TYPE ResetType, IN EFI_STATUS ResetStatus,
                                     IN UINTN DataSize, IN VOID *ResetData OPTIONAL);
    /* UEFI 2.0 capsule services */
    EFI_STATUS (EFIAPI *UpdateCapsule)(IN EFI_CAPSULE_HEADER **CapsuleHeaderArray,
                                       IN UINTN CapsuleCount,
                                       IN EFI_PHYSICAL_ADDRESS ScatterGatherList OPTIONAL);
    EFI_STATUS (EFIAPI *QueryCapsuleCapabilities)(IN EFI_CAPSULE_HEADER **CapsuleHeaderArray,
                                                  IN UINTN CapsuleCount,
                                                  OUT UINT64 *MaximumCapsuleSize,
                                                  OUT EFI_RESET_TYPE *ResetType);
    /* Miscellaneous UEFI 2.0 service */
    EFI_STATUS (EFIAPI *QueryVariableInfo)(IN UINT32 Attributes,
                                           OUT UINT64 *MaximumVariableStorageSize,
                                           OUT UINT64 *RemainingVariableStorageSize,
                                           OUT UINT64 *MaximumVariableSize);
} EFI_RUNTIME_SERVICES;

/* ---- 4.4 Boot services table ------------------------------------------- */
typedef struct {
    EFI_TABLE_HEADER Hdr;
    /* Task priority services */
    EFI_TPL    (EFIAPI *RaiseTPL)(IN EFI_TPL NewTpl);
    VOID       (EFIAPI *RestoreTPL)(IN EFI_TPL OldTpl);
    /* Memory services */
    EFI_STATUS (EFIAPI *AllocatePages)(IN EFI_ALLOCATE_TYPE Type, IN EFI_MEMORY_TYPE MemoryType,
                                       IN UINTN Pages, IN OUT EFI_PHYSICAL_ADDRESS *Memory);
    EFI_STATUS (EFIAPI *FreePages)(IN EFI_PHYSICAL_ADDRESS Memory, IN UINTN Pages);
    EFI_STATUS (EFIAPI *GetMemoryMap)(IN OUT UINTN *MemoryMapSize, OUT EFI_MEMORY_DESCRIPTOR *MemoryMap,
                                      OUT UINTN *MapKey, OUT UINTN *DescriptorSize,
                                      OUT UINT32 *DescriptorVersion);
    EFI_STATUS (EFIAPI *AllocatePool)(IN EFI_MEMORY_TYPE PoolType, IN UINTN Size, OUT VOID **Buffer);
    EFI_STATUS (EFIAPI *FreePool)(IN VOID *Buffer);
    /* Event and timer services */
    EFI_STATUS (EFIAPI *CreateEvent)(IN UINT32 Type, IN EFI_TPL NotifyTpl,
                                     IN EFI_EVENT_NOTIFY NotifyFunction OPTIONAL,
                                     IN VOID *NotifyContext OPTIONAL, OUT EFI_EVENT *Event);
    EFI_STATUS (EFIAPI *SetTimer)(IN EFI_EVENT Event, IN EFI_TIMER_DELAY Type, IN UINT64 TriggerTime);
    EFI_STATUS (EFIAPI *WaitForEvent)(IN UINTN NumberOfEvents, IN EFI_EVENT *Event, OUT UINTN *Index);
    EFI_STATUS (EFIAPI *SignalEvent)(IN EFI_EVENT Event);
    EFI_STATUS (EFIAPI *CloseEvent)(IN EFI_EVENT Event);
    EFI_STATUS (EFIAPI *CheckEvent)(IN EFI_EVENT Event);
    /* Protocol handler services */
    EFI_STATUS (EFIAPI *InstallProtocolInterface)(IN OUT EFI_HANDLE *Handle, IN EFI_GUID *Protocol,
                                                  IN EFI_INTERFACE_TYPE InterfaceType,
                                                  IN VOID *Interface);
    EFI_STATUS (EFIAPI *ReinstallProtocolInterface)(IN EFI_HANDLE Handle, IN EFI_GUID *Protocol,
                                                    IN VOID *OldInterface, IN VOID *NewInterface);
    EFI_STATUS (EFIAPI *UninstallProtocolInterface)(IN EFI_HANDLE Handle, IN EFI_GUID *Protocol,
                                                    IN VOID *Interface);
    EFI_STATUS (EFIAPI *HandleProtocol)(IN EFI_HANDLE Handle, IN EFI_GUID *Protocol,
                                        OUT VOID **Interface);
    VOID       *Reserved;
    EFI_STATUS (EFIAPI *RegisterProtocolNotify)(IN EFI_GUID *Protocol, IN EFI_EVENT Event,
                                                OUT VOID **Registration);
    EFI_STATUS (EFIAPI *LocateHandle)(IN EFI_LOCATE_SEARCH_TYPE SearchType,
                                      IN EFI_GUID *Protocol OPTIONAL, IN VOID *SearchKey OPTIONAL,
                                      IN OUT UINTN *BufferSize, OUT EFI_HANDLE *Buffer);
    EFI_STATUS (EFIAPI *LocateDevicePath)(IN EFI_GUID *Protocol,
                                          IN OUT EFI_DEVICE_PATH_PROTOCOL **DevicePath,
                                          OUT EFI_HANDLE *Device);
    EFI_STATUS (EFIAPI *InstallConfigurationTable)(IN EFI_GUID *Guid, IN VOID *Table);
    /* Image services */
    EFI_STATUS (EFIAPI *LoadImage)(IN BOOLEAN BootPolicy, IN EFI_HANDLE ParentImageHandle,
                                   IN EFI_DEVICE_PATH_PROTOCOL *DevicePath OPTIONAL,
                                   IN VOID *SourceBuffer OPTIONAL, IN UINTN SourceSize,
                                   OUT EFI_HANDLE *ImageHandle);
    EFI_STATUS (EFIAPI *StartImage)(IN EFI_HANDLE ImageHandle, OUT UINTN *ExitDataSize,
                                    OUT CHAR16 **ExitData OPTIONAL);
    EFI_STATUS (EFIAPI *Exit)(IN EFI_HANDLE ImageHandle, IN EFI_STATUS ExitStatus,
                              IN UINTN ExitDataSize, IN CHAR16 *ExitData OPTIONAL);
    EFI_STATUS (EFIAPI *UnloadImage)(IN EFI_HANDLE ImageHandle);
    EFI_STATUS (EFIAPI *ExitBootServices)(IN EFI_HANDLE ImageHandle, IN UINTN MapKey);
    /* Miscellaneous services */
    EFI_STATUS (EFIAPI *GetNextMonotonicCount)(OUT UINT64 *Count);
    EFI_STATUS (EFIAPI *Stall)(IN UINTN Microseconds);
    EFI_STATUS (EFIAPI *SetWatchdogTimer)(IN UINTN Timeout, IN UINT64 WatchdogCode,
                                          IN UINTN DataSize, IN CHAR16 *WatchdogData OPTIONAL);
    /* DriverSupport services */
    EFI_STATUS (EFIAPI *ConnectController)(IN EFI_HANDLE ControllerHandle,
                                           IN EFI_HANDLE *DriverImageHandle OPTIONAL,
                                           IN EFI_DEVICE_PATH_PROTOCOL *RemainingDevicePath OPTIONAL,
                                           IN BOOLEAN Recursive);
    EFI_STATUS (EFIAPI *DisconnectController)(IN EFI_HANDLE ControllerHandle,
                                              IN EFI_HANDLE DriverImageHandle OPTIONAL,
                                              IN EFI_HANDLE ChildHandle OPTIONAL);
    /* Open and close protocol services */
    EFI_STATUS (EFIAPI *OpenProtocol)(IN EFI_HANDLE Handle, IN EFI_GUID *Protocol,
                                      OUT VOID **Interface OPTIONAL, IN EFI_HANDLE AgentHandle,
                                      IN EFI_HANDLE ControllerHandle, IN UINT32 Attributes);
    EFI_STATUS (EFIAPI *CloseProtocol)(IN EFI_HANDLE Handle, IN EFI_GUID *Protocol,
                                       IN EFI_HANDLE AgentHandle, IN EFI_HANDLE ControllerHandle);
    EFI_STATUS (EFIAPI *OpenProtocolInformation)(IN EFI_HANDLE Handle, IN EFI_GUID *Protocol,
                                                 OUT EFI_OPEN_PROTOCOL_INFORMATION_ENTRY **EntryBuffer,
                                                 OUT UINTN *EntryCount);
    /* Library services */
    EFI_STATUS (EFIAPI *ProtocolsPerHandle)(IN EFI_HANDLE Handle, OUT EFI_GUID ***ProtocolBuffer,
                                            OUT UINTN *ProtocolBufferCount);
    EFI_STATUS (EFIAPI *LocateHandleBuffer)(IN EFI_LOCATE_SEARCH_TYPE SearchType,
                                            IN EFI_GUID *Protocol OPTIONAL,
                                            IN VOID *SearchKey OPTIONAL,
                                            OUT UINTN *NoHandles, OUT EFI_HANDLE **Buffer);
    EFI_STATUS (EFIAPI *LocateProtocol)(IN EFI_GUID *Protocol, IN VOID *Registration OPTIONAL,
                                        OUT VOID **Interface);
    EFI_STATUS (EFIAPI *InstallMultipleProtocolInterfaces)(IN OUT EFI_HANDLE *Handle, ...);
    EFI_STATUS (EFIAPI *UninstallMultipleProtocolInterfaces)(IN EFI_HANDLE Handle, ...);
    /* 32-bit CRC services */
    EFI_STATUS (EFIAPI *CalculateCrc32)(IN VOID *Data, IN UINTN DataSize, OUT UINT32 *Crc32);
    /* Miscellaneous services */
    VOID       (EFIAPI *CopyMem)(IN VOID *Destination, IN VOID *Source, IN UINTN Length);
    VOID       (EFIAPI *SetMem)(IN VOID *Buffer, IN UINTN Size, IN UINT8 Value);
    EFI_STATUS (EFIAPI *CreateEventEx)(IN UINT32 Type, IN EFI_TPL NotifyTpl,
                                       IN EFI_EVENT_NOTIFY NotifyFunction OPTIONAL,
                                       IN const VOID *NotifyContext OPTIONAL,
                                       IN const EFI_GUID *EventGroup OPTIONAL,
                                       OUT EFI_EVENT *Event);
} EFI_BOOT_SERVICES;

/* ---- 4.6 Configuration table ------------------------------------------- */
typedef struct {
    EFI_GUID VendorGuid;
    VOID    *VendorTable;
} EFI_CONFIGURATION_TABLE;

/* ---- 4.6.2 EFI_RT_PROPERTIES_TABLE --------------------------------------- */
#define EFI_RT_PROPERTIES_TABLE_VERSION 0x1
typedef struct {
    UINT16 Version;
    UINT16 Length;
    UINT32 RuntimeServicesSupported;
} EFI_RT_PROPERTIES_TABLE;

/* ---- 4.3 System table ---------------------------------------------------- */
typedef struct {
    EFI_TABLE_HEADER                 Hdr;
    CHAR16                          *FirmwareVendor;
    UINT32                           FirmwareRevision;
    EFI_HANDLE                       ConsoleInHandle;
    EFI_SIMPLE_TEXT_INPUT_PROTOCOL  *ConIn;
    EFI_HANDLE                       ConsoleOutHandle;
    EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL *ConOut;
    EFI_HANDLE                       StandardErrorHandle;
    EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL *StdErr;
    EFI_RUNTIME_SERVICES            *RuntimeServices;
    EFI_BOOT_SERVICES               *BootServices;
    UINTN                            NumberOfTableEntries;
    EFI_CONFIGURATION_TABLE         *ConfigurationTable;
} EFI_SYSTEM_TABLE;

/* ---- 9.1 Loaded image ---------------------------------------------------- */
#define EFI_LOADED_IMAGE_PROTOCOL_REVISION 0x1000
typedef struct {
    UINT32                    Revision;
    EFI_HANDLE                ParentHandle;
    EFI_SYSTEM_TABLE         *SystemTable;
    /* Source location of the image */
    EFI_HANDLE                DeviceHandle;
    EFI_DEVICE_PATH_PROTOCOL *FilePath;
    VOID                     *Reserved;
    /* Image's load options */
    UINT32                    LoadOptionsSize;
    VOID                     *LoadOptions;
    /* Location where image was loaded */
    VOID                     *ImageBase;
    UINT64                    ImageSize;
    EFI_MEMORY_TYPE           ImageCodeType;
    EFI_MEMORY_TYPE           ImageDataType;
    EFI_STATUS (EFIAPI *Unload)(IN EFI_HANDLE ImageHandle);
} EFI_LOADED_IMAGE_PROTOCOL;

/* ---- 37.5 RNG protocol --------------------------------------------------- */
typedef EFI_GUID EFI_RNG_ALGORITHM;
struct _EFI_RNG_PROTOCOL;
typedef struct _EFI_RNG_PROTOCOL {
    EFI_STATUS (EFIAPI *GetInfo)(IN struct _EFI_RNG_PROTOCOL *This,
                                 IN OUT UINTN *RNGAlgorithmListSize,
                                 OUT EFI_RNG_ALGORITHM *RNGAlgorithmList);
    EFI_STATUS (EFIAPI *GetRNG)(IN struct _EFI_RNG_PROTOCOL *This,
                                IN EFI_RNG_ALGORITHM *RNGAlgorithm OPTIONAL,
                                IN UINTN RNGValueLength, OUT UINT8 *RNGValue);
} EFI_RNG_PROTOCOL;

/* ---- 13.2 Load file 2 ---------------------------------------------------- */
struct _EFI_LOAD_FILE2_PROTOCOL;
typedef struct _EFI_LOAD_FILE2_PROTOCOL {
    EFI_STATUS (EFIAPI *LoadFile)(IN struct _EFI_LOAD_FILE2_PROTOCOL *This,
                                  IN EFI_DEVICE_PATH_PROTOCOL *FilePath, IN BOOLEAN BootPolicy,
                                  IN OUT UINTN *BufferSize, IN VOID *Buffer OPTIONAL);
} EFI_LOAD_FILE2_PROTOCOL;

/* ---- 13.4 / 13.5 Simple file system, file protocol ----------------------- */
typedef struct {
    EFI_EVENT  Event;
    EFI_STATUS Status;
    UINTN      BufferSize;
    VOID      *Buffer;
} EFI_FILE_IO_TOKEN;

#define EFI_FILE_PROTOCOL_REVISION   0x00010000
#define EFI_FILE_PROTOCOL_REVISION2  0x00020000
typedef struct _EFI_FILE_PROTOCOL EFI_FILE_PROTOCOL;
struct _EFI_FILE_PROTOCOL {
    UINT64 Revision;
    EFI_STATUS (EFIAPI *Open)(EFI_FILE_PROTOCOL *This, EFI_FILE_PROTOCOL **NewHandle,
                              CHAR16 *FileName, UINT64 OpenMode, UINT64 Attributes);
    EFI_STATUS (EFIAPI *Close)(EFI_FILE_PROTOCOL *This);
    EFI_STATUS (EFIAPI *Delete)(EFI_FILE_PROTOCOL *This);
    EFI_STATUS (EFIAPI *Read)(EFI_FILE_PROTOCOL *This, UINTN *BufferSize, VOID *Buffer);
    EFI_STATUS (EFIAPI *Write)(EFI_FILE_PROTOCOL *This, UINTN *BufferSize, VOID *Buffer);
    EFI_STATUS (EFIAPI *GetPosition)(EFI_FILE_PROTOCOL *This, UINT64 *Position);
    EFI_STATUS (EFIAPI *SetPosition)(EFI_FILE_PROTOCOL *This, UINT64 Position);
    EFI_STATUS (EFIAPI *GetInfo)(EFI_FILE_PROTOCOL *This, EFI_GUID *InformationType,
                                 UINTN *BufferSize, VOID *Buffer);
    EFI_STATUS (EFIAPI *SetInfo)(EFI_FILE_PROTOCOL *This, EFI_GUID *InformationType,
                                 UINTN BufferSize, VOID *Buffer);
    EFI_STATUS (EFIAPI *Flush)(EFI_FILE_PROTOCOL *This);
    /* EFI_FILE_PROTOCOL_REVISION2 */
    EFI_STATUS (EFIAPI *OpenEx)(EFI_FILE_PROTOCOL *This, EFI_FILE_PROTOCOL **NewHandle,
                                CHAR16 *FileName, UINT64 OpenMode, UINT64 Attributes,
                                EFI_FILE_IO_TOKEN *Token);
    EFI_STATUS (EFIAPI *ReadEx)(EFI_FILE_PROTOCOL *This, EFI_FILE_IO_TOKEN *Token);
    EFI_STATUS (EFIAPI *WriteEx)(EFI_FILE_PROTOCOL *This, EFI_FILE_IO_TOKEN *Token);
    EFI_STATUS (EFIAPI *FlushEx)(EFI_FILE_PROTOCOL *This, EFI_FILE_IO_TOKEN *Token);
};

#define EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_REVISION 0x00010000
typedef struct _EFI_SIMPLE_FILE_SYSTEM_PROTOCOL {
    UINT64 Revision;
    EFI_STATUS (EFIAPI *OpenVolume)(struct _EFI_SIMPLE_FILE_SYSTEM_PROTOCOL *This,
                                    EFI_FILE_PROTOCOL **Root);
} EFI_SIMPLE_FILE_SYSTEM_PROTOCOL;

typedef struct {
    UINT64   Size;
    UINT64   FileSize;
    UINT64   PhysicalSize;
    EFI_TIME CreateTime;
    EFI_TIME LastAccessTime;
    EFI_TIME ModificationTime;
    UINT64   Attribute;
    CHAR16   FileName[];
} EFI_FILE_INFO;
#define SIZE_OF_EFI_FILE_INFO __builtin_offsetof(EFI_FILE_INFO, FileName)

typedef struct {
    UINT64  Size;
    BOOLEAN ReadOnly;
    UINT64  VolumeSize;
    UINT64  FreeSpace;
    UINT32  BlockSize;
    CHAR16  VolumeLabel[];
} EFI_FILE_SYSTEM_INFO;
#define SIZE_OF_EFI_FILE_SYSTEM_INFO __builtin_offsetof(EFI_FILE_SYSTEM_INFO, VolumeLabel)

#define EFI_FILE_MODE_READ    0x0000000000000001ULL
#define EFI_FILE_MODE_WRITE   0x0000000000000002ULL
#define EFI_FILE_MODE_CREATE  0x8000000000000000ULL
#define EFI_FILE_READ_ONLY    0x01ULL
#define EFI_FILE_HIDDEN       0x02ULL
#define EFI_FILE_SYSTEM       0x04ULL
#define EFI_FILE_RESERVED     0x08ULL
#define EFI_FILE_DIRECTORY    0x10ULL
#define EFI_FILE_ARCHIVE      0x20ULL
#define EFI_FILE_VALID_ATTR   0x37ULL

/* ---- TCG EFI Protocol Specification: EFI_TCG2_PROTOCOL -------------------- */
typedef UINT32 EFI_TCG2_EVENT_LOG_BITMAP;
typedef UINT32 EFI_TCG2_EVENT_LOG_FORMAT;
typedef UINT32 EFI_TCG2_EVENT_ALGORITHM_BITMAP;
#define EFI_TCG2_EVENT_LOG_FORMAT_TCG_1_2  0x00000001
#define EFI_TCG2_EVENT_LOG_FORMAT_TCG_2    0x00000002
#define EFI_TCG2_EXTEND_ONLY               0x0000000000000001ULL
#define PE_COFF_IMAGE                      0x0000000000000010ULL

typedef struct {
    UINT8 Major;
    UINT8 Minor;
} EFI_TCG2_VERSION;

typedef struct {                        /* natural alignment, not packed */
    UINT8                           Size;
    EFI_TCG2_VERSION                StructureVersion;
    EFI_TCG2_VERSION                ProtocolVersion;
    EFI_TCG2_EVENT_ALGORITHM_BITMAP HashAlgorithmBitmap;
    EFI_TCG2_EVENT_LOG_BITMAP       SupportedEventLogs;
    BOOLEAN                         TPMPresentFlag;
    UINT16                          MaxCommandSize;
    UINT16                          MaxResponseSize;
    UINT32                          ManufacturerID;
    UINT32                          NumberOfPCRBanks;
    EFI_TCG2_EVENT_ALGORITHM_BITMAP ActivePcrBanks;
} EFI_TCG2_BOOT_SERVICE_CAPABILITY;

#define EFI_TCG2_EVENT_HEADER_VERSION 1
#pragma pack(push, 1)
typedef struct {
    UINT32 HeaderSize;
    UINT16 HeaderVersion;
    UINT32 PCRIndex;
    UINT32 EventType;
} EFI_TCG2_EVENT_HEADER;

typedef struct {
    UINT32                Size;
    EFI_TCG2_EVENT_HEADER Header;
    UINT8                 Event[];
} EFI_TCG2_EVENT;
#pragma pack(pop)

struct _EFI_TCG2_PROTOCOL;
#define _TCG2 struct _EFI_TCG2_PROTOCOL
typedef struct _EFI_TCG2_PROTOCOL {
    EFI_STATUS (EFIAPI *GetCapability)(IN _TCG2 *This,
                                       IN OUT EFI_TCG2_BOOT_SERVICE_CAPABILITY *ProtocolCapability);
    EFI_STATUS (EFIAPI *GetEventLog)(IN _TCG2 *This, IN EFI_TCG2_EVENT_LOG_FORMAT EventLogFormat,
                                     OUT EFI_PHYSICAL_ADDRESS *EventLogLocation,
                                     OUT EFI_PHYSICAL_ADDRESS *EventLogLastEntry,
                                     OUT BOOLEAN *EventLogTruncated);
    EFI_STATUS (EFIAPI *HashLogExtendEvent)(IN _TCG2 *This, IN UINT64 Flags,
                                            IN EFI_PHYSICAL_ADDRESS DataToHash,
                                            IN UINT64 DataToHashLen, IN EFI_TCG2_EVENT *EfiTcgEvent);
    EFI_STATUS (EFIAPI *SubmitCommand)(IN _TCG2 *This, IN UINT32 InputParameterBlockSize,
                                       IN UINT8 *InputParameterBlock,
                                       IN UINT32 OutputParameterBlockSize,
                                       IN UINT8 *OutputParameterBlock);
    EFI_STATUS (EFIAPI *GetActivePcrBanks)(IN _TCG2 *This, OUT UINT32 *ActivePcrBanks);
    EFI_STATUS (EFIAPI *SetActivePcrBanks)(IN _TCG2 *This, IN UINT32 ActivePcrBanks);
    EFI_STATUS (EFIAPI *GetResultOfSetActivePcrBanks)(IN _TCG2 *This, OUT UINT32 *OperationPresent,
                                                      OUT UINT32 *Response);
} EFI_TCG2_PROTOCOL;
#undef _TCG2

#define EFI_TCG2_FINAL_EVENTS_TABLE_VERSION 1
typedef struct {
    UINT64 Version;
    UINT64 NumberOfEvents;
    /* TCG_PCR_EVENT2 Event[NumberOfEvents] follows (variable-sized records) */
} EFI_TCG2_FINAL_EVENTS_TABLE;

/* ---- TCG PC Client PFP 1.05 section 10.2: event log structures ------------- */
#pragma pack(push, 1)
typedef struct {
    UINT32 PCRIndex;
    UINT32 EventType;
    UINT8  Digest[20];
    UINT32 EventSize;
    UINT8  Event[];
} TCG_PCR_EVENT;

typedef struct {
    UINT16 algorithmId;
    UINT16 digestSize;
} TCG_EfiSpecIdEventAlgorithmSize;

typedef struct {
    UINT8  signature[16];
    UINT32 platformClass;
    UINT8  specVersionMinor;
    UINT8  specVersionMajor;
    UINT8  specErrata;
    UINT8  uintnSize;
    UINT32 numberOfAlgorithms;
    TCG_EfiSpecIdEventAlgorithmSize digestSizes[];
    /* UINT8 vendorInfoSize; UINT8 vendorInfo[vendorInfoSize]; */
} TCG_EfiSpecIDEventStruct;

typedef struct {
    UINT8 Signature[16];
    UINT8 StartupLocality;
} TCG_EfiStartupLocalityEvent;

typedef struct {
    UINT32 taggedEventID;
    UINT32 taggedEventDataSize;
    UINT8  taggedEventData[];
} TCG_PCClientTaggedEvent;

typedef struct {
    EFI_PHYSICAL_ADDRESS ImageLocationInMemory;
    UINT64               ImageLengthInMemory;
    UINT64               ImageLinkTimeAddress;
    UINT64               LengthOfDevicePath;
    UINT8                DevicePath[];
} UEFI_IMAGE_LOAD_EVENT;

typedef struct {
    EFI_GUID VariableName;
    UINT64   UnicodeNameLength;
    UINT64   VariableDataLength;
    CHAR16   UnicodeName[];
    /* INT8 VariableData[VariableDataLength] follows the name */
} UEFI_VARIABLE_DATA;
#pragma pack(pop)

/* ---- GUIDs --------------------------------------------------------------- */
#define EFI_LOADED_IMAGE_PROTOCOL_GUID \
    {0x5B1B31A1, 0x9562, 0x11d2, {0x8E, 0x3F, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B}}
#define EFI_LOADED_IMAGE_DEVICE_PATH_PROTOCOL_GUID \
    {0xbc62157e, 0x3e33, 0x4fec, {0x99, 0x20, 0x2d, 0x3b, 0x36, 0xd7, 0x50, 0xdf}}
#define EFI_DEVICE_PATH_PROTOCOL_GUID \
    {0x09576e91, 0x6d3f, 0x11d2, {0x8e, 0x39, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b}}
#define EFI_SIMPLE_TEXT_INPUT_PROTOCOL_GUID \
    {0x387477c1, 0x69c7, 0x11d2, {0x8e, 0x39, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b}}
#define EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL_GUID \
    {0x387477c2, 0x69c7, 0x11d2, {0x8e, 0x39, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b}}
#define EFI_RNG_PROTOCOL_GUID \
    {0x3152bca5, 0xeade, 0x433d, {0x86, 0x2e, 0xc0, 0x1c, 0xdc, 0x29, 0x1f, 0x44}}
#define EFI_RNG_ALGORITHM_RAW \
    {0xe43176d7, 0xb6e8, 0x4827, {0xb7, 0x84, 0x7f, 0xfd, 0xc4, 0xb6, 0x85, 0x61}}
#define EFI_LOAD_FILE2_PROTOCOL_GUID \
    {0x4006c0c1, 0xfcb3, 0x403e, {0x99, 0x6d, 0x4a, 0x6c, 0x87, 0x24, 0xe0, 0x6d}}
#define EFI_GLOBAL_VARIABLE \
    {0x8BE4DF61, 0x93CA, 0x11d2, {0xAA, 0x0D, 0x00, 0xE0, 0x98, 0x03, 0x2B, 0x8C}}
#define EFI_ACPI_20_TABLE_GUID \
    {0x8868e871, 0xe4f1, 0x11d3, {0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81}}
#define EFI_DEVICE_PATH_TO_TEXT_PROTOCOL_GUID \
    {0x8b843e20, 0x8132, 0x4852, {0x90, 0xcc, 0x55, 0x1a, 0x4e, 0x4a, 0x7f, 0x1c}}
#define EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL_GUID \
    {0x05c99a21, 0xc70f, 0x4ad2, {0x8a, 0x5f, 0x35, 0xdf, 0x33, 0x43, 0xf5, 0x1e}}
#define EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_GUID \
    {0x964e5b22, 0x6459, 0x11d2, {0x8e, 0x39, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b}}
#define EFI_FILE_INFO_ID \
    {0x09576e92, 0x6d3f, 0x11d2, {0x8e, 0x39, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b}}
#define EFI_FILE_SYSTEM_INFO_ID \
    {0x09576e93, 0x6d3f, 0x11d2, {0x8e, 0x39, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b}}
#define EFI_FILE_SYSTEM_VOLUME_LABEL_ID \
    {0xdb47d7d3, 0xfe81, 0x11d3, {0x9a, 0x35, 0x00, 0x90, 0x27, 0x3f, 0xc1, 0x4d}}
#define EFI_TCG2_PROTOCOL_GUID \
    {0x607f766c, 0x7455, 0x42be, {0x93, 0x0b, 0xe4, 0xd7, 0x6d, 0xb2, 0x72, 0x0f}}
#define EFI_TCG2_FINAL_EVENTS_TABLE_GUID \
    {0x1e2ed096, 0x30e2, 0x4254, {0xbd, 0x89, 0x86, 0x3b, 0xbe, 0xf8, 0x23, 0x25}}
#define EFI_RT_PROPERTIES_TABLE_GUID \
    {0xeb66918a, 0x7eef, 0x402a, {0x84, 0x2e, 0x93, 0x1d, 0x21, 0xc3, 0x8a, 0xe9}}
#define EFI_IMAGE_SECURITY_DATABASE_GUID \
    {0xd719b2cb, 0x3d3a, 0x4596, {0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f}}
#define LINUX_EFI_INITRD_MEDIA_GUID \
    {0x5568e427, 0x68fc, 0x4f3d, {0xac, 0x74, 0xca, 0x55, 0x52, 0x31, 0xcc, 0x68}}

#endif /* VMRUN_TEST_EFI_H */
