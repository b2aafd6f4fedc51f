"""Firmware-identical measurements: the same UKI and ESP sidecar booted under real firmware with a
real TPM (Debian's OVMF + swtpm in QEMU) and run in vmrun give the same PCRs, in every bank.

Compared: PCR 2, 3, 4 (the UKI and the .linux image the stub loads: Authenticode digests,
"Calling EFI Application", separators), 6, 7 (Secure Boot policy of firmware without keys),
8, 9 (the kernel stub's LoadOptions and initrd), 11 (systemd-stub's sections), 12 (the
credential), 13-15. Not compared, because they are the platform's own and not the payload's:
PCR 0/1 (OVMF measures its own code and configuration), 5 (OVMF's GPT disk event precedes the
ExitBootServices actions), 10 (IMA, extended by the running kernel).
"""

import pytest

from tests.e2e import ovmf_tpm as O
from tests.e2e.uki import build_uki
from vmrun.runner import RunOptions, run_payload

pytestmark = [pytest.mark.slow, pytest.mark.kvm, pytest.mark.payloads]

COMPARED = (2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 15)
BANKS = ("sha1", "sha256", "sha384", "sha512")
CRED = b"vmrun-pcr12-credential\n"


@pytest.mark.parametrize("stub", ["252", "257"])
def test_pcrs_equal_ovmf_with_swtpm(stub, tmp_path, payload_cache, bookworm_kernel):
    if O.available():
        pytest.fail(f"reference unavailable: {O.available()} (scripts/setup installs qemu, ovmf, swtpm)")
    initrd = O.make_reference_initrd(tmp_path / "ref.cpio")
    esp = tmp_path / "esp"
    extra = esp / "EFI" / "BOOT" / "BOOTX64.EFI.extra.d"
    extra.mkdir(parents=True)
    uki = build_uki(payload_cache / "stubs" / stub / "linuxx64.efi.stub", esp / "EFI" / "BOOT" / "BOOTX64.EFI",
                    linux=bookworm_kernel, initrd=initrd, cmdline=f"console=ttyS0 pcr-compare-{stub}")
    (extra / "ref.cred").write_bytes(CRED)

    ours = run_payload(uki, RunOptions(esp=esp, tpm_banks=BANKS, timeout=60))
    assert ours.outcome == "exit_boot_services", ours.error
    ref = O.boot_uki(uki, esp_extra={"EFI/BOOT/BOOTX64.EFI.extra.d/ref.cred": CRED}, timeout=240)
    assert ref.complete and not ref.errors, str(ref)

    assert ref.pcrs["sha256"][12] != "00" * 32 and ref.pcrs["sha256"][11] != "00" * 32
    diffs = [(bank, i) for bank in BANKS for i in COMPARED if ours.pcrs[bank][str(i)] != ref.pcrs[bank][i]]
    assert not diffs, "\n".join(f"{b} PCR {i}: vmrun {ours.pcrs[b][str(i)]} != OVMF {ref.pcrs[b][i]}"
                                for b, i in diffs)
