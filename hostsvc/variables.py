"""UEFI variables from an in-memory store (UEFI 2.10 §8.2 Variable Services).

Seeds come from ``--var`` options (:func:`parse_var_option`); every SetVariable the payload
makes is recorded so the run summary can show what the payload left behind.
"""

from __future__ import annotations

import pathlib
import uuid
from dataclasses import dataclass, field

from hostsvc import status as S
from hostsvc.guids import EFI_GLOBAL_VARIABLE
from hostsvc.status import EfiError
from vmrun.errors import BadOptionError

NON_VOLATILE = 0x01
BOOTSERVICE_ACCESS = 0x02
RUNTIME_ACCESS = 0x04
HARDWARE_ERROR_RECORD = 0x08
AUTHENTICATED_WRITE_ACCESS = 0x10
TIME_BASED_AUTHENTICATED_WRITE_ACCESS = 0x20
APPEND_WRITE = 0x40
ENHANCED_AUTHENTICATED_ACCESS = 0x80
_KNOWN_ATTRS = 0xFF

# The store's limits, what QueryVariableInfo reports and SetVariable enforces (UEFI 2.10 §8.2).
#: MaximumVariableSize: one variable's name (UTF-16 with its NUL) plus data, at most
MAX_VARIABLE_SIZE = 64 * 1024
#: storage for the payload's variables, beyond what the seeds (--var, --vars, --host-vars) use
STORAGE_SIZE = 256 * 1024
#: a name is at most this many characters (without the NUL)
MAX_NAME_CHARS = 1024
#: bytes each variable costs in the store beyond its name and data (EDK2's variable header is
#: some 60 bytes): many tiny variables also run out of storage
VARIABLE_OVERHEAD = 64


def variable_size(name: str, data: bytes) -> int:
    """What a variable counts against MaximumVariableSize: its UTF-16 name with the NUL, and data."""
    return 2 * (len(name) + 1) + len(data)


@dataclass
class Variable:
    name: str
    guid: uuid.UUID
    attributes: int
    data: bytes


@dataclass
class VariableStore:
    """The variables, and how often the payload wrote each (in first-write order).

    Storage is :data:`STORAGE_SIZE` bytes beyond what the seeds use (so ``--host-vars`` with a
    full store still leaves the payload room); each variable costs its name, data and
    :data:`VARIABLE_OVERHEAD`."""
    vars: dict[tuple[str, uuid.UUID], Variable] = field(default_factory=dict)
    writes: dict[tuple[str, uuid.UUID], int] = field(default_factory=dict)
    seeded_bytes: int = 0

    def seed(self, name: str, guid: uuid.UUID, data: bytes,
             attributes: int = NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS) -> None:
        self.vars[(name, guid)] = Variable(name, guid, attributes, data)
        self.seeded_bytes += variable_size(name, data) + VARIABLE_OVERHEAD

    @property
    def storage_size(self) -> int:
        """MaximumVariableStorageSize (QueryVariableInfo)."""
        return self.seeded_bytes + STORAGE_SIZE

    @property
    def used_bytes(self) -> int:
        return sum(variable_size(v.name, v.data) + VARIABLE_OVERHEAD for v in self.vars.values())

    @property
    def remaining_bytes(self) -> int:
        """RemainingVariableStorageSize (QueryVariableInfo)."""
        return max(self.storage_size - self.used_bytes, 0)

    def summary(self) -> list[dict]:
        """The variables the payload set (final value, or deleted), for the run summary."""
        out = []
        for (name, guid), count in self.writes.items():
            v = self.vars.get((name, guid))
            entry = {"name": name, "guid": str(guid), "writes": count}
            if v is None:
                entry["deleted"] = True
            else:
                entry.update(attributes=v.attributes, size=len(v.data), data=v.data.hex())
                if len(v.data) % 2 == 0 and v.data.endswith(b"\0\0"):
                    try:
                        text = v.data.decode("utf-16-le").rstrip("\0")
                    except UnicodeDecodeError:
                        text = ""
                    if text and text.isprintable():
                        entry["text"] = text
            out.append(entry)
        return out

    def get(self, name: str, guid: uuid.UUID) -> Variable:
        v = self.vars.get((name, guid))
        if v is None:
            raise EfiError(S.NOT_FOUND, f"{name}-{guid}")
        return v

    def next_name(self, name: str, guid: uuid.UUID) -> Variable:
        keys = list(self.vars)
        if name == "":
            idx = 0
        else:
            try:
                idx = keys.index((name, guid)) + 1
            except ValueError:
                raise EfiError(S.INVALID_PARAMETER, f"{name}-{guid} is not a variable") from None
        if idx >= len(keys):
            raise EfiError(S.NOT_FOUND, "no more variables")
        return self.vars[keys[idx]]

    def set(self, name: str, guid: uuid.UUID, attributes: int, data: bytes) -> None:
        """SetVariable (§8.2): DataSize 0 or Attributes 0 deletes; APPEND_WRITE appends.

        The limits QueryVariableInfo reports hold: a variable larger than MaximumVariableSize is
        EFI_INVALID_PARAMETER ("the DataSize exceeds the maximum allowed"), one that does not
        fit the remaining storage EFI_OUT_OF_RESOURCES; a name longer than
        :data:`MAX_NAME_CHARS` is EFI_INVALID_PARAMETER."""
        if not name:
            raise EfiError(S.INVALID_PARAMETER, "empty variable name")
        if len(name) > MAX_NAME_CHARS:
            raise EfiError(S.INVALID_PARAMETER, f"variable name of {len(name)} characters (at most "
                                                f"{MAX_NAME_CHARS})")
        if attributes & ~_KNOWN_ATTRS:
            raise EfiError(S.INVALID_PARAMETER, f"unknown attributes {attributes:#x}")
        if attributes & (AUTHENTICATED_WRITE_ACCESS | TIME_BASED_AUTHENTICATED_WRITE_ACCESS
                         | ENHANCED_AUTHENTICATED_ACCESS):
            raise EfiError(S.UNSUPPORTED, "authenticated variables are not supported")
        if attributes & RUNTIME_ACCESS and not attributes & BOOTSERVICE_ACCESS:
            raise EfiError(S.INVALID_PARAMETER, "RUNTIME_ACCESS without BOOTSERVICE_ACCESS")
        key = (name, guid)
        existing = self.vars.get(key)
        append = bool(attributes & APPEND_WRITE)
        if (not data and not append) or attributes & ~APPEND_WRITE == 0:
            if existing is None:
                raise EfiError(S.NOT_FOUND, f"delete of missing {name}")
            self._count_write(key)
            del self.vars[key]
            return
        attrs = attributes & ~APPEND_WRITE
        if existing is not None and existing.attributes != attrs:
            raise EfiError(S.INVALID_PARAMETER, f"{name} exists with attributes {existing.attributes:#x}")
        new_data = existing.data + data if append and existing is not None else bytes(data)
        size = variable_size(name, new_data)
        if size > MAX_VARIABLE_SIZE:
            raise EfiError(S.INVALID_PARAMETER, f"{name} would be {size} bytes (name and data), more than "
                                                f"MaximumVariableSize {MAX_VARIABLE_SIZE}")
        old_cost = variable_size(name, existing.data) + VARIABLE_OVERHEAD if existing is not None else 0
        grow = size + VARIABLE_OVERHEAD - old_cost
        if grow > 0 and grow > self.remaining_bytes:
            raise EfiError(S.OUT_OF_RESOURCES, f"{name} needs {grow} more bytes of variable storage, "
                                               f"{self.remaining_bytes} remain")
        self._count_write(key)
        if existing is not None:
            existing.data = new_data
        else:
            self.vars[key] = Variable(name, guid, attrs, new_data)

    def _count_write(self, key: tuple[str, uuid.UUID]) -> None:
        self.writes[key] = self.writes.get(key, 0) + 1


