"""A host folder presented as the EFI System Partition: EFI_SIMPLE_FILE_SYSTEM_PROTOCOL and
EFI_FILE_PROTOCOL (UEFI 2.10 §13.4, §13.5) with FAT semantics, so that systemd-stub finds its
sidecar files (``<uki>.extra.d/``, ``\\loader\\credentials``, …) next to the payload.

The volume sits on its own handle with the device path
``PciRoot(0x0)/Pci(0x1,0x1)/HD(1,GPT,<partuuid>,0x800,<sectors>)`` and the payload's
LoadedImage.DeviceHandle / FilePath point at it (:meth:`EspVolume.hook`).

FAT semantics kept: names are looked up case-insensitively, ``\\`` separates components,
``.``/``..`` are resolved *within the volume* (``..`` at the root is refused), a path with a
trailing ``\\`` must name a directory, names with characters FAT forbids are
EFI_INVALID_PARAMETER, directory reads return one EFI_FILE_INFO per call without ``.``/``..``.

The jail: every host path the guest can reach resolves (symlinks followed) inside the folder.
A ``..`` above the volume root, a symlink whose target leaves the folder, and device files,
FIFOs and sockets are refused with EFI_ACCESS_DENIED and logged (``esp.refused``) without the
target ever being opened; directory listings leave such entries out. Host files are opened
component by component with ``openat(O_NOFOLLOW)`` from the folder's real path, so a symlink
swapped in after the check cannot redirect the access either.

Read-only by default: Open for write, Write, Flush, SetInfo → EFI_WRITE_PROTECTED, Delete →
EFI_WARN_DELETE_FAILURE (the only failure Delete may return, §13.5.4).

Backed by no folder (``root=None``, :func:`empty_volume_hook`), the same volume is empty and
read-only: the device a payload started without ``--esp`` was loaded from, since firmware
always loads an image from some device.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import structlog

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import status as S
from hostsvc import uefi_types as U
from hostsvc.dispatch import GUIDPTR, OPTPTR, PTR, U64, UINTN, efiapi, size_in_out
from hostsvc.status import EfiError

log = structlog.get_logger("hostsvc.filesystem")

FILE_ORDER = U.function_names(U.EFI_FILE_PROTOCOL)
FILE_STRUCT_SIZE = ctypes.sizeof(U.EFI_FILE_PROTOCOL)

# Open modes and attributes (§13.5.2)
MODE_READ, MODE_WRITE, MODE_CREATE = 0x1, 0x2, 0x8000000000000000
VALID_MODES = (MODE_READ, MODE_READ | MODE_WRITE, MODE_READ | MODE_WRITE | MODE_CREATE)
ATTR_READ_ONLY, ATTR_HIDDEN, ATTR_SYSTEM, ATTR_RESERVED = 0x01, 0x02, 0x04, 0x08
ATTR_DIRECTORY, ATTR_ARCHIVE = 0x10, 0x20
ATTR_VALID = 0x37
POSITION_END = 0xFFFFFFFFFFFFFFFF

BLOCK_SIZE = 512
CLUSTER = 4096
PARTITION_START = 0x800      # LBA of partition 1, as a GPT disk from sgdisk/parted has it
# the partition GUID of the volume backed by no folder (stable, so runs are reproducible)
EMPTY_VOLUME_PARTUUID = uuid.uuid5(uuid.NAMESPACE_URL, "urn:vmrun:empty-volume")
MAX_NAME = 255               # FAT long file name limit
WRITE_CHUNK = 16 << 20       # Read/Write move file data in pieces of this size (deadline between)
MAX_INFO_SIZE = 64 * 1024    # SetInfo: no information structure is larger (name ≤ 255 chars)
MAX_FILE_OFFSET = (1 << 63) - 1  # the host's off_t: positions and sizes beyond are EFI_VOLUME_FULL
INVALID_NAME_CHARS = set('"*/:<>?\\|')   # EDK2 FatFileNameIsValid (and control characters)


# --------------------------------------------------------------------------------------------
# pure helpers: names, the jail, EFI_FILE_INFO
# --------------------------------------------------------------------------------------------

class Refused(EfiError):
    """A jail refusal (logged as ``esp.refused``)."""


@dataclass(frozen=True)
class Resolved:
    """Where a name resolved to.

    ``parts``: the volume path (canonical host names, one per component; () is the root);
    ``rel``: the real host path relative to the folder's real path (symlinks inside the
    volume already followed; what :func:`open_beneath` walks); ``kind``: "file", "dir" or
    "missing" (only the last component, only when a create was asked for: then ``parts`` ends
    with the requested name and ``rel`` names the parent directory plus that name)."""
    parts: tuple[str, ...]
    rel: tuple[str, ...]
    kind: str

    @property
    def efi_path(self) -> str:
        return "\\" + "\\".join(self.parts)


def efi_path_text(parts) -> str:
    return "\\" + "\\".join(parts)


def representable(name: str) -> bool:
    """A host directory entry the guest may see: UCS-2, no separators or controls, ≤ 255 chars."""
    if not name or name in (".", "..") or len(name) > MAX_NAME:
        return False
    for ch in name:
        o = ord(ch)
        if o < 0x20 or o > 0xFFFF or 0xD800 <= o <= 0xDFFF or ch in INVALID_NAME_CHARS:
            return False
    return True


def valid_component(name: str) -> bool:
    """A component the guest asked for: what FAT can name (EDK2 FatFileNameIsValid's
    character set, no ``/``: a host separator never reaches the host)."""
    return representable(name)


def within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def lookup(directory: Path, name: str) -> str | None:
    """The entry of ``directory`` that ``name`` means under FAT rules: the exact name if present,
    else the (first, sorted) entry equal to it ignoring case; None if there is none."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return None
    if name in entries:
        return name
    folded = name.casefold()
    for e in entries:
        if representable(e) and e.casefold() == folded:
            return e
    return None


