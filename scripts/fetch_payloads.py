"""Fetch the real Debian payloads vmrun is exercised against.

Packages are downloaded with ``apt-get download`` and unpacked with
``dpkg -x`` / ``dpkg-deb``; nothing is installed and the machine's own apt
configuration is never modified.  Every suite is resolved through a private
apt configuration that lives inside the cache folder (own sources, lists,
state and cache directories).  The archive URI is taken at run time from the
machine's own apt sources, and signatures are checked against the Debian
archive keyring.

Cache layout (default ``<repo>/.cache/payloads``, override with VMRUN_CACHE):

    kernels/bookworm/vmlinuz  (+ version, release)
    kernels/bookworm/modules/ (the modules a virtio 9p mount needs, + load-order; those a UEFI
                              test target needs, + load-order-target)
    kernels/trixie/vmlinuz    (+ version, release)
    kernels/trixie/modules/   (likewise)
    stubs/252/linuxx64.efi.stub
    stubs/257/linuxx64.efi.stub, stubs/257/addonx64.efi.stub
    tools/busybox
    tools/kexec-tools/        (unpacked kexec-tools package)
    initrd/test-initrd.cpio.gz
    manifest.json

Usage: scripts/fetch-payloads [--only GROUP[,GROUP...]] [--refresh] [--list]
Groups: kernels, stubs, tools, initrd.

The thin ``scripts/fetch-payloads`` calls :func:`cli`; the tests import this module as
``scripts.fetch_payloads``. Standard library only (and :mod:`scripts.newc`): ``scripts/setup``
runs it with the system's ``python3``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import struct
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from scripts import newc

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "payloads"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SYSTEM_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "amd64"
GROUPS = ("kernels", "stubs", "tools", "initrd")
INITRD_MARKER = "VMRUN-INITRD-OK"

# Channels: each one is a private apt root holding a coherent set of suites,
# so that "the candidate" of a package is the newest version in that channel.
CHANNELS = {
    "bookworm": {"suites": ["bookworm", "bookworm-updates"], "security": ["bookworm-security"]},
    "bookworm-backports": {"suites": ["bookworm-backports"], "security": []},
    "trixie": {"suites": ["trixie", "trixie-updates"], "security": ["trixie-security"]},
}
# The modules a QEMU guest needs to mount a ``-virtfs`` (virtio 9p) share, besides what they
# depend on; the ones the kernel has built in are skipped. Loaded in the order of LOAD_ORDER.
NINEP_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
LOAD_ORDER = "load-order"
# What a QEMU guest acting as a UEFI kexec target loads on top of those: KVM (QEMU's TCG
# emulates AMD SVM with -cpu max, so kvm_amd; it needs ccp for its SEV symbols) for vmrun to
# run in, and efivarfs for the target's own UEFI variables. Order in LOAD_ORDER_TARGET.
TARGET_MODULES = ("kvm_amd", "efivarfs")
LOAD_ORDER_TARGET = "load-order-target"
MODULE_GROUPS = ((LOAD_ORDER, NINEP_MODULES), (LOAD_ORDER_TARGET, TARGET_MODULES))

# The release key whose presence in a keyring shows it can verify the suite.
RELEASE_KEY_UID = {"trixie": "13/trixie", "bookworm": "12/bookworm", "bookworm-backports": "12/bookworm"}


class FetchError(Exception):
    """A failure worth a one-line message."""


def log(msg: str) -> None:
    print(f"fetch-payloads: {msg}", flush=True)


# --------------------------------------------------------------------------
# Archive URI derivation from the machine's apt sources
# --------------------------------------------------------------------------

def parse_deb822_sources(text: str) -> list[dict]:
    """Parse deb822 ``.sources`` text into entries {types, uris, suites, components}."""
    entries: list[dict] = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            if raw[0] in " \t" and key is not None:  # continuation line
                fields[key] += " " + raw.strip()
                continue
            if ":" not in raw:
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if not fields or fields.get("enabled", "yes").strip().lower() == "no":
            continue
        entries.append({
            "types": fields.get("types", "").split(),
            "uris": fields.get("uris", "").split(),
            "suites": fields.get("suites", "").split(),
            "components": fields.get("components", "").split(),
        })
    return entries


def parse_one_line_sources(text: str) -> list[dict]:
    """Parse classic one-line ``sources.list`` text."""
    entries: list[dict] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # drop [ options ]
        parts = line.split()
        if len(parts) < 3 or parts[0] not in ("deb", "deb-src"):
            continue
        entries.append({"types": [parts[0]], "uris": [parts[1]], "suites": [parts[2]],
                        "components": parts[3:]})
    return entries


def derive_archive_uris(entries: list[dict]) -> dict[str, str]:
    """Pick the Debian archive URI and (if any) the security archive URI.

    Returns {"archive": URI, "security": URI-or-missing}.  The archive is the
    first binary ``deb`` entry over http(s) that carries a plain release suite
    (e.g. ``bookworm`` or ``bookworm-updates``); the security archive is the
    first one carrying a ``*-security`` suite.
    """
    result: dict[str, str] = {}
    for e in entries:
        if "deb" not in e["types"]:
            continue
        uris = [u.rstrip("/") for u in e["uris"] if re.match(r"^https?://", u)]
        if not uris:
            continue
        if any(s.endswith("-security") or "/updates" in s for s in e["suites"]):
            result.setdefault("security", uris[0])
        elif any(re.fullmatch(r"[a-z]+(-updates|-backports|-proposed-updates)?", s)
                 for s in e["suites"]):
            result.setdefault("archive", uris[0])
    return result


def machine_sources(etc: Path = Path("/etc/apt")) -> list[dict]:
    entries: list[dict] = []
    main = etc / "sources.list"
    if main.is_file():
        entries += parse_one_line_sources(main.read_text(errors="replace"))
    for f in sorted((etc / "sources.list.d").glob("*")):
        if f.suffix == ".list":
            entries += parse_one_line_sources(f.read_text(errors="replace"))
        elif f.suffix == ".sources":
            entries += parse_deb822_sources(f.read_text(errors="replace"))
    return entries


def machine_archive_uris() -> dict[str, str]:
    uris = derive_archive_uris(machine_sources())
    override = os.environ.get("VMRUN_DEBIAN_ARCHIVE")
    if override:
        uris["archive"] = override.rstrip("/")
    if "archive" not in uris:
        raise FetchError("no Debian archive URI found in /etc/apt/sources.list{,.d} "
                         "(set VMRUN_DEBIAN_ARCHIVE to the archive URI)")
    if "security" not in uris and "archive" in uris:
        # Conventional sibling location of the security archive.
        uris["security"] = re.sub(r"/debian$", "/debian-security", uris["archive"])
    return uris


# --------------------------------------------------------------------------
# Private apt roots
# --------------------------------------------------------------------------

def run(cmd: list[str], *, cwd: Path | None = None, check: bool = True,
        capture: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None)
    if check and p.returncode != 0:
        err = (p.stderr or "").strip().splitlines()
        detail = next((l for l in reversed(err) if l.startswith(("E:", "W:"))), err[-1] if err else "")
        raise FetchError(f"{' '.join(cmd[:2])} ... failed (exit {p.returncode}): {detail}")
    return p


def keyring_uids(keyring: Path) -> str:
    if not keyring.is_file() or not shutil.which("gpg"):
        return ""
    with tempfile.TemporaryDirectory() as home:
        p = subprocess.run(["gpg", "--homedir", home, "--batch", "--with-colons",
                            "--show-keys", str(keyring)],
                           text=True, capture_output=True, stdin=subprocess.DEVNULL)
    return p.stdout


class AptRoot:
    def __init__(self, cache: Path, channel: str, uris: dict[str, str], keyring: Path):
        self.channel = channel
        self.root = cache / "apt" / channel
        self.conf = self.root / "apt.conf"
        self.uris = uris
        self.keyring = keyring
        self._updated = False

    def prepare(self) -> None:
        r = self.root
        for d in ("sources.list.d", "preferences.d", "state/lists/partial",
                  "cache/archives/partial", "download"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "sources.list").write_text("")
        (r / "preferences").write_text("")
        status = r / "state" / "status"
        if not status.exists():
            status.write_text("")
        spec = CHANNELS[self.channel]
        stanzas = [
            f"Types: deb\nURIs: {self.uris['archive']}\nSuites: {' '.join(spec['suites'])}\n"
            f"Components: main\nArchitectures: {ARCH}\nSigned-By: {self.keyring}\n"
        ]
        if spec["security"] and self.uris.get("security"):
            stanzas.append(
                f"Types: deb\nURIs: {self.uris['security']}\nSuites: {' '.join(spec['security'])}\n"
                f"Components: main\nArchitectures: {ARCH}\nSigned-By: {self.keyring}\n")
        (r / "sources.list.d" / "vmrun.sources").write_text("\n".join(stanzas))
        (self.conf).write_text(
            "// private apt configuration of scripts/fetch-payloads; generated\n"
            f'Dir::Etc::SourceList "{r}/sources.list";\n'
            f'Dir::Etc::SourceParts "{r}/sources.list.d";\n'
            f'Dir::Etc::Preferences "{r}/preferences";\n'
            f'Dir::Etc::PreferencesParts "{r}/preferences.d";\n'
            f'Dir::State "{r}/state";\n'
            f'Dir::State::lists "{r}/state/lists";\n'
            f'Dir::State::status "{status}";\n'
            f'Dir::Cache "{r}/cache";\n'
            f'Dir::Cache::archives "{r}/cache/archives";\n'
            f'APT::Architecture "{ARCH}";\n'
            f'APT::Architectures {{ "{ARCH}"; }};\n'
            'Acquire::Languages "none";\n'
            'Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";\n'
            'APT::Get::List-Cleanup "true";\n'
        )

    def apt(self, tool: str, *args: str, cwd: Path | None = None, check: bool = True):
        return run([tool, "-c", str(self.conf), *args], cwd=cwd, check=check)

    def update(self) -> None:
        if self._updated:
            return
        log(f"[{self.channel}] apt-get update (private lists under {self.root})")
        p = self.apt("apt-get", "-q", "update", check=False)
        out = (p.stdout or "") + (p.stderr or "")
        lines = out.splitlines()
        errors = [l for l in lines if l.startswith("E:")]
        warnings = [l for l in lines if l.startswith("W: Failed to fetch") or "GPG error" in l
                    or "NO_PUBKEY" in l]
        failed = [l for l in lines if l.startswith("Err:")]
        if p.returncode != 0 or errors or warnings or failed:
            why = (errors or warnings or failed or [l for l in lines if l.strip()] or ["?"])[0]
            raise FetchError(f"[{self.channel}] apt-get update failed: {why.strip()}")
        self._updated = True

    def has_suite(self, suite: str) -> bool:
        lists = self.root / "state" / "lists"
        return any(lists.glob(f"*_dists_{suite}_InRelease")) or any(lists.glob(f"*_dists_{suite}_Release"))

    def show(self, pkg: str) -> dict[str, str] | None:
        """Fields of the candidate version of pkg, or None if unknown."""
        p = self.apt("apt-cache", "show", "--no-all-versions", pkg, check=False)
        if p.returncode != 0 or not p.stdout.strip():
            return None
        fields: dict[str, str] = {}
        key = None
        for line in p.stdout.splitlines():
            if not line.strip():
                break
            if line[0] in " \t" and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, v = line.partition(":")
                fields[key] = v.strip()
        return fields

    def names_matching(self, regex: str) -> list[str]:
        p = self.apt("apt-cache", "pkgnames", check=False)
        return sorted(n for n in p.stdout.split() if re.fullmatch(regex, n))

    def download(self, pkg: str) -> tuple[Path, dict[str, str]]:
        info = self.show(pkg)
        if info is None:
            raise FetchError(f"[{self.channel}] package {pkg} not found")
        dl = self.root / "download"
        for old in dl.glob("*.deb"):
            old.unlink()
        log(f"[{self.channel}] apt-get download {pkg}={info['Version']}")
        self.apt("apt-get", "-q", "download", f"{pkg}={info['Version']}", cwd=dl)
        debs = list(dl.glob("*.deb"))
        if len(debs) != 1:
            raise FetchError(f"[{self.channel}] apt-get download {pkg} produced {len(debs)} files")
        return debs[0], info


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def version_key(v: str):
    """Crude Debian-ish version sort key, good enough for kernel ABI names."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)]


