"""Named EFI GUIDs touched by Linux EFI stubs, systemd-stub/systemd-boot and the
paravirtual boot services.

An ``EFI_GUID`` in memory is ``{UINT32 Data1; UINT16 Data2; UINT16 Data3; UINT8
Data4[8]}`` little-endian (UEFI 2.10 Appendix A, "GUID and Time Formats"), i.e.
exactly :pyattr:`uuid.UUID.bytes_le`.  The canonical text form used by the spec
and by ``DevicePathToText`` (``%g``) is ``str(uuid)`` (lower case).

Every value below was cross-checked against a public source: EDK2
``MdePkg/MdePkg.dec`` (tianocore/edk2) and/or Linux ``include/linux/efi.h``;
the source is noted where only one of them carries the GUID.  Notes on values
that differ from folklore:

* ``CC_MEASUREMENT`` is ``96751a3d-72f4-41a6-a794-ed5d0e67ae6b`` (MdePkg.dec,
  efi.h).
* ``OVMF_SEV_MEMORY_ACCEPTANCE`` is ``c5a010fe-38a7-4531-8a4a-0500d2fd1649``
  (efi.h).
* ``LINUX_EFI_SCREEN_INFO`` is ``e03fc20a-85dc-406e-b90e-4ab502371d95``
  (efi.h).
* EDK2 calls ``8868e871-…`` ``gEfiAcpiTableGuid`` (ACPI 2.0+) and
  ``eb9d2d30-…`` ``gEfiAcpi10TableGuid``; here they follow the Linux/UEFI
  naming: ``ACPI_20_TABLE`` and ``ACPI_TABLE``.
"""

from __future__ import annotations

from uuid import UUID

__all__ = ["NAMES", "guid_name", "guid_from_bytes", "guid_to_bytes", "lookup"]

# --- UEFI core protocols (UEFI 2.10 §9, §10, §12, §13) --------------------------
LOADED_IMAGE = UUID("5b1b31a1-9562-11d2-8e3f-00a0c969723b")
LOADED_IMAGE_DEVICE_PATH = UUID("bc62157e-3e33-4fec-9920-2d3b36d750df")
DEVICE_PATH = UUID("09576e91-6d3f-11d2-8e39-00a0c969723b")
DEVICE_PATH_TO_TEXT = UUID("8b843e20-8132-4852-90cc-551a4e4a7f1c")
DEVICE_PATH_FROM_TEXT = UUID("05c99a21-c70f-4ad2-8a5f-35df3343f51e")
DEVICE_PATH_UTILITIES = UUID("0379be4e-d706-437d-b037-edb82fb772a4")  # MdePkg.dec
DRIVER_BINDING = UUID("18a031ab-b443-4d1a-a5c0-0c09261e9f71")  # MdePkg.dec
COMPONENT_NAME2 = UUID("6a7a5cff-e8d9-4f70-bada-75ab3025ce14")  # MdePkg.dec

SIMPLE_TEXT_INPUT = UUID("387477c1-69c7-11d2-8e39-00a0c969723b")
SIMPLE_TEXT_INPUT_EX = UUID("dd9e7534-7762-4698-8c14-f58517a625aa")
SIMPLE_TEXT_OUTPUT = UUID("387477c2-69c7-11d2-8e39-00a0c969723b")
SIMPLE_POINTER = UUID("31878c87-0b75-11d5-9a4f-0090273fc14d")  # MdePkg.dec
SERIAL_IO = UUID("bb25cf6f-f1d4-11d2-9a0c-0090273fc1fd")  # MdePkg.dec
GRAPHICS_OUTPUT = UUID("9042a9de-23dc-4a38-96fb-7aded080516a")
EDID_DISCOVERED = UUID("1c0c34f6-d380-41fa-a049-8ad06c1a66aa")  # MdePkg.dec
EDID_ACTIVE = UUID("bd8c1056-9f36-44ec-92a8-a6337f817986")  # MdePkg.dec
UGA_DRAW = UUID("982c298b-f4fa-41cb-b838-77aa688fb839")
UGA_IO = UUID("61a4d49e-6f68-4f1b-b922-a86eed0b07a2")  # efi.h

LOAD_FILE = UUID("56ec3091-954c-11d2-8e3f-00a0c969723b")
EFI_LOAD_FILE_PROTOCOL = LOAD_FILE
LOAD_FILE2 = UUID("4006c0c1-fcb3-403e-996d-4a6c8724e06d")
SIMPLE_FILE_SYSTEM = UUID("964e5b22-6459-11d2-8e39-00a0c969723b")
FILE_INFO = UUID("09576e92-6d3f-11d2-8e39-00a0c969723b")
FILE_SYSTEM_INFO = UUID("09576e93-6d3f-11d2-8e39-00a0c969723b")  # MdePkg.dec
FILE_SYSTEM_VOLUME_LABEL = UUID("db47d7d3-fe81-11d3-9a35-0090273fc14d")  # MdePkg.dec
BLOCK_IO = UUID("964e5b21-6459-11d2-8e39-00a0c969723b")  # MdePkg.dec
BLOCK_IO2 = UUID("a77b2472-e282-4e9f-a245-c2c0e27bbcc1")  # MdePkg.dec
DISK_IO = UUID("ce345171-ba0b-11d2-8e4f-00a0c969723b")  # MdePkg.dec
DISK_IO2 = UUID("151c8eae-7f2c-472c-9e54-9828194f6a88")  # MdePkg.dec
UNICODE_COLLATION2 = UUID("a4c751fc-23ae-4c3e-92e9-4964cf63f349")  # MdePkg.dec

