"""EFI_RUNTIME_SERVICES before ExitBootServices (UEFI 2.10 §4.5, §8).

Time comes from the host clock; variables from :class:`hostsvc.variables.VariableStore`.
After ExitBootServices there is no host: the handoff points every entry at guest code that
returns EFI_UNSUPPORTED (``rt_unsupported`` in guest/firmware.S).
"""

from __future__ import annotations

import datetime as _dt

from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.dispatch import GUIDPTR, OPTPTR, PTR, U32, UINTN, efiapi, size_in_out
from hostsvc.status import EfiError
from hostsvc.variables import MAX_NAME_CHARS, MAX_VARIABLE_SIZE

#: EFI_TIME_CAPABILITIES GetTime reports: 1 Hz resolution, 1 s (1e6 ppm) accuracy, not reset to
#: zero on a time set
TIME_CAPABILITIES = dict(Resolution=1, Accuracy=1_000_000, SetsToZero=0)


class ResetSystemCalled(Exception):
    def __init__(self, reset_type: int, status: int):
        self.reset_type, self.status = reset_type, status


class RuntimeServices:
    def __init__(self, fw, now=None):
        self.fw = fw
        self.mem = fw.mem
        self.now = now or (lambda: _dt.datetime.now(_dt.timezone.utc))

    @efiapi("GetTime", ("time", PTR), ("capabilities", OPTPTR))
    def get_time(self, time, capabilities):
        """§8.3 GetTime: EFI_TIME in UTC (TimeZone 0), from the host clock."""
        t = self.now()
        self.mem.write_struct(time, U.EFI_TIME(Year=t.year, Month=t.month, Day=t.day, Hour=t.hour,
                                               Minute=t.minute, Second=t.second,
                                               Nanosecond=t.microsecond * 1000, TimeZone=0, Daylight=0))
        if capabilities:
            self.mem.write_struct(capabilities, U.EFI_TIME_CAPABILITIES(**TIME_CAPABILITIES))

    @efiapi("GetVariable", ("variable_name", PTR), ("vendor_guid", GUIDPTR), ("attributes", OPTPTR),
            ("data_size", PTR), ("data", OPTPTR))
    def get_variable(self, variable_name, vendor_guid, attributes, data_size, data):
        name = self.mem.read_utf16z(variable_name, MAX_NAME_CHARS)
        var = self.fw.variables.get(name, vendor_guid)
        size_in_out(self.mem, data_size, len(var.data), name)
        if not data:
            raise EfiError(S.INVALID_PARAMETER, "Data is NULL")
        self.mem.write(data, var.data)
        if attributes:
            self.mem.write_u32(attributes, var.attributes)

    @efiapi("GetNextVariableName", ("variable_name_size", PTR), ("variable_name", PTR),
            ("vendor_guid", PTR))
    def get_next_variable_name(self, variable_name_size, variable_name, vendor_guid):
        size = self.mem.read_u64(variable_name_size)
        current = self.mem.read_utf16z(variable_name, max(1, min(size // 2, MAX_NAME_CHARS)))
        guid = self.mem.read_struct(vendor_guid, U.EFI_GUID).uuid
        var = self.fw.variables.next_name(current, guid)
        raw = (var.name + "\0").encode("utf-16-le")
        size_in_out(self.mem, variable_name_size, len(raw), "the next name")
        self.mem.write(variable_name, raw)
        self.mem.write_struct(vendor_guid, U.EFI_GUID.from_uuid(var.guid))

    @efiapi("SetVariable", ("variable_name", PTR), ("vendor_guid", GUIDPTR), ("attributes", U32),
            ("data_size", UINTN), ("data", OPTPTR))
    def set_variable(self, variable_name, vendor_guid, attributes, data_size, data):
        name = self.mem.read_utf16z(variable_name, MAX_NAME_CHARS + 1)
        if data_size and not data:
            raise EfiError(S.INVALID_PARAMETER, "Data is NULL")
        if data_size > MAX_VARIABLE_SIZE:  # before the host copies it
            raise EfiError(S.INVALID_PARAMETER, f"DataSize {data_size:#x} is more than MaximumVariableSize "
                                                f"{MAX_VARIABLE_SIZE}")
        payload = self.mem.read(data, data_size) if data_size else b""
        self.fw.variables.set(name, vendor_guid, attributes, payload)

    @efiapi("QueryVariableInfo", ("attributes", U32), ("maximum_variable_storage_size", PTR),
            ("remaining_variable_storage_size", PTR), ("maximum_variable_size", PTR))
    def query_variable_info(self, attributes, maximum_variable_storage_size,
                            remaining_variable_storage_size, maximum_variable_size):
        if attributes == 0:
            raise EfiError(S.INVALID_PARAMETER, "Attributes is 0")
        store = self.fw.variables
        self.mem.write_u64(maximum_variable_storage_size, store.storage_size)
        self.mem.write_u64(remaining_variable_storage_size, store.remaining_bytes)
        self.mem.write_u64(maximum_variable_size, MAX_VARIABLE_SIZE)

    @efiapi("GetNextHighMonotonicCount", ("high_count", PTR))
    def get_next_high_monotonic_count(self, high_count):
        """§8.5.2: increments the high 32 bits of the counter GetNextMonotonicCount reads."""
        high = (self.fw.monotonic_count >> 32) + 1
        self.fw.monotonic_count = high << 32
        self.mem.write_u32(high_count, high)

    @efiapi("ResetSystem", ("reset_type", U32), ("reset_status", UINTN), ("data_size", UINTN),
            ("reset_data", OPTPTR))
    def reset_system(self, reset_type, reset_status, data_size, reset_data):
        raise ResetSystemCalled(reset_type, reset_status)