def newest(names: list[str]) -> str | None:
    return max(names, key=version_key) if names else None


def unpack(deb: Path, dest: Path, members: list[str] | None = None) -> None:
    """dpkg -x deb into dest (optionally only some members, via dpkg-deb | tar)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if members is None:
        run(["dpkg", "-x", str(deb), str(dest)])
        return
    dd = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *members],
                         stdin=dd.stdout, capture_output=True, text=True)
    dd.stdout.close()
    if dd.wait() != 0 or tar.returncode != 0:
        raise FetchError(f"unpacking {deb.name} failed: {tar.stderr.strip()}")


def place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755 if os.access(src, os.X_OK) else 0o644)
    os.replace(tmp, dst)


_MODULE_FILE = re.compile(r"^(?:\./)?(?:usr/)?lib/modules/[^/]+/kernel/(?:.+/)?([^/]+)\.ko(\.xz|\.gz|\.zst)?$")


def module_name(filename: str) -> str:
    """The name the kernel knows a module by: ``9pnet_virtio.ko.xz`` -> ``9pnet_virtio``."""
    return re.sub(r"\.ko(\.\w+)?$", "", filename).replace("-", "_")


def decompress_module(data: bytes, suffix: str, name: str) -> bytes:
    """A module as ``insmod`` takes it (busybox insmod reads plain ELF only)."""
    if suffix in ("", None):
        return data
    if suffix == ".xz":
        return lzma.decompress(data)
    if suffix == ".gz":
        return gzip.decompress(data)
    if suffix == ".zst" and shutil.which("zstd"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    raise FetchError(f"cannot decompress kernel module {name}{suffix}")


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of an ELF64 kernel module: key -> values."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise FetchError("not an ELF64 kernel module")
    e_shoff, = struct.unpack_from("<Q", ko, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        sh = struct.unpack_from("<IIQQQQ", ko, e_shoff + i * e_shentsize)
        return sh[0], sh[4], sh[5]

    _, stroff, _ = section(e_shstrndx)
    out: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name_off, off, size = section(i)
        name = ko[stroff + name_off: ko.index(b"\0", stroff + name_off)]
        if name == b".modinfo":
            for item in ko[off:off + size].split(b"\0"):
                key, eq, value = item.decode(errors="replace").partition("=")
                if eq:
                    out.setdefault(key, []).append(value)
    return out


def _deb_members(deb: Path):
    """(TarInfo, file object) for each regular file of ``deb``'s data, streamed once."""
    dd = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=dd.stdout, mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    yield m, tar.extractfile(m)
    finally:
        dd.stdout.close()
        if dd.wait() != 0:
            raise FetchError(f"dpkg-deb --fsys-tarfile {deb.name} failed")