def parse_var_option(text: str) -> tuple[str, uuid.UUID, bytes]:
    """``NAME[:GUID]=VALUE`` with VALUE one of ``hex:0a0b``, ``str:text`` (UTF-16LE, NUL added),
    ``u8:N``, ``u32:N``, ``@FILE`` (raw bytes). The GUID defaults to EFI_GLOBAL_VARIABLE."""
    if "=" not in text:
        raise BadOptionError(f"--var {text!r}: expected NAME[:GUID]=VALUE")
    key, value = text.split("=", 1)
    name, _, guid_text = key.partition(":")
    if not name:
        raise BadOptionError(f"--var {text!r}: empty name")
    try:
        guid = uuid.UUID(guid_text) if guid_text else EFI_GLOBAL_VARIABLE
    except ValueError:
        raise BadOptionError(f"--var {text!r}: {guid_text!r} is not a GUID") from None
    try:
        if value.startswith("hex:"):
            data = bytes.fromhex(value[4:])
        elif value.startswith("str:"):
            data = (value[4:] + "\0").encode("utf-16-le")
        elif value.startswith("u8:"):
            data = int(value[3:], 0).to_bytes(1, "little")
        elif value.startswith("u32:"):
            data = int(value[4:], 0).to_bytes(4, "little")
        elif value.startswith("@"):
            data = pathlib.Path(value[1:]).read_bytes()
        else:
            raise BadOptionError(f"--var {text!r}: value must start with hex:, str:, u8:, u32: or @")
    except (ValueError, OverflowError, OSError) as e:
        raise BadOptionError(f"--var {text!r}: {e}") from None
    return name, guid, data


def load_vars_file(path) -> list[tuple[str, uuid.UUID, bytes, int]]:
    """``--vars FILE``: a JSON list of {"name", "guid" (default global), "data" hex | "text"
    (UTF-16, NUL added), "attributes" (default NV|BS|RT)}."""
    import json
    try:
        raw = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadOptionError(f"--vars {path}: {e}") from None
    if not isinstance(raw, list):
        raise BadOptionError(f"--vars {path}: expected a JSON list of variables")
    out = []
    for i, item in enumerate(raw):
        try:
            name = item["name"]
            guid = uuid.UUID(item.get("guid", str(EFI_GLOBAL_VARIABLE)))
            if "text" in item:
                data = (item["text"] + "\0").encode("utf-16-le")
            else:
                data = bytes.fromhex(item["data"])
            attrs = int(item.get("attributes", NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS))
        except (KeyError, TypeError, ValueError) as e:
            raise BadOptionError(f"--vars {path}: entry {i}: {e}") from None
        out.append((name, guid, data, attrs))
    return out


def host_variables(root="/sys/firmware/efi/efivars") -> list[tuple[str, uuid.UUID, bytes, int]]:
    """``--host-vars``: this machine's UEFI variables from efivarfs (``Name-GUID`` files whose
    first 4 bytes are the attributes)."""
    d = pathlib.Path(root)
    if not d.is_dir():
        raise BadOptionError(f"--host-vars: {root} does not exist (this machine did not boot with UEFI, "
                             "or efivarfs is not mounted)")
    out = []
    for f in sorted(d.iterdir()):
        guid_text = f.name[-36:]
        try:
            guid = uuid.UUID(guid_text)
            raw = f.read_bytes()
        except (ValueError, OSError):
            continue
        if len(raw) < 4:
            continue
        out.append((f.name[:-37], guid, raw[4:], int.from_bytes(raw[:4], "little")))
    return out
