"""hostsvc.devicepath (UEFI 2.10 §10) and hostsvc.guids."""

from __future__ import annotations

import struct
from uuid import UUID

import pytest

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc.status import INVALID_PARAMETER, EfiError

END = bytes.fromhex("7fff0400")
INITRD = "5568e427-68fc-4f3d-ac74-ca555231cc68"
PART = UUID("a1b2c3d4-e5f6-4718-9a0b-1c2d3e4f5a6b")


def _raises_invalid(fn, *a):
    with pytest.raises(EfiError) as ei:
        fn(*a)
    assert ei.value.status == INVALID_PARAMETER
    return ei.value


# ---------------------------------------------------------------- guids

def test_guid_memory_layout_is_bytes_le():
    b = G.guid_to_bytes(G.LOADED_IMAGE)
    assert b == bytes.fromhex("a1311b5b6295d2118e3f00a0c969723b")
    assert G.guid_from_bytes(b) == G.LOADED_IMAGE
    with pytest.raises(ValueError):
        G.guid_from_bytes(b[:15])


def test_guid_names_and_fallback():
    assert G.guid_name(G.LINUX_EFI_INITRD_MEDIA) == "LINUX_EFI_INITRD_MEDIA"
    assert G.guid_name(G.guid_to_bytes(G.LOAD_FILE2)) == "LOAD_FILE2"
    assert G.guid_name(G.EFI_LOAD_FILE_PROTOCOL) == "LOAD_FILE"          # alias maps to primary name
    assert G.guid_name("12345678-1234-1234-1234-123456789abc") == "12345678-1234-1234-1234-123456789abc"
    assert G.NAMES[G.DEVICE_PATH] == "DEVICE_PATH"
    assert G.lookup("TCG2") == UUID("607f766c-7455-42be-930b-e4d76db2720f")


@pytest.mark.parametrize("name,text", [
    # values that are easy to get wrong (checked against MdePkg.dec / linux/efi.h)
    ("CC_MEASUREMENT", "96751a3d-72f4-41a6-a794-ed5d0e67ae6b"),
    ("OVMF_SEV_MEMORY_ACCEPTANCE", "c5a010fe-38a7-4531-8a4a-0500d2fd1649"),
    ("LINUX_EFI_SCREEN_INFO", "e03fc20a-85dc-406e-b90e-4ab502371d95"),
    ("ACPI_20_TABLE", "8868e871-e4f1-11d3-bc22-0080c73c8881"),
    ("ACPI_TABLE", "eb9d2d30-2d88-11d3-9a16-0090273fc14d"),
    ("MEMORY_ATTRIBUTE", "f4560cf6-40ec-4b4a-a192-bf1d57d0b189"),
    ("LINUX_EFI_LOADER_ENTRY", "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"),
    ("SECURITY2_ARCH", "94ab2f58-1438-4ef1-9152-18941a3a0e68"),
    ("DEVICE_PATH_UTILITIES", "0379be4e-d706-437d-b037-edb82fb772a4"),
])
def test_selected_guid_values(name, text):
    assert G.lookup(name) == UUID(text)


def test_no_two_primary_names_share_a_value():
    primaries = [k for k, v in vars(G).items() if isinstance(v, UUID) and k.isupper()
                 and k not in G._ALIASES]
    assert len(primaries) == len(G.NAMES)


# ---------------------------------------------------------------- binary

def test_encode_exact_bytes_pciroot_pci():
    raw = DP.encode([DP.acpi("PNP0A03", 0), DP.pci(function=2, device=0x1F)])
    assert raw == bytes.fromhex("02010c00d041030a00000000" "01010600021f") + END
    assert DP.size(raw) == 22


def test_parse_round_trip_and_trailing_bytes_ignored():
    nodes = [DP.acpi(0x0A0341D0, 0), DP.pci(0, 1), DP.file_path("\\EFI\\BOOT\\BOOTX64.EFI")]
    raw = DP.encode(nodes)
    assert DP.parse(raw) == nodes
    assert DP.parse(raw + b"\xde\xad\xbe\xef" * 4) == nodes      # nothing after End Entire
    assert DP.size(raw + b"garbage") == len(raw)


def test_end_instance_kept_and_split():
    nodes = [DP.pci(0, 1), DP.end_instance(), DP.pci(0, 2)]
    raw = DP.encode(nodes)
    assert raw[6:10] == bytes.fromhex("7f010400")
    parsed = DP.parse(raw)
    assert parsed == nodes
    assert DP.split_instances(parsed) == [[DP.pci(0, 1)], [DP.pci(0, 2)]]


def test_empty_path_is_just_end():
    assert DP.encode([]) == END
    assert DP.parse(END) == []
    assert DP.size(END) == 4