def classify(host: Path, real_root: str) -> tuple[str, tuple[str, ...]]:
    """("file" | "dir", real path relative to ``real_root``) for an existing entry, following
    symlinks only while they stay inside. Raises Refused(ACCESS_DENIED) for a target outside
    ``real_root`` or a device/FIFO/socket, EfiError(NOT_FOUND) for a dangling link. Never opens
    the target."""
    try:
        st = os.lstat(host)
    except OSError:
        raise EfiError(S.NOT_FOUND, f"{host.name!r} vanished") from None
    real = os.path.realpath(host)
    if not within(real, real_root):
        why = "symlink leaves the volume" if stat.S_ISLNK(st.st_mode) else "path leaves the volume"
        raise Refused(S.ACCESS_DENIED, why)
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(real)
        except OSError:
            raise EfiError(S.NOT_FOUND, "dangling symlink") from None
    rel = tuple(Path(real).relative_to(real_root).parts)
    if stat.S_ISREG(st.st_mode):
        return "file", rel
    if stat.S_ISDIR(st.st_mode):
        return "dir", rel
    m = st.st_mode
    kind = ("character device" if stat.S_ISCHR(m) else "block device" if stat.S_ISBLK(m)
            else "FIFO" if stat.S_ISFIFO(m) else "socket" if stat.S_ISSOCK(m) else "special file")
    raise Refused(S.ACCESS_DENIED, f"{kind}, not a file or directory")


def resolve(root: Path | str, cwd: tuple[str, ...], name: str, *, create: bool = False) -> Resolved:
    """Resolve the EFI file name ``name`` against the volume directory ``cwd`` (volume parts).

    A leading ``\\`` starts at the volume root; ``.`` and ``..`` are handled on the volume path,
    never on the host (``..`` at the root → Refused(ACCESS_DENIED)). Each component is looked up
    case-insensitively and checked with :func:`classify`. With ``create`` a missing last
    component yields kind "missing" instead of NOT_FOUND. ``root`` None is a volume backed by no
    folder: its root directory is empty.
    """
    real_root = os.path.realpath(root) if root is not None else None
    if name == "":
        raise EfiError(S.INVALID_PARAMETER, "empty file name")
    dir_intended = name.endswith("\\")
    parts: list[str] = [] if name.startswith("\\") else list(cwd)
    comps = [c for c in name.split("\\") if c]
    kind = "dir"
    rel: tuple[str, ...] = ()
    if parts:  # re-check the starting directory (the host may have changed)
        kind, rel = classify(Path(real_root, *parts), real_root)
    for i, comp in enumerate(comps):
        if comp == ".":
            continue
        if comp == "..":
            if not parts:
                raise Refused(S.ACCESS_DENIED, "'..' above the volume root")
            parts.pop()
            kind, rel = classify(Path(real_root, *parts), real_root) if parts else ("dir", ())
            continue
        if not valid_component(comp):
            raise EfiError(S.INVALID_PARAMETER, f"invalid FAT file name {comp!r}")
        if kind != "dir":
            raise EfiError(S.NOT_FOUND, f"{efi_path_text(parts)} is not a directory")
        directory = Path(real_root, *rel) if real_root is not None else None
        found = lookup(directory, comp) if directory is not None else None
        if found is None:
            if create and i == len(comps) - 1:
                return Resolved(tuple(parts) + (comp,), rel + (comp,), "missing")
            raise EfiError(S.NOT_FOUND, f"{efi_path_text(parts + [comp])} does not exist")
        parts.append(found)
        kind, rel = classify(directory / found, real_root)
    if dir_intended and kind != "dir":
        raise EfiError(S.NOT_FOUND, f"{efi_path_text(parts)} is not a directory")
    return Resolved(tuple(parts), rel, kind)


