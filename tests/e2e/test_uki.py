"""systemd-stub UKIs (Debian's 252 and 257 stubs around the bookworm kernel) in vmrun, with an
ESP folder (and without one): they reach ExitBootServices through nested LoadImage/StartImage, the kernel gets the
UKI's command line and initrd, sidecars (addon, credential) take effect, and PCR 11 equals
systemd-measure's prediction (252; for 257, see test_ovmf_tpm_reference.py against OVMF+swtpm)."""

import subprocess
import uuid

import pytest

from hostsvc import tpm as T
from tests.e2e.uki import build_addon, build_uki
from vmrun.formats import pe as PE
from vmrun.runner import RunOptions, run_payload

pytestmark = [pytest.mark.kvm, pytest.mark.payloads]

CMDLINE = "console=ttyS0 uki-test=1"
SYSTEMD_MEASURE = "/lib/systemd/systemd-measure"


@pytest.fixture(params=["252", "257"])
def esp(request, tmp_path, payload_cache, bookworm_kernel, test_initrd):
    stub = payload_cache / "stubs" / request.param / "linuxx64.efi.stub"
    d = tmp_path / "esp"
    (d / "EFI" / "Linux").mkdir(parents=True)
    uki = build_uki(stub, d / "EFI" / "Linux" / "uki.efi", linux=bookworm_kernel, initrd=test_initrd,
                    cmdline=CMDLINE)
    return request.param, d, uki, test_initrd.read_bytes()


def run(esp_dir, uki, **kw):
    return run_payload(uki, RunOptions(esp=esp_dir, timeout=60, **kw), keep=True)


def test_uki_reaches_exit_boot_services_with_its_cmdline_and_initrd(esp):
    version, d, uki, initrd = esp
    r = run(d, uki)
    try:
        assert r.outcome == "exit_boot_services", r.error
        assert r.services["LoadImage"] >= 1 and r.services["StartImage"] >= 1  # the stub starts .linux
        assert r.linux["cmdline"] == CMDLINE
        got = r.machine.mem.read(r.linux["ramdisk_image"], r.linux["ramdisk_size"])
        assert got.startswith(initrd)  # the stub may append its own cpio archives after it
        assert r.unimplemented == {}
    finally:
        r.machine.close()


@pytest.mark.parametrize("esp", ["252"], indirect=True)  # 257: compared with OVMF+swtpm (test_pcrs_vs_ovmf.py)
def test_pcr11_equals_systemd_measure_for_252(esp, tmp_path, bookworm_kernel):
    version, d, uki, initrd = esp
    r = run(d, uki)
    try:
        (tmp_path / "osrel").write_bytes(PE.load_file(uki).section(".osrel").data())
        (tmp_path / "cmdline").write_text(CMDLINE)
        (tmp_path / "initrd").write_bytes(initrd)
        out = subprocess.run([SYSTEMD_MEASURE, "calculate", f"--linux={bookworm_kernel}",
                              f"--osrel={tmp_path / 'osrel'}", f"--cmdline={tmp_path / 'cmdline'}",
                              f"--initrd={tmp_path / 'initrd'}", "--bank=sha256", "--phase="],
                             capture_output=True, text=True, check=True).stdout
        expect = [ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("11:sha256=")]
        assert expect and r.pcrs["sha256"]["11"] == expect[-1]
    finally:
        r.machine.close()


def test_pcr11_events_are_the_stubs_documented_ones(esp):
    """Each UKI section is measured as two EV_IPL events on PCR 11: its name (with the NUL),
    then its contents — and nothing else lands on PCR 11."""
    version, d, uki, initrd = esp
    r = run(d, uki)
    try:
        events = [e for e in T.parse(r.event_log) if e.pcr == 11]
        assert events and all(e.event_type == T.EV_IPL for e in events)
        names = [e.data.decode("utf-16-le", "replace").rstrip("\0") for e in events]
        # systemd's TPM2_PCR_MEASUREMENTS.md: every measured section, in the stub's fixed order;
        # 257 also measures the stub's own .sbat
        sections = [".linux", ".osrel", ".cmdline", ".initrd"] + ([".sbat"] if version == "257" else [])
        assert names == [n for n in sections for _ in (0, 1)]  # name event, then contents event
        replayed = T.replay(T.parse(r.event_log), ("sha256",))["sha256"][11].hex()
        assert replayed == r.pcrs["sha256"]["11"]
    finally:
        r.machine.close()