PCI_IO = UUID("4cf5b200-68b8-4ca5-9eec-b23e3f50029a")
PCI_ROOT_BRIDGE_IO = UUID("2f707ebb-4a1a-11d4-9a38-0090273fc14d")  # MdePkg.dec

RNG = UUID("3152bca5-eade-433d-862e-c01cdc291f44")
RNG_ALGORITHM_RAW = UUID("e43176d7-b6e8-4827-b784-7ffdc4b68561")
RNG_ALGORITHM_SP800_90_CTR_256 = UUID("44f0de6e-4d8c-4045-a8c7-4dd168856b9e")  # MdePkg.dec
TIMESTAMP = UUID("afbfde41-2e6e-4262-ba65-62b9236e5495")  # MdePkg.dec

TCG = UUID("f541796d-a62e-4954-a775-9584f61b9cdd")  # MdePkg.dec (TPM 1.2)
TCG2 = UUID("607f766c-7455-42be-930b-e4d76db2720f")
CC_MEASUREMENT = UUID("96751a3d-72f4-41a6-a794-ed5d0e67ae6b")
MEMORY_ATTRIBUTE = UUID("f4560cf6-40ec-4b4a-a192-bf1d57d0b189")  # efi.h
OVMF_SEV_MEMORY_ACCEPTANCE = UUID("c5a010fe-38a7-4531-8a4a-0500d2fd1649")  # efi.h
SEV_MEMORY_ACCEPTANCE = OVMF_SEV_MEMORY_ACCEPTANCE
EDKII_MEMORY_ACCEPT = UUID("38c74800-5590-4db4-a0f3-675d9b8e8026")  # MdePkg.dec
SMBIOS_PROTOCOL = UUID("03583ff6-cb36-4940-947e-b9b39f4afaf7")
DT_FIXUP = UUID("e617d64c-fe08-46da-f4dc-bbd5870c7300")  # EBBR; used by systemd-stub

HII_DATABASE = UUID("ef9fc172-a1b2-4693-b327-6d32fc416042")  # MdePkg.dec
HII_STRING = UUID("0fd96974-23aa-4cdc-b9cb-98d17750322a")  # MdePkg.dec
HII_FONT = UUID("e9ca4775-8657-47fc-97e7-7ed65a084324")  # MdePkg.dec
HII_IMAGE = UUID("31a6406a-6bdf-4e46-b2a2-ebaa89c40920")  # MdePkg.dec
HII_CONFIG_ROUTING = UUID("587e72d7-cc50-4f79-8209-ca291fc1a10f")  # MdePkg.dec
HII_PACKAGE_LIST = UUID("6a1ee763-d47a-43b4-aabe-ef1de2ab56fc")  # MdePkg.dec

# --- PI architectural protocols --------------------------------------------------
SECURITY_ARCH = UUID("a46423e3-4617-49f1-b9ff-d1bfa9115839")  # MdePkg.dec
SECURITY2_ARCH = UUID("94ab2f58-1438-4ef1-9152-18941a3a0e68")  # MdePkg.dec

# --- shim ------------------------------------------------------------------------
SHIM_LOCK = UUID("605dab50-e046-4300-abb6-3dd810dd8b23")

# --- Linux-specific --------------------------------------------------------------
LINUX_EFI_INITRD_MEDIA = UUID("5568e427-68fc-4f3d-ac74-ca555231cc68")
LINUX_EFI_LOADED_IMAGE_FIXED = UUID("f5a37b6d-3344-42a5-b6bb-978648c1890a")  # efi.h
LINUX_EFI_BOOT_MEMMAP = UUID("800f683f-d08b-423a-a293-965c3c6fe2b4")  # efi.h
LINUX_EFI_RANDOM_SEED = UUID("1ce1e5bc-7ceb-42f2-81e5-8aadf180f57b")  # efi.h
LINUX_EFI_TPM_EVENT_LOG = UUID("b7799cb0-eca2-4943-9667-1fae07b747fa")  # efi.h
LINUX_EFI_SCREEN_INFO = UUID("e03fc20a-85dc-406e-b90e-4ab502371d95")  # efi.h
LINUX_EFI_MEMRESERVE = UUID("888eb0c6-8ede-4ff5-a8f0-9aee5cb977c2")  # efi.h
LINUX_EFI_UNACCEPTED_MEM = UUID("d5d1de3c-105c-44f9-9ea9-bcef98120031")  # efi.h
LINUX_EFI_MOK_VARIABLE_TABLE = UUID("c451ed2b-9694-45d3-baba-ed9f8988a389")  # efi.h
LINUX_EFI_COCO_SECRET_AREA = UUID("adf956ad-e98c-484c-ae11-b51c7d336447")  # efi.h
# Same value as systemd's Boot Loader Interface vendor GUID (LoaderDevicePartUUID,
# LoaderImageIdentifier, StubInfo, StubFeatures, ... are variables of this vendor).
LINUX_EFI_LOADER_ENTRY = UUID("4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")  # efi.h
LOADER_VENDOR = LINUX_EFI_LOADER_ENTRY
SYSTEMD_LOADER = LINUX_EFI_LOADER_ENTRY

