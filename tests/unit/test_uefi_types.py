"""hostsvc.uefi_types against the C definitions the EFI test applications are built with.

The reference is tests/efi/include/efi.h (written from the UEFI and TCG specifications),
compiled by mingw-w64 with the apps' own flags (tests/efi/build.py): a C file that includes it
emits ``sizeof`` and every ``offsetof`` of each Python structure, the constants and the GUIDs as
one initialised object in its own section; the object file is compiled with ``-c`` and the
section's bytes are read back with objcopy. Every structure of the module must be in efi.h under
its own name with the same members (compilation fails otherwise), and every size and offset must
match.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from hostsvc import events as EV
from hostsvc import guids as G
from hostsvc import handles as H
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc import variables as V
from hostsvc.protocols import filesystem as F
from hostsvc.protocols import tcg2 as TCG
from vmrun.errors import GuestMemoryError
from vmrun.vm import layout as L
from vmrun.vm.memory import GuestMemory

REPO = Path(__file__).resolve().parents[2]
EFI_DIR = REPO / "tests" / "efi"
MAGIC = 0x54554F59414C4D56  # "VMLAYOUT"
SECTION = ".vmrun"

STRUCTURES = U.structures()

# efi.h macro -> the Python value it must equal
CONSTANTS: dict[str, int] = {
    "EFI_SYSTEM_TABLE_SIGNATURE": U.EFI_SYSTEM_TABLE.SIGNATURE,
    "EFI_BOOT_SERVICES_SIGNATURE": U.EFI_BOOT_SERVICES.SIGNATURE,
    "EFI_RUNTIME_SERVICES_SIGNATURE": U.EFI_RUNTIME_SERVICES.SIGNATURE,
    "EFI_2_70_SYSTEM_TABLE_REVISION": U.EFI_2_70_SYSTEM_TABLE_REVISION,
    "EFI_LOADED_IMAGE_PROTOCOL_REVISION": U.EFI_LOADED_IMAGE_PROTOCOL.REVISION,
    "EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_REVISION": U.EFI_SIMPLE_FILE_SYSTEM_PROTOCOL.REVISION,
    "EFI_FILE_PROTOCOL_REVISION": U.EFI_FILE_PROTOCOL.REVISION,
    "EFI_RT_PROPERTIES_TABLE_VERSION": U.EFI_RT_PROPERTIES_TABLE.VERSION,
    "EFI_TCG2_EVENT_HEADER_VERSION": U.EFI_TCG2_EVENT_HEADER.VERSION,
    "EFI_TCG2_FINAL_EVENTS_TABLE_VERSION": U.EFI_TCG2_FINAL_EVENTS_TABLE.VERSION,
    "EFI_MEMORY_DESCRIPTOR_VERSION": U.EFI_MEMORY_DESCRIPTOR_VERSION,
    "EFI_UNSPECIFIED_TIMEZONE": U.EFI_UNSPECIFIED_TIMEZONE,
    "EFI_PAGE_SIZE": L.PAGE_SIZE,
    "SIZE_OF_EFI_FILE_INFO": U.SIZE_OF_EFI_FILE_INFO,
    "SIZE_OF_EFI_FILE_SYSTEM_INFO": U.SIZE_OF_EFI_FILE_SYSTEM_INFO,
    **{f"Efi{t.name}": t.value for t in U.MemType},
    "EfiMaxMemoryType": U.MAX_MEMORY_TYPE,
    **{f"Allocate{t.name}": t.value for t in U.AllocType},
    "MaxAllocateType": U.MAX_ALLOCATE_TYPE,
    **{name: getattr(U, name) for name in dir(U) if name.startswith("EFI_MEMORY_") and name.isupper()
       and isinstance(getattr(U, name), int) and name != "EFI_MEMORY_DESCRIPTOR_VERSION"},
    **{f"EFI_{name}": value for name, value in vars(S).items()
       if name.isupper() and isinstance(value, int) and name not in ("ERROR_BIT", "NAMES")
       and name in {"SUCCESS", "LOAD_ERROR", "INVALID_PARAMETER", "UNSUPPORTED", "BAD_BUFFER_SIZE",
                    "BUFFER_TOO_SMALL", "NOT_READY", "DEVICE_ERROR", "WRITE_PROTECTED", "OUT_OF_RESOURCES",
                    "VOLUME_CORRUPTED", "VOLUME_FULL", "NO_MEDIA", "MEDIA_CHANGED", "NOT_FOUND",
                    "ACCESS_DENIED", "NO_RESPONSE", "NO_MAPPING", "TIMEOUT", "NOT_STARTED",
                    "ALREADY_STARTED", "ABORTED", "SECURITY_VIOLATION", "WARN_DELETE_FAILURE"}},
    "EFI_VARIABLE_NON_VOLATILE": V.NON_VOLATILE,
    "EFI_VARIABLE_BOOTSERVICE_ACCESS": V.BOOTSERVICE_ACCESS,
    "EFI_VARIABLE_RUNTIME_ACCESS": V.RUNTIME_ACCESS,
    "EFI_VARIABLE_HARDWARE_ERROR_RECORD": V.HARDWARE_ERROR_RECORD,
    "EFI_VARIABLE_AUTHENTICATED_WRITE_ACCESS": V.AUTHENTICATED_WRITE_ACCESS,
    "EFI_VARIABLE_TIME_BASED_AUTHENTICATED_WRITE_ACCESS": V.TIME_BASED_AUTHENTICATED_WRITE_ACCESS,
    "EFI_VARIABLE_APPEND_WRITE": V.APPEND_WRITE,
    "EVT_TIMER": EV.EVT_TIMER,
    "EVT_RUNTIME": EV.EVT_RUNTIME,
    "EVT_NOTIFY_WAIT": EV.EVT_NOTIFY_WAIT,
    "EVT_NOTIFY_SIGNAL": EV.EVT_NOTIFY_SIGNAL,
    "EVT_SIGNAL_EXIT_BOOT_SERVICES": EV.EVT_SIGNAL_EXIT_BOOT_SERVICES,
    "EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE": EV.EVT_SIGNAL_VIRTUAL_ADDRESS_CHANGE,
    "TPL_APPLICATION": EV.TPL_APPLICATION,
    "TPL_CALLBACK": EV.TPL_CALLBACK,
    "TPL_NOTIFY": EV.TPL_NOTIFY,
    "TPL_HIGH_LEVEL": EV.TPL_HIGH_LEVEL,
    "TimerCancel": EV.TIMER_CANCEL,
    "TimerPeriodic": EV.TIMER_PERIODIC,
    "TimerRelative": EV.TIMER_RELATIVE,
    "AllHandles": H.ALL_HANDLES,
    "ByRegisterNotify": H.BY_REGISTER_NOTIFY,
    "ByProtocol": H.BY_PROTOCOL,
    "EFI_OPEN_PROTOCOL_BY_HANDLE_PROTOCOL": H.BY_HANDLE_PROTOCOL,
    "EFI_OPEN_PROTOCOL_GET_PROTOCOL": H.GET_PROTOCOL,
    "EFI_OPEN_PROTOCOL_TEST_PROTOCOL": H.TEST_PROTOCOL,
    "EFI_OPEN_PROTOCOL_BY_CHILD_CONTROLLER": H.BY_CHILD_CONTROLLER,
    "EFI_OPEN_PROTOCOL_BY_DRIVER": H.BY_DRIVER,
    "EFI_OPEN_PROTOCOL_EXCLUSIVE": H.EXCLUSIVE,
    "EFI_FILE_MODE_READ": F.MODE_READ,
    "EFI_FILE_MODE_WRITE": F.MODE_WRITE,
    "EFI_FILE_MODE_CREATE": F.MODE_CREATE,
    "EFI_FILE_READ_ONLY": F.ATTR_READ_ONLY,
    "EFI_FILE_HIDDEN": F.ATTR_HIDDEN,
    "EFI_FILE_SYSTEM": F.ATTR_SYSTEM,
    "EFI_FILE_RESERVED": F.ATTR_RESERVED,
    "EFI_FILE_DIRECTORY": F.ATTR_DIRECTORY,
    "EFI_FILE_ARCHIVE": F.ATTR_ARCHIVE,
    "EFI_FILE_VALID_ATTR": F.ATTR_VALID,
    "EFI_TCG2_EVENT_LOG_FORMAT_TCG_1_2": TCG.EVENT_LOG_FORMAT_TCG_1_2,
    "EFI_TCG2_EVENT_LOG_FORMAT_TCG_2": TCG.EVENT_LOG_FORMAT_TCG_2,
    "EFI_TCG2_EXTEND_ONLY": TCG.EFI_TCG2_EXTEND_ONLY,
    "PE_COFF_IMAGE": TCG.PE_COFF_IMAGE,
}

# efi.h GUID macro -> hostsvc.guids
GUIDS: dict[str, uuid.UUID] = {
    "EFI_LOADED_IMAGE_PROTOCOL_GUID": G.LOADED_IMAGE,
    "EFI_LOADED_IMAGE_DEVICE_PATH_PROTOCOL_GUID": G.LOADED_IMAGE_DEVICE_PATH,
    "EFI_DEVICE_PATH_PROTOCOL_GUID": G.DEVICE_PATH,
    "EFI_DEVICE_PATH_TO_TEXT_PROTOCOL_GUID": G.DEVICE_PATH_TO_TEXT,
    "EFI_DEVICE_PATH_FROM_TEXT_PROTOCOL_GUID": G.DEVICE_PATH_FROM_TEXT,
    "EFI_SIMPLE_TEXT_INPUT_PROTOCOL_GUID": G.SIMPLE_TEXT_INPUT,
    "EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL_GUID": G.SIMPLE_TEXT_OUTPUT,
    "EFI_RNG_PROTOCOL_GUID": G.RNG,
    "EFI_RNG_ALGORITHM_RAW": G.RNG_ALGORITHM_RAW,
    "EFI_LOAD_FILE2_PROTOCOL_GUID": G.LOAD_FILE2,
    "EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_GUID": G.SIMPLE_FILE_SYSTEM,
    "EFI_FILE_INFO_ID": G.FILE_INFO,
    "EFI_FILE_SYSTEM_INFO_ID": G.FILE_SYSTEM_INFO,
    "EFI_FILE_SYSTEM_VOLUME_LABEL_ID": G.FILE_SYSTEM_VOLUME_LABEL,
    "EFI_TCG2_PROTOCOL_GUID": G.TCG2,
    "EFI_TCG2_FINAL_EVENTS_TABLE_GUID": G.EFI_TCG2_FINAL_EVENTS,
    "EFI_RT_PROPERTIES_TABLE_GUID": G.EFI_RT_PROPERTIES_TABLE,
    "EFI_GLOBAL_VARIABLE": G.EFI_GLOBAL_VARIABLE,
    "EFI_IMAGE_SECURITY_DATABASE_GUID": G.EFI_IMAGE_SECURITY_DATABASE,
    "EFI_ACPI_20_TABLE_GUID": G.ACPI_20_TABLE,
    "LINUX_EFI_INITRD_MEDIA_GUID": G.LINUX_EFI_INITRD_MEDIA,
}


def _entries() -> list[tuple[tuple[str, ...], str]]:
    """(key, C expression) for every value the reference object carries, in its order."""
    out = []
    for name, ctype in STRUCTURES.items():
        out.append((("size", name), f"sizeof({name})"))
        for field, *_ in ctype._fields_:
            out.append((("offset", name, field), f"__builtin_offsetof({name}, {field})"))
    out += [(("const", name), f"(UINT64)({name})") for name in CONSTANTS]
    return out


def _build_module():
    spec = importlib.util.spec_from_file_location("efi_build", EFI_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict:
    """Every size, offset and constant as mingw-w64 computes them from efi.h, plus the GUIDs."""
    build = _build_module()
    cc = shutil.which(build.CC)
    objcopy = shutil.which(build.CC.replace("-gcc", "-objcopy")) if build.CC.endswith("-gcc") else None
    if cc is None or objcopy is None:  # the reference layout: never skipped
        pytest.fail(f"{build.CC} and its objcopy are needed (scripts/setup installs gcc-mingw-w64-x86-64)",
                    pytrace=False)
    entries = _entries()
    src = ['#include "efi.h"',
           f'const struct {{ UINT64 magic, count, values[{len(entries)}]; EFI_GUID guids[{len(GUIDS)}]; }}',
           f'vmrun_layout __attribute__((section("{SECTION}"), used)) = {{',
           f"    {MAGIC:#x}ULL, {len(entries)},",
           "    {", *(f"        {expr}," for _, expr in entries), "    },",
           "    {", *(f"        {macro}," for macro in GUIDS), "    },",
           "};"]
    d = tmp_path_factory.mktemp("uefi_types")
    (d / "layout.c").write_text("\n".join(src) + "\n")
    r = subprocess.run([cc, *build.CFLAGS, "-c", str(d / "layout.c"), "-o", str(d / "layout.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"efi.h lacks a structure, member or constant of hostsvc.uefi_types:\n{r.stderr}"
    subprocess.run([objcopy, "-O", "binary", "-j", SECTION, str(d / "layout.o"), str(d / "layout.bin")],
                   check=True)
    raw = (d / "layout.bin").read_bytes()
    magic, count = struct.unpack_from("<QQ", raw)
    assert (magic, count) == (MAGIC, len(entries)), "unexpected layout of the reference object"
    values = dict(zip((k for k, _ in entries), struct.unpack_from(f"<{count}Q", raw, 16)))
    at = 16 + 8 * count
    values["guids"] = {m: uuid.UUID(bytes_le=raw[at + 16 * i:at + 16 * i + 16]) for i, m in enumerate(GUIDS)}
    return values


def layout_mismatches(ctype: type, c_name: str, c_values: dict) -> list[str]:
    """How ``ctype`` differs from the C structure ``c_name``: its size and each field's offset."""
    out = []
    if ctypes.sizeof(ctype) != c_values[("size", c_name)]:
        out.append(f"sizeof({c_name}): Python {ctypes.sizeof(ctype)}, C {c_values[('size', c_name)]}")
    for field, *_ in ctype._fields_:
        py, c = getattr(ctype, field).offset, c_values[("offset", c_name, field)]
        if py != c:
            out.append(f"offsetof({c_name}, {field}): Python {py}, C {c}")
    return out


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_structure_matches_efi_h(c_values, name):
    assert layout_mismatches(STRUCTURES[name], name, c_values) == []


