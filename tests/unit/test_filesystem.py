"""hostsvc.protocols.filesystem: name resolution and the jail as pure functions, the
EFI_FILE_INFO / EFI_FILE_SYSTEM_INFO encodings parsed back with struct, and the protocol
methods against a stand-in firmware (guest memory without a VM), read-only and writable."""

from __future__ import annotations

import datetime as dt
import os
import socket
import struct
import uuid

from types import SimpleNamespace

import pytest

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc import status as S
from hostsvc.dispatch import ServiceTable
from hostsvc.protocols import filesystem as F
from hostsvc.status import EfiError
from vmrun.vm.memory import GuestMemory


def status_of(fn, *a, **kw) -> int:
    with pytest.raises(EfiError) as ei:
        fn(*a, **kw)
    return ei.value.status


@pytest.fixture
def tree(tmp_path):
    """<tmp>/esp: hello.txt, EFI/Linux/uki.efi, Mixed/Case.TXT; <tmp>/secret outside."""
    root = tmp_path / "esp"
    (root / "EFI" / "Linux").mkdir(parents=True)
    (root / "Mixed").mkdir()
    (root / "hello.txt").write_bytes(b"hello from the ESP\n")
    (root / "EFI" / "Linux" / "uki.efi").write_bytes(b"MZ uki")
    (root / "Mixed" / "Case.TXT").write_bytes(b"case")
    (tmp_path / "secret").write_bytes(b"SECRET")
    return root


# --------------------------------------------------------------------------------------------
# resolve / classify / lookup
# --------------------------------------------------------------------------------------------

def test_absolute_and_relative(tree):
    r = F.resolve(tree, (), "\\EFI\\Linux\\uki.efi")
    assert (r.parts, r.rel, r.kind, r.efi_path) == (("EFI", "Linux", "uki.efi"), ("EFI", "Linux", "uki.efi"),
                                                   "file", "\\EFI\\Linux\\uki.efi")
    assert F.resolve(tree, ("EFI",), "Linux\\uki.efi").parts == ("EFI", "Linux", "uki.efi")
    assert F.resolve(tree, ("EFI", "Linux"), "\\hello.txt").parts == ("hello.txt",)   # absolute ignores cwd
    assert F.resolve(tree, (), "\\").kind == "dir" and F.resolve(tree, (), "\\").parts == ()
    assert F.resolve(tree, (), "EFI\\\\Linux\\").parts == ("EFI", "Linux")              # empty components


def test_case_insensitive_lookup(tree):
    assert F.resolve(tree, (), "\\efi\\LINUX\\UKI.EFI").parts == ("EFI", "Linux", "uki.efi")
    assert F.resolve(tree, (), "mixed\\case.txt").parts == ("Mixed", "Case.TXT")
    assert F.lookup(tree, "HELLO.txt") == "hello.txt"
    assert F.lookup(tree, "nope") is None


def test_exact_case_preferred(tree):
    (tree / "HELLO.TXT").write_bytes(b"upper")
    assert F.lookup(tree, "HELLO.TXT") == "HELLO.TXT"
    assert F.lookup(tree, "hello.txt") == "hello.txt"
    assert F.lookup(tree, "Hello.Txt") == "HELLO.TXT"      # first sorted candidate


def test_dot_and_dotdot_inside_volume(tree):
    assert F.resolve(tree, ("EFI", "Linux"), "..\\..\\hello.txt").parts == ("hello.txt",)
    assert F.resolve(tree, ("EFI",), ".\\Linux\\.\\uki.efi").parts == ("EFI", "Linux", "uki.efi")
    assert F.resolve(tree, (), "\\EFI\\..").parts == ()


@pytest.mark.parametrize("cwd,name", [((), ".."), ((), "..\\secret"), ((), "\\..\\secret"),
                                      (("EFI",), "..\\..\\secret"), (("EFI", "Linux"), "\\EFI\\..\\..\\secret"),
                                      ((), "\\EFI\\Linux\\..\\..\\..\\esp\\hello.txt")])
