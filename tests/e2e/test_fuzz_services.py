"""Boot-services fuzzer: tests/efi/fuzz_services.c calls every
boot service, runtime service and protocol function vmrun implements with seeded garbage
arguments (see its header for what it passes and what it deliberately never does), then prints

    DONE fuzz seed <s> calls <n> success <k> errors <e> notifies <m>

and calls ExitBootServices. The run has an ESP (so the file protocol has files to open, and
paths that try to leave the jail) and an initrd (so LoadFile2 is there).

Asserted: the run ends as exit_boot_services (exit 0) within its --timeout (+1 s): no internal
or host error (exit 1/30/31), and no payload fault in the middle: the app only touches memory
it owns, so a fault means a service wrote where it must not (e.g. firmware memory given as an
output pointer) or broke the VM; at least FUZZ_CALLS calls made (the app's count and vmrun's).
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.efiapps import build_apps
from tests.e2e.test_hostile import EXIT, HOST_ERROR_CODES, WALL_SLACK_S, run_vmrun

pytestmark = [pytest.mark.kvm, pytest.mark.efiapps]

#: calls per CI run (at least 100,000). Measured here (seed 1, fwptrs=0): 20,000 calls in
#: ~4 s, 100,000 in ~44 s (the per-call cost grows with what earlier calls left behind)
FUZZ_CALLS = 100_000
#: the run's --timeout: 100,000 calls take ~45 s on an idle 2-core machine, more when the suite
#: runs two tests at once
FUZZ_TIMEOUT = 150
#: seeds run in CI (each is reproducible: `vmrun run fuzz_services.efi --cmdline "seed=N"`)
SEEDS = [1]

DONE = re.compile(r"^DONE fuzz seed (\d+) calls (\d+) success (\d+) errors (\d+) notifies (\d+)$", re.M)


@pytest.fixture(scope="module")
def apps():
    return build_apps()


@pytest.fixture
def esp(tmp_path):
    root = tmp_path / "esp"
    (root / "dir").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "dir" / "a.bin").write_bytes(bytes(range(256)) * 12)
    (root / "EFI" / "BOOT").mkdir(parents=True)
    initrd = tmp_path / "initrd.bin"
    initrd.write_bytes(b"\x5a" * 1000)
    return root, initrd


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_every_service_with_garbage(apps, esp, seed):
    root, initrd = esp
    r = run_vmrun(apps / "fuzz_services.efi", f"seed={seed} calls={FUZZ_CALLS}", FUZZ_TIMEOUT,
                  memory_cap=1 << 30, extra=["--esp", str(root), "--initrd", str(initrd)])
    assert not r.killed, r.describe()
    assert r.returncode not in HOST_ERROR_CODES, r.describe()
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.describe()
    assert r.result is not None, r.describe()
    assert r.wall <= FUZZ_TIMEOUT + WALL_SLACK_S, r.describe()
    # a fault, timeout or anything but the app's own ExitBootServices is a failure of vmrun here
    assert r.result["outcome"] == "exit_boot_services" and r.returncode == EXIT["exit_boot_services"], r.describe()
    done = DONE.findall(r.console)
    assert done, f"no DONE line: {r.describe()}"
    got_seed, calls, success, errors, _ = map(int, done[-1])
    assert got_seed == seed
    assert calls >= FUZZ_CALLS, r.describe()
    assert r.result["calls"] >= FUZZ_CALLS, r.result["calls"]
    assert success > 0 and errors > 0   # both kinds of answer were exercised
