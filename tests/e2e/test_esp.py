"""A host folder as the EFI System Partition (hostsvc/protocols/filesystem.py), seen from a
guest: tests/efi/fs.c is loaded from <esp>/EFI/BOOT/fs.efi and checks Simple File System /
File protocol semantics and the jail from inside the VM."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil

import pytest
import structlog

from hostsvc import devicepath as DP
from hostsvc import guids as G
from hostsvc.protocols.filesystem import EspVolume, default_partuuid, esp_hook
from tests.e2e.efiapps import APPS_DIR, ROOT
from vmrun.runner import RunOptions, run_payload
from tests.e2e.uki import build_uki

pytestmark = [pytest.mark.kvm, pytest.mark.efiapps]

DONE = re.compile(r"^DONE (\d+) passed, (\d+) failed$", re.M)
HELLO = b"hello from the ESP\n"
SECRET = b"SECRET outside the ESP: must never reach the guest\n"
JAIL_CHECKS = ["fs-jail-dotdot-relative", "fs-jail-dotdot-absolute", "fs-jail-dotdot-deep",
               "fs-jail-symlink-out", "fs-jail-symlink-out-case", "fs-jail-fifo",
               "fs-jail-host-separator", "fs-jail-dotdot-from-subdir"]


def _efi_build():
    spec = importlib.util.spec_from_file_location("efi_build", ROOT / "tests" / "efi" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def fs_efi():
    """tests/efi/fs.c built with build.py's own flags (whether or not "fs" is in its APPS)."""
    b = _efi_build()
    path, _ = b.build_app("fs", APPS_DIR, b.compiler_version())
    return path


@pytest.fixture
def esp(tmp_path, fs_efi):
    """<tmp>/esp is the volume; <tmp>/outside.txt is the secret next to it."""
    root = tmp_path / "esp"
    (root / "EFI" / "BOOT").mkdir(parents=True)
    (root / "hello.txt").write_bytes(HELLO)
    (tmp_path / "outside.txt").write_bytes(SECRET)
    os.symlink(tmp_path / "outside.txt", root / "link-out")
    os.symlink("hello.txt", root / "link-in")
    os.mkfifo(root / "fifo")
    app = root / "EFI" / "BOOT" / "fs.efi"
    shutil.copyfile(fs_efi, app)
    return root, app


def _run(app, hooks):
    with structlog.testing.capture_logs() as logs:
        r = run_payload(app, RunOptions(hooks=hooks, trace=True, timeout=30))
    return r, logs


def test_fs_app_on_esp(esp):
    root, app = esp
    r, logs = _run(app, [esp_hook(root, app)])
    console = r.console.replace("\r", "")
    fails = [ln for ln in console.splitlines() if ln.startswith("FAIL")]
    assert not fails, "\n".join(fails) + "\n" + console
    done = DONE.findall(console)
    assert done, f"fs.efi printed no DONE line (outcome {r.outcome}: {r.error})\n{console}"
    passed, failed = map(int, done[-1])
    oks = {ln.split()[1] for ln in console.splitlines() if ln.startswith("ok ")}
    assert failed == 0 and passed == len(oks) >= 60
    assert r.outcome == "payload_returned" and r.exit_status == 0
    assert r.unimplemented == {}

    # LoadedImage->FilePath as the guest saw it, and every jail check really ran
    assert "fs: file path \\EFI\\BOOT\\fs.efi" in console
    assert {"fs-file-path", "fs-device-path-gpt", "fs-read-hello", "fs-open-case-insensitive",
            "fs-write-protected", *JAIL_CHECKS} <= oks
    assert "fs: label ESP" in console
    assert SECRET.decode().strip() not in console

    # the refusals are EFI_ACCESS_DENIED, logged and traced
    jail_lines = re.findall(r"^fs: jail (.*) -> (\S+)$", console, re.M)
    assert len(jail_lines) == len(JAIL_CHECKS)
    for path, status in jail_lines:   # '/' is no separator on FAT: an invalid name, not a path
        assert status == ("EFI_INVALID_PARAMETER" if "/" in path else "EFI_ACCESS_DENIED"), (path, status)
    refused = [e for e in logs if e["event"] == "esp.refused"]
    assert refused and all(e["log_level"] == "warning" for e in refused)
    whys = {e["why"] for e in refused}
    assert "'..' above the volume root" in whys
    assert "symlink leaves the volume" in whys
    assert any("FIFO" in w for w in whys)
    paths = {e["path"] for e in refused}
    assert {"\\link-out", "\\LINK-OUT", "\\fifo", "\\..\\outside.txt",
            "\\EFI\\BOOT\\..\\..\\..\\outside.txt"} <= paths
    traced = [t for t in r.trace if t["service"] == "Open" and t["status"] == "ACCESS_DENIED"]
    assert len(traced) == len(JAIL_CHECKS) - 1
    assert any("symlink leaves the volume" in t["note"] for t in traced)
    # the hidden entries were never shown and the device path names the folder's partition
    assert "entry link-out" not in console and "entry fifo" not in console
    vol_handles = [e for e in logs if e["event"] == "esp.installed"]
    assert vol_handles and str(default_partuuid(root)) in vol_handles[0]["device_path"]
    assert vol_handles[0]["device_path"].startswith("PciRoot(0x0)/Pci(0x1,0x1)/HD(1,GPT,")