@pytest.mark.parametrize("raw,why", [
    (b"", "empty"),
    (bytes.fromhex("7fff04"), "truncated header"),
    (bytes.fromhex("01010300") + END, "length 3 < 4"),
    (bytes.fromhex("01010000") + END, "length 0"),
    (bytes.fromhex("01011000ffff"), "node overruns buffer"),
    (bytes.fromhex("010106000001"), "no End node"),
    (bytes.fromhex("7fff0800") + b"\0" * 4, "End Entire with length 8"),
])
def test_parse_malformed(raw, why):
    _raises_invalid(DP.parse, raw)


def test_parse_max_len():
    raw = DP.encode([DP.file_path("x" * 100)])
    assert len(DP.parse(raw, max_len=len(raw))) == 1
    _raises_invalid(DP.parse, raw, len(raw) - 1)


def test_encode_rejects_end_entire_and_oversize():
    with pytest.raises(ValueError):
        DP.encode([DP.Node(0x7F, 0xFF, b"")])
    with pytest.raises(ValueError):
        DP.Node(4, 4, b"\0" * 65532)


# ---------------------------------------------------------------- constructors

def test_vendor_media_initrd_bytes():
    n = DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)
    assert n.to_bytes() == bytes.fromhex("04031400") + bytes.fromhex("27e46855fc683d4fac74ca555231cc68")
    assert DP.encode([n]) == n.to_bytes() + END       # what the Linux stub looks up: 24 bytes


def test_file_path_bytes():
    n = DP.file_path("\\a.efi")
    assert n.type == 4 and n.subtype == 4
    assert n.data == "\\a.efi\0".encode("utf-16-le")
    assert n.length == 4 + 14


def test_hard_drive_layout():
    n = DP.hard_drive(1, 0x800, 0x100000, PART)
    assert n.length == 42
    num, start, sz, sig, mbr, st = struct.unpack("<IQQ16sBB", n.data)
    assert (num, start, sz, sig, mbr, st) == (1, 0x800, 0x100000, PART.bytes_le, 2, 2)
    m = DP.hard_drive(2, 63, 1000, struct.pack("<I", 0xBE1AFDFA), mbr_type=1, sig_type=1)
    assert m.data[20:36] == bytes.fromhex("fafd1abe") + b"\0" * 12


def test_mem_mapped_and_vendor_hw_layout():
    assert DP.mem_mapped(11, 0x1000, 0x1fff).to_bytes() == \
        bytes.fromhex("01031800") + struct.pack("<IQQ", 11, 0x1000, 0x1fff)
    assert DP.vendor_hw(PART, b"\x01\x02").to_bytes() == bytes.fromhex("01041600") + PART.bytes_le + b"\x01\x02"


def test_eisa_id():
    assert DP.eisa_id("PNP0A03") == 0x0A0341D0
    assert DP.eisa_id_text(0x0A0341D0) == "PNP0A03"


# ---------------------------------------------------------------- to_text (§10.6.1.x, EDK2 output)

@pytest.mark.parametrize("nodes,text", [
    ([DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)], f"VenMedia({INITRD})"),
    ([DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA, b"\x01\xab")], f"VenMedia({INITRD},01ab)"),
    ([DP.hard_drive(1, 0x800, 0x100000, PART)], f"HD(1,GPT,{PART},0x800,0x100000)"),
    ([DP.hard_drive(1, 0x3F, 0xFBFC1, struct.pack("<I", 0xBE1AFDFA), 1, 1)], "HD(1,MBR,0xbe1afdfa,0x3f,0xfbfc1)"),
    ([DP.hard_drive(3, 1, 2, b"", 0, 0)], "HD(3,0,0,0x1,0x2)"),
    ([DP.file_path("\\EFI\\Linux\\x.efi")], "\\EFI\\Linux\\x.efi"),
    ([DP.acpi("PNP0A03", 0), DP.pci(0, 1)], "PciRoot(0x0)/Pci(0x1,0x0)"),
    ([DP.acpi("PNP0A08", 1), DP.pci(function=2, device=0x1F)], "PcieRoot(0x1)/Pci(0x1f,0x2)"),
    ([DP.acpi("PNP0501", 0)], "Serial(0x0)"),
    ([DP.acpi("PNP0C09", 2)], "Acpi(PNP0c09,0x2)"),
    ([DP.acpi(0x12345678, 1)], "Acpi(0x12345678,0x1)"),
    ([DP.mem_mapped(11, 0xfed00000, 0xfed003ff)], "MemoryMapped(0xb,0xfed00000,0xfed003ff)"),
    ([DP.vendor_hw(PART, b"\x00\xff")], f"VenHw({PART},00ff)"),
    ([DP.vendor_msg(PART)], f"VenMsg({PART})"),
    ([DP.controller(0)], "Ctrl(0x0)"),
    ([DP.cdrom(0, 0x10, 0x20)], "CDROM(0x0,0x10,0x20)"),
    ([DP.media_protocol(PART)], f"Media({PART})"),
    ([DP.Node(4, 6, PART.bytes_le)], f"FvFile({PART})"),
    ([DP.Node(1, 9, b"\x01\x02")], "HardwarePath(9,0102)"),
    ([DP.Node(2, 7, b"")], "AcpiPath(7)"),
    ([DP.Node(3, 99, b"\xab")], "Msg(99,ab)"),
    ([DP.Node(4, 50, b"\xab\xcd")], "MediaPath(50,abcd)"),
    ([DP.Node(0x33, 1, b"\x10")], "Path(51,1,10)"),
    ([DP.Node(1, 1, b"\x01")], "HardwarePath(1,01)"),          # PCI node with bad length → generic
    ([DP.pci(0, 1), DP.end_instance(), DP.pci(0, 2)], "Pci(0x1,0x0),Pci(0x2,0x0)"),
    ([], ""),
])
def test_to_text(nodes, text):
    assert DP.to_text(nodes) == text
    assert DP.to_text(DP.encode(nodes)) == text              # also from raw bytes


