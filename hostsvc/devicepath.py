"""EFI device paths: binary parse/encode, constructors and the text forms
(UEFI 2.10 §10 "Device Path Protocol").

Binary layout (§10.2, §10.3): a device path is a packed sequence of nodes, each
``{UINT8 Type; UINT8 SubType; UINT16 Length /* incl. this 4-byte header */;
UINT8 Data[Length-4]}``, terminated by the End of Hardware Device Path node
(Type 0x7F) with Sub-Type 0xFF "End Entire Device Path".  Sub-Type 0x01 "End This
Instance" separates the instances of a multi-instance path (§10.3.1).  Multi-byte
fields are little-endian and nodes are not aligned.

Text forms follow §10.6 (Device Path Text Representation) and its node tables
§10.6.1.x, and match EDK2 ``DevicePathToText.c`` / ``DevicePathFromText.c``
byte for byte for the nodes handled here:

====================  =========  ==========================================
text                  type/sub   notes
====================  =========  ==========================================
``Pci(Dev,Fn)``       1/1        §10.3.2.1; text order Device, Function
``MemoryMapped(..)``  1/3        ``MemoryMapped(EfiMemoryType,Start,End)``
``VenHw(g[,hex])``    1/4        vendor data as a hex byte dump
``Ctrl(n)``           1/5
``PciRoot(uid)``      2/1        ACPI HID PNP0A03 (also PcieRoot/Floppy/
                                 Keyboard/Serial/ParallelPort shortcuts);
                                 other HIDs ``Acpi(PNPxxxx,uid)`` or
                                 ``Acpi(0xHHHHHHHH,uid)``
``VenMsg(g[,hex])``   3/10
``HD(n,GPT,g,s,z)``   4/1        §10.3.5.1; ``HD(n,MBR,0xSIG,s,z)``;
                                 other signature types ``HD(n,t,0,s,z)``
``CDROM(e,s,z)``      4/2
``VenMedia(g[,hex])`` 4/3
``\\path``             4/4        the path name itself
``Media(g)``          4/5
``FvFile(g)``/``Fv``  4/6, 4/7
``Offset(s,e)``       4/8
``HardwarePath(st,hex)`` etc.     §10.6.1.1 generic forms for unknown
                                 sub-types of known types
                                 (HardwarePath/AcpiPath/Msg/MediaPath/
                                 BbsPath), ``Path(t,st,hex)`` otherwise
====================  =========  ==========================================

Nodes are joined with ``/``; an End This Instance node is written as ``,``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence
from uuid import UUID

from .status import INVALID_PARAMETER, EfiError

__all__ = [
    "Node", "parse", "encode", "size", "is_prefix", "split_instances",
    "vendor_media", "vendor_hw", "vendor_msg", "file_path", "hard_drive", "cdrom",
    "pci", "acpi", "mem_mapped", "controller", "media_protocol", "end_instance",
    "to_text", "node_to_text", "from_text", "eisa_id", "eisa_id_text",
]

# Types (§10.3.1)
HARDWARE, ACPI, MESSAGING, MEDIA, BBS, END = 0x01, 0x02, 0x03, 0x04, 0x05, 0x7F
# Sub-types used here
HW_PCI, HW_PCCARD, HW_MEMMAP, HW_VENDOR, HW_CONTROLLER = 1, 2, 3, 4, 5
ACPI_DP = 1
MSG_VENDOR = 10
MEDIA_HARDDRIVE, MEDIA_CDROM, MEDIA_VENDOR, MEDIA_FILEPATH, MEDIA_PROTOCOL = 1, 2, 3, 4, 5
MEDIA_FV_FILE, MEDIA_FV, MEDIA_RELATIVE_OFFSET = 6, 7, 8
END_INSTANCE, END_ENTIRE = 0x01, 0xFF

HEADER = 4
END_ENTIRE_BYTES = bytes((END, END_ENTIRE, 4, 0))

PNP_EISA_ID_CONST = 0x41D0
SIGNATURE_TYPE_MBR, SIGNATURE_TYPE_GUID = 1, 2
MBR_TYPE_PCAT, MBR_TYPE_GPT = 1, 2


@dataclass(frozen=True)
class Node:
    """One device path node; ``data`` excludes the 4-byte header."""

    type: int
    subtype: int
    data: bytes = b""

    def __post_init__(self):
        if not (0 <= self.type <= 0xFF and 0 <= self.subtype <= 0xFF):
            raise ValueError(f"bad node type/subtype {self.type}/{self.subtype}")
        if len(self.data) > 0xFFFF - HEADER:
            raise ValueError("device path node data too long")
        object.__setattr__(self, "data", bytes(self.data))

    @property
    def length(self) -> int:
        return HEADER + len(self.data)

    def to_bytes(self) -> bytes:
        return struct.pack("<BBH", self.type, self.subtype, self.length) + self.data

    @property
    def is_end_instance(self) -> bool:
        return self.type == END and self.subtype == END_INSTANCE

    def __str__(self) -> str:
        return node_to_text(self)


# --------------------------------------------------------------------------------
# binary
# --------------------------------------------------------------------------------

def _parse(raw: bytes, max_len: int) -> tuple[list[Node], int]:
    mv = memoryview(bytes(raw))
    limit = min(len(mv), max_len)
    off = 0
    nodes: list[Node] = []
    while True:
        if off + HEADER > limit:
            raise EfiError(INVALID_PARAMETER, f"device path runs past {limit} bytes without an End node")
        t, st, ln = struct.unpack_from("<BBH", mv, off)
        if ln < HEADER:
            raise EfiError(INVALID_PARAMETER, f"device path node at +{off:#x} has length {ln} < 4")
        if off + ln > limit:
            raise EfiError(INVALID_PARAMETER, f"device path node at +{off:#x} (length {ln}) overruns {limit} bytes")
        if t == END and st == END_ENTIRE:
            if ln != HEADER:
                raise EfiError(INVALID_PARAMETER, f"End Entire node has length {ln}, not 4")
            return nodes, off + HEADER
        nodes.append(Node(t, st, bytes(mv[off + HEADER: off + ln])))
        off += ln


def parse(raw: bytes, max_len: int = 65536) -> list[Node]:
    """Parse a binary device path up to (excluding) its End Entire node.

    End This Instance nodes (0x7F/0x01) are kept in the list.  Anything after
    the End Entire node is ignored.  A node shorter than its 4-byte header, a
    node that overruns ``raw``/``max_len``, a missing End Entire node or an End
    Entire node whose length is not 4 (as EDK2 ``IsDevicePathValid``) raise
    ``EfiError(INVALID_PARAMETER)``.
    """
    return _parse(raw, max_len)[0]


def size(raw: bytes, max_len: int = 65536) -> int:
    """Size in bytes of the device path at the start of ``raw``, including the End Entire node
    (``GetDevicePathSize``, §10.5 EFI_DEVICE_PATH_UTILITIES_PROTOCOL)."""
    return _parse(raw, max_len)[1]


def encode(nodes: Iterable[Node]) -> bytes:
    """Serialize ``nodes`` and append the End Entire node.  An End Entire node in
    ``nodes`` is rejected (ValueError); End This Instance nodes are allowed."""
    out = bytearray()
    for n in nodes:
        if n.type == END and n.subtype == END_ENTIRE:
            raise ValueError("End Entire node inside a node list; encode() appends it")
        out += n.to_bytes()
    out += END_ENTIRE_BYTES
    return bytes(out)


def nodes_size(nodes: Sequence[Node]) -> int:
    """Byte size of ``nodes`` without the End Entire node."""
    return sum(n.length for n in nodes)


def is_prefix(prefix_nodes: Sequence[Node], nodes: Sequence[Node]) -> bool:
    """True when ``prefix_nodes`` equals the first ``len(prefix_nodes)`` nodes of
    ``nodes`` (type, sub-type and data compared)."""
    if len(prefix_nodes) > len(nodes):
        return False
    return all(a == b for a, b in zip(prefix_nodes, nodes))


def split_instances(nodes: Sequence[Node]) -> list[list[Node]]:
    """Split a (possibly multi-instance) node list at End This Instance nodes (§10.3.1)."""
    out: list[list[Node]] = [[]]
    for n in nodes:
        if n.is_end_instance:
            out.append([])
        else:
            out[-1].append(n)
    return out


# --------------------------------------------------------------------------------
# constructors (§10.3)
# --------------------------------------------------------------------------------

def _guid(g: UUID | str | bytes) -> bytes:
    if isinstance(g, UUID):
        return g.bytes_le
    if isinstance(g, str):
        return UUID(g).bytes_le
    b = bytes(g)
    if len(b) != 16:
        raise ValueError("GUID must be 16 bytes")
    return b


def pci(function: int, device: int) -> Node:
    """PCI node (§10.3.2.1): ``UINT8 Function; UINT8 Device`` (text ``Pci(Device,Function)``)."""
    return Node(HARDWARE, HW_PCI, struct.pack("<BB", function, device))


def mem_mapped(mem_type: int, start: int, end: int) -> Node:
    """Memory Mapped node (§10.3.2.3): ``UINT32 MemoryType; UINT64 Start; UINT64 End`` (end inclusive)."""
    return Node(HARDWARE, HW_MEMMAP, struct.pack("<IQQ", mem_type, start, end))


def vendor_hw(guid, data: bytes = b"") -> Node:
    """Vendor-defined hardware node (§10.3.2.4)."""
    return Node(HARDWARE, HW_VENDOR, _guid(guid) + bytes(data))


def controller(number: int) -> Node:
    """Controller node (§10.3.2.5)."""
    return Node(HARDWARE, HW_CONTROLLER, struct.pack("<I", number))


def eisa_id(text: str) -> int:
    """Compressed EISA id of e.g. ``"PNP0A03"`` (ACPI HID encoding; EDK2 ``EisaIdFromText``)."""
    if len(text) != 7 or not text[:3].isalpha():
        raise ValueError(f"not an EISA id: {text!r}")
    c = [((ord(ch.upper()) - ord("A") + 1) & 0x1F) for ch in text[:3]]
    return (c[0] << 10) | (c[1] << 5) | c[2] | (int(text[3:], 16) << 16)


def eisa_id_text(hid: int) -> str:
    """Inverse of :func:`eisa_id` (upper-case letters, upper-case hex)."""
    return "%c%c%c%04X" % (((hid >> 10) & 0x1F) + 64, ((hid >> 5) & 0x1F) + 64, (hid & 0x1F) + 64,
                           (hid >> 16) & 0xFFFF)


def acpi(hid: int | str, uid: int) -> Node:
    """ACPI node (§10.3.3): ``UINT32 _HID; UINT32 _UID``.  ``hid`` may be an EISA id string (``"PNP0A03"``)."""
    if isinstance(hid, str):
        hid = eisa_id(hid)
    return Node(ACPI, ACPI_DP, struct.pack("<II", hid, uid))


def vendor_msg(guid, data: bytes = b"") -> Node:
    """Vendor-defined messaging node (§10.3.4.17)."""
    return Node(MESSAGING, MSG_VENDOR, _guid(guid) + bytes(data))


def hard_drive(partition_number: int, start_lba: int, size_lba: int, signature: bytes | UUID,
               mbr_type: int = MBR_TYPE_GPT, sig_type: int = SIGNATURE_TYPE_GUID) -> Node:
    """Hard Drive media node (§10.3.5.1): ``UINT32 PartitionNumber; UINT64 PartitionStart;
    UINT64 PartitionSize; UINT8 Signature[16]; UINT8 MBRType; UINT8 SignatureType``.

    ``signature`` is the 16 signature bytes as stored (for GPT the EFI_GUID in memory
    layout; a UUID is converted with ``bytes_le``); shorter byte strings (MBR 4-byte
    signature) are zero-padded.
    """
    sig = signature.bytes_le if isinstance(signature, UUID) else bytes(signature)
    if len(sig) > 16:
        raise ValueError("HD signature longer than 16 bytes")
    sig = sig.ljust(16, b"\0")
    return Node(MEDIA, MEDIA_HARDDRIVE,
                struct.pack("<IQQ16sBB", partition_number, start_lba, size_lba, sig, mbr_type, sig_type))


def cdrom(boot_entry: int, start: int, size_: int) -> Node:
    """CD-ROM media node (§10.3.5.2)."""
    return Node(MEDIA, MEDIA_CDROM, struct.pack("<IQQ", boot_entry, start, size_))


def vendor_media(guid, data: bytes = b"") -> Node:
    """Vendor-defined media node (§10.3.5.3); e.g. ``vendor_media(LINUX_EFI_INITRD_MEDIA)``."""
    return Node(MEDIA, MEDIA_VENDOR, _guid(guid) + bytes(data))


def file_path(text: str) -> Node:
    """File Path media node (§10.3.5.4): NUL-terminated UCS-2 path name."""
    return Node(MEDIA, MEDIA_FILEPATH, (text + "\0").encode("utf-16-le"))


def media_protocol(guid) -> Node:
    """Media Protocol node (§10.3.5.5)."""
    return Node(MEDIA, MEDIA_PROTOCOL, _guid(guid))


def end_instance() -> Node:
    """End This Instance node (§10.3.1)."""
    return Node(END, END_INSTANCE, b"")


def file_path_text(node: Node) -> str:
    """The path name of a File Path node (up to its first NUL)."""
    s = node.data.decode("utf-16-le", errors="replace") if len(node.data) % 2 == 0 else \
        node.data[:-1].decode("utf-16-le", errors="replace")
    return s.split("\0", 1)[0]


# --------------------------------------------------------------------------------
# to text (§10.6.1; EDK2 DevicePathToText.c with DisplayOnly=FALSE, AllowShortcuts=FALSE)
# --------------------------------------------------------------------------------

_GENERIC_NAMES = {HARDWARE: "HardwarePath", ACPI: "AcpiPath", MESSAGING: "Msg", MEDIA: "MediaPath", BBS: "BbsPath"}
_ACPI_SHORTCUTS = {0x0A03: "PciRoot", 0x0A08: "PcieRoot", 0x0604: "Floppy", 0x0301: "Keyboard",
                   0x0501: "Serial", 0x0401: "ParallelPort"}
_VENDOR_NAMES = {(HARDWARE, HW_VENDOR): "VenHw", (MESSAGING, MSG_VENDOR): "VenMsg", (MEDIA, MEDIA_VENDOR): "VenMedia"}


def _g(b: bytes) -> str:
    return str(UUID(bytes_le=bytes(b[:16])))


def _generic(n: Node) -> str:
    name = _GENERIC_NAMES.get(n.type)
    head = f"{name}({n.subtype}" if name else f"Path({n.type},{n.subtype}"
    return head + (("," + n.data.hex()) if n.data else "") + ")"


def node_to_text(n: Node) -> str:
    """Text of one node (§10.6.1.x); unknown or malformed nodes use the generic form."""
    d, key = n.data, (n.type, n.subtype)
    try:
        if key == (HARDWARE, HW_PCI) and len(d) == 2:
            return f"Pci({d[1]:#x},{d[0]:#x})"
        if key == (HARDWARE, HW_MEMMAP) and len(d) == 20:
            t, s, e = struct.unpack("<IQQ", d)
            return f"MemoryMapped({t:#x},{s:#x},{e:#x})"
        if key in _VENDOR_NAMES and len(d) >= 16:
            return f"{_VENDOR_NAMES[key]}({_g(d)}" + (("," + d[16:].hex()) if len(d) > 16 else "") + ")"
        if key == (HARDWARE, HW_CONTROLLER) and len(d) == 4:
            return f"Ctrl({struct.unpack('<I', d)[0]:#x})"
        if key == (ACPI, ACPI_DP) and len(d) == 8:
            hid, uid = struct.unpack("<II", d)
            if hid & 0xFFFF == PNP_EISA_ID_CONST:
                num = hid >> 16
                if num in _ACPI_SHORTCUTS:
                    return f"{_ACPI_SHORTCUTS[num]}({uid:#x})"
                return f"Acpi(PNP{num:04x},{uid:#x})"
            return f"Acpi(0x{hid:08x},{uid:#x})"
        if key == (MEDIA, MEDIA_HARDDRIVE) and len(d) == 38:
            num, start, sz, sig, _mbr, st = struct.unpack("<IQQ16sBB", d)
            if st == SIGNATURE_TYPE_MBR:
                head = f"HD({num},MBR,0x{struct.unpack_from('<I', sig)[0]:08x},"
            elif st == SIGNATURE_TYPE_GUID:
                head = f"HD({num},GPT,{_g(sig)},"
            else:
                head = f"HD({num},{st},0,"
            return head + f"{start:#x},{sz:#x})"
        if key == (MEDIA, MEDIA_CDROM) and len(d) == 20:
            e, s, z = struct.unpack("<IQQ", d)
            return f"CDROM({e:#x},{s:#x},{z:#x})"
        if key == (MEDIA, MEDIA_FILEPATH) and len(d) >= 2:
            return file_path_text(n)
        if key == (MEDIA, MEDIA_PROTOCOL) and len(d) == 16:
            return f"Media({_g(d)})"
        if key == (MEDIA, MEDIA_FV_FILE) and len(d) == 16:
            return f"FvFile({_g(d)})"
        if key == (MEDIA, MEDIA_FV) and len(d) == 16:
            return f"Fv({_g(d)})"
        if key == (MEDIA, MEDIA_RELATIVE_OFFSET) and len(d) == 20:
            _r, s, e = struct.unpack("<IQQ", d)
            return f"Offset({s:#x},{e:#x})"
        if key == (END, END_INSTANCE):
            return ","
    except (struct.error, UnicodeDecodeError):  # pragma: no cover - guarded by length checks
        pass
    return _generic(n)


def to_text(nodes: Sequence[Node] | bytes) -> str:
    """DevicePathToText (§10.6.2) of a node list (or of raw bytes, parsed first)."""
    if isinstance(nodes, (bytes, bytearray, memoryview)):
        nodes = parse(bytes(nodes))
    out: list[str] = []
    for n in nodes:
        t = node_to_text(n)
        if n.is_end_instance:
            out.append(",")
        else:
            if out and out[-1] != ",":
                out.append("/")
            out.append(t)
    return "".join(out)


# --------------------------------------------------------------------------------
# from text (§10.6.1; EDK2 DevicePathFromText.c)
# --------------------------------------------------------------------------------

_NODE_RE = re.compile(r"^([A-Za-z][A-Za-z0-9]*)\((.*)\)$", re.S)


def _int(s: str) -> int:
    """EDK2 ``Strtoi``: ``0x`` prefix → hex, otherwise decimal; empty → 0."""
    s = s.strip()
    if not s:
        return 0
    if s[:2].lower() == "0x":
        return int(s[2:], 16)
    return int(s, 10)


def _hex(s: str) -> bytes:
    s = s.strip()
    if s[:2].lower() == "0x":
        s = s[2:]
    if len(s) % 2:
        raise ValueError(f"odd-length hex data {s!r}")
    return bytes.fromhex(s)


def _args(s: str) -> list[str]:
    return [a.strip() for a in s.split(",")] if s.strip() else []


def _split_nodes(text: str) -> list[str]:
    """Split at '/' and ',' that are outside parentheses; ',' is kept as an item."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise EfiError(INVALID_PARAMETER, f"unbalanced ')' in {text!r}")
        if depth == 0 and ch in "/,":
            items.append("".join(cur))
            cur = []
            if ch == ",":
                items.append(",")
            continue
        cur.append(ch)
    if depth != 0:
        raise EfiError(INVALID_PARAMETER, f"unbalanced '(' in {text!r}")
    items.append("".join(cur))
    return items