def test_payload_outside_esp_gets_esp_path(esp, tmp_path):
    """A payload outside the folder is presented at --esp-path (else \\EFI\\Linux\\<name>); the
    fs.efi FilePath check then fails, which shows the check can fail."""
    root, app = esp
    elsewhere = tmp_path / "fs.efi"
    shutil.copyfile(app, elsewhere)
    vol = EspVolume(None, root)
    assert vol.payload_efi_path(elsewhere) == "\\EFI\\Linux\\fs.efi"
    assert vol.payload_efi_path(elsewhere, "EFI/Linux/uki.efi") == "\\EFI\\Linux\\uki.efi"
    assert DP.to_text(vol.file_path_nodes(app)) == "\\EFI\\BOOT\\fs.efi"
    r, _ = _run(elsewhere, [vol.hook(elsewhere, "\\EFI\\Linux\\other.efi")])
    console = r.console.replace("\r", "")
    assert "fs: file path \\EFI\\Linux\\other.efi" in console
    assert "FAIL fs-file-path" in console
    assert "ok fs-read-hello" in console      # the volume itself still works


def test_without_volume_the_app_fails(esp):
    """No folder: the app is loaded from an empty volume, so it must report failures rather than
    pass vacuously."""
    _root, app = esp
    r, _ = _run(app, [])
    console = r.console.replace("\r", "")
    done = DONE.findall(console)
    fails = {ln.split()[1].rstrip(":") for ln in console.splitlines() if ln.startswith("FAIL ")}
    # the DONE line counts the FAIL lines, among them the file the empty volume does not have
    assert done and int(done[-1][1]) == len(fails), console
    assert "fs-open-hello" in fails, console
    # tests/efi/README.md: efi_main returns EFI_ABORTED when a check failed (UEFI 2.10
    # Appendix D: EFI_ABORTED is error code 21)
    assert r.exit_status == (1 << 63) | 21, r.exit_status


# --------------------------------------------------------------------------------------------
# the point of it all: a systemd-stub UKI on the ESP finds its sidecars
# --------------------------------------------------------------------------------------------

@pytest.mark.payloads
def test_systemd_stub_reads_its_sidecars(tmp_path, stub_257, trixie_kernel):
    root = tmp_path / "esp"
    extra = root / "EFI" / "Linux" / "uki.efi.extra.d"
    extra.mkdir(parents=True)
    (extra / "x.cred").write_bytes(b"credential from extra.d")
    (extra / "sys.confext.raw").write_bytes(b"confext image")
    (root / "loader" / "credentials").mkdir(parents=True)
    (root / "loader" / "credentials" / "y.cred").write_bytes(b"global credential")
    (tmp_path / "outside.cred").write_bytes(SECRET)
    os.symlink(tmp_path / "outside.cred", extra / "z.cred")          # a sidecar escaping the ESP
    uki = root / "EFI" / "Linux" / "uki.efi"
    build_uki(stub_257, uki, linux=trixie_kernel, initrd=None, cmdline="console=ttyS0",
              osrel="ID=debian\nVERSION_ID=13\n")
    vol = EspVolume(None, root)
    r, logs = _run(uki, [vol.hook(uki)])
    assert r.outcome == "exit_boot_services", (r.error, r.console)
    opened = [e["path"] for e in logs if e["event"] == "esp.open"]
    assert "\\EFI\\Linux\\uki.efi.extra.d\\x.cred" in opened
    assert "\\EFI\\Linux\\uki.efi.extra.d\\sys.confext.raw" in opened
    assert "\\loader\\credentials\\y.cred" in opened
    assert not any("z.cred" in p for p in opened)                     # hidden from the listing
    part = r.firmware.variables.get("LoaderDevicePartUUID", G.LOADER_VENDOR).data
    assert part.decode("utf-16-le").rstrip("\0").lower() == str(vol.partuuid)
    ident = r.firmware.variables.get("LoaderImageIdentifier", G.LOADER_VENDOR).data
    assert ident.decode("utf-16-le").rstrip("\0") == "\\EFI\\Linux\\uki.efi"