def test_every_structure_is_checked():
    # what the firmware writes into guest memory, at least
    assert {"EFI_TABLE_HEADER", "EFI_SYSTEM_TABLE", "EFI_BOOT_SERVICES", "EFI_RUNTIME_SERVICES",
            "EFI_CONFIGURATION_TABLE", "EFI_LOADED_IMAGE_PROTOCOL", "EFI_MEMORY_DESCRIPTOR", "EFI_TIME",
            "EFI_TIME_CAPABILITIES", "EFI_FILE_INFO", "EFI_FILE_SYSTEM_INFO", "EFI_FILE_PROTOCOL",
            "EFI_SIMPLE_FILE_SYSTEM_PROTOCOL", "EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL", "SIMPLE_TEXT_OUTPUT_MODE",
            "EFI_SIMPLE_TEXT_INPUT_PROTOCOL", "EFI_TCG2_BOOT_SERVICE_CAPABILITY", "EFI_TCG2_EVENT_HEADER",
            "EFI_TCG2_EVENT", "EFI_TCG2_FINAL_EVENTS_TABLE", "EFI_RT_PROPERTIES_TABLE",
            "EFI_OPEN_PROTOCOL_INFORMATION_ENTRY", "UEFI_IMAGE_LOAD_EVENT"} <= set(STRUCTURES)