def test_dotdot_above_root_is_refused(tree, cwd, name):
    with pytest.raises(F.Refused) as ei:
        F.resolve(tree, cwd, name)
    assert ei.value.status == S.ACCESS_DENIED and "above the volume root" in ei.value.why


def test_symlinks(tree, tmp_path):
    os.symlink(tmp_path / "secret", tree / "link-out")                 # absolute, outside
    os.symlink("../secret", tree / "rel-out")                           # relative, outside
    os.symlink(tmp_path, tree / "dir-out")                              # a directory outside
    os.symlink("EFI/Linux/uki.efi", tree / "link-in")                  # inside: allowed
    os.symlink("EFI/Linux", tree / "dir-in")
    os.symlink("does-not-exist", tree / "dangling-in")
    os.symlink(tmp_path / "does-not-exist", tree / "dangling-out")
    for name in ("\\link-out", "\\LINK-OUT", "\\rel-out", "\\dir-out\\secret", "\\dir-out", "\\dangling-out"):
        with pytest.raises(F.Refused) as ei:
            F.resolve(tree, (), name)
        assert ei.value.status == S.ACCESS_DENIED and "leaves the volume" in ei.value.why, name
    r = F.resolve(tree, (), "\\link-in")
    assert r.parts == ("link-in",) and r.rel == ("EFI", "Linux", "uki.efi") and r.kind == "file"
    r = F.resolve(tree, (), "\\dir-in\\UKI.EFI")
    assert r.parts == ("dir-in", "uki.efi") and r.rel == ("EFI", "Linux", "uki.efi")
    assert F.resolve(tree, (), "\\dir-in\\..").parts == ()               # '..' is lexical, on the volume
    assert status_of(F.resolve, tree, (), "\\dangling-in") == S.NOT_FOUND