def _need(a: list[str], lo: int, hi: int | None = None) -> None:
    hi = lo if hi is None else hi
    if not lo <= len(a) <= hi:
        raise ValueError(f"expected {lo}..{hi} arguments, got {len(a)}")


def _acpi_hid(s: str) -> int:
    return _int(s) if s[:2].lower() == "0x" or s.isdigit() else eisa_id(s)


def _node_from_text(s: str) -> Node:
    m = _NODE_RE.match(s)
    if not m:
        return file_path(s)
    name, a = m.group(1), _args(m.group(2))
    if name == "Pci":
        _need(a, 2)
        return pci(_int(a[1]), _int(a[0]))
    if name == "MemoryMapped":
        _need(a, 3)
        return mem_mapped(_int(a[0]), _int(a[1]), _int(a[2]))
    if name in ("VenHw", "VenMsg", "VenMedia"):
        _need(a, 1, 2)
        data = _hex(a[1]) if len(a) == 2 else b""
        return {"VenHw": vendor_hw, "VenMsg": vendor_msg, "VenMedia": vendor_media}[name](UUID(a[0]), data)
    if name == "Ctrl":
        _need(a, 1)
        return controller(_int(a[0]))
    shortcut = {v: k for k, v in _ACPI_SHORTCUTS.items()}
    if name in shortcut:
        _need(a, 0, 1)
        return acpi((shortcut[name] << 16) | PNP_EISA_ID_CONST, _int(a[0]) if a else 0)
    if name == "Acpi":
        _need(a, 1, 2)
        return acpi(_acpi_hid(a[0]), _int(a[1]) if len(a) == 2 else 0)
    if name == "HD":
        _need(a, 5)
        num, typ = _int(a[0]), a[1]
        if typ == "MBR":
            sig, mbr, st = struct.pack("<I", _int(a[2])), MBR_TYPE_PCAT, SIGNATURE_TYPE_MBR
        elif typ == "GPT":
            sig, mbr, st = UUID(a[2]).bytes_le, MBR_TYPE_GPT, SIGNATURE_TYPE_GUID
        else:
            sig, mbr, st = b"", 0, _int(typ)
        return hard_drive(num, _int(a[3]), _int(a[4]), sig, mbr_type=mbr, sig_type=st)
    if name == "CDROM":
        _need(a, 1, 3)
        v = [_int(x) for x in a] + [0] * (3 - len(a))
        return cdrom(*v)
    if name == "Media":
        _need(a, 1)
        return media_protocol(UUID(a[0]))
    if name in ("FvFile", "Fv"):
        _need(a, 1)
        return Node(MEDIA, MEDIA_FV_FILE if name == "FvFile" else MEDIA_FV, UUID(a[0]).bytes_le)
    if name == "Offset":
        _need(a, 2)
        return Node(MEDIA, MEDIA_RELATIVE_OFFSET, struct.pack("<IQQ", 0, _int(a[0]), _int(a[1])))
    if name == "Path":
        _need(a, 2, 3)
        return Node(_int(a[0]), _int(a[1]), _hex(a[2]) if len(a) == 3 else b"")
    generic = {v: k for k, v in _GENERIC_NAMES.items()}
    if name in generic:
        _need(a, 1, 2)
        return Node(generic[name], _int(a[0]), _hex(a[1]) if len(a) == 2 else b"")
    # EDK2: text that names no known node is taken as a file path name.
    return file_path(s)


def from_text(text: str) -> list[Node]:
    """DevicePathFromText (§10.6.3) for the node forms listed in the module docstring.

    Returns the node list without the End Entire node (``encode`` adds it); a
    ``,`` between instances yields an End This Instance node.  Text that is not
    ``Name(args)`` (or names an unknown node) becomes a File Path node, as in
    EDK2.  Malformed arguments raise ``EfiError(INVALID_PARAMETER)``.
    """
    if not text:
        return []
    nodes: list[Node] = []
    for item in _split_nodes(text):
        if item == ",":
            nodes.append(end_instance())
            continue
        if item == "":
            continue
        try:
            nodes.append(_node_from_text(item))
        except (ValueError, struct.error) as e:
            raise EfiError(INVALID_PARAMETER, f"bad device path node {item!r}: {e}") from e
    return nodes