def test_full_boot_option_path_text():
    nodes = [DP.acpi("PNP0A03", 0), DP.pci(0, 4), DP.hard_drive(1, 0x800, 0x100000, PART),
             DP.file_path("\\EFI\\Linux\\x.efi")]
    assert DP.to_text(nodes) == f"PciRoot(0x0)/Pci(0x4,0x0)/HD(1,GPT,{PART},0x800,0x100000)/\\EFI\\Linux\\x.efi"


# ---------------------------------------------------------------- from_text

@pytest.mark.parametrize("text", [
    f"VenMedia({INITRD})",
    f"VenMedia({INITRD},0102)",
    f"PciRoot(0x0)/Pci(0x1,0x0)/HD(1,GPT,{PART},0x800,0x100000)/\\EFI\\Linux\\x.efi",
    "PciRoot(0x0)/Pci(0x1f,0x2)/HD(1,MBR,0xbe1afdfa,0x3f,0xfbfc1)",
    "HD(3,0,0,0x1,0x2)",
    "Acpi(PNP0c09,0x2)",
    "Acpi(0x12345678,0x1)",
    "Floppy(0x0)",
    "MemoryMapped(0xb,0xfed00000,0xfed003ff)",
    f"VenHw({PART},00ff)",
    f"VenMsg({PART})",
    "Ctrl(0x1)",
    "CDROM(0x0,0x10,0x20)",
    f"Media({PART})",
    f"Fv({PART})",
    "Offset(0x10,0x20)",
    "HardwarePath(9,0102)",
    "Msg(99,ab)",
    "MediaPath(50,abcd)",
    "BbsPath(2)",
    "Path(51,1,10)",
    "Pci(0x1,0x0),Pci(0x2,0x0)",
    "\\kernel",
])
def test_text_round_trip(text):
    nodes = DP.from_text(text)
    assert DP.to_text(nodes) == text
    assert DP.parse(DP.encode(nodes)) == nodes


def test_from_text_values():
    assert DP.from_text("PciRoot(0)/Pci(31,2)") == [DP.acpi(0x0A0341D0, 0), DP.pci(function=2, device=31)]
    assert DP.from_text("Acpi(PNP0A03,0)") == [DP.acpi("PNP0A03", 0)]
    hd = DP.from_text(f"HD(1,GPT,{str(PART).upper()},0x800,0x100000)")[0]
    assert hd == DP.hard_drive(1, 0x800, 0x100000, PART, mbr_type=2, sig_type=2)
    mbr = DP.from_text("HD(1,MBR,0xBE1AFDFA,0x3F,0xFBFC1)")[0]
    assert mbr == DP.hard_drive(1, 0x3F, 0xFBFC1, bytes.fromhex("fafd1abe"), mbr_type=1, sig_type=1)
    assert DP.from_text(f"VenMedia({INITRD})") == [DP.vendor_media(G.LINUX_EFI_INITRD_MEDIA)]
    assert DP.from_text("\\EFI\\BOOT\\BOOTX64.EFI") == [DP.file_path("\\EFI\\BOOT\\BOOTX64.EFI")]
    assert DP.from_text("Unknown(1,2)") == [DP.file_path("Unknown(1,2)")]      # EDK2: unknown → file path
    assert DP.from_text("") == []


@pytest.mark.parametrize("text", [
    "Pci(1)",
    "Pci(x,0)",
    "HD(1,GPT,not-a-guid,0,0)",
    "VenMedia(5568e427)",
    f"VenMedia({INITRD},abc)",
    "PciRoot(0x0)/Pci(0x1,0x0",
    "Pci(0x1,0x0))",
])
def test_from_text_malformed(text):
    _raises_invalid(DP.from_text, text)


def test_is_prefix():
    a = [DP.acpi("PNP0A03", 0), DP.pci(0, 1)]
    b = a + [DP.hard_drive(1, 0x800, 0x100000, PART)]
    assert DP.is_prefix(a, b)
    assert DP.is_prefix(b, b)
    assert DP.is_prefix([], b)
    assert not DP.is_prefix(b, a)
    assert not DP.is_prefix([DP.acpi("PNP0A03", 0), DP.pci(0, 2)], b)
    assert not DP.is_prefix([DP.acpi("PNP0A03", 1)], b)