def test_special_files_are_refused(tree, tmp_path):
    os.mkfifo(tree / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    try:
        for name, what in (("\\fifo", "FIFO"), ("\\sock", "socket")):
            with pytest.raises(F.Refused) as ei:
                F.resolve(tree, (), name)
            assert ei.value.status == S.ACCESS_DENIED and what in ei.value.why
        try:
            os.mknod(tree / "null", 0o600 | 0o020000, os.makedev(1, 3))
        except PermissionError:
            pass
        else:
            with pytest.raises(F.Refused) as ei:
                F.resolve(tree, (), "\\null")
            assert "character device" in ei.value.why
    finally:
        sock.close()


def test_not_found_and_invalid_names(tree):
    assert status_of(F.resolve, tree, (), "\\nope") == S.NOT_FOUND
    assert status_of(F.resolve, tree, (), "\\nope\\x") == S.NOT_FOUND
    assert status_of(F.resolve, tree, (), "\\hello.txt\\x") == S.NOT_FOUND          # a file is no directory
    assert status_of(F.resolve, tree, ("hello.txt",), "x") == S.NOT_FOUND           # relative to a file
    assert status_of(F.resolve, tree, (), "\\hello.txt\\") == S.NOT_FOUND           # trailing '\' = directory
    assert status_of(F.resolve, tree, (), "") == S.INVALID_PARAMETER
    for bad in ("EFI/../../secret", "a:b", "x*", "q?", "\x01"):
        assert status_of(F.resolve, tree, (), bad) == S.INVALID_PARAMETER, bad


def test_create_resolution(tree):
    r = F.resolve(tree, ("EFI",), "Linux\\new.efi", create=True)
    assert (r.kind, r.parts, r.rel) == ("missing", ("EFI", "Linux", "new.efi"), ("EFI", "Linux", "new.efi"))
    assert status_of(F.resolve, tree, (), "\\nodir\\new.efi", create=True) == S.NOT_FOUND
    assert F.resolve(tree, (), "\\HELLO.TXT", create=True).kind == "file"             # existing: opened


def test_root_reached_through_a_symlink(tree, tmp_path):
    alias = tmp_path / "alias"
    os.symlink(tree, alias)
    assert F.resolve(alias, (), "\\EFI\\Linux\\uki.efi").rel == ("EFI", "Linux", "uki.efi")
    os.symlink(tmp_path / "secret", tree / "out")
    assert status_of(F.resolve, alias, (), "\\out") == S.ACCESS_DENIED


def test_open_beneath_refuses_a_symlink_swapped_in(tree, tmp_path):
    r = F.resolve(tree, (), "\\EFI\\Linux\\uki.efi")
    (tree / "EFI" / "Linux" / "uki.efi").unlink()
    (tree / "EFI" / "Linux").rmdir()
    os.symlink(tmp_path, tree / "EFI" / "Linux")                     # a race after resolve()
    (tmp_path / "uki.efi").write_bytes(b"SECRET")
    with pytest.raises(OSError) as ei:
        F.open_beneath(os.path.realpath(tree), r.rel)
    assert ei.value.errno in (40, 20)                                  # ELOOP / ENOTDIR
    fd = F.open_beneath(os.path.realpath(tree), ("hello.txt",))
    try:
        assert os.read(fd, 5) == b"hello"
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# encodings
# --------------------------------------------------------------------------------------------

def _ns(*args) -> int:
    t = dt.datetime(*args[:6], tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * 1_000_000_000 + (args[6] if len(args) > 6 else 0)


def test_efi_time_layout():
    raw = F.efi_time(_ns(2024, 2, 29, 12, 34, 56, 789_000_000))
    assert len(raw) == 16
    year, month, day, hour, minute, second, pad1, nano, tz, daylight, pad2 = struct.unpack("<HBBBBBBIhBB", raw)
    assert (year, month, day, hour, minute, second, nano) == (2024, 2, 29, 12, 34, 56, 789_000_000)
    assert (pad1, tz, daylight, pad2) == (0, 0, 0, 0)
    assert F.parse_efi_time(raw) == _ns(2024, 2, 29, 12, 34, 56, 789_000_000)
    assert F.parse_efi_time(bytes(16)) is None
    # out-of-range host times are clamped, not an exception, to a valid EFI_TIME (UEFI 2.10
    # §8.3: Year 1900-9999, Month 1-12, Day 1-31, Hour 0-23, Minute and Second 0-59,
    # Nanosecond below 10^9, TimeZone -1440..1440 or EFI_UNSPECIFIED_TIMEZONE 0x07FF)
    for ns in (-(10 ** 20), 10 ** 30):
        y, mo, d, h, mi, sec, _, nano, tz, _, _ = struct.unpack("<HBBBBBBIhBB", F.efi_time(ns))
        assert (1900 <= y <= 9999 and 1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59
                and sec <= 59 and nano < 10 ** 9 and (-1440 <= tz <= 1440 or tz == 0x07FF)), (ns, y, mo, d)
        assert (y < 2000) == (ns < 0)  # before the epoch stays in the past, far future in the future


def test_file_info_encoding():
    c, a, m = _ns(2023, 1, 2, 3, 4, 5), _ns(2024, 6, 7, 8, 9, 10, 5), _ns(2025, 12, 31, 23, 59, 59, 999_999_999)
    raw = F.encode_file_info("uki.efi", 1234, 4096, c, a, m, F.ATTR_ARCHIVE | F.ATTR_READ_ONLY)
    size, file_size, physical = struct.unpack_from("<QQQ", raw, 0)
    name = "uki.efi\0".encode("utf-16-le")
    assert size == len(raw) == 80 + len(name)
    assert (file_size, physical) == (1234, 4096)
    times = [struct.unpack_from("<HBBBBBxIhBx", raw, off) for off in (24, 40, 56)]
    assert times[0][:6] == (2023, 1, 2, 3, 4, 5)
    assert times[1][:7] == (2024, 6, 7, 8, 9, 10, 5)
    assert times[2][:7] == (2025, 12, 31, 23, 59, 59, 999_999_999)
    assert struct.unpack_from("<Q", raw, 72)[0] == 0x21
    assert raw[80:] == name


def test_file_info_from_stat(tree):
    st = os.stat(tree / "hello.txt")
    raw = F.file_info_from_stat("hello.txt", st, read_only=True)
    assert struct.unpack_from("<QQQ", raw) == (80 + 20, 19, 4096)
    assert struct.unpack_from("<Q", raw, 72)[0] == F.ATTR_ARCHIVE | F.ATTR_READ_ONLY
    mtime = dt.datetime.fromtimestamp(st.st_mtime_ns // 10 ** 9, dt.timezone.utc)
    assert struct.unpack_from("<HBBBBB", raw, 56) == (mtime.year, mtime.month, mtime.day, mtime.hour,
                                                      mtime.minute, mtime.second)
    raw = F.file_info_from_stat("EFI", os.stat(tree / "EFI"), read_only=False)
    assert struct.unpack_from("<QQQ", raw)[1:] == (0, 0)
    assert struct.unpack_from("<Q", raw, 72)[0] == F.ATTR_DIRECTORY


def test_fs_info_encoding():
    raw = F.encode_fs_info(True, 64 << 20, 0, "ESP")
    size, ro, vol, free, block = struct.unpack_from("<QB7xQQI", raw)
    assert (size, ro, vol, free, block) == (36 + 8, 1, 64 << 20, 0, 512) and size == len(raw)
    assert raw[36:] == "ESP\0".encode("utf-16-le")


def test_partuuid_and_paths(tree, tmp_path):
    assert F.default_partuuid(tree) == F.default_partuuid(str(tree) + "/")
    assert F.default_partuuid(tree) != F.default_partuuid(tmp_path)
    assert F.default_partuuid(tree) == uuid.uuid5(uuid.NAMESPACE_URL, tree.resolve().as_uri())
    assert F.normalize_esp_path("EFI/Linux/x.efi") == F.normalize_esp_path("\\EFI\\Linux\\x.efi") \
        == "\\EFI\\Linux\\x.efi"
    vol = F.EspVolume(None, tree)
    assert DP.to_text(vol.file_path_nodes(tree / "EFI" / "Linux" / "uki.efi")) == "\\EFI\\Linux\\uki.efi"
    with pytest.raises(ValueError):
        vol.file_path_nodes(tmp_path / "secret")
    assert vol.payload_efi_path(tree / "EFI" / "Linux" / "uki.efi", "\\ignored") == "\\EFI\\Linux\\uki.efi"
    assert vol.payload_efi_path(tmp_path / "secret", "EFI/Linux/a.efi") == "\\EFI\\Linux\\a.efi"
    assert vol.payload_efi_path(tmp_path / "secret") == "\\EFI\\Linux\\secret"
    assert vol.read_file("\\efi\\linux\\UKI.EFI") == b"MZ uki"
    os.symlink(tmp_path / "secret", tree / "out")
    assert status_of(vol.read_file, "\\out") == S.ACCESS_DENIED


# --------------------------------------------------------------------------------------------
# the protocol methods on a stand-in firmware
# --------------------------------------------------------------------------------------------

class FakeFw:
    BASE, SIZE = 0x100000, 0x100000

    def __init__(self):
        self.mem = GuestMemory()
        self.mem.add_region(self.BASE, self.SIZE)
        self.next = self.BASE
        self.freed: list[int] = []
        self.installed: list = []
        self.volumes: dict = {}
        self.table = ServiceTable(self.mem)
        self.port = SimpleNamespace(thunk=lambda i: 0xF0000000 + 16 * i)
        self.alloc = SimpleNamespace(free_pool=lambda addr, owner="payload": self.freed.append(addr))
        self.handles = SimpleNamespace(install_multiple=self._install)

    def _install(self, handle, pairs):
        self.installed.extend(pairs)
        return 0x7770

    def pool(self, size):
        addr = self.next
        self.next += (size + 15) & ~15
        self.mem.fill(addr, size, 0)
        return addr

    def device_path(self, nodes):
        raw = DP.encode(nodes)
        addr = self.pool(len(raw))
        self.mem.write(addr, raw)
        return addr

    def wstr(self, text):
        raw = (text + "\0").encode("utf-16-le")
        addr = self.pool(len(raw))
        self.mem.write(addr, raw)
        return addr


class Guest:
    """Calls the volume's methods the way dispatch would, with guest buffers."""

    def __init__(self, root, **kw):
        self.fw = FakeFw()
        self.vol = F.EspVolume(self.fw, root, **kw)
        self.handle = self.vol.install()
        self.out = self.fw.pool(8)
        self.size = self.fw.pool(8)
        self.buf = self.fw.pool(0x4000)

    def open_volume(self):
        self.vol.open_volume(this=self.vol.sfs_iface, root=self.out)
        return self.fw.mem.read_u64(self.out)

    def open(self, this, name, mode=F.MODE_READ, attributes=0):
        self.vol.open(this=this, new_handle=self.out, file_name=self.fw.wstr(name), open_mode=mode,
                      attributes=attributes)
        return self.fw.mem.read_u64(self.out)

    def read(self, this, n):
        self.fw.mem.write_u64(self.size, n)
        self.vol.read(this=this, buffer_size=self.size, buffer=self.buf)
        got = self.fw.mem.read_u64(self.size)
        return self.fw.mem.read(self.buf, got)

    def write(self, this, data):
        self.fw.mem.write(self.buf, data)
        self.fw.mem.write_u64(self.size, len(data))
        self.vol.write(this=this, buffer_size=self.size, buffer=self.buf)

    def info(self, this, guid, n=0x4000):
        self.fw.mem.write_u64(self.size, n)
        self.vol.get_info(this=this, information_type=guid, buffer_size=self.size, buffer=self.buf)
        return self.fw.mem.read(self.buf, self.fw.mem.read_u64(self.size))

    def close(self):
        self.fw.mem.close()


@pytest.fixture
def guest(tree):
    g = Guest(tree)
    yield g
    g.close()


def test_install_layout(guest, tree):
    fw, vol = guest.fw, guest.vol
    kinds = [g for g, _ in fw.installed]
    assert kinds == [G.DEVICE_PATH, G.SIMPLE_FILE_SYSTEM] and guest.handle == 0x7770
    text = DP.to_text(fw.mem.read(fw.installed[0][1], 12 + 6 + 42 + 4))
    sectors = vol.volume_bytes // 512
    assert text == f"PciRoot(0x0)/Pci(0x1,0x1)/HD(1,GPT,{F.default_partuuid(tree)},0x800,{sectors:#x})"
    assert struct.unpack("<QQ", fw.mem.read(vol.sfs_iface, 16))[0] == 0x00010000
    root = guest.open_volume()
    rev, *thunks = struct.unpack("<15Q", fw.mem.read(root, F.FILE_STRUCT_SIZE))
    assert rev == 0x00010000 and len(set(thunks)) == 14
    names = [fw.table.services[(t - 0xF0000000) // 16].name for t in thunks]
    assert names == F.FILE_ORDER
    assert [fw.table.services[(t - 0xF0000000) // 16].implemented for t in thunks] == [True] * 10 + [False] * 4


def test_read_seek_and_info(guest):
    root = guest.open_volume()
    f = guest.open(root, "\\HELLO.txt")
    assert guest.read(f, 5) == b"hello" and guest.read(f, 100) == b" from the ESP\n" and guest.read(f, 10) == b""
    guest.vol.set_position(this=f, position=F.POSITION_END)
    guest.vol.get_position(this=f, position=guest.size)
    assert guest.fw.mem.read_u64(guest.size) == 19
    guest.vol.set_position(this=f, position=20)
    assert status_of(guest.read, f, 4) == S.DEVICE_ERROR
    assert status_of(guest.info, f, G.FILE_INFO, 81) == S.BUFFER_TOO_SMALL
    assert guest.fw.mem.read_u64(guest.size) == 100
    raw = guest.info(f, G.FILE_INFO)
    assert struct.unpack_from("<QQ", raw) == (100, 19) and raw[80:].decode("utf-16-le") == "hello.txt\0"
    assert status_of(guest.info, f, uuid.uuid4()) == S.UNSUPPORTED
    assert guest.info(root, G.FILE_SYSTEM_VOLUME_LABEL) == "ESP\0".encode("utf-16-le")
    ro = struct.unpack_from("<B", guest.info(root, G.FILE_SYSTEM_INFO), 8)[0]
    assert ro == 1
    guest.vol.close(this=f)
    assert f in guest.fw.freed and status_of(guest.read, f, 1) == S.INVALID_PARAMETER


def test_directory_reads(guest, tree, tmp_path):
    os.symlink(tmp_path / "secret", tree / "out")
    os.mkfifo(tree / "fifo")
    root = guest.open_volume()
    names = []
    assert status_of(guest.read, root, 10) == S.BUFFER_TOO_SMALL      # position unchanged
    while True:
        raw = guest.read(root, 0x1000)
        if not raw:
            break
        size = struct.unpack_from("<Q", raw)[0]
        assert size == len(raw)
        names.append(raw[80:size - 2].decode("utf-16-le"))
    assert names == ["EFI", "Mixed", "hello.txt"]                        # no . / .. / out / fifo
    assert status_of(guest.vol.set_position, this=root, position=1) == S.UNSUPPORTED
    assert status_of(guest.vol.get_position, this=root, position=guest.size) == S.UNSUPPORTED
    guest.vol.set_position(this=root, position=0)
    assert guest.read(root, 0x1000)[80:86].decode("utf-16-le") == "EFI"


def test_read_only_volume_refuses_changes(guest, tree):
    root = guest.open_volume()
    for mode in (F.MODE_READ | F.MODE_WRITE, F.MODE_READ | F.MODE_WRITE | F.MODE_CREATE):
        assert status_of(guest.open, root, "\\new.txt", mode) == S.WRITE_PROTECTED
    assert not (tree / "new.txt").exists()
    assert status_of(guest.open, root, "\\hello.txt", F.MODE_WRITE) == S.INVALID_PARAMETER
    assert status_of(guest.open, root, "\\hello.txt", F.MODE_READ, 0x40) == S.INVALID_PARAMETER
    f = guest.open(root, "\\hello.txt")
    assert status_of(guest.write, f, b"x") == S.WRITE_PROTECTED
    assert status_of(guest.vol.flush, this=f) == S.WRITE_PROTECTED
    assert status_of(guest.vol.set_info, this=f, information_type=G.FILE_INFO, buffer_size=0x60,
                     buffer=guest.buf) == S.WRITE_PROTECTED
    assert guest.vol.delete(this=f) == S.WARN_DELETE_FAILURE
    assert (tree / "hello.txt").read_bytes() == b"hello from the ESP\n" and f in guest.fw.freed


def test_writable_volume(tree, tmp_path):
    g = Guest(tree, writable=True, label="RW")
    try:
        rw = F.MODE_READ | F.MODE_WRITE
        root = g.open_volume()
        d = g.open(root, "\\EFI\\new", rw | F.MODE_CREATE, F.ATTR_DIRECTORY)
        assert (tree / "EFI" / "new").is_dir()
        f = g.open(d, "Data.bin", rw | F.MODE_CREATE)
        g.write(f, b"abcdef")
        g.vol.set_position(this=f, position=2)
        g.write(f, b"XY")
        g.vol.flush(this=f)
        assert (tree / "EFI" / "new" / "Data.bin").read_bytes() == b"abXYef"
        info = bytearray(g.info(f, G.FILE_INFO))
        struct.pack_into("<Q", info, 8, 3)                              # truncate to 3 bytes
        name = "renamed.bin\0".encode("utf-16-le")
        info = info[:80] + name
        struct.pack_into("<Q", info, 0, len(info))
        g.fw.mem.write(g.buf, bytes(info))
        g.vol.set_info(this=f, information_type=G.FILE_INFO, buffer_size=len(info), buffer=g.buf)
        assert (tree / "EFI" / "new" / "renamed.bin").read_bytes() == b"abX"
        assert not (tree / "EFI" / "new" / "Data.bin").exists()
        assert g.vol.delete(this=f) is None and not (tree / "EFI" / "new" / "renamed.bin").exists()
        assert g.vol.delete(this=d) is None and not (tree / "EFI" / "new").exists()
        assert struct.unpack_from("<B", g.info(root, G.FILE_SYSTEM_INFO), 8)[0] == 0
        ro = g.open(root, "\\hello.txt")
        assert status_of(g.write, ro, b"x") == S.ACCESS_DENIED            # opened read-only
        # the jail holds for creation too
        assert status_of(g.open, root, "..\\evil", rw | F.MODE_CREATE) == S.ACCESS_DENIED
        os.symlink(tmp_path, tree / "outdir")
        assert status_of(g.open, root, "\\outdir\\evil", rw | F.MODE_CREATE) == S.ACCESS_DENIED
        assert not (tmp_path / "evil").exists()
        assert status_of(g.open, root, "\\new\\", rw | F.MODE_CREATE) == S.INVALID_PARAMETER
    finally:
        g.close()


def test_volume_backed_by_no_folder_is_empty_and_read_only():
    """The device of a payload run without --esp: an HD() partition whose root directory is
    empty (a directory read at its end returns BufferSize 0, §13.5.5) and that refuses writes
    with EFI_WRITE_PROTECTED (§13.5.2)."""
    g = Guest(None)
    try:
        fw, vol = g.fw, g.vol
        text = DP.to_text(fw.mem.read(fw.installed[0][1], 12 + 6 + 42 + 4))
        assert text == f"PciRoot(0x0)/Pci(0x1,0x1)/HD(1,GPT,{F.EMPTY_VOLUME_PARTUUID},0x800,0x1000)"   # 2 MiB
        root = g.open_volume()
        assert g.read(root, 0x1000) == b""
        info = g.info(root, G.FILE_INFO)
        attribute = struct.unpack_from("<Q", info, 72)[0]
        assert attribute == F.ATTR_DIRECTORY | F.ATTR_READ_ONLY and info[80:] == b"\0\0"
        fs = g.info(root, G.FILE_SYSTEM_INFO)
        assert struct.unpack_from("<QBxxxxxxxQQI", fs) == (len(fs), 1, 2 << 20, 0, 512)
        for name in ("\\EFI", "hello.txt", "\\EFI\\Linux\\uki.efi", "\\loader\\credentials\\"):
            assert status_of(g.open, root, name) == S.NOT_FOUND, name
        again = g.open(root, "\\.")
        assert again != root and g.read(again, 0x1000) == b""
        assert status_of(g.open, root, "..") == S.ACCESS_DENIED
        for mode in (F.MODE_READ | F.MODE_WRITE, F.MODE_READ | F.MODE_WRITE | F.MODE_CREATE):
            assert status_of(g.open, root, "\\new.txt", mode) == S.WRITE_PROTECTED
        assert status_of(g.vol.flush, this=root) == S.WRITE_PROTECTED
        assert g.vol.delete(this=again) == S.WARN_DELETE_FAILURE
        assert status_of(vol.read_file, "\\EFI\\Linux\\uki.efi") == S.NOT_FOUND
        assert vol.payload_efi_path("/somewhere/uki.efi") == "\\EFI\\Linux\\uki.efi"
        assert vol.payload_efi_path("/somewhere/uki.efi", "EFI/BOOT/BOOTX64.EFI") == "\\EFI\\BOOT\\BOOTX64.EFI"
    finally:
        g.close()
    with pytest.raises(ValueError):
        F.EspVolume(None, None, writable=True)