def extract_modules(deb: Path, groups: tuple[tuple[str, tuple[str, ...]], ...], dest: Path
                    ) -> dict[str, list[str]]:
    """Put each group's root modules and the modules they depend on (``depends=`` of their
    modinfo: the package has no modules.dep, depmod makes that at install) from a linux-image
    package into ``dest`` as plain ``NAME.ko``, and write one load-order file per group
    (``groups``: (file name, roots); one module file name a line, dependencies first; a module
    an earlier group already loads is not repeated). Roots the kernel has built in
    (``modules.builtin``) are left out. Returns {load-order file: its modules}."""
    deps: dict[str, list[str]] = {}
    builtin: set[str] = set()
    for m, f in _deb_members(deb):  # pass 1: every module's dependencies
        if m.name.endswith("/modules.builtin"):
            builtin |= {module_name(Path(l.strip()).name) for l in f.read().decode().splitlines() if l.strip()}
        elif hit := _MODULE_FILE.match(m.name):
            name = module_name(hit[1])
            info = modinfo(decompress_module(f.read(), hit[2], name))
            deps[name] = [d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d]
    loaded: list[str] = []
    orders: dict[str, list[str]] = {}

    def visit(name: str, path: tuple[str, ...], order: list[str]) -> None:
        if name in order or name in loaded:
            return
        if name not in deps:
            raise FetchError(f"module {name} (needed by {' <- '.join(reversed(path)) or 'vmrun'}) "
                             f"is neither in {deb.name} nor built in")
        if name in path:
            raise FetchError(f"module dependency cycle: {' -> '.join(path + (name,))}")
        for d in deps[name]:
            visit(d, path + (name,), order)
        order.append(name)

    for order_file, roots in groups:
        order: list[str] = []
        for root in roots:
            if root.replace("-", "_") not in builtin:
                visit(root.replace("-", "_"), (), order)
        orders[order_file] = order
        loaded += order
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    wanted = set(loaded)
    for m, f in _deb_members(deb):  # pass 2: the needed ones
        if (hit := _MODULE_FILE.match(m.name)) and module_name(hit[1]) in wanted:
            name = module_name(hit[1])
            (dest / f"{name}.ko").write_bytes(decompress_module(f.read(), hit[2], name))
            wanted.discard(name)
    if wanted:
        raise FetchError(f"{deb.name}: modules {', '.join(sorted(wanted))} vanished between two reads")
    out = {}
    for order_file, order in orders.items():
        files = [f"{name}.ko" for name in order]
        (dest / order_file).write_text("".join(f + "\n" for f in files))
        out[order_file] = files
    return out