# --- Variables vendors -----------------------------------------------------------
EFI_GLOBAL_VARIABLE = UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")

# --- Configuration tables (UEFI 2.10 §4.6) ---------------------------------------
ACPI_20_TABLE = UUID("8868e871-e4f1-11d3-bc22-0080c73c8881")
ACPI_TABLE = UUID("eb9d2d30-2d88-11d3-9a16-0090273fc14d")
SMBIOS_TABLE = UUID("eb9d2d31-2d88-11d3-9a16-0090273fc14d")
SMBIOS3_TABLE = UUID("f2fd1544-9794-4a2c-992e-e5bbcf20e394")
EFI_RT_PROPERTIES_TABLE = UUID("eb66918a-7eef-402a-842e-931d21c38ae9")
EFI_TCG2_FINAL_EVENTS = UUID("1e2ed096-30e2-4254-bd89-863bbef82325")
EFI_CC_FINAL_EVENTS = UUID("dd4a4648-2de7-4665-964d-21d9ef5fb446")
EFI_MEMORY_ATTRIBUTES_TABLE = UUID("dcfa911d-26eb-469f-a220-38b7dc461220")
EFI_SYSTEM_RESOURCE_TABLE = UUID("b122a263-3661-4f68-9929-78f8b0d62180")
EFI_DEBUG_IMAGE_INFO_TABLE = UUID("49152e77-1ada-4764-b7a2-7afefed95e8b")  # MdePkg.dec
DXE_SERVICES_TABLE = UUID("05ad34ba-6f02-4214-952e-4da0398e2bb9")
DEVICE_TREE = UUID("b1b621d5-f19c-41a5-830b-d9152c69aae0")
EFI_CONSOLE_OUT_DEVICE = UUID("d3b36f2c-d551-11d4-9a46-0090273fc14d")  # efi.h

# --- Event groups (UEFI 2.10 §7.1 CreateEventEx) ---------------------------------
EVENT_GROUP_EXIT_BOOT_SERVICES = UUID("27abf055-b1b8-4c26-8048-748f37baa2df")
EVENT_GROUP_BEFORE_EXIT_BOOT_SERVICES = UUID("8be0e274-3970-4b44-80c5-1ab9502f3bfc")
EVENT_GROUP_VIRTUAL_ADDRESS_CHANGE = UUID("13fa7698-c831-49c7-87ea-8f43fcc25196")
EVENT_GROUP_MEMORY_MAP_CHANGE = UUID("78bee926-692f-48fd-9edb-01422ef0d7ab")
EVENT_GROUP_READY_TO_BOOT = UUID("7ce88fb3-4bd7-4679-87a8-a8d8dee50d2b")

# --- GPT partition types (UEFI 2.10 §5.3.3) --------------------------------------
PART_TYPE_EFI_SYSTEM = UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")

# Aliases: the reverse map keeps the first (primary) name for each value.
_ALIASES = {"EFI_LOAD_FILE_PROTOCOL", "SEV_MEMORY_ACCEPTANCE", "LOADER_VENDOR", "SYSTEMD_LOADER"}

NAMES: dict[UUID, str] = {}
for _k, _v in list(globals().items()):
    if isinstance(_v, UUID) and _k.isupper() and _k not in _ALIASES:
        NAMES.setdefault(_v, _k)
del _k, _v


def _coerce(g: UUID | bytes | str) -> UUID:
    if isinstance(g, UUID):
        return g
    if isinstance(g, (bytes, bytearray, memoryview)):
        return guid_from_bytes(bytes(g))
    if isinstance(g, str):
        return UUID(g)
    raise TypeError(f"not a GUID: {g!r}")


def guid_name(g: UUID | bytes | str) -> str:
    """The constant's name for ``g`` (UUID, 16 in-memory bytes or text), else its canonical string."""
    u = _coerce(g)
    return NAMES.get(u, str(u))


def lookup(name: str) -> UUID:
    """The GUID constant called ``name`` (KeyError if unknown)."""
    v = globals().get(name)
    if not isinstance(v, UUID) or not name.isupper():
        raise KeyError(name)
    return v


def guid_from_bytes(b: bytes) -> UUID:
    """EFI_GUID as laid out in guest memory (16 bytes, mixed-endian) → UUID."""
    if len(b) != 16:
        raise ValueError(f"EFI_GUID needs 16 bytes, got {len(b)}")
    return UUID(bytes_le=bytes(b))


def guid_to_bytes(g: UUID | str) -> bytes:
    """UUID (or its text) → the 16 bytes of an EFI_GUID in guest memory."""
    return _coerce(g).bytes_le
