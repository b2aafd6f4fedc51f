"""A userspace measurement as systemd makes one, for the measured-kexec tests on a target:
extend a PCR in every active bank of the TPM with the digests of a string (tpm2_pcrextend),
and unless ``--no-record`` append the record systemd writes for it to its measurement log
(a JSON text sequence, RFC 7464: RS, a CEL-JSON record, newline; systemd.io "TPM2 PCR
Measurements Made by systemd")::

    python -m tests.e2e.measure_record --pcr 15 --string machine-id:1234 --event-type machine-id
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import time

LOG = "/run/log/systemd/tpm2-measure.log"


def active_banks(tcti: str | None) -> list[str]:
    args = ["tpm2_getcap", "pcrs"] + (["-T", tcti] if tcti else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout
    return [m.group(1) for m in re.finditer(r"-\s*(sha\d+)\s*:\s*\[\s*\d", out)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pcr", type=int, required=True)
    ap.add_argument("--string", required=True)
    ap.add_argument("--event-type", default="phase")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--log", default=LOG)
    ap.add_argument("--tcti", default=None)
    a = ap.parse_args()
    banks = active_banks(a.tcti)
    digests = {b: hashlib.new(b, a.string.encode()).hexdigest() for b in banks}
    spec = f"{a.pcr}:" + ",".join(f"{b}={d}" for b, d in digests.items())
    subprocess.run(["tpm2_pcrextend", spec] + (["-T", a.tcti] if a.tcti else []), check=True, timeout=30)
    if not a.no_record:
        record = {"pcr": a.pcr, "digests": [{"hashAlg": b, "digest": d} for b, d in digests.items()],
                  "content_type": "systemd",
                  "content": {"string": a.string, "timestamp": int(time.monotonic() * 1e6),
                              "eventType": a.event_type}}
        os.makedirs(os.path.dirname(a.log), exist_ok=True)
        with open(a.log, "ab") as f:
            f.write(b"\x1e" + json.dumps(record).encode() + b"\n")
    print(f"extended PCR {a.pcr} ({', '.join(banks)}) with {a.string!r}" + ("" if a.no_record else " (recorded)"))


if __name__ == "__main__":
    main()