# --------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------

class Fetcher:
    def __init__(self, cache: Path):
        self.cache = cache
        self.entries: dict[str, dict] = {}
        self._roots: dict[str, AptRoot] = {}
        self._uris: dict[str, str] | None = None
        self._trixie_keyring: Path | None = None

    # -- apt roots -----------------------------------------------------------
    def uris(self) -> dict[str, str]:
        if self._uris is None:
            self._uris = machine_archive_uris()
        return self._uris

    def keyring_for(self, channel: str) -> Path:
        if not SYSTEM_KEYRING.is_file():
            raise FetchError(f"{SYSTEM_KEYRING} missing (apt-get install debian-archive-keyring)")
        uid = RELEASE_KEY_UID[channel]
        uids = keyring_uids(SYSTEM_KEYRING)
        if not uids or uid in uids:
            return SYSTEM_KEYRING
        # The machine's keyring predates this release: take the newest
        # debian-archive-keyring package from bookworm, which the machine's
        # keyring does verify, and use its keyring for this channel only.
        if self._trixie_keyring is None:
            log(f"machine keyring lacks the {uid} key; fetching debian-archive-keyring from bookworm")
            deb, info = self.root("bookworm").download("debian-archive-keyring")
            dest = self.cache / "apt" / "keyring"
            unpack(deb, dest)
            deb.unlink()
            kr = dest / "usr/share/keyrings/debian-archive-keyring.gpg"
            if uid not in keyring_uids(kr):
                raise FetchError(f"debian-archive-keyring {info['Version']} lacks the {uid} key")
            self._trixie_keyring = kr
        return self._trixie_keyring

    def root(self, channel: str) -> AptRoot:
        if channel not in self._roots:
            r = AptRoot(self.cache, channel, self.uris(), self.keyring_for(channel))
            r.prepare()
            r.update()
            self._roots[channel] = r
        return self._roots[channel]

    # -- manifest ------------------------------------------------------------
    def record(self, name: str, path: Path, *, group: str, package: str, version: str,
               suite: str, **extra) -> None:
        self.entries[name] = {
            "path": str(path.relative_to(self.cache)), "group": group,
            "package": package, "version": version, "suite": suite,
            "sha256": sha256(path), "size": path.stat().st_size, **extra,
        }
        log(f"  {name}: {path.relative_to(self.cache)} ({package} {version})")

    # -- kernels -------------------------------------------------------------
    def kernel(self, label: str, channel: str, abi_regex: str) -> None:
        r = self.root(channel)
        meta = r.show("linux-image-amd64")
        pkg = None
        if meta:
            m = re.search(r"\b(linux-image-[0-9][^\s,|]*-amd64)\b", meta.get("Depends", ""))
            if m and re.fullmatch(abi_regex, m.group(1)):
                pkg = m.group(1)
        if pkg is None:
            pkg = newest(r.names_matching(abi_regex))
        if pkg is None:
            raise FetchError(f"[{channel}] no package matching {abi_regex}")
        deb, info = r.download(pkg)
        work = self.cache / "work" / label
        unpack(deb, work, ["./boot/vmlinuz-*"])
        out = self.cache / "kernels" / label
        orders = extract_modules(deb, MODULE_GROUPS, out / "modules")
        deb.unlink()
        vmlinuz = sorted((work / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise FetchError(f"{pkg}: expected one /boot/vmlinuz-*, found {len(vmlinuz)}")
        release = vmlinuz[0].name[len("vmlinuz-"):]
        place(vmlinuz[0], out / "vmlinuz")
        (out / "version").write_text(info["Version"] + "\n")
        (out / "release").write_text(release + "\n")
        shutil.rmtree(work)
        self.record(f"kernel-{label}", out / "vmlinuz", group="kernels", package=pkg,
                    version=info["Version"], suite=channel, release=release)
        self.record(f"modules-{label}", out / "modules" / LOAD_ORDER, group="kernels", package=pkg,
                    version=info["Version"], suite=channel, release=release,
                    modules={f: sha256(out / "modules" / f) for fs in orders.values() for f in fs},
                    module_groups=module_groups_key())

    def kernels(self) -> None:
        self.kernel("bookworm", "bookworm", r"linux-image-6\.1\.0-[0-9]+-amd64")
        regex = r"linux-image-6\.12\.[0-9]+[+~.a-z0-9]*-amd64"
        try:
            self.kernel("trixie", "trixie", regex)
        except FetchError as e:
            log(f"trixie unavailable ({e}); falling back to bookworm-backports")
            self.kernel("trixie", "bookworm-backports", regex)

    # -- stubs ---------------------------------------------------------------
    def stubs(self) -> None:
        for channel, major in (("bookworm", "252"), ("trixie", "257")):
            r = self.root(channel)
            deb, info = r.download("systemd-boot-efi")
            if not info["Version"].startswith(major + "."):
                raise FetchError(f"[{channel}] systemd-boot-efi is {info['Version']}, expected {major}.*")
            work = self.cache / "work" / f"systemd-boot-efi-{major}"
            unpack(deb, work)
            deb.unlink()
            efi = work / "usr/lib/systemd/boot/efi"
            out = self.cache / "stubs" / major
            found = False
            for stub in ("linuxx64.efi.stub", "addonx64.efi.stub"):
                if (efi / stub).is_file():
                    place(efi / stub, out / stub)
                    self.record(f"stub-{major}-{stub.split('x64')[0]}", out / stub, group="stubs",
                                package="systemd-boot-efi", version=info["Version"], suite=channel)
                    found = found or stub.startswith("linux")
            if not found:
                raise FetchError(f"systemd-boot-efi {info['Version']} has no linuxx64.efi.stub")
            (out / "version").write_text(info["Version"] + "\n")
            shutil.rmtree(work)

    # -- tools ---------------------------------------------------------------
    def busybox(self) -> None:
        r = self.root("bookworm")
        deb, info = r.download("busybox-static")
        work = self.cache / "work" / "busybox-static"
        unpack(deb, work)
        deb.unlink()
        place(work / "bin/busybox", self.cache / "tools" / "busybox")
        shutil.rmtree(work)
        self.record("busybox", self.cache / "tools" / "busybox", group="tools",
                    package="busybox-static", version=info["Version"], suite="bookworm")

    def kexec(self) -> None:
        r = self.root("bookworm")
        deb, info = r.download("kexec-tools")
        out = self.cache / "tools" / "kexec-tools"
        unpack(deb, out)
        deb.unlink()
        binary = out / "sbin" / "kexec"
        if not binary.is_file():
            binary = out / "usr" / "sbin" / "kexec"
        if not binary.is_file():
            raise FetchError("kexec-tools has no sbin/kexec")
        self.record("kexec", binary, group="tools", package="kexec-tools",
                    version=info["Version"], suite="bookworm")

    def tools(self) -> None:
        self.busybox()
        self.kexec()

    # -- initrd --------------------------------------------------------------
    def initrd(self) -> None:
        busybox = self.cache / "tools" / "busybox"
        bb = self.entries.get("busybox")
        if bb is None or not busybox.is_file():
            self.busybox()
            bb = self.entries["busybox"]
        out = self.cache / "initrd" / "test-initrd.cpio.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        data = build_test_initrd(busybox.read_bytes())
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)
        self.record("test-initrd", out, group="initrd", package="busybox-static",
                    version=bb["version"], suite="bookworm", marker=INITRD_MARKER,
                    recipe=initrd_recipe())


INIT_SCRIPT = f"""#!/bin/sh
# vmrun test initrd: print a marker and the command line, then power off.
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
echo {INITRD_MARKER}
/bin/busybox cat /proc/cmdline
/bin/busybox sync
/bin/busybox poweroff -f
"""


def build_test_initrd(busybox: bytes) -> bytes:
    """A reproducible gzip-compressed newc cpio (:mod:`scripts.newc`): /init, /bin/busybox,
    /bin/sh -> busybox, /dev/console, /dev/null, /proc and /sys."""
    t = newc.Tree()
    for d in ("bin", "dev", "proc", "sys"):
        t.dir(d)
    t.chardev("dev/console", 5, 1)
    t.chardev("dev/null", 1, 3, 0o666)
    t.file("bin/busybox", busybox)
    t.symlink("bin/sh", "busybox")
    t.file("init", INIT_SCRIPT.encode())
    return newc.gzipped(t.cpio())


def initrd_recipe() -> str:
    """What the test initrd is built from, besides busybox: a digest of the initrd this code
    builds around an empty busybox. A cached initrd recorded with another recipe (its /init or
    the cpio writer changed) is rebuilt."""
    return hashlib.sha256(build_test_initrd(b"")).hexdigest()[:16]


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def module_groups_key() -> dict[str, list[str]]:
    """What the cached modules were chosen for: a manifest whose groups differ is refetched."""
    return {order_file: list(roots) for order_file, roots in MODULE_GROUPS}


def load_manifest(cache: Path) -> dict:
    try:
        m = json.loads((cache / MANIFEST_NAME).read_text())
        if m.get("format") == MANIFEST_FORMAT and isinstance(m.get("payloads"), dict):
            return m
    except (OSError, ValueError):
        pass
    return {"format": MANIFEST_FORMAT, "payloads": {}}


def group_up_to_date(cache: Path, manifest: dict, group: str) -> bool:
    expected = {"kernels": {"kernel-bookworm", "kernel-trixie", "modules-bookworm", "modules-trixie"},
                "stubs": {"stub-252-linux", "stub-257-linux"},
                "tools": {"busybox", "kexec"},
                "initrd": {"test-initrd"}}[group]
    payloads = manifest["payloads"]
    if not expected <= set(payloads):
        return False
    for name, e in payloads.items():
        if e.get("group") != group:
            continue
        p = cache / e["path"]
        if not p.is_file() or p.stat().st_size != e.get("size"):
            return False
        if any(not (p.parent / f).is_file() for f in e.get("modules", {})):
            return False
        if name.startswith("modules-") and (e.get("module_groups") != module_groups_key()
                                            or any(not (p.parent / f).is_file() for f, _ in MODULE_GROUPS)):
            return False
        if name == "test-initrd" and e.get("recipe") != initrd_recipe():
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fetch-payloads", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated groups to fetch ({', '.join(GROUPS)})")
    ap.add_argument("--refresh", action="store_true",
                    help="re-resolve the newest versions even if the cache is complete")
    ap.add_argument("--list", action="store_true", help="print the manifest and exit")
    args = ap.parse_args(argv)

    cache = Path(os.environ.get("VMRUN_CACHE") or DEFAULT_CACHE).resolve()
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise FetchError(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")

    manifest = load_manifest(cache)
    if args.list:
        print(json.dumps(manifest, indent=2))
        return 0
    todo = [g for g in groups if args.refresh or not group_up_to_date(cache, manifest, g)]
    if "tools" in todo and "initrd" in groups and "initrd" not in todo:
        todo.append("initrd")  # the initrd embeds busybox from the tools group
    if not todo:
        log(f"up to date in {cache} ({', '.join(groups)})")
        return 0

    for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb", "tar"):
        if not shutil.which(tool):
            raise FetchError(f"{tool} not found (a Debian system is required)")
    log(f"cache: {cache}; fetching: {', '.join(todo)}")
    cache.mkdir(parents=True, exist_ok=True)
    f = Fetcher(cache)
    f.entries = {k: v for k, v in manifest["payloads"].items() if v.get("group") not in todo}
    t0 = time.monotonic()
    for g in GROUPS:  # fixed order: initrd needs busybox from tools
        if g in todo:
            log(f"== {g}")
            getattr(f, g)()
    shutil.rmtree(cache / "work", ignore_errors=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "payloads": dict(sorted(f.entries.items())),
    }
    tmp = cache / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, cache / MANIFEST_NAME)
    log(f"done in {time.monotonic() - t0:.0f}s; manifest: {cache / MANIFEST_NAME}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``scripts/fetch-payloads``: :func:`main` with a one-line error (exit 1) for a
    :class:`FetchError` and exit 130 for Ctrl-C."""
    try:
        return main(argv)
    except FetchError as e:
        print(f"fetch-payloads: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