def test_function_slots_are_fields_in_spec_order():
    for name, ctype in STRUCTURES.items():
        fns = getattr(ctype, "FUNCTIONS", ())
        fields = [f for f, *_ in ctype._fields_]
        if fns:
            first = fields.index(fns[0])
            assert fields[first:first + len(fns)] == list(fns), name
            assert all(dict(ctype._fields_)[f] is U.FUNCTION for f in fns), name


@pytest.mark.parametrize("name", list(CONSTANTS))
def test_constant_matches_efi_h(c_values, name):
    assert CONSTANTS[name] == c_values[("const", name)]


def test_guids_match_efi_h(c_values):
    assert c_values["guids"] == GUIDS


def test_a_wrong_offset_is_caught(c_values):
    """The comparison itself: a structure with one member of the wrong width is reported."""

    class Broken(U.Struct):  # EFI_LOADED_IMAGE_PROTOCOL with ImageCodeType as UINT64
        _fields_ = [(n, U.UINT64 if n == "ImageCodeType" else t)
                    for n, t in U.EFI_LOADED_IMAGE_PROTOCOL._fields_]

    class Packed(U.PackedStruct):  # natural alignment lost
        _fields_ = list(U.EFI_SYSTEM_TABLE._fields_)

    assert layout_mismatches(U.EFI_LOADED_IMAGE_PROTOCOL, "EFI_LOADED_IMAGE_PROTOCOL", c_values) == []
    broken = layout_mismatches(Broken, "EFI_LOADED_IMAGE_PROTOCOL", c_values)
    assert broken[1:] == ["offsetof(EFI_LOADED_IMAGE_PROTOCOL, ImageDataType): Python 88, C 84",
                          "offsetof(EFI_LOADED_IMAGE_PROTOCOL, Unload): Python 96, C 88"]
    assert broken[0] == "sizeof(EFI_LOADED_IMAGE_PROTOCOL): Python 104, C 96"
    assert "offsetof(EFI_SYSTEM_TABLE, ConsoleInHandle): Python 36, C 40" in \
        layout_mismatches(Packed, "EFI_SYSTEM_TABLE", c_values)


