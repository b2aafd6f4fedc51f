"""Reproducible build of the guest firmware blob.

    python -m guest.build            # rebuild guest/firmware.bin and guest/firmware.sym.json
    python -m guest.build --check    # rebuild into a temporary folder and compare (exit 1 if stale)

Needs GNU binutils (as, ld, objcopy, nm). The built files are committed so that vmrun itself
needs no toolchain; tests/unit/test_guest_blob.py rebuilds and compares them.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "firmware.ld"
BLOBS = ("firmware", "purgatory")  # guest/<name>.S → guest/<name>.bin + guest/<name>.sym.json


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit(f"guest build needs {cmd[0]} (GNU binutils)") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{e.stderr}") from None


def build(outdir: pathlib.Path, name: str = "firmware") -> tuple[bytes, dict[str, int]]:
    obj, elf, binf = outdir / f"{name}.o", outdir / f"{name}.elf", outdir / f"{name}.bin"
    _run("as", "--64", "-o", str(obj), str(HERE / f"{name}.S"))
    _run("ld", "-T", str(SCRIPT), "--build-id=none", "-o", str(elf), str(obj))
    _run("objcopy", "-O", "binary", str(elf), str(binf))
    symbols = {}
    for line in _run("nm", "--defined-only", str(elf)).splitlines():
        value, kind, name = line.split()
        if kind in "Tt":
            symbols[name] = int(value, 16)
    return binf.read_bytes(), dict(sorted(symbols.items()))


def main(argv: list[str]) -> int:
    stale = []
    for name in BLOBS:
        blob_path, sym_path = HERE / f"{name}.bin", HERE / f"{name}.sym.json"
        with tempfile.TemporaryDirectory() as tmp:
            blob, symbols = build(pathlib.Path(tmp), name)
        sym_text = json.dumps(symbols, indent=1) + "\n"
        if "--check" in argv:
            if not blob_path.exists() or blob_path.read_bytes() != blob:
                stale.append(blob_path.name)
            if not sym_path.exists() or sym_path.read_text() != sym_text:
                stale.append(sym_path.name)
            continue
        blob_path.write_bytes(blob)
        sym_path.write_text(sym_text)
        print(f"wrote {blob_path.name} ({len(blob)} bytes) and {sym_path.name}")
    if "--check" in argv:
        if stale:
            print(f"stale: {', '.join(stale)} (run python -m guest.build)")
            return 1
        print("guest blobs up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
