"""Boot loader entries as ``bootctl`` finds them, for ``vmrun kexec -l --default-entry``.

Written from the Boot Loader Specification (UAPI.1), the Version Format Specification (UAPI.10)
and the behaviour of systemd's ``bootctl``/``sd-boot`` (``src/shared/bootspec.c``):

- Partitions: the ESP is the first of ``/efi``, ``/boot``, ``/boot/efi`` that is a mount point
  of a vfat file system whose partition type is the ESP's (udev's ``ID_PART_ENTRY_TYPE``) or,
  when udev does not say, that has an ``EFI`` directory. XBOOTLDR is ``/boot`` when it is a mount
  point other than the ESP whose partition type is XBOOTLDR's (or, unknown type, that has
  ``loader/entries``). ``esp=``/``xbootldr=`` override the search (trusted as given).
- Type #1 entries: ``loader/entries/*.conf`` on the ESP and on XBOOTLDR (keys ``title``,
  ``version``, ``machine-id``, ``sort-key``, ``linux``, ``initrd`` (repeatable), ``efi``, ``uki``,
  ``options`` (repeatable, joined with spaces), ``architecture``), paths relative to the root of
  the partition holding the snippet. Entries with neither ``linux``, ``efi`` nor ``uki``, or for
  another architecture than x64, are left out (sd-boot hides them).
- Type #2 entries: ``EFI/Linux/*.efi`` on both partitions that are UKIs (``.osrel`` and
  ``.linux`` sections, x86_64): title, version and sort key from ``.osrel`` (PRETTY_NAME|IMAGE_ID|
  NAME|ID; IMAGE_VERSION|VERSION|VERSION_ID|BUILD_ID; IMAGE_ID|ID).
- Boot counting: ``NAME+LEFT[-DONE].conf|.efi``; the id drops the counter; entries with no
  tries left ("bad") sort after all others (they stay bootable, as the specification asks).
- Sorting: bad entries last; entries with a ``sort-key`` before those without; then sort-key
  (strcmp), machine-id (strcmp, missing first), version (descending, UAPI.10 order); then id
  (descending, UAPI.10 order).
- Default: the ``LoaderEntryOneShot`` EFI variable, then ``LoaderEntryDefault``, then
  ``loader.conf``'s ``default`` (on the ESP), each a case-insensitive glob matched against the
  ids in sorted order (``@saved`` means ``LoaderEntrySelected``); else the first entry.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import pathlib
import shlex
import struct
from dataclasses import dataclass, field

from vmrun.errors import VmrunError

ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
XBOOTLDR_TYPE = "bc13c2ff-59e6-4262-a352-b275fd6f7172"
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
EFIVARS = "/sys/firmware/efi/efivars"
MOUNTINFO = "/proc/self/mountinfo"
UDEV_DATA = "/run/udev/data"
ESP_CANDIDATES = ("/efi", "/boot", "/boot/efi")
XBOOTLDR_CANDIDATES = ("/boot",)
PE_SECTION_MAX = 4 << 20      # like bootctl: the sections it reads are at most 4 MiB
AMD64 = 0x8664
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_.@")


class BootEntryError(VmrunError):
    """No boot loader entry could be found or used."""
    exit_code = 10
    kind = "boot_entry"


# --- UAPI.10 version comparison ----------------------------------------------------------------
def _vchar(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-.~^")


def verscmp(a: str | None, b: str | None) -> int:
    """Compare two version strings as the Version Format Specification (UAPI.10) says:
    -1, 0 or 1. ``None`` is the empty string."""
    a, b = a or "", b or ""
    i = j = 0
    while True:
        while i < len(a) and not _vchar(a[i]):
            i += 1
        while j < len(b) and not _vchar(b[j]):
            j += 1
        ta, tb = a.startswith("~", i), b.startswith("~", j)
        if ta or tb:
            if ta != tb:
                return -1 if ta else 1
            i, j = i + 1, j + 1
            continue
        if i >= len(a) or j >= len(b):
            return (i < len(a)) - (j < len(b))
        special = next((ch for ch in "-^." if a[i] == ch or b[j] == ch), None)
        if special:
            if a[i] != b[j]:
                return -1 if a[i] == special else 1
            i, j = i + 1, j + 1
            continue
        if a[i].isdigit() or b[j].isdigit():
            i2, j2 = i, j
            while i2 < len(a) and a[i2].isascii() and a[i2].isdigit():
                i2 += 1
            while j2 < len(b) and b[j2].isascii() and b[j2].isdigit():
                j2 += 1
            if (i2 > i) != (j2 > j):      # systemd (and bootctl): digits sort above letters; the
                return 1 if i2 > i else -1    # spec's "an empty prefix is 0" disagrees (see the tests)
            na, nb = int(a[i:i2]), int(b[j:j2])
            if na != nb:
                return -1 if na < nb else 1
            i, j = i2, j2
            continue
        while i < len(a) and j < len(b) and a[i].isascii() and a[i].isalpha() \
                and b[j].isascii() and b[j].isalpha():
            if a[i] != b[j]:
                return -1 if a[i] < b[j] else 1
            i, j = i + 1, j + 1
        la = i < len(a) and a[i].isascii() and a[i].isalpha()
        lb = j < len(b) and b[j].isascii() and b[j].isalpha()
        if la != lb:
            return 1 if la else -1


# --- boot counting -------------------------------------------------------------------------------
def split_tries(fname: str) -> tuple[str, int | None, int | None]:
    """``foo+3-1.conf`` → (``foo.conf``, 3, 1); names without a counter → (name, None, None)."""
    dot = fname.rfind(".")
    if dot < 0:
        return fname, None, None
    plus = fname.rfind("+", 0, dot)
    if plus < 0:
        return fname, None, None
    counter = fname[plus + 1:dot]
    left, _, done = counter.partition("-")
    if not left.isdigit() or not left.isascii() or ("-" in counter and not (done.isdigit() and done.isascii())):
        return fname, None, None
    return fname[:plus] + fname[dot:], int(left), (int(done) if done else None)


def name_valid(name: str) -> bool:
    return 0 < len(name) <= 255 and name not in (".", "..") and set(name) <= _NAME_CHARS


# --- entries -------------------------------------------------------------------------------------
@dataclass
class BootEntry:
    id: str                       # file name without the boot counter (what LoaderEntryDefault names)
    type: str                     # "type1" or "type2"
    source: pathlib.Path          # the .conf snippet or the UKI
    root: pathlib.Path            # the partition (mount point) the entry lies on
    title: str | None = None
    version: str | None = None
    sort_key: str | None = None
    machine_id: str | None = None
    architecture: str | None = None
    linux: pathlib.Path | None = None     # host paths, resolved inside ``root``
    efi: pathlib.Path | None = None       # "efi" or "uki" key, or the Type #2 UKI itself
    initrd: list[pathlib.Path] = field(default_factory=list)
    options: str | None = None            # Type #1 ``options``; a UKI's .cmdline (informational)
    tries_left: int | None = None
    tries_done: int | None = None

    @property
    def payload(self) -> pathlib.Path:
        """What vmrun runs: the EFI program / UKI, else the (EFI-stub) kernel."""
        return self.efi or self.linux

    @property
    def is_uki(self) -> bool:
        return self.type == "type2"

    @property
    def bad(self) -> bool:
        return self.tries_left == 0

    def describe(self) -> str:
        what = self.title or self.id
        if self.version:
            what += f", version {self.version}"
        tries = f", {self.tries_left} tries left" if self.tries_left is not None else ""
        return f"{self.id} ({what}{tries}; {self.type}, {self.source})"


def _mangle_path(root: pathlib.Path, value: str) -> pathlib.Path | None:
    """A snippet's path, relative to the partition root (bootctl: normalized, no trailing '/',
    no '.' or '..'); None when unusable or when it leaves the partition through a symlink."""
    p = value if value.startswith("/") else "/" + value
    if p.endswith("/"):
        return None
    parts = [x for x in p.split("/") if x]
    if any(x in (".", "..") for x in parts) or not parts:
        return None
    host = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(host)
    if os.path.commonpath([real_root, real]) != real_root:
        return None
    return host


def _key_value(line: str) -> tuple[str, str]:
    """``key value…`` (the first word, then the rest without surrounding white space)."""
    parts = line.split(None, 1)
    return parts[0], (parts[1].strip() if len(parts) > 1 else "")


def parse_type1(path: pathlib.Path, root: pathlib.Path, text: str | None = None) -> BootEntry | None:
    """One ``loader/entries/*.conf`` snippet; None when its name is invalid."""
    entry_id, left, done = split_tries(path.name)
    if not name_valid(entry_id) or not entry_id.lower().endswith(".conf"):
        return None
    if text is None:
        text = path.read_text(errors="replace")
    e = BootEntry(id=entry_id, type="type1", source=path, root=root, tries_left=left, tries_done=done)
    options: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, value = _key_value(line)
        if not value:
            continue
        if key in ("title", "version", "sort-key", "machine-id", "architecture"):
            setattr(e, key.replace("-", "_"), value)
        elif key == "options":
            options.append(value)
        elif key == "linux":
            e.linux = _mangle_path(root, value) or e.linux
        elif key in ("efi", "uki"):
            e.efi = _mangle_path(root, value) or e.efi
        elif key == "initrd":
            p = _mangle_path(root, value)
            if p is not None:
                e.initrd.append(p)
    e.options = " ".join(options) if options else None
    return e


def read_pe_sections(path: pathlib.Path, names=(".osrel", ".cmdline")) -> dict | None:
    """The named sections of a PE file read from its headers alone (a UKI is mostly kernel and
    initrd, never read here), plus ``"_sections"`` (all names) and ``"_machine"``; None when
    the file is not PE."""
    try:
        with open(path, "rb") as f:
            dos = f.read(64)
            if len(dos) < 64 or dos[:2] != b"MZ":
                return None
            (lfanew,) = struct.unpack_from("<I", dos, 0x3C)
            f.seek(lfanew)
            hdr = f.read(24)
            if len(hdr) < 24 or hdr[:4] != b"PE\0\0":
                return None
            machine, nsect = struct.unpack_from("<HH", hdr, 4)
            (opt_size,) = struct.unpack_from("<H", hdr, 20)
            if nsect > 96:
                return None
            f.seek(lfanew + 24 + opt_size)
            table = f.read(40 * nsect)
            if len(table) < 40 * nsect:
                return None
            out: dict = {"_machine": machine, "_sections": []}
            for k in range(nsect):
                name = table[40 * k:40 * k + 8].rstrip(b"\0").decode("latin-1")
                vsize, _rva, rawsize, rawoff = struct.unpack_from("<IIII", table, 40 * k + 8)
                out["_sections"].append(name)
                if name in names and name not in out:
                    size = min(vsize or rawsize, rawsize)
                    if size > PE_SECTION_MAX:
                        continue
                    f.seek(rawoff)
                    out[name] = f.read(size)
            return out
    except OSError:
        return None


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5) ``KEY=value`` lines (shell quoting)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, _, v = line.partition("=")
        try:
            words = shlex.split(v, comments=False, posix=True)
            v = " ".join(words)
        except ValueError:
            v = v.strip("\"'")
        out[k.strip()] = v
    return out


def _first(*vals):
    return next((v for v in vals if v is not None), None)


def parse_type2(path: pathlib.Path, root: pathlib.Path) -> BootEntry | None:
    """A UKI in ``EFI/Linux``; None when the file is not an x86_64 UKI (bootctl skips those)."""
    entry_id, left, done = split_tries(path.name)
    if not name_valid(entry_id):
        return None
    secs = read_pe_sections(path)
    if not secs or secs["_machine"] != AMD64 or ".osrel" not in secs or ".linux" not in secs["_sections"]:
        return None
    osr = parse_os_release(secs[".osrel"].rstrip(b"\0").decode("utf-8", "replace"))
    g = osr.get
    title = _first(g("PRETTY_NAME"), g("IMAGE_ID"), g("NAME"), g("ID"))
    if title is None:
        return None
    cmdline = secs.get(".cmdline", b"").rstrip(b"\0").decode("utf-8", "replace").strip() or None
    return BootEntry(id=entry_id, type="type2", source=path, root=root, title=title,
                     version=_first(g("IMAGE_VERSION"), g("VERSION"), g("VERSION_ID"), g("BUILD_ID")),
                     sort_key=_first(g("IMAGE_ID"), g("ID")), efi=path, options=cmdline,
                     tries_left=left, tries_done=done)


def _cmp(x, y) -> int:
    return (x > y) - (x < y)


def _strcmp(a: str, b: str) -> int:
    return _cmp(a.encode(), b.encode())


def compare(a: BootEntry, b: BootEntry) -> int:
    """The specification's order (negative: ``a`` first)."""
    r = _cmp(a.bad, b.bad)
    if r:
        return r
    r = _cmp(a.sort_key is None, b.sort_key is None)
    if r:
        return r
    if a.sort_key is not None and b.sort_key is not None:
        r = _strcmp(a.sort_key, b.sort_key)
        if r:
            return r
        if a.machine_id is None or b.machine_id is None:
            r = _cmp(a.machine_id is not None, b.machine_id is not None)
        else:
            r = _strcmp(a.machine_id, b.machine_id)
        if r:
            return r
        r = -verscmp(a.version, b.version)
        if r:
            return r
    r = -verscmp(a.id, b.id)
    if r:
        return r
    if a.tries_left is not None and b.tries_left is not None:   # same entry, other counters
        return -_cmp(a.tries_left, b.tries_left) or _cmp(a.tries_done or 0, b.tries_done or 0)
    return 0


def _files(directory: pathlib.Path, suffix: str) -> list[pathlib.Path]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [directory / n for n in names if n.lower().endswith(suffix)
            and not os.path.islink(directory / n) and (directory / n).is_file()]


def _subdir(root: pathlib.Path, *parts: str) -> pathlib.Path:
    """``root/parts…`` matching each component case-insensitively (vfat is case-insensitive,
    and a folder on another file system may spell ``EFI`` differently)."""
    cur = root
    for part in parts:
        nxt = cur / part
        if not nxt.is_dir():
            try:
                nxt = next((cur / n for n in os.listdir(cur) if n.lower() == part.lower()
                            and (cur / n).is_dir()), nxt)
            except OSError:
                pass
        cur = nxt
    return cur


def load_entries(esp: pathlib.Path | None, xbootldr: pathlib.Path | None = None) -> list[BootEntry]:
    """Every usable entry of both partitions, sorted (first = what sd-boot lists first)."""
    entries: list[BootEntry] = []
    seen: set[tuple[int, int]] = set()
    for root in (esp, xbootldr):
        if root is None:
            continue
        found = [(p, "1") for p in _files(_subdir(root, "loader", "entries"), ".conf")]
        found += [(p, "2") for p in _files(_subdir(root, "EFI", "Linux"), ".efi")]
        for path, kind in found:
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                e = parse_type1(path, root) if kind == "1" else parse_type2(path, root)
            except OSError:
                continue
            if e is None or e.payload is None:
                continue
            if e.architecture and e.architecture.lower() != "x64":
                continue
            entries.append(e)
    entries.sort(key=functools.cmp_to_key(compare))
    return entries


def read_loader_conf(esp: pathlib.Path | None) -> dict[str, str]:
    """``loader/loader.conf`` on the ESP (``default``, ``timeout``, …); last value wins."""
    if esp is None:
        return {}
    path = _subdir(esp, "loader") / "loader.conf"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    out = {}
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, value = _key_value(line)
        if value:
            out[key] = value
    return out


def read_efivar_string(name: str, efivars: str | os.PathLike = EFIVARS, guid: str = LOADER_GUID) -> str | None:
    """A UTF-16 string variable from efivarfs (4 attribute bytes, then the data); None when
    absent or not a string."""
    try:
        data = pathlib.Path(efivars, f"{name}-{guid}").read_bytes()
    except OSError:
        return None
    body = data[4:]
    if len(body) % 2:
        body = body[:-1]
    try:
        text = body.decode("utf-16-le")
    except UnicodeDecodeError:
        return None
    return text.split("\0", 1)[0] or None


def find_entry(entries: list[BootEntry], pattern: str | None, selected: str | None = None) -> BootEntry | None:
    """The first entry whose id the glob ``pattern`` matches (case-insensitive); ``@saved``
    stands for the entry booted this time (LoaderEntrySelected)."""
    if not pattern:
        return None
    if pattern.startswith("@"):
        if pattern.lower() != "@saved" or not selected:
            return None
        pattern = selected
    pat = pattern.lower()
    return next((e for e in entries if fnmatch.fnmatchcase(e.id.lower(), pat)), None)


@dataclass
class Choice:
    entry: BootEntry
    reason: str
    entries: list[BootEntry]
    esp: pathlib.Path | None
    xbootldr: pathlib.Path | None


def select_default(entries: list[BootEntry], *, oneshot: str | None = None, default_var: str | None = None,
                   pattern: str | None = None, selected: str | None = None) -> tuple[BootEntry, str]:
    """bootctl's default: LoaderEntryOneShot, LoaderEntryDefault, loader.conf ``default``,
    else the first entry."""
    if not entries:
        raise BootEntryError("no boot loader entries found")
    for value, why in ((oneshot, "the LoaderEntryOneShot EFI variable"),
                       (default_var, "the LoaderEntryDefault EFI variable"),
                       (pattern, "loader.conf's default")):
        e = find_entry(entries, value, selected)
        if e is not None:
            return e, f"{why} ({value!r})"
    return entries[0], "the first entry in boot menu order (no default set)"


# --- partitions ----------------------------------------------------------------------------------
@dataclass
class Mount:
    mount_point: str
    fstype: str
    source: str
    devno: str        # "major:minor"


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def read_mounts(mountinfo: str | os.PathLike = MOUNTINFO) -> list[Mount]:
    out = []
    try:
        lines = pathlib.Path(mountinfo).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 5 or len(r) < 2:
            continue
        out.append(Mount(_unescape(f[4]), r[0], r[1], f[2]))
    return out


def mount_of(path: str | os.PathLike, mountinfo: str | os.PathLike = MOUNTINFO) -> Mount | None:
    """The mount holding ``path`` (the last-mounted of the longest matching mount points)."""
    real = os.path.realpath(path)
    best = None
    for m in read_mounts(mountinfo):
        mp = m.mount_point
        if real == mp or real.startswith(mp.rstrip("/") + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mount_point):
                best = m
    return best


def udev_property(devno: str, key: str, udev_data: str | os.PathLike = UDEV_DATA) -> str | None:
    try:
        text = pathlib.Path(udev_data, f"b{devno}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"E:{key}="):
            return line.split("=", 1)[1].strip()
    return None


@dataclass
class Partition:
    root: pathlib.Path        # the mount point
    kind: str                 # "esp" or "xbootldr"
    partuuid: str | None      # PARTUUID when udev knows it
    why: str


def classify(mount_point: str, m: Mount, udev_data: str | os.PathLike = UDEV_DATA) -> Partition | None:
    """Is this mount an ESP or an XBOOTLDR partition? (vfat + partition type, or + an ``EFI``
    folder when udev cannot tell the type.)"""
    ptype = (udev_property(m.devno, "ID_PART_ENTRY_TYPE", udev_data) or "").lower() or None
    uuid = udev_property(m.devno, "ID_PART_ENTRY_UUID", udev_data)
    root = pathlib.Path(mount_point)
    if ptype == XBOOTLDR_TYPE:
        return Partition(root, "xbootldr", uuid, f"partition type XBOOTLDR ({m.source})")
    if m.fstype != "vfat":
        return None
    if ptype == ESP_TYPE:
        return Partition(root, "esp", uuid, f"vfat, partition type ESP ({m.source})")
    if ptype is None and _subdir(root, "EFI").is_dir():
        return Partition(root, "esp", uuid, f"vfat with an EFI folder ({m.source})")
    return None


def partition_of(path: str | os.PathLike, mountinfo: str | os.PathLike = MOUNTINFO,
                 udev_data: str | os.PathLike = UDEV_DATA) -> Partition | None:
    """The ESP or XBOOTLDR partition a file lies on, or None."""
    m = mount_of(path, mountinfo)
    if m is None or m.mount_point == "/":
        return None
    return classify(m.mount_point, m, udev_data)


def find_partitions(mountinfo: str | os.PathLike = MOUNTINFO, udev_data: str | os.PathLike = UDEV_DATA
                    ) -> tuple[Partition | None, Partition | None]:
    """(ESP, XBOOTLDR) as bootctl looks for them: ``/efi``, ``/boot``, ``/boot/efi``; ``/boot``."""
    mounts = {m.mount_point: m for m in read_mounts(mountinfo)}   # the last mount on a point wins
    esp = None
    for cand in ESP_CANDIDATES:
        m = mounts.get(cand)
        if m is not None:
            p = classify(cand, m, udev_data)
            if p is not None and p.kind == "esp":
                esp = p
                break
    xbootldr = None
    for cand in XBOOTLDR_CANDIDATES:
        m = mounts.get(cand)
        if m is None or (esp is not None and str(esp.root) == cand):
            continue
        p = classify(cand, m, udev_data)
        if p is not None and p.kind == "xbootldr":
            xbootldr = p
        elif p is None and udev_property(m.devno, "ID_PART_ENTRY_TYPE", udev_data) is None \
                and _subdir(pathlib.Path(cand), "loader", "entries").is_dir():
            xbootldr = Partition(pathlib.Path(cand), "xbootldr", None, f"{cand} has loader/entries ({m.source})")
    return esp, xbootldr


def default_entry(esp: str | os.PathLike | None = None, xbootldr: str | os.PathLike | None = None, *,
                  efivars: str | os.PathLike = EFIVARS, mountinfo: str | os.PathLike = MOUNTINFO,
                  udev_data: str | os.PathLike = UDEV_DATA) -> Choice:
    """The entry ``bootctl`` calls the default. ``esp``/``xbootldr`` override the search; with
    only one of them given, the other is not searched (as bootctl with --esp-path/--boot-path)."""
    if esp is None and xbootldr is None:
        pe, px = find_partitions(mountinfo, udev_data)
        esp_root = pe.root if pe else None
        x_root = px.root if px else None
        if esp_root is None and x_root is None:
            raise BootEntryError("no EFI System Partition found (looked for a vfat mount with an EFI folder "
                                 f"at {', '.join(ESP_CANDIDATES)}): give --esp PATH")
    else:
        esp_root = pathlib.Path(esp) if esp is not None else None
        x_root = pathlib.Path(xbootldr) if xbootldr is not None else None
        for opt, p in (("--esp", esp_root), ("--boot-path", x_root)):
            if p is not None and not p.is_dir():
                raise BootEntryError(f"{opt} {p}: not a folder")
    if esp_root is not None and x_root is not None and os.path.realpath(esp_root) == os.path.realpath(x_root):
        x_root = None
    entries = load_entries(esp_root, x_root)
    where = " and ".join(str(p) for p in (esp_root, x_root) if p is not None)
    if not entries:
        raise BootEntryError(f"no boot loader entries in {where} (loader/entries/*.conf with linux, efi or "
                             "uki; EFI/Linux/*.efi UKIs with an .osrel section)")
    conf = read_loader_conf(esp_root if esp_root is not None else x_root)
    entry, reason = select_default(
        entries, oneshot=read_efivar_string("LoaderEntryOneShot", efivars),
        default_var=read_efivar_string("LoaderEntryDefault", efivars), pattern=conf.get("default"),
        selected=read_efivar_string("LoaderEntrySelected", efivars))
    return Choice(entry, reason, entries, esp_root, x_root)