@pytest.mark.parametrize("version", ["252", "257"])
def test_uki_without_esp_is_loaded_from_a_device(version, tmp_path, payload_cache, bookworm_kernel, test_initrd):
    """Without an ESP folder the image still comes from a device (firmware always has one): the
    stub reaches ExitBootServices and reports that device's partition GUID and its own path,
    which it reads from LoadedImage.DeviceHandle's HD() node and LoadedImage.FilePath."""
    stub = payload_cache / "stubs" / version / "linuxx64.efi.stub"
    uki = build_uki(stub, tmp_path / "uki.efi", linux=bookworm_kernel, initrd=test_initrd, cmdline=CMDLINE)
    part = "6b3c1d2e-0f4a-4b5c-9d8e-7f6a5b4c3d2e"
    r = run_payload(uki, RunOptions(esp_partuuid=uuid.UUID(part), timeout=60), keep=True)
    try:
        assert r.outcome == "exit_boot_services", r.error
        assert r.linux["cmdline"] == CMDLINE
        v = {x["name"]: x for x in r.variables}
        assert v["LoaderDevicePartUUID"]["text"].lower() == part
        assert v["LoaderImageIdentifier"]["text"] == "\\EFI\\Linux\\uki.efi"
        if version == "257":
            assert v["StubDevicePartUUID"]["text"].lower() == part
        assert r.unimplemented == {}
    finally:
        r.machine.close()


def test_257_addon_extends_the_cmdline_and_credentials_reach_the_initrd(tmp_path, payload_cache, bookworm_kernel,
                                                                       test_initrd):
    stub = payload_cache / "stubs" / "257" / "linuxx64.efi.stub"
    addon_stub = payload_cache / "stubs" / "257" / "addonx64.efi.stub"
    d = tmp_path / "esp"
    (d / "EFI" / "Linux").mkdir(parents=True)
    uki = build_uki(stub, d / "EFI" / "Linux" / "uki.efi", linux=bookworm_kernel, initrd=test_initrd,
                    cmdline=CMDLINE)
    extra = d / "EFI" / "Linux" / "uki.efi.extra.d"
    extra.mkdir()
    build_addon(addon_stub, extra / "debug.addon.efi", cmdline="addon-marker=42")
    (extra / "secret.cred").write_bytes(b"vmrun-credential-payload-0123456789")
    r = run(d, uki)
    try:
        assert r.outcome == "exit_boot_services", r.error
        assert "addon-marker=42" in r.linux["cmdline"] and r.linux["cmdline"].startswith(CMDLINE)
        initrd = r.machine.mem.read(r.linux["ramdisk_image"], r.linux["ramdisk_size"])
        assert b"secret.cred" in initrd and b"vmrun-credential-payload-0123456789" in initrd
        pcr12 = [e for e in T.parse(r.event_log) if e.pcr == 12]
        assert pcr12, "the addon's cmdline and the credential are measured into PCR 12"
        assert r.pcrs["sha256"]["12"] != "00" * 32
    finally:
        r.machine.close()


def test_stub_variables_are_reported(esp):
    """systemd-stub publishes Loader*/Stub* variables; with DevicePathToText it can name its
    own image, and LoaderDevicePartUUID is the ESP's partition GUID we chose."""
    version, d, uki, initrd = esp
    part = "0fc63daf-8483-4772-8e79-3d69d8477de4"
    r = run_payload(uki, RunOptions(esp=d, esp_partuuid=__import__("uuid").UUID(part), timeout=60))
    assert r.outcome == "exit_boot_services", r.error
    v = {x["name"]: x for x in r.variables}
    assert v["LoaderDevicePartUUID"]["text"].lower() == part
    assert v["StubInfo"]["text"].startswith(f"systemd-stub {version}")
    if version == "257":
        assert v["StubImageIdentifier"]["text"] == "\\EFI\\Linux\\uki.efi"
    assert v["LoaderImageIdentifier"]["text"] == "\\EFI\\Linux\\uki.efi"
    assert v["LoaderDevicePartUUID"]["attributes"] & 0x6 == 0x6  # boot service + runtime access
