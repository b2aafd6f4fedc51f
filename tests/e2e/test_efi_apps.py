"""The C test applications in tests/efi, one per service family, run under vmrun.

Each app checks its services against the UEFI spec and prints `ok <check>` / `FAIL <check>: …`
lines and `DONE <n> passed, <m> failed`; the same apps pass under Debian's OVMF (see
tests/efi/README.md and test_efi_apps_ovmf.py), which makes OVMF the reference.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from vmrun.runner import RunOptions, continue_after_ebs, run_payload
from tests.e2e.efiapps import build_apps

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
    if family == "image":  # vmrun passes --cmdline as LoadOptions: the check must run, not skip
        assert "ok image-load-options" in oks and "ok image-load-options-skipped" not in oks
        # no --esp: the image still comes from a device, with a file system that opens
        assert {"ok loaded-image-device-handle", "ok loaded-image-device-sfs", "ok loaded-image-open-volume",
                "ok loaded-image-device-path-hd", "ok loaded-image-file-path-node"} <= set(oks)


def _checks(console: str) -> set[str]:
    return {ln.split()[1] for ln in console.replace("\r", "").splitlines() if ln.startswith(("ok ", "FAIL "))}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["memory", "protocols", "events", "misc", "console", "variables", "image",
                                    "halt"])
def test_same_checks_pass_under_ovmf(apps, family):
    """Real firmware as the reference: under Debian's OVMF (QEMU/TCG) the app runs the same
    checks and all pass, so the checks are the spec's behaviour, not vmrun's."""
    sys.path.insert(0, str(apps.parent))
    import run_ovmf
    if run_ovmf.available():
        pytest.fail(f"OVMF reference unavailable: {run_ovmf.available()} (scripts/setup installs qemu and ovmf)")
    text, finished = run_ovmf.run_app(apps / f"{family}.efi", timeout=240)
    assert finished, f"{family}.efi did not finish under OVMF:\n{text[-2000:]}"
    done = DONE.findall(text)
    assert done and done[-1][1] == "0", text[-2000:]
    ours = run_payload(apps / f"{family}.efi", RunOptions(timeout=30))
    ovmf_checks, vmrun_checks = _checks(text), _checks(ours.console)
    assert vmrun_checks == ovmf_checks
    assert not [ln for ln in ours.console.splitlines() if ln.startswith("FAIL")]


def test_spinning_app_times_out(apps):
    r = run_payload(apps / "spin.efi", RunOptions(timeout=2))
    assert r.outcome == "timeout"
    assert "spinning" in r.console
    assert "time limit of 2 s" in r.error["message"] and "spin.efi+0x" in r.error["message"]


def test_hlt_with_interrupts_enabled_pauses_until_a_timer_event(apps):
    """halt.efi halts in a loop until its 100 ms timer event fires (it does under OVMF too)."""
    r = run_payload(apps / "halt.efi", RunOptions(timeout=30))
    console = r.console.replace("\r", "")
    assert r.outcome == "payload_returned" and r.exit_status == 0, (r.error, console)
    assert DONE.findall(console)[-1] == ("5", "0"), console
    assert "ok halt-timer-fired" in console
    # every hlt the app counted (it prints how many it ran) was emulated, and nothing else
    halts = int(re.search(r"^halt: (\d+) hlt until the timer fired$", console, re.M)[1])
    assert r.emulated["hlt"] == halts >= 1, (r.emulated, console)


@pytest.mark.parametrize("mode,banner", [("cli", "halting: cli; hlt"), ("tpl", "halting at TPL_HIGH_LEVEL")])
def test_halted_app_ends_at_once(apps, mode, banner):
    r = run_payload(apps / "halt.efi", RunOptions(cmdline=mode, timeout=60))
    assert r.outcome == "halted", r.error
    assert r.seconds < 5
    msg = r.error["message"]
    assert "halt.efi+0x" in msg and "interrupts disabled" in msg and msg.endswith(f"last console line: {banner!r}")


def test_halted_app_exit_code_with_a_long_time_limit(apps):
    from vmrun import errors as E
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", "run", str(apps / "halt.efi"), "--cmdline", "cli",
                        "--timeout", "60", "--json"], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 10
    assert p.returncode == E.PayloadHalted.exit_code == 25, p.stderr
    assert "Traceback" not in p.stderr
    d = json.loads(p.stdout)
    assert d["outcome"] == "halted" and d["error"]["kind"] == "halted"
    assert "halting: cli; hlt" in d["error"]["message"] and d["emulated"] == {"cli": 1, "hlt": 1}


def test_hlt_loop_with_interrupts_enabled_is_no_halt(apps):
    r = run_payload(apps / "halt.efi", RunOptions(cmdline="sti", timeout=1))
    assert r.outcome == "timeout", r.error
    assert "halting with interrupts enabled" in r.error["message"]


def test_endless_stall_loop_ends_as_a_timeout_at_once(apps):
    """A payload that stalls forever after a fatal error (Stall(60 s) in a loop) cannot get past
    the time limit: the run ends when the first Stall is asked to wait beyond it."""
    r = run_payload(apps / "halt.efi", RunOptions(cmdline="stall", timeout=60))
    assert r.outcome == "timeout", r.error
    assert r.seconds < 5
    msg = r.error["message"]
    assert "Stall(60000000 µs)" in msg and "halt.efi+0x" in msg and "time limit of 60 s" in msg
    assert msg.endswith("last console line: 'stalling forever'")


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


def _uart_lines(result) -> list[str]:
    return result.uart.output.decode("latin-1").replace("\r", "").splitlines()


def test_exit_boot_services_contract(apps):
    """Stale map key → EFI_INVALID_PARAMETER and no notify; the current key → frozen; resumed
    as the handoff will (EFI_SUCCESS), the app sees success and its notify ran exactly once."""
    r = run_payload(apps / "ebs.efi", RunOptions(timeout=30), keep=True)
    try:
        assert r.outcome == "exit_boot_services", r.error
        console = r.console.replace("\r", "")
        assert not [ln for ln in console.splitlines() if ln.startswith("FAIL")], console
        assert "ok ebs-stale-key" in console and "ok ebs-no-notify-on-stale-key" in console
        assert r.services["ExitBootServices"] == 2
        stop = continue_after_ebs(r, seconds=2)  # the app halts forever after its UART lines
        assert stop.kind == "timeout"
        lines = _uart_lines(r)
        assert lines == ["ok ebs-success", "ok ebs-notify-ran-once", "DONE-EBS"], lines
    finally:
        r.machine.close()


@pytest.mark.slow
def test_exit_boot_services_contract_under_ovmf(apps):
    sys.path.insert(0, str(apps.parent))
    import run_ovmf
    text, finished = run_ovmf.run_app(apps / "ebs.efi", timeout=240, until="DONE-EBS")
    assert finished, text[-2000:]
    for check in ("ok ebs-stale-key", "ok ebs-no-notify-on-stale-key", "ok ebs-success", "ok ebs-notify-ran-once"):
        assert check in text, text[-2000:]


def _images_esp(apps, tmp_path):
    import shutil
    esp = tmp_path / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    shutil.copy(apps / "images.efi", esp / "EFI" / "BOOT" / "BOOTX64.EFI")
    return esp


def test_image_services(apps, tmp_path):
    """LoadImage from a device path on the ESP, StartImage, Exit with ExitData, UnloadImage."""
    esp = _images_esp(apps, tmp_path)
    r = run_payload(esp / "EFI" / "BOOT" / "BOOTX64.EFI", RunOptions(esp=esp, timeout=30))
    console = r.console.replace("\r", "")
    assert not [ln for ln in console.splitlines() if ln.startswith("FAIL")], console
    assert DONE.findall(console)[-1] == ("20", "0"), console
    # two good loads, the garbage buffer and the bad parent; the child start and a bad handle
    assert r.services["LoadImage"] == 4 and r.services["StartImage"] == 2 and r.services["Exit"] == 1


@pytest.mark.slow
def test_image_services_under_ovmf(apps):
    sys.path.insert(0, str(apps.parent))
    import run_ovmf
    text, finished = run_ovmf.run_app(apps / "images.efi", timeout=240)
    assert finished, text[-2000:]
    assert DONE.findall(text)[-1] == ("20", "0"), text[-2000:]
