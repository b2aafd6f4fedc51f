"""The C test applications in tests/efi, one per service family, run under vmrun.

Each app checks its services against the UEFI spec and prints `ok <check>` / `FAIL <check>: …`
lines and `DONE <n> passed, <m> failed`; the same apps pass under Debian's OVMF (see
tests/efi/README.md and test_efi_apps_ovmf.py), which makes OVMF the reference.
"""

import re
import subprocess
import sys

import pytest

from vmrun.runner import RunOptions, run_payload
from tests.e2e.efiapps import APPS_DIR, build_apps

pytestmark = [pytest.mark.kvm, pytest.mark.efiapps]

FAMILIES = ["memory", "protocols", "events", "misc", "console", "image", "variables", "emulated"]
DONE = re.compile(r"^DONE (\d+) passed, (\d+) failed$", re.M)


@pytest.fixture(scope="session")
def apps():
    return build_apps()


@pytest.mark.parametrize("family", FAMILIES)
def test_service_family(apps, family):
    r = run_payload(apps / f"{family}.efi", RunOptions(cmdline="vmrun-test-options 123", timeout=30))
    console = r.console.replace("\r", "")
    fails = [ln for ln in console.splitlines() if ln.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    done = DONE.findall(console)
    assert done, f"{family}.efi printed no DONE line (outcome {r.outcome}: {r.error})\n{console}"
    passed, failed = map(int, done[-1])
    oks = [ln for ln in console.splitlines() if ln.startswith("ok ")]
    assert failed == 0 and passed == len(oks) >= 10
    assert r.outcome == "payload_returned" and r.exit_status == 0
    assert r.unimplemented == {}, f"{family} used services vmrun does not implement: {r.unimplemented}"


def test_spinning_app_times_out(apps):
    r = run_payload(apps / "spin.efi", RunOptions(timeout=2))
    assert r.outcome == "timeout"
    assert "spinning" in r.console
    assert "time limit of 2 s" in r.error["message"] and "spin.efi+0x" in r.error["message"]


def test_privileged_app_is_a_payload_fault(apps):
    r = run_payload(apps / "privileged.efi", RunOptions(timeout=10))
    assert r.outcome == "fault"
    msg = r.error["message"]
    assert "lidt" in msg and "privileged.efi+0x" in msg and "#GP" in msg
    assert "about to fault" in r.console


def test_cli_exit_codes_for_timeout_and_fault(apps):
    from vmrun import errors as E
    for app, code, extra in (("spin", E.RunTimeout.exit_code, ["--timeout", "1"]),
                             ("privileged", E.PayloadFault.exit_code, [])):
        p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(apps / f"{app}.efi"), *extra],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == code, p.stderr
        assert "Traceback" not in p.stderr
