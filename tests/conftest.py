"""Shared pytest fixtures for vmrun's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# Debian payloads fetched by scripts/fetch-payloads
# --------------------------------------------------------------------------

def _payload_cache_dir() -> Path:
    return Path(os.environ.get("VMRUN_CACHE") or REPO / ".cache" / "payloads")


def _require_payload(relpath: str) -> Path:
    """Path of a cached payload; a missing one fails the test.

    Only with VMRUN_ALLOW_MISSING_PAYLOADS=1 is a missing payload a skip, so
    that CI can never pass by silently skipping the payload tests.
    """
    path = _payload_cache_dir() / relpath
    if not path.is_file():
        msg = f"payload {path} is missing: run scripts/fetch-payloads (or scripts/setup)"
        if os.environ.get("VMRUN_ALLOW_MISSING_PAYLOADS") == "1":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)
    return path


@pytest.fixture(scope="session")
def payload_cache() -> Path:
    return _payload_cache_dir()


@pytest.fixture(scope="session")
def bookworm_kernel() -> Path:
    """Debian 12 linux-image-6.1.0-*-amd64 EFI-stub bzImage."""
    return _require_payload("kernels/bookworm/vmlinuz")


@pytest.fixture(scope="session")
def trixie_kernel() -> Path:
    """Debian 13 (or bookworm-backports) linux-image-6.12.*-amd64 EFI-stub bzImage."""
    return _require_payload("kernels/trixie/vmlinuz")


@pytest.fixture(scope="session")
def stub_252() -> Path:
    """systemd-boot-efi 252 (bookworm) linuxx64.efi.stub."""
    return _require_payload("stubs/252/linuxx64.efi.stub")


@pytest.fixture(scope="session")
def stub_257() -> Path:
    """systemd-boot-efi 257 (trixie) linuxx64.efi.stub."""
    return _require_payload("stubs/257/linuxx64.efi.stub")


@pytest.fixture(scope="session")
def test_initrd() -> Path:
    """gzip newc initrd: busybox + /init printing VMRUN-INITRD-OK and /proc/cmdline."""
    return _require_payload("initrd/test-initrd.cpio.gz")