# --- the typed accessors on guest memory ---------------------------------------------------------

@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0x1000, 0x2000)
    yield m
    m.close()


def test_read_and_write_struct(mem):
    hdr = U.table_header(U.EFI_SYSTEM_TABLE)
    mem.write_struct(0x1100, hdr)
    assert mem.read(0x1100, 24) == struct.pack("<QIIII", 0x5453595320494249, (2 << 16) | 70, 120, 0, 0)
    back = mem.read_struct(0x1100, U.EFI_TABLE_HEADER)
    assert (back.Signature, back.HeaderSize) == (U.EFI_SYSTEM_TABLE.SIGNATURE, 120)
    back.CRC32 = 7  # a copy: guest memory is unchanged until written
    assert mem.read_u32(0x1100 + U.EFI_TABLE_HEADER.CRC32.offset) == 0
    guids = (U.EFI_GUID * 2)(U.EFI_GUID.from_uuid(G.LOADED_IMAGE), U.EFI_GUID.from_uuid(G.TCG2))
    mem.write_struct(0x2000, guids)
    assert mem.read(0x2000, 32) == G.LOADED_IMAGE.bytes_le + G.TCG2.bytes_le
    assert [g.uuid for g in mem.read_struct(0x2000, U.EFI_GUID * 2)] == [G.LOADED_IMAGE, G.TCG2]


@pytest.mark.parametrize("gpa", [0x0, 0x3000, 0x3000 - 100])  # below, above, straddling the end
def test_struct_accessors_refuse_bad_addresses(mem, gpa):
    with pytest.raises(GuestMemoryError) as e:
        mem.read_struct(gpa, U.EFI_SYSTEM_TABLE)
    assert (e.value.gpa, e.value.size) == (gpa, 120) and "read" in str(e.value)
    with pytest.raises(GuestMemoryError) as e:
        mem.write_struct(gpa, U.EFI_SYSTEM_TABLE())
    assert (e.value.gpa, e.value.size) == (gpa, 120) and "write" in str(e.value)
    if gpa == 0x3000 - 100:
        assert mem.read(0x3000 - 100, 100) == bytes(100)  # all or nothing: no partial write