def open_beneath(real_root: str, rel: tuple[str, ...], flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """open() of ``real_root/rel`` walking one component at a time with O_NOFOLLOW: the result
    is inside ``real_root`` even if symlinks were swapped in after :func:`resolve` checked."""
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not rel:
            out, fd = fd, -1
            return out
        for p in rel[:-1]:
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(rel[-1], flags | nofollow | os.O_NONBLOCK, mode, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def efi_time_struct(ns: int) -> U.EFI_TIME:
    """EFI_TIME (§8.3) for a host timestamp, in UTC (TimeZone 0, no daylight flags)."""
    secs, frac = divmod(ns, 1_000_000_000)
    try:
        t = _dt.datetime.fromtimestamp(secs, tz=_dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        t = _dt.datetime(1980 if secs < 0 else 9999, 1, 1, tzinfo=_dt.timezone.utc)
        frac = 0
    if t.year < 1900:
        t, frac = _dt.datetime(1900, 1, 1, tzinfo=_dt.timezone.utc), 0
    return U.EFI_TIME(Year=t.year, Month=t.month, Day=t.day, Hour=t.hour, Minute=t.minute, Second=t.second,
                      Nanosecond=frac, TimeZone=0, Daylight=0)


def efi_time(ns: int) -> bytes:
    """The 16 bytes of :func:`efi_time_struct`."""
    return bytes(efi_time_struct(ns))


def parse_efi_time(raw: bytes | U.EFI_TIME) -> int | None:
    """Host ns timestamp of an EFI_TIME, or None for an all-zero time ("leave unchanged")."""
    t = raw if isinstance(raw, U.EFI_TIME) else U.EFI_TIME.from_buffer_copy(bytes(raw[:ctypes.sizeof(U.EFI_TIME)]))
    if t.Year == 0:
        return None
    when = _dt.datetime(t.Year, t.Month, t.Day, t.Hour, t.Minute, t.Second,
                        tzinfo=_dt.timezone.utc)  # TimeZone ignored: taken as UTC
    return int(when.timestamp()) * 1_000_000_000 + t.Nanosecond


def encode_file_info(name: str, file_size: int, physical_size: int, create_ns: int, access_ns: int,
                     modify_ns: int, attribute: int) -> bytes:
    """EFI_FILE_INFO (§13.5.16): Size, FileSize, PhysicalSize, three EFI_TIMEs, Attribute, FileName."""
    fname = (name + "\0").encode("utf-16-le")
    info = U.EFI_FILE_INFO(Size=U.SIZE_OF_EFI_FILE_INFO + len(fname), FileSize=file_size,
                           PhysicalSize=physical_size, CreateTime=efi_time_struct(create_ns),
                           LastAccessTime=efi_time_struct(access_ns), ModificationTime=efi_time_struct(modify_ns),
                           Attribute=attribute)
    return bytes(info)[:U.SIZE_OF_EFI_FILE_INFO] + fname


def file_info_from_stat(name: str, st: os.stat_result, *, read_only: bool) -> bytes:
    is_dir = stat.S_ISDIR(st.st_mode)
    size = 0 if is_dir else st.st_size
    attribute = (ATTR_DIRECTORY if is_dir else ATTR_ARCHIVE) | (ATTR_READ_ONLY if read_only else 0)
    create = getattr(st, "st_birthtime_ns", None) or min(st.st_ctime_ns, st.st_mtime_ns)
    physical = -(-size // CLUSTER) * CLUSTER
    return encode_file_info(name, size, physical, create, st.st_atime_ns, st.st_mtime_ns, attribute)


def encode_fs_info(read_only: bool, volume_size: int, free_space: int, label: str) -> bytes:
    """EFI_FILE_SYSTEM_INFO (§13.5.17)."""
    lab = (label + "\0").encode("utf-16-le")
    info = U.EFI_FILE_SYSTEM_INFO(Size=U.SIZE_OF_EFI_FILE_SYSTEM_INFO + len(lab), ReadOnly=int(read_only),
                                  VolumeSize=volume_size, FreeSpace=free_space, BlockSize=BLOCK_SIZE)
    return bytes(info)[:U.SIZE_OF_EFI_FILE_SYSTEM_INFO] + lab


def used_bytes(real_root: str, limit: int = 200_000) -> int:
    """Bytes the folder's tree takes in whole clusters (symlinks not followed)."""
    total, seen = 0, 0
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        total += CLUSTER
        for f in filenames:
            seen += 1
            if seen > limit:
                return total
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += -(-st.st_size // CLUSTER) * CLUSTER
    return total


def default_partuuid(root: Path | str) -> uuid.UUID:
    """Stable per folder: uuid5 of the folder's real absolute path as a file: URI."""
    return uuid.uuid5(uuid.NAMESPACE_URL, Path(os.path.realpath(root)).as_uri())


def normalize_esp_path(text: str) -> str:
    """``EFI/Linux/x.efi`` or ``\\EFI\\Linux\\x.efi`` → ``\\EFI\\Linux\\x.efi``."""
    parts = [p for p in text.replace("/", "\\").split("\\") if p]
    return "\\" + "\\".join(parts)


# --------------------------------------------------------------------------------------------
# the protocols
# --------------------------------------------------------------------------------------------

@dataclass
class OpenFile:
    parts: tuple[str, ...]
    rel: tuple[str, ...]
    is_dir: bool
    write: bool                    # opened with EFI_FILE_MODE_WRITE
    position: int = 0
    entries: list[str] | None = field(default=None, repr=False)   # directory snapshot

    @property
    def efi_path(self) -> str:
        return efi_path_text(self.parts)


class EspVolume:
    """A host folder as a FAT EFI System Partition. ``fw`` may be None until :meth:`hook`'s
    callable runs (it binds the Firmware it is given). ``root`` None: an empty read-only volume
    backed by no folder."""

    def __init__(self, fw, root: Path | str | None, *, writable: bool = False, label: str = "ESP",
                 partuuid: uuid.UUID | None = None):
        self.fw = fw
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise NotADirectoryError(f"ESP folder {root} is not a directory")
        if self.root is None and writable:
            raise ValueError("a volume backed by no folder is read-only")
        self.real_root = os.path.realpath(self.root) if self.root is not None else None
        self.writable = writable
        self.label = label
        self.partuuid = partuuid or (default_partuuid(self.root) if self.root is not None
                                     else EMPTY_VOLUME_PARTUUID)
        self.created_ns = time.time_ns()   # the empty volume's root directory times
        self.files: dict[int, OpenFile] = {}
        self.handle = 0
        self.sfs_iface = 0
        self._file_protocol = U.EFI_FILE_PROTOCOL()   # what every open file's interface holds
        self.volume_bytes = 0

    # --- set-up -------------------------------------------------------------------------
    def device_path_nodes(self) -> list:
        sectors = self.volume_bytes // BLOCK_SIZE
        return [DP.acpi("PNP0A03", 0), DP.pci(1, 1),
                DP.hard_drive(1, PARTITION_START, sectors, self.partuuid)]

    def _volume_size(self) -> tuple[int, int]:
        used = used_bytes(self.real_root) if self.real_root is not None else CLUSTER
        if self.writable:
            vfs = os.statvfs(self.real_root)
            free = vfs.f_bavail * vfs.f_frsize
            return used + free, free
        mib = 1 << 20
        return max(-(-(used + mib) // mib) * mib, 2 * mib), 0

    def install(self) -> int:
        """A new handle with DEVICE_PATH (…/HD(1,GPT,partuuid,…)) and SIMPLE_FILE_SYSTEM."""
        if self.fw is None:
            raise RuntimeError("EspVolume.install needs a Firmware")
        fw = self.fw
        self.volume_bytes = self._volume_size()[0]
        ids = fw.table.register_all("File(ESP)", self, FILE_ORDER)
        self._file_protocol = U.EFI_FILE_PROTOCOL(Revision=U.EFI_FILE_PROTOCOL.REVISION)
        for name, i in zip(FILE_ORDER, ids):
            setattr(self._file_protocol, name, fw.port.thunk(i))
        (sfs_id,) = fw.table.register_all("SimpleFileSystem(ESP)", self,
                                          U.function_names(U.EFI_SIMPLE_FILE_SYSTEM_PROTOCOL))
        sfs = U.EFI_SIMPLE_FILE_SYSTEM_PROTOCOL(Revision=U.EFI_SIMPLE_FILE_SYSTEM_PROTOCOL.REVISION,
                                                OpenVolume=fw.port.thunk(sfs_id))
        self.sfs_iface = fw.pool(ctypes.sizeof(sfs))
        fw.mem.write_struct(self.sfs_iface, sfs)
        nodes = self.device_path_nodes()
        self.handle = fw.handles.install_multiple(None, [(G.DEVICE_PATH, fw.device_path(nodes)),
                                                         (G.SIMPLE_FILE_SYSTEM, self.sfs_iface)])
        fw.volumes[self.handle] = self
        log.info("esp.installed", root=self.real_root, handle=hex(self.handle), writable=self.writable,
                 device_path=DP.to_text(nodes))
        return self.handle

    def efi_path_of(self, host_path: Path | str) -> str:
        """``\\EFI\\Linux\\uki.efi`` for a host file inside the folder (ValueError otherwise)."""
        real = os.path.realpath(host_path)
        if self.real_root is None or not within(real, self.real_root):
            raise ValueError(f"{host_path} is not inside the ESP folder {self.root}")
        return efi_path_text(Path(real).relative_to(self.real_root).parts)

    def file_path_nodes(self, host_path: Path | str) -> list:
        """The FilePath device path node(s) of a host file inside the folder."""
        return [DP.file_path(self.efi_path_of(host_path))]

    def payload_efi_path(self, payload: Path | str, esp_path: str | None = None) -> str:
        try:
            return self.efi_path_of(payload)
        except ValueError:
            pass
        if esp_path:
            return normalize_esp_path(esp_path)
        return "\\EFI\\Linux\\" + Path(payload).name

    def hook(self, payload: Path | str, esp_path: str | None = None):
        """A RunOptions.hooks callable: installs the volume and points the payload's
        LoadedImage DeviceHandle/FilePath at it (its own path when it lies in the folder, else
        ``esp_path``, else ``\\EFI\\Linux\\<name>``)."""
        path = self.payload_efi_path(payload, esp_path)

        def esp_hook(fw):
            self.fw = fw
            handle = self.install()
            log.info("esp.payload", file_path=path)
            return {"device_handle": handle, "file_path_nodes": [DP.file_path(path)]}

        return esp_hook

    def read_file(self, efi_path: str, max_size: int | None = None) -> bytes:
        """The bytes of a file on the volume, through the same jail (for LoadImage from a
        device path); a file larger than ``max_size`` is EFI_LOAD_ERROR, unread."""
        r = self._resolve((), efi_path)
        if r.kind != "file":
            raise EfiError(S.NOT_FOUND, f"{r.efi_path} is a directory")
        fd = self._open_fd(r.rel, r.efi_path)
        try:
            size = os.fstat(fd).st_size
            if max_size is not None and size > max_size:
                raise EfiError(S.LOAD_ERROR, f"{r.efi_path} is {size} bytes, more than the "
                                             f"{max_size >> 20} MiB vmrun loads")
            return _pread_all(fd, size, 0)
        finally:
            os.close(fd)

    # --- internals ----------------------------------------------------------------------
    @property
    def mem(self):
        return self.fw.mem

    def _new_file(self, of: OpenFile) -> int:
        addr = self.fw.pool(FILE_STRUCT_SIZE)
        self.mem.write_struct(addr, self._file_protocol)
        self.files[addr] = of
        return addr

    def _tick(self) -> None:
        """The run's deadline check between pieces of a Read or Write (a firmware stand-in
        without one, as unit tests build, has none)."""
        check = getattr(self.fw.port, "check_deadline", None)
        if check is not None:
            check()

    def _file(self, this: int) -> OpenFile:
        of = self.files.get(this)
        if of is None:
            raise EfiError(S.INVALID_PARAMETER, f"{this:#x} is not an open file of this volume")
        return of

    def _refuse(self, e: Refused, path: str) -> None:
        log.warning("esp.refused", path=path, why=e.why, root=self.real_root)

    def _resolve(self, cwd: tuple[str, ...], name: str, create: bool = False) -> Resolved:
        try:
            return resolve(self.real_root, cwd, name, create=create)
        except Refused as e:
            self._refuse(e, name if name.startswith("\\") else efi_path_text(cwd).rstrip("\\") + "\\" + name)
            raise

    def _open_fd(self, rel: tuple[str, ...], path: str, flags: int = os.O_RDONLY) -> int:
        try:
            fd = open_beneath(self.real_root, rel, flags)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                err = Refused(S.ACCESS_DENIED, f"changed under us: {e.strerror}")
                self._refuse(err, path)
                raise err from None
            raise _os_error(e, path) from None
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            os.close(fd)
            err = Refused(S.ACCESS_DENIED, "not a file or directory")
            self._refuse(err, path)
            raise err
        return fd

    def _stat(self, of: OpenFile) -> os.stat_result:
        if self.real_root is None:  # the empty volume's root directory
            t = self.created_ns
            return SimpleNamespace(st_mode=stat.S_IFDIR | 0o555, st_size=0, st_atime_ns=t, st_mtime_ns=t,
                                   st_ctime_ns=t)
        fd = self._open_fd(of.rel, of.efi_path)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _entries(self, of: OpenFile) -> list[str]:
        """The directory's entries the guest may see, sorted (snapshot until rewound)."""
        if of.entries is None and self.real_root is None:
            of.entries = []
        if of.entries is None:
            fd = self._open_fd(of.rel, of.efi_path)
            try:
                names = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            out = []
            base = Path(self.real_root, *of.rel)
            for n in names:
                if not representable(n):
                    log.debug("esp.hidden", dir=of.efi_path, name=n, why="name not representable")
                    continue
                try:
                    classify(base / n, self.real_root)
                except EfiError as e:
                    log.debug("esp.hidden", dir=of.efi_path, name=n, why=e.why)
                    continue
                out.append(n)
            of.entries = out
        return of.entries

    def _info_of(self, of: OpenFile) -> bytes:
        st = self._stat(of)
        name = of.parts[-1] if of.parts else ""
        return file_info_from_stat(name, st, read_only=not self.writable)

    def _put(self, buffer_size: int, buffer: int, data: bytes, what: str) -> None:
        size_in_out(self.mem, buffer_size, len(data), what)
        if not buffer:
            raise EfiError(S.INVALID_PARAMETER, "Buffer is NULL")
        self.mem.write(buffer, data)

    def _require_writable(self, of: OpenFile | None = None) -> None:
        if not self.writable:
            raise EfiError(S.WRITE_PROTECTED, "the ESP is read-only (use a writable volume)")
        if of is not None and not of.write:
            raise EfiError(S.ACCESS_DENIED, f"{of.efi_path} was opened read-only")

    # --- EFI_SIMPLE_FILE_SYSTEM_PROTOCOL ------------------------------------------------
    @efiapi("OpenVolume", ("this", PTR), ("root", PTR))
    def open_volume(self, this, root):
        if this != self.sfs_iface:
            raise EfiError(S.INVALID_PARAMETER, "This is not this volume's SimpleFileSystem")
        self.mem.write_u64(root, self._new_file(OpenFile((), (), True, False)))

    # --- EFI_FILE_PROTOCOL --------------------------------------------------------------
    @efiapi("Open", ("this", PTR), ("new_handle", PTR), ("file_name", PTR), ("open_mode", U64),
            ("attributes", U64))
    def open(self, this, new_handle, file_name, open_mode, attributes):
        of = self._file(this)
        name = self.mem.read_utf16z(file_name)
        if open_mode not in VALID_MODES:
            raise EfiError(S.INVALID_PARAMETER, f"OpenMode {open_mode:#x}")
        if attributes & ~ATTR_VALID:
            raise EfiError(S.INVALID_PARAMETER, f"Attributes {attributes:#x}")
        if open_mode & MODE_CREATE and attributes & ATTR_READ_ONLY:
            raise EfiError(S.INVALID_PARAMETER, "create with EFI_FILE_READ_ONLY")
        write = bool(open_mode & MODE_WRITE)
        if write and not self.writable:
            raise EfiError(S.WRITE_PROTECTED, f"{name!r}: the ESP is read-only")
        r = self._resolve(of.parts, name, create=bool(open_mode & MODE_CREATE))
        if r.kind == "missing":
            if name.endswith("\\") and not attributes & ATTR_DIRECTORY:
                raise EfiError(S.INVALID_PARAMETER,
                               f"{name!r} names a directory; create one with EFI_FILE_DIRECTORY")
            self._create(r, bool(attributes & ATTR_DIRECTORY))
            r = self._resolve((), r.efi_path)
        if self.real_root is not None:  # an empty volume has only its root, which always opens
            fd = self._open_fd(r.rel, r.efi_path, os.O_RDWR if write and r.kind == "file" else os.O_RDONLY)
            os.close(fd)
        self.mem.write_u64(new_handle, self._new_file(OpenFile(r.parts, r.rel, r.kind == "dir", write)))
        log.debug("esp.open", path=r.efi_path, mode=hex(open_mode))

    def _create(self, r: Resolved, directory: bool) -> None:
        parent_fd = self._open_fd(r.rel[:-1], efi_path_text(r.parts[:-1]))
        try:
            if directory:
                os.mkdir(r.rel[-1], 0o755, dir_fd=parent_fd)
            else:
                os.close(os.open(r.rel[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o644, dir_fd=parent_fd))
        except OSError as e:
            raise _os_error(e, r.efi_path) from None
        finally:
            os.close(parent_fd)
        log.info("esp.created", path=r.efi_path, directory=directory)

    @efiapi("Close", ("this", PTR))
    def close(self, this):
        self._file(this)
        del self.files[this]
        self.fw.alloc.free_pool(this, owner="firmware")

    @efiapi("Delete", ("this", PTR))
    def delete(self, this):
        of = self._file(this)
        self.close(this)
        if not self.writable or not of.write or not of.parts:
            return S.WARN_DELETE_FAILURE
        parent_fd = self._open_fd(of.rel[:-1], efi_path_text(of.parts[:-1]))
        try:
            if of.is_dir:
                os.rmdir(of.rel[-1], dir_fd=parent_fd)
            else:
                os.unlink(of.rel[-1], dir_fd=parent_fd)
        except OSError as e:
            log.info("esp.delete_failed", path=of.efi_path, why=e.strerror)
            return S.WARN_DELETE_FAILURE
        finally:
            os.close(parent_fd)
        log.info("esp.deleted", path=of.efi_path)

    @efiapi("Read", ("this", PTR), ("buffer_size", PTR), ("buffer", OPTPTR))
    def read(self, this, buffer_size, buffer):
        of = self._file(this)
        if of.is_dir:
            entries = self._entries(of)
            while of.position < len(entries):
                child = OpenFile(of.parts + (entries[of.position],), (), False, False)
                try:
                    _kind, child.rel = classify(Path(self.real_root, *of.rel, entries[of.position]),
                                               self.real_root)
                    info = self._info_of(child)
                except EfiError:          # vanished or changed since the snapshot
                    of.position += 1
                    continue
                self._put(buffer_size, buffer, info, "EFI_FILE_INFO")
                of.position += 1
                return
            self.mem.write_u64(buffer_size, 0)
            return
        want = self.mem.read_u64(buffer_size)
        fd = self._open_fd(of.rel, of.efi_path)
        try:
            size = os.fstat(fd).st_size
            if of.position > size:
                raise EfiError(S.DEVICE_ERROR, f"position {of.position} beyond end of file ({size})")
            n = min(want, size - of.position)
            if n and not buffer:
                raise EfiError(S.INVALID_PARAMETER, "Buffer is NULL")
            if n and not self.mem.contains(buffer, n):
                raise EfiError(S.INVALID_PARAMETER, f"Buffer {buffer:#x}+{n:#x} is outside guest memory")
            # in pieces (the host holds one at a time), the run's deadline checked between them
            done = 0
            while done < n:
                self._tick()
                data = _pread_all(fd, min(n - done, WRITE_CHUNK), of.position + done)
                if not data:
                    break
                self.mem.write(buffer + done, data)
                done += len(data)
        finally:
            os.close(fd)
        self.mem.write_u64(buffer_size, done)
        of.position += done

    @efiapi("Write", ("this", PTR), ("buffer_size", PTR), ("buffer", PTR))
    def write(self, this, buffer_size, buffer):
        of = self._file(this)
        if of.is_dir:
            raise EfiError(S.UNSUPPORTED, "Write on a directory")
        self._require_writable(of)
        n = self.mem.read_u64(buffer_size)
        if n and not self.mem.contains(buffer, n):
            raise EfiError(S.INVALID_PARAMETER, f"Buffer {buffer:#x}+{n:#x} is outside guest memory")
        if of.position + n > MAX_FILE_OFFSET:
            raise EfiError(S.VOLUME_FULL, f"writing {n} bytes at position {of.position:#x} would pass the "
                                          f"largest file offset {MAX_FILE_OFFSET:#x}")
        fd = self._open_fd(of.rel, of.efi_path, os.O_WRONLY)
        try:
            # straight from guest memory in pieces (no host copy of the whole buffer), the run's
            # deadline checked between them
            done = 0
            while done < n:
                self._tick()
                view = self.mem.view(buffer + done, min(n - done, WRITE_CHUNK))
                try:
                    done += os.pwrite(fd, view, of.position + done)
                finally:
                    view.release()
        except OSError as e:
            raise _os_error(e, of.efi_path) from None
        finally:
            os.close(fd)
        of.position += n

    @efiapi("GetPosition", ("this", PTR), ("position", PTR))
    def get_position(self, this, position):
        of = self._file(this)
        if of.is_dir:
            raise EfiError(S.UNSUPPORTED, "GetPosition on a directory")
        self.mem.write_u64(position, of.position)

    @efiapi("SetPosition", ("this", PTR), ("position", U64))
    def set_position(self, this, position):
        of = self._file(this)
        if of.is_dir:
            if position != 0:
                raise EfiError(S.UNSUPPORTED, "a directory can only be rewound (position 0)")
            of.position, of.entries = 0, None
            return
        of.position = self._stat(of).st_size if position == POSITION_END else position

    @efiapi("GetInfo", ("this", PTR), ("information_type", GUIDPTR), ("buffer_size", PTR),
            ("buffer", OPTPTR))
    def get_info(self, this, information_type, buffer_size, buffer):
        of = self._file(this)
        if information_type == G.FILE_INFO:
            data, what = self._info_of(of), "EFI_FILE_INFO"
        elif information_type == G.FILE_SYSTEM_INFO:
            size, free = self._volume_size()
            data, what = encode_fs_info(not self.writable, size, free, self.label), "EFI_FILE_SYSTEM_INFO"
        elif information_type == G.FILE_SYSTEM_VOLUME_LABEL:
            data, what = (self.label + "\0").encode("utf-16-le"), "EFI_FILE_SYSTEM_VOLUME_LABEL"
        else:
            raise EfiError(S.UNSUPPORTED, f"information type {G.guid_name(information_type)}")
        self._put(buffer_size, buffer, data, what)

    @efiapi("SetInfo", ("this", PTR), ("information_type", GUIDPTR), ("buffer_size", UINTN),
            ("buffer", PTR))
    def set_info(self, this, information_type, buffer_size, buffer):
        of = self._file(this)
        if information_type not in (G.FILE_INFO, G.FILE_SYSTEM_INFO, G.FILE_SYSTEM_VOLUME_LABEL):
            raise EfiError(S.UNSUPPORTED, f"information type {G.guid_name(information_type)}")
        self._require_writable()
        if buffer_size > MAX_INFO_SIZE:
            raise EfiError(S.BAD_BUFFER_SIZE, f"BufferSize {buffer_size:#x} is more than an information "
                                              f"structure needs ({MAX_INFO_SIZE} bytes at most)")
        raw = self.mem.read(buffer, buffer_size)
        if information_type == G.FILE_SYSTEM_VOLUME_LABEL:
            self.label = raw.decode("utf-16-le", errors="replace").split("\0", 1)[0]
            return
        if information_type == G.FILE_SYSTEM_INFO:
            if buffer_size < U.SIZE_OF_EFI_FILE_SYSTEM_INFO + 2:
                raise EfiError(S.BAD_BUFFER_SIZE, "EFI_FILE_SYSTEM_INFO too small")
            self.label = raw[U.SIZE_OF_EFI_FILE_SYSTEM_INFO:].decode("utf-16-le", errors="replace").split("\0", 1)[0]
            return
        self._set_file_info(of, raw)

    def _set_file_info(self, of: OpenFile, raw: bytes) -> None:
        if len(raw) < U.SIZE_OF_EFI_FILE_INFO + 2:
            raise EfiError(S.BAD_BUFFER_SIZE, "EFI_FILE_INFO too small")
        info = U.EFI_FILE_INFO.from_buffer_copy(raw[:U.SIZE_OF_EFI_FILE_INFO])
        size, file_size, attribute = info.Size, info.FileSize, info.Attribute
        if size > len(raw) or size < U.SIZE_OF_EFI_FILE_INFO + 2:
            raise EfiError(S.BAD_BUFFER_SIZE, f"EFI_FILE_INFO.Size {size}")
        name = raw[U.SIZE_OF_EFI_FILE_INFO:size].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        if attribute & ~ATTR_VALID or bool(attribute & ATTR_DIRECTORY) != of.is_dir:
            raise EfiError(S.ACCESS_DENIED, f"attribute {attribute:#x} cannot change the file type")
        if not of.parts:  # the root: nothing to rename or resize
            if name not in ("", "\\"):
                raise EfiError(S.ACCESS_DENIED, "cannot rename the root directory")
            return
        if not of.write:
            raise EfiError(S.ACCESS_DENIED, f"{of.efi_path} was opened read-only")
        fd = self._open_fd(of.rel, of.efi_path, os.O_RDONLY if of.is_dir else os.O_WRONLY)
        try:
            st = os.fstat(fd)
            if not of.is_dir and file_size != st.st_size:
                if file_size > MAX_FILE_OFFSET:
                    raise EfiError(S.VOLUME_FULL, f"FileSize {file_size:#x} is more than the largest file "
                                                  f"size {MAX_FILE_OFFSET:#x}")
                os.ftruncate(fd, file_size)
            access, modify = parse_efi_time(info.LastAccessTime), parse_efi_time(info.ModificationTime)
            if access is not None or modify is not None:
                os.utime(fd, ns=(access if access is not None else st.st_atime_ns,
                                 modify if modify is not None else st.st_mtime_ns))
        except (OSError, ValueError) as e:
            raise EfiError(S.DEVICE_ERROR, f"{of.efi_path}: {e}") from None
        finally:
            os.close(fd)
        if name and name.casefold() != of.parts[-1].casefold():
            self._rename(of, name)

    def _rename(self, of: OpenFile, name: str) -> None:
        new = self._resolve(of.parts[:-1], name, create=True)
        if new.kind != "missing":
            raise EfiError(S.ACCESS_DENIED, f"{new.efi_path} already exists")
        src_fd = self._open_fd(of.rel[:-1], efi_path_text(of.parts[:-1]))
        dst_fd = self._open_fd(new.rel[:-1], efi_path_text(new.parts[:-1]))
        try:
            os.rename(of.rel[-1], new.rel[-1], src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError as e:
            raise _os_error(e, new.efi_path) from None
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        log.info("esp.renamed", path=of.efi_path, to=new.efi_path)
        of.parts, of.rel = new.parts, new.rel

    @efiapi("Flush", ("this", PTR))
    def flush(self, this):
        of = self._file(this)
        self._require_writable(of)


def esp_hook(root: Path | str, payload: Path | str, esp_path: str | None = None, *, writable: bool = False,
             label: str = "ESP", partuuid: uuid.UUID | None = None):
    """``RunOptions(hooks=[esp_hook(esp_dir, payload)])``: present ``root`` as the ESP the payload
    was loaded from."""
    return EspVolume(None, root, writable=writable, label=label, partuuid=partuuid).hook(payload, esp_path)


def empty_volume_hook(payload: Path | str, esp_path: str | None = None, *, partuuid: uuid.UUID | None = None):
    """``RunOptions.hooks`` callable: an empty read-only volume (backed by no folder) as the
    device the payload was loaded from, the payload at ``esp_path`` (default
    ``\\EFI\\Linux\\<name>``) on it."""
    return EspVolume(None, None, partuuid=partuuid).hook(payload, esp_path)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, min(n - len(out), 1 << 24), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _os_error(e: OSError, path: str) -> EfiError:
    status = {errno.ENOENT: S.NOT_FOUND, errno.EACCES: S.ACCESS_DENIED, errno.EPERM: S.ACCESS_DENIED,
              errno.EEXIST: S.ACCESS_DENIED, errno.ENOSPC: S.VOLUME_FULL, errno.EROFS: S.WRITE_PROTECTED,
              errno.ENOTEMPTY: S.ACCESS_DENIED, errno.ENOTDIR: S.NOT_FOUND,
              errno.EISDIR: S.ACCESS_DENIED}.get(e.errno, S.DEVICE_ERROR)
    return EfiError(status, f"{path}: {e.strerror}")


__all__ = ["EspVolume", "esp_hook", "empty_volume_hook", "EMPTY_VOLUME_PARTUUID", "resolve", "classify", "lookup",
           "open_beneath", "Refused", "Resolved", "encode_file_info", "file_info_from_stat", "encode_fs_info", "efi_time",
           "efi_time_struct", "parse_efi_time",
           "default_partuuid", "normalize_esp_path"]
