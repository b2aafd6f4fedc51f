"""The `vmrun run` command line contract: outcomes, JSON fields, one-line errors, exit codes."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.unit import pebuilder
from vmrun import errors as E

pytestmark = pytest.mark.kvm

VMRUN = [sys.executable, "-m", "vmrun.cli"]


def vmrun(*args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([*VMRUN, "-q", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


def one_line_error(r):
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vmrun: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_file(tmp_path):
    r = vmrun("run", tmp_path / "nope.efi")
    assert r.returncode == E.InputFileError.exit_code
    assert "nope.efi" in one_line_error(r)


def test_not_pe(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello, this is not an EFI image\n" * 10)
    r = vmrun("run", f)
    assert r.returncode == E.NotPEError.exit_code
    assert "not a PE" in one_line_error(r)


def test_aarch64_image_says_it_needs_an_aarch64_host(tmp_path):
    f = tmp_path / "arm.efi"
    f.write_bytes(pebuilder.build_pe(machine=0xAA64).data)
    r = vmrun("run", f)
    assert r.returncode == E.WrongArchitectureError.exit_code
    assert "aarch64 host" in one_line_error(r)


def test_truncated_image(tmp_path, bookworm_kernel):
    f = tmp_path / "cut.efi"
    f.write_bytes(bookworm_kernel.read_bytes()[:100_000])
    r = vmrun("run", f)
    assert r.returncode == E.MalformedImageError.exit_code
    assert "cut.efi" in one_line_error(r)


def test_unsupported_subsystem(tmp_path):
    f = tmp_path / "console.exe"
    f.write_bytes(pebuilder.build_pe(subsystem=3).data)
    r = vmrun("run", f)
    assert r.returncode == E.UnsupportedSubsystemError.exit_code
    assert "subsystem" in one_line_error(r)


def test_bad_memmap_option(tmp_path, bookworm_kernel):
    m = tmp_path / "map.txt"
    m.write_text("this is not a memory map\n")
    r = vmrun("run", bookworm_kernel, "--memmap", m)
    assert r.returncode == E.BadOptionError.exit_code
    assert "map.txt" in one_line_error(r)


def test_json_summary_of_a_kernel(bookworm_kernel, test_initrd):
    t0 = time.monotonic()
    r = vmrun("run", bookworm_kernel, "--cmdline", "console=ttyS0 x=1", "--initrd", test_initrd, "--json",
              "--trace")
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["outcome"] == "exit_boot_services"
    assert d["calls"] == sum(d["services"].values()) == len(d["trace"])
    assert d["services"]["ExitBootServices"] == 1
    # the run (VM creation to outcome) is part of the whole process's life, as this test clocked it
    assert 0 < d["seconds"] < wall, (d["seconds"], wall)
    assert d["linux"]["cmdline"] == "console=ttyS0 x=1"
    first = d["trace"][0]
    assert set(first) >= {"service", "args", "status", "implemented"}
    # the one ExitBootServices call is the one that succeeded (the outcome says so)
    ebs = [t for t in d["trace"] if t["service"] == "ExitBootServices"]
    assert [t["status"] for t in ebs] == ["SUCCESS"], ebs
    assert d["trace"][-1]["service"] == "ExitBootServices"  # nothing runs after it


def test_esp_writable_without_esp_is_a_usage_error(bookworm_kernel):
    r = vmrun("run", bookworm_kernel, "--esp-writable")
    assert r.returncode == E.BadOptionError.exit_code
    assert "--esp-writable needs --esp" in one_line_error(r)
