"""The real-firmware reference (tests/e2e/ovmf_tpm.py) works: a systemd-stub 252 UKI around the
bookworm kernel boots under Debian's OVMF with swtpm, the TPM's PCR 11 is systemd-measure's
prediction, and the firmware's event log (checked by tpm2_eventlog too) replays to the PCRs the
TPM reports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest

from hostsvc import tpm as T
from tests.e2e import ovmf_tpm as O

pytestmark = [pytest.mark.slow, pytest.mark.payloads]

CMDLINE = "console=ttyS0 ref-test"
SYSTEMD_MEASURE = "/lib/systemd/systemd-measure"
# PCR 10 is IMA's: the kernel extends it (boot_aggregate) and it is not in the firmware's log.
KERNEL_EXTENDED = {10}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stub_252, bookworm_kernel):
    if reason := O.available():
        pytest.fail(f"OVMF+swtpm reference unavailable: {reason}")
    d = tmp_path_factory.mktemp("ovmf-tpm")
    t0 = time.monotonic()
    initrd = O.make_reference_initrd(d / "ref.cpio")
    uki = O.build_uki(stub_252, d / "uki.efi", linux=bookworm_kernel, initrd=initrd,
                      cmdline=CMDLINE, osrel=O.DEBIAN_OSREL)
    built = time.monotonic() - t0
    ref = O.boot_uki(uki, timeout=180)
    print(f"\n[ovmf_tpm] initrd+UKI built in {built:.1f}s, boot to VMRUN-REF-END in {ref.seconds:.1f}s")
    return d, uki, initrd, ref


@pytest.mark.timeout(300)
def test_boot_completes(reference):
    d, uki, initrd, ref = reference
    assert ref.complete and not ref.errors, str(ref)
    assert ref.cmdline == CMDLINE
    assert set(ref.pcrs) >= {"sha1", "sha256"}, str(ref)
    for bank, values in ref.pcrs.items():
        assert sorted(values) == list(range(16))
        assert all(len(v) == 2 * T.ALGS[bank].size for v in values.values()), bank


@pytest.mark.timeout(300)
def test_pcr11_is_systemd_measure_prediction(reference, bookworm_kernel):
    d, uki, initrd, ref = reference
    assert ref.complete, str(ref)
    (d / "osrel").write_bytes(O.DEBIAN_OSREL.encode())
    (d / "cmdline").write_bytes(CMDLINE.encode())
    for bank in sorted(ref.pcrs):
        out = subprocess.run([SYSTEMD_MEASURE, "calculate", f"--linux={bookworm_kernel}",
                              f"--osrel={d / 'osrel'}", f"--cmdline={d / 'cmdline'}",
                              f"--initrd={initrd}", f"--bank={bank}", "--phase=", "--json=short"],
                             capture_output=True, text=True, check=True).stdout
        # one JSON object, then (252) a "# PCR[11] Phase <:>" comment on the same line
        predicted = json.JSONDecoder().raw_decode(out.strip())[0][bank][0]
        assert predicted["pcr"] == 11
        assert ref.pcrs[bank][11] == predicted["hash"], bank


@pytest.mark.timeout(300)
def test_event_log_replays_to_the_tpm_pcrs(reference):
    d, uki, initrd, ref = reference
    assert ref.complete, str(ref)
    events = ref.events()
    replayed = T.replay(events, banks=sorted(ref.pcrs))
    for bank, values in ref.pcrs.items():
        for index, value in values.items():
            if index in KERNEL_EXTENDED:
                continue
            assert replayed[bank][index].hex() == value, f"{bank} PCR {index}"
    # what real firmware (Debian's OVMF with swtpm) logs for a UKI: the UKI and the .linux it
    # starts on PCR 4, separators on 0-7, the ExitBootServices actions on 5, the Linux stub's tags
    # on 9, and systemd-stub's section measurements on 11
    kinds = {(e.pcr, T.event_type_name(e.event_type)) for e in events[1:]}
    assert (4, "EV_EFI_BOOT_SERVICES_APPLICATION") in kinds
    assert sum(1 for e in events if e.pcr == 4 and e.event_type == T.EV_EFI_BOOT_SERVICES_APPLICATION) == 2
    assert {(i, "EV_SEPARATOR") for i in range(8)} <= kinds
    actions = [e.data for e in events if e.pcr == 5 and T.event_type_name(e.event_type) == "EV_EFI_ACTION"]
    assert b"Exit Boot Services Invocation" in actions
    assert b"Exit Boot Services Returned with Success" in actions
    assert (9, "EV_EVENT_TAG") in kinds
    assert (11, "EV_IPL") in kinds


@pytest.mark.timeout(300)
def test_tpm2_eventlog_parses_the_log(reference):
    d, uki, initrd, ref = reference
    assert ref.complete, str(ref)
    if shutil.which("tpm2_eventlog") is None:
        pytest.fail("tpm2_eventlog not found (apt-get install tpm2-tools)")
    (d / "eventlog.bin").write_bytes(ref.event_log)
    r = subprocess.run(["tpm2_eventlog", str(d / "eventlog.bin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # its own replay (the "pcrs:" map at the end) agrees with the TPM on every bank
    theirs: dict[str, dict[int, str]] = {}
    bank = None
    for line in r.stdout.split("\npcrs:", 1)[1].splitlines():
        if m := re.match(r"^  (sha\w+):\s*$", line):
            bank = m[1]
        elif (m := re.match(r"^    (\d+)\s*:\s*0x([0-9a-fA-F]+)\s*$", line)) and bank:
            theirs.setdefault(bank, {})[int(m[1])] = m[2].lower()
    assert set(theirs) == set(ref.pcrs), r.stdout[-3000:]
    for bank, values in ref.pcrs.items():
        for index, value in values.items():
            if index in KERNEL_EXTENDED or (index not in theirs[bank] and set(value) == {"0"}):
                continue
            assert theirs[bank].get(index) == value, f"tpm2_eventlog {bank} PCR {index}"


@pytest.mark.timeout(300)
def test_esp_extra_credential_is_measured_into_pcr12(reference):
    """``esp_extra`` puts files next to the UKI: systemd-stub 252 picks up a credential from
    BOOTX64.EFI.extra.d/ and measures it into PCR 12 ("Credentials initrd")."""
    d, uki, initrd, ref = reference
    cred = O.boot_uki(uki, esp_extra={"EFI/BOOT/BOOTX64.EFI.extra.d/ref.cred": b"reference-credential"},
                      timeout=180)
    print(f"\n[ovmf_tpm] boot with a credential: {cred.seconds:.1f}s")
    assert cred.complete and not cred.errors, str(cred)
    assert set(ref.pcrs["sha256"][12]) == {"0"}
    assert set(cred.pcrs["sha256"][12]) != {"0"}
    pcr12 = [e for e in cred.events() if e.pcr == 12]
    assert [e.data.decode("utf-16-le").rstrip("\0") for e in pcr12] == ["Credentials initrd"]
    # the firmware, stub and kernel measure the same; PCR 9 differs, because the Linux stub
    # measures the initrd it is handed, which now ends with systemd-stub's credentials cpio
    assert cred.pcrs["sha256"][9] != ref.pcrs["sha256"][9]
    for index in (0, 1, 2, 3, 4, 5, 6, 7, 11):
        assert cred.pcrs["sha256"][index] == ref.pcrs["sha256"][index], index
