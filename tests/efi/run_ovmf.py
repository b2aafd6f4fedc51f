#!/usr/bin/env python3
"""Run one EFI test application under real firmware (OVMF in QEMU/TCG) and print its console.

    python tests/efi/run_ovmf.py APP.efi [--timeout S] [--until REGEX] [--full] [--cmdline] [--raw] [--keep DIR]

The app is put on a throw-away FAT disk as EFI/BOOT/BOOTX64.EFI (the removable-media
default boot file), so OVMF's boot manager starts it with no LoadOptions.  OVMF sends
ConOut to the serial port; this script captures it, strips the terminal escape sequences
the firmware adds, and stops QEMU as soon as a line matching --until appears (default:
the final "DONE <n> passed, <m> failed" line) or after --timeout seconds (default 120).

Exit status: 0 if the --until line appeared, 2 on timeout, 3 if QEMU/OVMF are missing.
Library use:  from run_ovmf import run_app;  text, finished = run_app(path)

Needs: qemu-system-x86_64 and /usr/share/ovmf/OVMF.fd (apt-get install -y qemu-system-x86 ovmf).
A virtio-rng device is attached so that OVMF publishes EFI_RNG_PROTOCOL. QEMU runs through the
QEMU tests' one boot-and-wait helper, tests/e2e/qemu.py's ``boot`` (standard library only).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys
import tempfile

_REPO = str(pathlib.Path(__file__).resolve().parents[2])
if _REPO not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, _REPO)

from tests.e2e import qemu  # noqa: E402

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
OVMF = os.environ.get("OVMF_FD", "/usr/share/ovmf/OVMF.fd")
DONE_RE = r"DONE \d+ passed, \d+ failed"

# The serial bytes as text: the escape sequences of OVMF's terminal driver and CRs removed.
clean = qemu.clean_console


def available() -> str | None:
    """None if QEMU and OVMF are installed, else a reason string."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install -y qemu-system-x86)"
    if not pathlib.Path(OVMF).is_file():
        return f"{OVMF} not found (apt-get install -y ovmf)"
    return None


def run_app(app: str | os.PathLike, timeout: float = 120.0, until: str = DONE_RE,
            raw: bool = False, keep: str | os.PathLike | None = None,
            memory_mb: int = 512, full: bool = False,
            chain: str | os.PathLike | None = None) -> tuple[str, bool]:
    """Boot `app` under OVMF; return (console text, whether `until` appeared).

    The text ends with the line that matched `until` unless `full` is true.
    With `chain` (the path of chain.efi), chain.efi is the boot file and starts `app`
    with LoadOptions "vmrun-test-options 123", as vmrun's --cmdline would.
    """
    reason = available()
    if reason:
        raise FileNotFoundError(reason)
    pattern = re.compile(until)
    with tempfile.TemporaryDirectory(prefix="vmrun-ovmf-") as tmp:
        work = pathlib.Path(keep) if keep else pathlib.Path(tmp)
        disk = work / "esp"
        boot = disk / "EFI" / "BOOT"
        boot.mkdir(parents=True, exist_ok=True)
        if chain:
            shutil.copyfile(chain, boot / "BOOTX64.EFI")
            shutil.copyfile(app, boot / "PAYLOAD.EFI")
        else:
            shutil.copyfile(app, boot / "BOOTX64.EFI")
        r = qemu.boot(None, memory_mb=memory_mb, timeout=timeout, bios=OVMF, qemu=QEMU,
                      extra_args=["-drive", f"format=raw,file=fat:rw:{disk}",
                                  "-device", "virtio-rng-pci"],
                      until=until, serial_text=clean,
                      linger=0.3)  # linger: let the rest of the line arrive
        (work / "serial.log").write_bytes(r.raw_serial)
    finished = r.matched
    if raw:
        return r.raw_serial.decode("utf-8", "replace"), finished
    text = r.serial
    if finished and not full:
        # cut after the line that ended the run: what follows is the boot manager's
        m = pattern.search(text)
        nl = text.find("\n", m.end()) if m else -1
        text = text[: nl + 1] if nl >= 0 else text
    if not finished and r.stderr.strip():
        text += "\n[qemu] " + r.stderr.strip() + "\n"
    return text, finished


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("app")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--until", default=DONE_RE, help="regex that ends the run (default: DONE line)")
    p.add_argument("--raw", action="store_true", help="print the serial bytes unfiltered")
    p.add_argument("--full", action="store_true", help="keep the console text after the --until line")
    p.add_argument("--cmdline", action="store_true",
                   help="start the app through chain.efi (next to it) with LoadOptions "
                        "'vmrun-test-options 123'")
    p.add_argument("--keep", help="work directory to keep (disk tree and serial.log)")
    a = p.parse_args(argv)
    chain = None
    if a.cmdline:
        chain = pathlib.Path(a.app).resolve().parent / "chain.efi"
        if not chain.is_file():
            print(f"run_ovmf: {chain} not found (python tests/efi/build.py)", file=sys.stderr)
            return 3
    try:
        text, finished = run_app(a.app, a.timeout, a.until, a.raw, a.keep, full=a.full, chain=chain)
    except FileNotFoundError as e:
        print(f"run_ovmf: {e}", file=sys.stderr)
        return 3
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if not finished:
        print(f"run_ovmf: timed out after {a.timeout:g}s without /{a.until}/", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
