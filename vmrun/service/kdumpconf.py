"""``vmrun kdump-arm``: arm the crash kernel from ``/etc/vmrun/kdump.conf`` (vmrun-kdump.service).

    payload      = "/boot/efi/EFI/Linux/debian-kdump.efi"   # required: PE kernel, UKI or staged file
    cmdline      = "console=ttyS0"                         # optional: the payload's command line
    kdump_append = "reset_devices nr_cpus=1 irqpoll"       # optional (vmrun's default when absent)
    initrd       = "/boot/initrd.img-kdump"                # optional
    esp          = "/boot/efi"                             # optional: the payload's ESP folder
    timeout      = 60                                      # optional, seconds
    memory_cap   = "2G"                                    # optional
    host_vars    = false                                   # optional: this machine's UEFI variables

It runs ``vmrun load --crash …`` (a process of its own, like a worker) and then prints one line
saying what is armed (payload, sha256, kdump command line, elfcorehdr), which systemd keeps in
the journal and ``systemctl status vmrun-kdump`` shows.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

from vmrun.errors import BadOptionError
from vmrun.service.config import parse_size

DEFAULT_PATH = pathlib.Path("/etc/vmrun/kdump.conf")
KEYS = {"payload": str, "cmdline": str, "kdump_append": str, "initrd": str, "esp": str,
        "timeout": (int, float), "memory_cap": (int, str), "host_vars": bool}


def parse(text: str, where: str) -> dict:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadOptionError(f"{where}: not valid TOML: {e}") from None
    for k, v in raw.items():
        if k not in KEYS:
            raise BadOptionError(f"{where}: unknown key {k!r} (known: {', '.join(KEYS)})")
        if isinstance(v, bool) and KEYS[k] is not bool or not isinstance(v, KEYS[k]):
            raise BadOptionError(f"{where}: {k}: wrong type {type(v).__name__}")
    if "payload" not in raw:
        raise BadOptionError(f"{where}: no payload = \"/path/to/kernel.efi\"")
    if "memory_cap" in raw:
        raw["memory_cap"] = parse_size(raw["memory_cap"], f"{where}: memory_cap")
    return raw


def argv(conf: dict) -> list[str]:
    """``vmrun load --crash`` arguments for ``conf``."""
    from vmrun import loader
    a = ["load", "--crash", conf["payload"]]
    if loader.is_staged_file(pathlib.Path(conf["payload"])):
        return a
    for key, opt in (("cmdline", "--cmdline"), ("kdump_append", "--kdump-append"), ("initrd", "--initrd"),
                     ("esp", "--esp"), ("timeout", "--timeout"), ("memory_cap", "--memory-cap")):
        if key in conf:
            a += [opt, str(conf[key])]
    if conf.get("host_vars"):
        a.append("--host-vars")
    return a


def arm(path: pathlib.Path | None) -> int:
    p = path or DEFAULT_PATH
    try:
        text = p.read_text()
    except OSError as e:
        raise BadOptionError(f"{p}: {e.strerror}: nothing to arm") from None
    conf = parse(text, str(p))
    r = subprocess.run([sys.executable, "-m", "vmrun.cli", "-q", *argv(conf)])
    if r.returncode != 0:
        print(f"vmrun-kdump: arming {conf['payload']} failed (exit {r.returncode})", file=sys.stderr)
        return r.returncode
    from vmrun import loader
    st = loader.status()["crash"]
    rec = st.get("record") or {}
    pay = rec.get("payload") or {}
    kd = rec.get("kdump") or {}
    print(f"armed: {pay.get('path') or conf['payload']} (sha256 {pay.get('sha256', '?')}) as the crash kernel; "
          f"cmdline {kd.get('cmdline', rec.get('cmdline'))!r}; elfcorehdr {kd.get('elfcorehdr')}; "
          f"since {rec.get('loaded_at')}", flush=True)
    return 0
