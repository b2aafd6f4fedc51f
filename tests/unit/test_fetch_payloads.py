"""Tests of scripts/fetch-payloads (its code: scripts/fetch_payloads.py): its parsing helpers,
the command itself, and the payloads it fetched."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from scripts import fetch_payloads as fp

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fetch-payloads"


# --------------------------------------------------------------------------
# Archive URI derivation (no network, made-up sources)
# --------------------------------------------------------------------------

DEB822_SAMPLE = """\
# a comment
Types: deb
# http://snapshot.example/archive/debian/20250101T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""

ONE_LINE_SAMPLE = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] https://mirror.example/debian/ bookworm main contrib
deb https://mirror.example/debian-security bookworm-security main
deb cdrom:[Debian GNU/Linux 12]/ bookworm main
"""


def test_deb822_sources_give_archive_and_security_uris():
    entries = fp.parse_deb822_sources(DEB822_SAMPLE)
    assert len(entries) == 2  # the Enabled: no stanza is dropped
    assert entries[0]["suites"] == ["bookworm", "bookworm-updates"]
    uris = fp.derive_archive_uris(entries)
    assert uris == {
        "archive": "http://mirror.example/debian",
        "security": "http://mirror.example/debian-security",
    }


def test_one_line_sources_give_archive_uri():
    entries = fp.parse_one_line_sources(ONE_LINE_SAMPLE)
    assert [e["types"][0] for e in entries] == ["deb-src", "deb", "deb", "deb"]
    uris = fp.derive_archive_uris(entries)
    assert uris["archive"] == "https://mirror.example/debian"  # trailing slash dropped
    assert uris["security"] == "https://mirror.example/debian-security"


def test_non_http_and_source_entries_are_ignored():
    entries = fp.parse_one_line_sources(
        "deb-src http://src.example/debian bookworm main\n"
        "deb cdrom:[Debian]/ bookworm main\n"
        "deb file:/srv/repo bookworm main\n")
    assert fp.derive_archive_uris(entries) == {}


def test_machine_sources_reads_only_sources_and_list_files(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822_SAMPLE)
    (tmp_path / "sources.list.d" / "other.list.disabled").write_text(
        "deb http://other.example/debian bookworm main\n")
    (tmp_path / "sources.list").write_text("")
    uris = fp.derive_archive_uris(fp.machine_sources(tmp_path))
    assert uris["archive"] == "http://mirror.example/debian"


def test_private_apt_config_stays_under_cache(tmp_path):
    uris = {"archive": "http://mirror.example/debian",
            "security": "http://mirror.example/debian-security"}
    root = fp.AptRoot(tmp_path, "trixie", uris, Path("/keyring.gpg"))
    root.prepare()
    conf = root.conf.read_text()
    for key in ("Dir::Etc::SourceList", "Dir::Etc::SourceParts", "Dir::State ", "Dir::Cache "):
        line = next(l for l in conf.splitlines() if l.startswith(key))
        assert str(tmp_path) in line, line
    sources = (root.root / "sources.list.d" / "vmrun.sources").read_text()
    assert "URIs: http://mirror.example/debian\n" in sources
    assert "Suites: trixie-security" in sources
    assert "Signed-By: /keyring.gpg" in sources
    assert "trusted" not in sources


# --------------------------------------------------------------------------
# The test initrd builder (pure)
# --------------------------------------------------------------------------

def parse_newc(data: bytes) -> dict[str, tuple[int, int, int, bytes]]:
    """{name: (mode, rdevmajor, rdevminor, data)} of a newc cpio archive."""
    out = {}
    off = 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad newc magic at {off}"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        off += 110
        name = data[off:off + namesize - 1].decode()
        off = (off + namesize + 3) & ~3
        body = data[off:off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, rmaj, rmin, body)


def test_build_test_initrd_layout():
    fake = b"\x7fELF fake busybox"
    image = fp.build_test_initrd(fake)
    assert image[:2] == b"\x1f\x8b"
    assert image == fp.build_test_initrd(fake), "initrd must be reproducible"
    files = parse_newc(gzip.decompress(image))
    assert files["bin/busybox"][3] == fake
    assert files["bin/busybox"][0] & 0o111
    mode, _, _, target = files["bin/sh"]
    assert mode & 0o170000 == 0o120000 and target == b"busybox"
    mode, rmaj, rmin, _ = files["dev/console"]
    assert mode & 0o170000 == 0o020000 and (rmaj, rmin) == (5, 1)
    mode, _, _, init = files["init"]
    assert mode & 0o111
    lines = init.decode().splitlines()
    assert lines[0] == "#!/bin/sh"
    marker = next(i for i, l in enumerate(lines) if "VMRUN-INITRD-OK" in l)
    cmdline = next(i for i, l in enumerate(lines) if "cat /proc/cmdline" in l)
    poweroff = next(i for i, l in enumerate(lines) if "poweroff -f" in l)
    assert marker < cmdline < poweroff


def test_build_test_initrd_as_gnu_cpio_reads_it():
    """GNU cpio, an independent reader of the format, lists the same entries: the symlink with
    its target, the console device 5,1, everything owned by root with mtime 0."""
    raw = gzip.decompress(fp.build_test_initrd(b"#!fake busybox\n"))
    assert len(raw) % 512 == 0
    if shutil.which("cpio") is None:
        pytest.fail("cpio(1) is missing: scripts/setup installs it", pytrace=False)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True,
                             check=True).stdout.decode().splitlines()
    by_name = {line.split(" -> ")[0].split()[-1]: line for line in listing}
    assert sorted(by_name) == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "dev/null",
                               "init", "proc", "sys"]
    assert list(by_name) == sorted(by_name)  # a directory before what it holds
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("bin/sh -> busybox")
    assert by_name["dev/console"].startswith("crw-------") and " 5,   1 " in by_name["dev/console"]
    assert by_name["dev/null"].startswith("crw-rw-rw-") and " 1,   3 " in by_name["dev/null"]
    assert by_name["bin/busybox"].startswith("-rwxr-xr-x")
    for line in listing:
        assert " root     root " in line and " Jan  1  1970 " in line, line


def test_newc_inode_numbers_follow_the_sorted_names():
    """newc header fields (buffer-format.rst): ino 1, 2, 3 ... in name order, nlink 2 for a
    directory, the trailer with ino 0."""
    from scripts import newc
    t = newc.Tree()
    t.file("z/file", b"abc")
    t.chardev("a/dev", 5, 1)
    raw = t.cpio()
    heads = []
    off = 0
    while True:
        f = [int(raw[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        name = raw[off + 110: off + 110 + f[11] - 1].decode()
        heads.append((name, f[0], f[4]))
        off = (off + 110 + f[11] + 3) & ~3
        off = (off + f[6] + 3) & ~3
        if name == "TRAILER!!!":
            break
    assert heads == [("a", 1, 2), ("a/dev", 2, 1), ("z", 3, 2), ("z/file", 4, 1), ("TRAILER!!!", 0, 1)]
    assert raw[off:] == bytes(len(raw) - off) and len(raw) % 512 == 0


def test_script_runs_from_the_command_line(tmp_path):
    """scripts/fetch-payloads as scripts/setup runs it (its own shebang: the system python3),
    against an empty cache: --list prints the empty manifest, an unknown group is one line."""
    env = dict(os.environ, VMRUN_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([str(SCRIPT), "--list"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"format": fp.MANIFEST_FORMAT, "payloads": {}}
    p = subprocess.run([str(SCRIPT), "--only", "nope"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 1
    assert p.stderr == ("fetch-payloads: error: unknown group(s) nope; choose from "
                        "kernels, stubs, tools, initrd\n")


def test_initrd_recipe_changes_make_the_initrd_stale(tmp_path):
    """A cached initrd recorded without the current recipe (built by older code) is rebuilt."""
    (tmp_path / "initrd").mkdir()
    img = tmp_path / "initrd" / "test-initrd.cpio.gz"
    img.write_bytes(b"x" * 10)
    entry = {"path": "initrd/test-initrd.cpio.gz", "group": "initrd", "size": 10}
    manifest = {"format": 1, "payloads": {"test-initrd": dict(entry, recipe=fp.initrd_recipe())}}
    assert fp.group_up_to_date(tmp_path, manifest, "initrd")
    manifest["payloads"]["test-initrd"] = entry
    assert not fp.group_up_to_date(tmp_path, manifest, "initrd")


# --------------------------------------------------------------------------
# The fetched payloads
# --------------------------------------------------------------------------

def pe_header(path: Path) -> tuple[int, int]:
    """(machine, e_lfanew) of a PE image; asserts the MZ and PE signatures."""
    data = path.read_bytes()
    assert data[:2] == b"MZ", f"{path} does not start with MZ"
    (e_lfanew,) = struct.unpack_from("<I", data, 0x3C)
    assert 0 < e_lfanew < len(data) - 24
    assert data[e_lfanew:e_lfanew + 4] == b"PE\0\0", f"{path}: no PE signature at {e_lfanew:#x}"
    (machine,) = struct.unpack_from("<H", data, e_lfanew + 4)
    return machine, e_lfanew


def bzimage_version_string(path: Path) -> str:
    """The kernel_version string the x86 boot protocol header points at."""
    data = path.read_bytes()
    assert data[0x202:0x206] == b"HdrS", "no x86 boot protocol header"
    (ptr,) = struct.unpack_from("<H", data, 0x20E)
    raw = data[0x200 + ptr: 0x200 + ptr + 256]
    return raw.split(b"\0", 1)[0].decode()


@pytest.mark.payloads
@pytest.mark.parametrize("label, version_re, release_re", [
    ("bookworm", r"6\.1\.\d+-\d+.*", r"6\.1\.0-\d+-amd64"),
    ("trixie", r"6\.12\.\d+-\d+.*", r"6\.12\.\d+.*-amd64"),
], ids=["bookworm", "trixie"])
def test_kernel_is_pe_bzimage_of_expected_version(request, label, version_re, release_re):
    vmlinuz = request.getfixturevalue(f"{label}_kernel")
    machine, _ = pe_header(vmlinuz)
    assert machine == 0x8664
    version = (vmlinuz.parent / "version").read_text().strip()
    release = (vmlinuz.parent / "release").read_text().strip()
    assert re.fullmatch(version_re, version), version
    assert re.fullmatch(release_re, release), release
    banner = bzimage_version_string(vmlinuz)
    assert banner.startswith(release + " "), banner
    assert version in banner, banner


@pytest.mark.payloads
def test_manifest_matches_files(payload_cache, bookworm_kernel, trixie_kernel, stub_252,
                                stub_257, test_initrd):
    manifest = json.loads((payload_cache / "manifest.json").read_text())
    payloads = manifest["payloads"]
    expected = {"kernel-bookworm", "kernel-trixie", "stub-252-linux", "stub-257-linux",
                "busybox", "kexec", "test-initrd"}
    assert expected <= set(payloads)
    for name, entry in payloads.items():
        path = payload_cache / entry["path"]
        assert path.is_file(), name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], name
        assert path.stat().st_size == entry["size"], name
        assert entry["package"] and entry["version"], name
    assert payloads["kernel-bookworm"]["package"].startswith("linux-image-6.1.0-")
    assert payloads["kernel-trixie"]["package"].startswith("linux-image-6.12")
    assert payloads["stub-252-linux"]["version"].startswith("252.")
    assert payloads["stub-257-linux"]["version"].startswith("257.")
    for kernel, name in ((bookworm_kernel, "kernel-bookworm"), (trixie_kernel, "kernel-trixie")):
        assert payloads[name]["version"] == (kernel.parent / "version").read_text().strip()


@pytest.mark.payloads
@pytest.mark.parametrize("major", ["252", "257"])
def test_stub_is_systemd_stub_of_expected_version(request, major):
    stub = request.getfixturevalue(f"stub_{major}")
    machine, _ = pe_header(stub)
    assert machine == 0x8664
    m = re.search(rb"#### LoaderInfo: systemd-stub (\S+) ####", stub.read_bytes())
    assert m, "no systemd-stub LoaderInfo string"
    assert m.group(1).decode().startswith(major + ".")
    assert (stub.parent / "version").read_text().startswith(major + ".")


@pytest.mark.payloads
def test_addon_stub_257(stub_257):
    addon = stub_257.parent / "addonx64.efi.stub"
    assert addon.is_file(), "systemd-boot-efi 257 ships addonx64.efi.stub"
    pe_header(addon)
    assert b"systemd-addon 257." in addon.read_bytes()


@pytest.mark.payloads
def test_tools(payload_cache):
    busybox = payload_cache / "tools" / "busybox"
    kexec = payload_cache / "tools" / "kexec-tools" / "sbin" / "kexec"
    for tool in (busybox, kexec):
        if not tool.is_file():
            msg = f"{tool} missing: run scripts/fetch-payloads"
            if os.environ.get("VMRUN_ALLOW_MISSING_PAYLOADS") == "1":
                pytest.skip(msg)
            pytest.fail(msg)
        assert tool.read_bytes()[:4] == b"\x7fELF"
    # busybox-static has no program interpreter (PT_INTERP)
    assert b"/lib64/ld-linux" not in busybox.read_bytes()[:4096]


@pytest.mark.payloads
def test_cached_initrd_holds_cached_busybox(payload_cache, test_initrd):
    files = parse_newc(gzip.decompress(test_initrd.read_bytes()))
    assert files["bin/busybox"][3] == (payload_cache / "tools" / "busybox").read_bytes()
    assert b"VMRUN-INITRD-OK" in files["init"][3]
