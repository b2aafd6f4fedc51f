#!/usr/bin/env python3
"""Build the vmrun EFI test applications (PE32+, subsystem 10, with base relocations).

    python tests/efi/build.py [OUTDIR]      # default OUTDIR: tests/efi/build
    python tests/efi/build.py --only memory,misc [OUTDIR]
    python tests/efi/build.py --force       # rebuild everything
    python tests/efi/build.py --list        # print the app names

Each app is tests/efi/<app>.c linked with tests/efi/lib.c; output is OUTDIR/<app>.efi.
An app is rebuilt only when the SHA-256 over the compiler command line, the compiler
version and every source it uses (app, lib.c, lib.h, hostile.h, include/efi.h) differs from the
one recorded in OUTDIR/<app>.efi.stamp.  Builds are deterministic (no timestamps,
no ident strings, no debug info): the same sources give byte-identical .efi files.

Needs Debian's mingw-w64 cross compiler (x86_64-w64-mingw32-gcc); stdlib only.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "build"
CC = os.environ.get("EFI_CC", "x86_64-w64-mingw32-gcc")

APPS = [
    "memory",
    "protocols",
    "events",
    "misc",
    "console",
    "image",
    "variables",
    "spin",
    "privileged",
    "emulated",
    "ebs",
    "fs",
    "stray",
    "images",
    "halt",
    "hostile_time",     # hostile payloads, one per class (tests/e2e/test_hostile.py)
    "hostile_memory",
    "hostile_cpu",
    "hostile_fw",
    "hostile_quiet",
    "fuzz_services",    # garbage arguments to every service (tests/e2e/test_fuzz_services.py)
    "chain",        # helper for run_ovmf.py --cmdline, not a test
    "varlist",      # prints every variable; compared with a target's efivarfs, not a test
]

COMMON = [HERE / "lib.c", HERE / "lib.h", HERE / "hostile.h", HERE / "include" / "efi.h"]

CFLAGS = [
    "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
    "-Werror=implicit-function-declaration", "-Werror=incompatible-pointer-types",
    "-ffreestanding", "-fno-stack-protector", "-fno-builtin", "-fno-strict-aliasing",
    "-mno-red-zone", "-fshort-wchar", "-mgeneral-regs-only", "-mno-stack-arg-probe",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-ident",
    "-I", str(HERE / "include"),
]

LDFLAGS = [
    "-nostdlib", "-s",
    "-Wl,--subsystem,10",          # EFI application
    "-e", "efi_main",
    "-Wl,--dynamicbase",           # keep base relocations (.reloc)
    "-Wl,--no-insert-timestamp",   # deterministic
    "-Wl,--file-alignment,0x200",
    "-Wl,--section-alignment,0x1000",
]


def compiler_version() -> str:
    try:
        r = subprocess.run([CC, "--version"], check=True, capture_output=True, text=True)
    except (FileNotFoundError, subprocess.CalledProcessError):
        raise SystemExit(
            f"tests/efi/build.py: C compiler {CC!r} not found -- "
            "install gcc-mingw-w64-x86-64: run scripts/setup "
            "(or: apt-get install -y gcc-mingw-w64-x86-64)"
        ) from None
    return r.stdout.splitlines()[0] if r.stdout else ""


def command(app: str, out: pathlib.Path) -> list[str]:
    return [CC, *CFLAGS, str(HERE / f"{app}.c"), str(HERE / "lib.c"), *LDFLAGS, "-o", str(out)]


def digest(app: str, version: str) -> str:
    h = hashlib.sha256()
    # the command with the output path neutralised: moving OUTDIR does not force rebuilds
    for arg in command(app, pathlib.Path("OUT")):
        h.update(arg.encode() + b"\0")
    h.update(version.encode() + b"\0")
    for src in [HERE / f"{app}.c", *COMMON]:
        h.update(src.name.encode() + b"\0")
        h.update(src.read_bytes())
    return h.hexdigest()


def build_app(app: str, outdir: pathlib.Path, version: str, force: bool = False) -> tuple[pathlib.Path, bool]:
    """Build one app; return (path, rebuilt)."""
    out = outdir / f"{app}.efi"
    stamp = outdir / f"{app}.efi.stamp"
    want = digest(app, version)
    if not force and out.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return out, False
    outdir.mkdir(parents=True, exist_ok=True)
    # link into a temporary name and rename: an interrupted build never leaves a stale .efi
    fd, tmpname = tempfile.mkstemp(prefix=f".{app}.", suffix=".efi", dir=outdir)
    os.close(fd)
    tmp = pathlib.Path(tmpname)
    try:
        r = subprocess.run(command(app, tmp), capture_output=True, text=True, cwd=HERE)
        if r.returncode != 0:
            raise SystemExit(f"building {app}.efi failed:\n{r.stdout}{r.stderr}")
        if r.stderr.strip():
            sys.stderr.write(r.stderr)
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    stamp.write_text(want + "\n")
    return out, True


def build_all(outdir: pathlib.Path = DEFAULT_OUT, apps: list[str] | None = None,
              force: bool = False, verbose: bool = False) -> dict[str, pathlib.Path]:
    version = compiler_version()
    result = {}
    for app in apps or APPS:
        path, rebuilt = build_app(app, outdir, version, force)
        if verbose:
            print(f"{'built' if rebuilt else 'up to date'}: {path}")
        result[app] = path
    return result


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build the vmrun EFI test applications.")
    p.add_argument("outdir", nargs="?", default=str(DEFAULT_OUT), help="default: tests/efi/build")
    p.add_argument("--only", help="comma-separated app names (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--list", action="store_true", help="print the app names and exit")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(APPS))
        return 0
    apps = a.only.split(",") if a.only else None
    for app in apps or []:
        if app not in APPS:
            raise SystemExit(f"unknown app {app!r}; known: {', '.join(APPS)}")
    build_all(pathlib.Path(a.outdir).resolve(), apps, force=a.force, verbose=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
