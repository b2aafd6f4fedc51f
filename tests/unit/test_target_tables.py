"""The target's SMBIOS tables, copied into the VM at their physical addresses."""

import struct

from vmrun.runner import host_smbios_tables
from vmrun.vm.machine import table_pages


def _fake(tmp_path, entry: bytes, table: bytes, systab: str):
    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "smbios_entry_point").write_bytes(entry)
    (dmi / "DMI").write_bytes(table)
    st = tmp_path / "systab"
    st.write_text(systab)
    return st, dmi


def test_smbios3_entry_point_and_table(tmp_path):
    # DSP0134 §5.2.2: "_SM3_", checksum, length 0x18, major, minor, docrev, revision, reserved,
    # max structure size (u32), structure table address (u64) at offset 0x10
    entry = b"_SM3_" + bytes([0, 0x18, 3, 0, 0, 1, 0]) + struct.pack("<IQ", 0x1234, 0x7F917000)
    st, dmi = _fake(tmp_path, entry, b"\x01" * 0x1234, "ACPI20=0x7fb7e014\nSMBIOS3=0x7f918000\n")
    assert host_smbios_tables(st, dmi) == [(0x7F918000, entry), (0x7F917000, b"\x01" * 0x1234)]


def test_smbios2_entry_point_and_table(tmp_path):
    # DSP0134 §5.2.1: "_SM_" … "_DMI_" at 0x10, structure table length u16 at 0x16, address u32 at 0x18
    entry = b"_SM_" + bytes(12) + b"_DMI_" + b"\0" + struct.pack("<HIH", 0x300, 0xF0100, 9) + b"\0"
    assert len(entry) == 0x1F
    st, dmi = _fake(tmp_path, entry, b"\x02" * 0x300, "SMBIOS=0xf0000\n")
    assert host_smbios_tables(st, dmi) == [(0xF0000, entry), (0xF0100, b"\x02" * 0x300)]


def test_unreadable_or_unannounced_tables_give_nothing(tmp_path):
    st = tmp_path / "systab"
    st.write_text("SMBIOS3=0x7f918000\n")
    assert host_smbios_tables(st, tmp_path / "nodmi") == []
    entry = b"_SM3_" + bytes(11) + struct.pack("<Q", 0x7F917000)
    st2, dmi = _fake(tmp_path, entry, b"x", "ACPI20=0x1000\n")  # systab names no SMBIOS table
    assert host_smbios_tables(st2, dmi) == []


def test_table_pages_skip_ram_and_merge():
    ram = [(0x100000, 0x7F000000)]
    tables = [(0x7F918000, bytes(24)), (0x7F917000, bytes(0x1234)), (0x7FF00000, bytes(1)),
              (0x200000, bytes(8)),              # inside RAM: left out (it is RAM already)
              (0x1_2000_0000, bytes(8))]         # above 4 GiB: not identity-mapped by the firmware
    assert table_pages(tables, ram) == [(0x7F917000, 0x7F919000), (0x7FF00000, 0x7FF01000)]
