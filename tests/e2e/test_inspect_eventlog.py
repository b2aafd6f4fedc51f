"""`vmrun inspect` and `vmrun eventlog`, checked against independent sources: hashlib over the
original files, the kernel package's release, and Debian's tpm2_eventlog for the event log."""

import hashlib
import json
import re
import subprocess
import sys

import pytest

from tests.e2e.uki import build_uki

pytestmark = [pytest.mark.payloads]

VMRUN = [sys.executable, "-m", "vmrun.cli", "-q"]


def test_inspect_uki(tmp_path, payload_cache, bookworm_kernel, test_initrd):
    uki = build_uki(payload_cache / "stubs" / "257" / "linuxx64.efi.stub", tmp_path / "uki.efi",
                    linux=bookworm_kernel, initrd=test_initrd, cmdline="console=ttyS0 inspect-me",
                    extra_sections={".uname": b"6.1.0-test"})
    p = subprocess.run([*VMRUN, "inspect", str(uki), "--json"], capture_output=True, text=True, check=True)
    d = json.loads(p.stdout)
    assert d["kind"] == "uki" and d["machine"] == "x86_64" and d["signed"] is False
    secs = {s["name"]: s for s in d["sections"]}
    assert secs[".linux"]["sha256"] == hashlib.sha256(bookworm_kernel.read_bytes()).hexdigest()
    assert secs[".initrd"]["sha256"] == hashlib.sha256(test_initrd.read_bytes()).hexdigest()
    assert d["text"][".cmdline"] == "console=ttyS0 inspect-me"
    assert d["text"][".uname"] == "6.1.0-test"
    assert "systemd-stub" in d["text"][".sbat"]
    release = (bookworm_kernel.parent / "release").read_text().strip()
    assert d["kernel"]["version"].startswith(release) and d["kernel"]["compression"] == "xz"
    text = subprocess.run([*VMRUN, "inspect", str(uki)], capture_output=True, text=True, check=True).stdout
    assert "inspect-me" in text and ".linux" in text


def test_inspect_signed_debian_kernel(bookworm_kernel):
    d = json.loads(subprocess.run([*VMRUN, "inspect", str(bookworm_kernel), "--json"], capture_output=True,
                                  text=True, check=True).stdout)
    assert d["kind"] == "linux-efi-stub" and d["signed"] is True  # Debian signs its kernels


@pytest.mark.kvm
def test_eventlog_of_a_run_replays_like_tpm2_eventlog(tmp_path, bookworm_kernel, test_initrd):
    log = tmp_path / "events.bin"
    p = subprocess.run([*VMRUN, "run", str(bookworm_kernel), "--initrd", str(test_initrd), "--cmdline", "x=1",
                        "--pcr-banks", "sha1,sha256", "--eventlog", str(log), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    run = json.loads(p.stdout)
    ours = json.loads(subprocess.run([*VMRUN, "eventlog", str(log), "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    assert ours["pcrs"]["sha256"] == run["pcrs"]["sha256"] and ours["pcrs"]["sha1"] == run["pcrs"]["sha1"]
    # Debian's tpm2_eventlog (tpm2-tools) as the independent parser and replayer
    yaml = subprocess.run(["tpm2_eventlog", str(log)], capture_output=True, text=True, check=True).stdout
    block = yaml.split("pcrs:", 1)[1]
    sha256 = block.split("sha256:", 1)[1]
    ref = {int(m[0]): m[1].lower() for m in re.findall(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)", sha256, re.M)}
    assert ref, yaml[-2000:]
    for i, v in ref.items():
        assert run["pcrs"]["sha256"][str(i)] == v, i
    assert {4, 5, 7, 9} <= set(ref)  # the image, EBS, secure-boot policy and the kernel stub's events
    text = subprocess.run([*VMRUN, "eventlog", str(log)], capture_output=True, text=True, check=True).stdout
    assert "Exit Boot Services Returned with Success" in text
