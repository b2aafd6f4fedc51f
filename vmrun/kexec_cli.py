"""``vmrun kexec``: kexec-tools' command line for PE kernels and UKIs.

Options are parsed the way kexec-tools parses them (getopt_long: options and the kernel file in
any order, ``--opt=value`` or ``--opt value``, bundled short options, unique prefixes of long
options), then the work is done by the service (``io.vmrun.Manager``, when its socket answers)
or in this process by the code behind ``vmrun load``, ``vmrun unload`` and ``vmrun exec``.

Exit status is kexec-like: 0 on success, 1 on any failure (vmrun's own exit code is in the
message; ``--vmrun-exit-codes`` exits with it instead). ``-S`` follows kexec-tools: 1 when the
slot is loaded, 0 when it is not. README "kexec-compatible front end" has the table.
"""

from __future__ import annotations

import contextlib
import getopt
import io
import os
import pathlib
import re
import sys
from dataclasses import dataclass, field

import click

from vmrun.errors import VmrunError

DEFAULT_SOCKET = "/run/vmrun/io.vmrun.Manager"
PROC_CMDLINE = "/proc/cmdline"
LOCKDOWN = "/sys/kernel/security/lockdown"
TYPES = ("pe", "efi")

SHORT = "hvdfixyluept:scaS"
SUPPORTED_LONG = [
    "help", "version", "debug", "force", "load", "unload", "exec", "type=", "load-panic",
    "kexec-file-syscall", "kexec-syscall", "kexec-syscall-auto", "status",
    "command-line=", "append=", "reuse-cmdline", "initrd=", "ramdisk=",
    "no-ifdown", "no-sync", "no-checks",
]
VMRUN_LONG = [
    "default-entry", "esp=", "boot-path=", "no-esp", "efivars=", "no-service", "socket=",
    "kdump-append=", "timeout=", "memory-cap=", "vmrun-exit-codes",
]
# kexec-tools options (x86_64 build) that make no sense for a PE payload run by vmrun: why not
UNSUPPORTED = {
    "exec-live-update": "Xen live update", "load-live-update": "Xen live update",
    "load-preserve-context": "preserve-context kexec (jump back) is not supported",
    "load-jump-back-helper": "preserve-context kexec (jump back) is not supported",
    "entry": "the entry point is the payload's own (vmrun's purgatory resumes it)",
    "mem-min": "vmrun places nothing itself: the payload's allocations decide where memory goes",
    "mem-max": "vmrun places nothing itself: the payload's allocations decide where memory goes",
    "reuseinitrd": "reusing the running kernel's initrd is not supported; give --initrd",
    "print-ckr-size": "see `vmrun status` (crash kernel reservation)",
    "hotplug": "crash hotplug updates of the ELF core header are not supported (reload after hotplug)",
    "no-cma": "a kexec_file_load flag; vmrun uses kexec_load(2)",
    "force-dtb": "device trees do not apply to x86_64 PE payloads",
    "dtb": "device trees do not apply to x86_64 PE payloads",
    "reset-vga": "the payload's firmware environment is vmrun's; no VGA reset",
    "console-vga": "purgatory consoles are kexec-tools' (vmrun's purgatory prints nothing)",
    "console-serial": "purgatory consoles are kexec-tools' (vmrun's purgatory prints nothing)",
    "serial": "purgatory consoles are kexec-tools' (vmrun's purgatory prints nothing)",
    "serial-baud": "purgatory consoles are kexec-tools' (vmrun's purgatory prints nothing)",
    "elf32-core-headers": "vmrun writes ELF64 core headers for kdump",
    "elf64-core-headers": "vmrun always writes ELF64 core headers for kdump (this is the default)",
    "pass-memmap-cmdline": "the kdump kernel gets its memory map from the EFI memory map vmrun's firmware hands it",
    "noefi": "a PE payload is started as an EFI application; --noefi contradicts it",
    "reuse-video-type": "the payload sees vmrun's firmware, not the running kernel's screen",
    "args-elf": "an ELF-loader option (-t elf-x86_64); vmrun runs PE images",
    "args-linux": "an ELF-loader option (-t elf-x86_64); vmrun runs PE images",
    "args-none": "an ELF-loader option (-t elf-x86_64); vmrun runs PE images",
    "module": "multiboot modules: vmrun runs PE images",
    "real-mode": "16-bit entry of a bzImage: vmrun starts the kernel through its EFI stub",
    "entry-32bit": "32-bit entry of a bzImage: vmrun starts the kernel through its EFI stub",
}
ALL_LONG = SUPPORTED_LONG + VMRUN_LONG + [
    n + ("=" if n in ("entry", "mem-min", "mem-max", "dtb", "serial", "serial-baud", "module") else "")
    for n in UNSUPPORTED]
_SHORT_NAMES = {"h": "help", "v": "version", "d": "debug", "f": "force", "i": "no-checks", "x": "no-ifdown",
                "y": "no-sync", "l": "load", "u": "unload", "e": "exec", "t": "type", "p": "load-panic",
                "s": "kexec-file-syscall", "c": "kexec-syscall", "a": "kexec-syscall-auto", "S": "status"}


class KexecUsageError(VmrunError):
    """A kexec-tools option vmrun kexec does not accept, or a combination it cannot do."""
    exit_code = 2
    kind = "usage"


class Failed(VmrunError):
    """A failure reported with another part's exit code (the service's, a payload outcome's)."""
    kind = "failed"

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Request:
    """What the command line asks for."""
    action: str | None = None          # load, unload, exec, load+exec, status
    crash: bool = False
    kernel: pathlib.Path | None = None
    cmdline: str | None = None         # --append/--command-line (last wins)
    reuse_cmdline: bool = False
    initrd: pathlib.Path | None = None
    type: str | None = None
    syscall: str | None = None         # "file", "load", "auto"
    debug: bool = False
    default_entry: bool = False
    esp: pathlib.Path | None = None
    boot_path: pathlib.Path | None = None
    no_esp: bool = False
    efivars: str | None = None
    no_service: bool = False
    socket: str | None = None
    kdump_append: str | None = None
    timeout: str | None = None
    memory_cap: str | None = None
    vmrun_exit_codes: bool = False
    help: bool = False
    version: bool = False
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)   # actions in the order given


USAGE = """\
Usage: vmrun kexec [OPTIONS] [KERNEL]

kexec-tools' options for PE kernels (EFI-stub bzImages) and UKIs, run by vmrun:

  -l, --load KERNEL            run KERNEL for this machine and load it (like kexec -l)
  -p, --load-panic KERNEL      ... as the crash (kdump) kernel (like kexec -p)
  -u, --unload                 unload the kexec image; with -p the crash kernel
  -e, --exec                   reboot into the loaded image now (no shutdown)
  -f, --force [KERNEL]         -e without shutdown (with KERNEL: load it, then -e)
  -S, --status                 exit 1 if the crash (with -l: normal) slot is loaded, 0 if not
      --append=TEXT, --command-line=TEXT
                               the kernel command line (a UKI's replaces its .cmdline)
      --reuse-cmdline          /proc/cmdline without BOOT_IMAGE= (and crashkernel= with -p),
                               then --append
      --initrd=FILE, --ramdisk=FILE
  -t, --type=pe|efi            the only types vmrun runs
  -s, -c, -a                   accepted: vmrun always uses kexec_load(2) with its own purgatory
  -x, -y, -i                   accepted (no effect)
  -d, --debug                  show vmrun's log
  -v, --version, -h, --help

vmrun's own:
      --default-entry          load the boot loader's default entry, as bootctl finds it
      --esp=PATH               the ESP (sidecars, entries); default: the mount KERNEL lies on
      --boot-path=PATH         the XBOOTLDR partition for --default-entry
      --no-esp                 do not present the partition KERNEL lies on
      --efivars=DIR            where LoaderEntryDefault & co are read (/sys/firmware/efi/efivars)
      --no-service, --socket=PATH
                               run in this process / talk to the service at PATH
                               (default: the service when /run/vmrun/io.vmrun.Manager answers)
      --kdump-append=TEXT      with -p: added to the kdump command line (see vmrun load --crash)
      --timeout=S, --memory-cap=SIZE
      --vmrun-exit-codes       exit with vmrun's own code instead of 1

Plain `vmrun kexec -e` reboots at once, like `kexec -e`; `systemctl kexec` shuts the system
down in order and then boots the loaded image.
"""


def parse(argv: list[str]) -> Request:
    """kexec-tools' options, the way getopt_long reads them; raises KexecUsageError."""
    try:
        opts, args = getopt.gnu_getopt(list(argv), SHORT, ALL_LONG)
    except getopt.GetoptError as e:
        opt = f"-{e.opt}" if len(e.opt) == 1 else f"--{e.opt}"
        if "not recognized" in e.msg:
            raise KexecUsageError(f"unknown option {opt}: neither kexec-tools nor vmrun kexec has it "
                                  "(vmrun kexec -h lists what it accepts)") from None
        raise KexecUsageError(f"option {opt}: {e.msg}") from None
    r = Request()
    for opt, val in opts:
        name = opt[2:] if opt.startswith("--") else _SHORT_NAMES[opt[1:]]
        if name in UNSUPPORTED:
            raise KexecUsageError(f"kexec-tools option --{name} is not supported by vmrun kexec: {UNSUPPORTED[name]}")
        if name == "help":
            r.help = True
        elif name == "version":
            r.version = True
        elif name == "debug":
            r.debug = True
        elif name in ("load", "load-panic", "unload", "exec", "force", "status"):
            r.flags.append(name)
            if name == "load-panic":
                r.crash = True
        elif name == "type":
            r.type = val
        elif name == "kexec-file-syscall":
            r.syscall = "file"
        elif name == "kexec-syscall":
            r.syscall = "load"
        elif name == "kexec-syscall-auto":
            r.syscall = "auto"
        elif name in ("append", "command-line"):
            r.cmdline = val
        elif name == "reuse-cmdline":
            r.reuse_cmdline = True
        elif name in ("initrd", "ramdisk"):
            r.initrd = pathlib.Path(val)
        elif name in ("no-ifdown", "no-sync", "no-checks"):
            r.notes.append(f"--{name} has no effect (vmrun always syncs; it takes no interface down and "
                           "checks nothing in purgatory)")
        elif name == "default-entry":
            r.default_entry = True
        elif name == "esp":
            r.esp = pathlib.Path(val)
        elif name == "boot-path":
            r.boot_path = pathlib.Path(val)
        elif name == "no-esp":
            r.no_esp = True
        elif name == "efivars":
            r.efivars = val
        elif name == "no-service":
            r.no_service = True
        elif name == "socket":
            r.socket = val
        elif name == "kdump-append":
            r.kdump_append = val
        elif name == "timeout":
            r.timeout = val
        elif name == "memory-cap":
            r.memory_cap = val
        elif name == "vmrun-exit-codes":
            r.vmrun_exit_codes = True
    if r.help or r.version:
        return r
    if len(args) > 1:
        raise KexecUsageError(f"one kernel only: {' '.join(args)}")
    r.kernel = pathlib.Path(args[0]) if args else None
    _decide_action(r)
    return r


def _decide_action(r: Request) -> None:
    f = set(r.flags)
    if "status" in f:                       # kexec-tools: -S supersedes every other action
        r.action = "status"
        r.crash = "load" not in f
        return
    if r.type is not None and r.type.lower() not in TYPES:
        raise KexecUsageError(f"-t {r.type}: vmrun kexec runs PE images only (types: {', '.join(TYPES)}); "
                              "other kernel formats are kexec-tools' job (kexec -t TYPE)")
    if "unload" in f:
        if "exec" in f or "force" in f:
            raise KexecUsageError("-u with -e/-f: unload and reboot are separate steps")
        if r.kernel is not None or r.default_entry:
            raise KexecUsageError(f"-u unloads and takes no kernel ({r.kernel or '--default-entry'} given)")
        r.action = "unload"
        return
    if "load" in f and r.crash:
        raise KexecUsageError("-l and -p: choose the normal (-l) or the crash (-p) slot")
    has_kernel = r.kernel is not None or r.default_entry
    if r.kernel is not None and r.default_entry:
        raise KexecUsageError(f"--default-entry picks the kernel itself; {r.kernel} given too")
    if "force" in f:
        if r.crash:
            raise KexecUsageError("-f with -p: a crash kernel is booted by a panic, not by -f")
        r.action = "load+exec" if has_kernel else "exec"
        return
    if "exec" in f:
        if "load" in f or r.crash or has_kernel:
            raise KexecUsageError("-e boots what is already loaded: load first (vmrun kexec -l KERNEL), "
                                  "or use -f KERNEL to load and boot at once")
        r.action = "exec"
        return
    if "load" in f or r.crash:
        if not has_kernel:
            raise KexecUsageError(f"{'-p' if r.crash else '-l'} needs a KERNEL (or --default-entry)")
        r.action = "load"
        return
    if has_kernel:
        raise KexecUsageError("no action given: kexec-tools without -l/-p/-e loads and then runs "
                              "shutdown(8); vmrun kexec does not shut down: use `vmrun kexec -l KERNEL` "
                              "then `systemctl kexec`")
    raise KexecUsageError("nothing to do: give -l KERNEL, -p KERNEL, -u, -e, -f or -S (vmrun kexec -h)")


# --- command line helpers ------------------------------------------------------------------------
_TOKEN = re.compile(r'(?:[^\s"]|"[^"]*"?)+')


def cmdline_words(text: str) -> list[str]:
    """Kernel command line words (white space outside double quotes separates them)."""
    return _TOKEN.findall(text)


def reuse_cmdline(text: str, *, crash: bool) -> str:
    """kexec-tools' --reuse-cmdline: the running kernel's command line without ``BOOT_IMAGE=``
    (a boot loader's note about itself) and, for a crash kernel, ``crashkernel=`` (every one:
    ``,high`` and ``,low`` too)."""
    drop = {"BOOT_IMAGE"} | ({"crashkernel"} if crash else set())
    words = [w for w in cmdline_words(text.replace("\r", " ").split("\n", 1)[0])
             if w.split("=", 1)[0] not in drop]
    return " ".join(words)


def command_line(r: Request, proc_cmdline: str = PROC_CMDLINE) -> str | None:
    """The command line to hand the payload: --reuse-cmdline then --append (kexec-tools'
    concat_cmdline), or None when neither was given (a UKI then keeps its .cmdline)."""
    base = None
    if r.reuse_cmdline:
        try:
            base = reuse_cmdline(pathlib.Path(proc_cmdline).read_text(), crash=r.crash)
        except OSError as e:
            raise Failed(f"--reuse-cmdline: cannot read {proc_cmdline}: {e.strerror}") from None
    if base is None:
        return r.cmdline
    return base if r.cmdline is None else f"{base} {r.cmdline}"


def lockdown_mode(path: str = LOCKDOWN) -> str | None:
    try:
        m = re.search(r"\[(\w+)\]", pathlib.Path(path).read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def syscall_notice(r: Request, lockdown_path: str = LOCKDOWN) -> str | None:
    """What -s/-c/-a mean here. Raises when -s asks for what cannot work on this machine."""
    if r.syscall != "file" or r.action not in ("load", "load+exec"):
        return None
    mode = lockdown_mode(lockdown_path)
    if mode not in (None, "none"):
        raise Failed(f"-s: this kernel is locked down ({mode}): only kexec_file_load(2) of a signed "
                         "kernel is allowed, and vmrun cannot use it (the kernel would verify and start the "
                         "PE itself, without vmrun's run). Use kexec-tools: kexec -s -l SIGNED_KERNEL",
                         exit_code=50)
    return ("-s: vmrun loads with kexec_load(2) and its own purgatory, not kexec_file_load(2): the kernel "
            "would verify and unpack the PE itself and lose what vmrun's run prepared (UKI sidecars, "
            "measurements, the stub's work); going on with kexec_load")


# --- ESP / default entry ---------------------------------------------------------------------------
@dataclass
class Payload:
    path: pathlib.Path
    initrd: list[pathlib.Path]
    cmdline: str | None
    esp: pathlib.Path | None
    partuuid: str | None
    staged: bool = False


def resolve_payload(r: Request, *, echo=None) -> Payload:
    """The file to load, its initrds, command line and the partition to present as its ESP."""
    from vmrun import bootentry as B
    say = echo or (lambda msg: click.echo(f"vmrun kexec: {msg}", err=True))
    cmdline = command_line(r)
    if r.default_entry:
        choice = B.default_entry(r.esp, r.boot_path, efivars=r.efivars or B.EFIVARS)
        e = choice.entry
        say(f"default boot entry: {e.describe()}, chosen by {choice.reason}")
        if e.linux is not None and e.efi is None and not e.linux.is_file():
            raise B.BootEntryError(f"boot entry {e.id}: linux {e.linux} is missing")
        if e.efi is not None and not e.efi.is_file():
            raise B.BootEntryError(f"boot entry {e.id}: {e.efi} is missing")
        for i in e.initrd:
            if not i.is_file():
                raise B.BootEntryError(f"boot entry {e.id}: initrd {i} is missing")
        initrd = [r.initrd] if r.initrd is not None else list(e.initrd)
        if cmdline is None and e.type == "type1":
            cmdline = e.options
        part = None if r.no_esp else B.partition_of(e.payload)
        partuuid = part.partuuid if part is not None and os.path.realpath(part.root) == os.path.realpath(e.root) \
            else None
        return Payload(e.payload, initrd, cmdline, None if r.no_esp else e.root, partuuid)
    kernel = r.kernel
    from vmrun import loader
    if loader.is_staged_file(kernel):
        if r.type is not None:
            raise KexecUsageError(f"-t {r.type}: {kernel} is a handoff from `vmrun stage` (an ELF), not a PE image")
        return Payload(kernel, [], cmdline, None, None, staged=True)
    initrd = [r.initrd] if r.initrd is not None else []
    if r.no_esp:
        return Payload(kernel, initrd, cmdline, None, None)
    if r.esp is not None:
        return Payload(kernel, initrd, cmdline, r.esp, None)
    part = B.partition_of(kernel)
    if part is not None:
        say(f"{kernel} lies on the {part.kind.upper()} mounted at {part.root} ({part.why}): presenting it "
            "as the payload's ESP (sidecars, credentials, addons)")
        return Payload(kernel, initrd, cmdline, part.root, part.partuuid)
    return Payload(kernel, initrd, cmdline, None, None)


def _join_initrds(paths: list[pathlib.Path]) -> tuple[pathlib.Path | None, object]:
    """One initrd file for several (concatenated, each padded to 4 bytes, as sd-boot does);
    returns (path, cleanup)."""
    if len(paths) <= 1:
        return (paths[0] if paths else None), (lambda: None)
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="vmrun-kexec-")
    out = pathlib.Path(d, "initrd")
    with open(out, "wb") as w:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, w)
            pad = -w.tell() % 4
            w.write(b"\0" * pad)
    os.chmod(d, 0o755)
    os.chmod(out, 0o644)
    return out, (lambda: shutil.rmtree(d, ignore_errors=True))


# --- doing it ------------------------------------------------------------------------------------
def _service(r: Request):
    """(client module, socket path) when the service is to be used, else None."""
    if r.no_service:
        return None
    path = r.socket or DEFAULT_SOCKET
    try:
        from vmrun.service import client
    except ImportError:
        if r.socket:
            raise Failed(f"--socket {r.socket}: vmrun's service client (vmrun.service.client) is not "
                             "installed") from None
        return None
    if not client.socket_available(path):
        if r.socket:
            raise Failed(f"--socket {r.socket}: no vmrun service answers there")
        return None
    return client, path


def _call(svc, method: str, params: dict, fds: list[int] | None = None) -> dict:
    client, path = svc
    try:
        if fds:
            return client.call(f"io.vmrun.Manager.{method}", params, socket=path, fds=fds) or {}
        return client.call(f"io.vmrun.Manager.{method}", params, socket=path) or {}
    except client.ServiceError as e:
        p = getattr(e, "parameters", None) or {}
        name = getattr(e, "name", "") or type(e).__name__
        if name == "org.varlink.service.PermissionDenied":
            raise Failed(f"the vmrun service at {path} refused {method}: permission denied "
                             "(loading, unloading and exec need root)", exit_code=50) from None
        msg = p.get("message") or str(e)
        raise Failed(f"{msg} (service error {name})", exit_code=int(p.get("exit_code") or 1)) from None


def _load_in_process(r: Request, p: Payload, initrd: pathlib.Path | None, debug: bool) -> str:
    from vmrun import cli as C
    argv = [str(p.path)] + (["--crash"] if r.crash else [])
    if not p.staged:
        if p.cmdline is not None:
            argv += ["--cmdline", p.cmdline]
        if initrd is not None:
            argv += ["--initrd", str(initrd)]
        if p.esp is not None:
            argv += ["--esp", str(p.esp)]
            if p.partuuid:
                argv += ["--esp-partuuid", p.partuuid]
        if r.kdump_append is not None:
            argv += ["--kdump-append", r.kdump_append]
        if r.timeout is not None:
            argv += ["--timeout", r.timeout]
        if r.memory_cap is not None:
            argv += ["--memory-cap", r.memory_cap]
    elif any(x is not None for x in (p.cmdline, initrd, r.kdump_append, r.timeout, r.memory_cap)):
        raise KexecUsageError(f"{p.path} is a staged handoff: command line, initrd and run options were fixed "
                              "when it was staged")
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out):
            C.load.main(args=argv, prog_name="vmrun load", standalone_mode=False)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    text = out.getvalue()
    if code:
        sys.stderr.write(text)
        from vmrun.errors import OUTCOME_EXIT_CODES
        outcome = next((o for o, c in OUTCOME_EXIT_CODES.items() if c == code), "failure")
        raise Failed(f"{p.path.name} did not reach ExitBootServices (outcome {outcome})", exit_code=code)
    if debug:
        return text
    return "".join(line + "\n" for line in text.splitlines()
                   if line.startswith(("loaded", "kdump:")))


def _load(r: Request, svc, debug: bool) -> None:
    p = resolve_payload(r)
    initrd, cleanup = _join_initrds(p.initrd)
    try:
        if svc is None:
            click.echo(_load_in_process(r, p, initrd, debug), nl=False)
            return
        from vmrun.cli import parse_size
        try:
            timeout = float(r.timeout) if r.timeout is not None else None
        except ValueError:
            raise KexecUsageError(f"--timeout {r.timeout!r}: expected seconds") from None
        params = {("staged" if p.staged else "payload"): str(p.path.resolve()), "crash": r.crash,
                  "initrd": str(initrd.resolve()) if initrd else None,
                  "esp": str(p.esp.resolve()) if p.esp else None,
                  "esp_partuuid": p.partuuid if p.esp else None, "cmdline": p.cmdline,
                  "kdump_append": r.kdump_append, "timeout": timeout,
                  "memory_cap": parse_size(r.memory_cap) if r.memory_cap is not None else None}
        fds = None
        if len(p.initrd) > 1:      # the joined temporary file: handed over open (a service with
            fds = [os.open(initrd, os.O_RDONLY | os.O_CLOEXEC)]   # PrivateTmp would not see it)
            params.pop("initrd")
            params["initrd_fd"] = 0
        try:
            reply = _call(svc, "Load", {k: v for k, v in params.items() if v is not None}, fds)
        finally:
            for fd in fds or ():
                os.close(fd)
        click.echo(f"loaded:   {p.path.name} into the {reply.get('slot', 'crash' if r.crash else 'normal')} slot "
                   f"by the vmrun service" + ("" if r.crash else "; `systemctl kexec` or `vmrun kexec -e` boots it"))
    finally:
        cleanup()


def _status(r: Request, svc) -> int:
    slot = "crash" if r.crash else "normal"
    if svc is not None:
        st = _call(svc, "Status", {})
        loaded = bool((st.get(slot) or {}).get("loaded"))
    else:
        from vmrun import kexec
        loaded = kexec.loaded(crash=r.crash)
    return 1 if loaded else 0


def run(r: Request, *, debug: bool = False) -> int:
    """Carry out a parsed request; returns the exit status (raises VmrunError on failure)."""
    for note in r.notes:
        click.echo(f"vmrun kexec: {note}", err=True)
    notice = syscall_notice(r)
    if notice:
        click.echo(f"vmrun kexec: {notice}", err=True)
    svc = _service(r)
    if r.action == "status":
        return _status(r, svc)
    if r.action == "unload":
        if svc is not None:
            _call(svc, "Unload", {"crash": r.crash})
        else:
            from vmrun import loader
            loader.unload(crash=r.crash)
        return 0
    if r.action in ("load", "load+exec"):
        _load(r, svc, debug)
    if r.action in ("exec", "load+exec"):
        if svc is not None:
            _call(svc, "Exec", {})
        else:
            from vmrun import kexec, loader
            loader.finalize_measured()   # a measured kexec: extend the TPM, reload with the final log
            kexec.execute()
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("vmrun")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


@click.command(name="kexec", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False,
                                 "help_option_names": []})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def kexec(ctx, argv):
    """kexec-tools' options (-l, -p, -u, -e, -f, --append, --initrd, …) for PE kernels and UKIs;
    vmrun kexec -h lists them."""
    obj = ctx.obj or {}
    debug_tb = bool(obj.get("debug"))
    exit_codes = "--vmrun-exit-codes" in argv
    try:
        r = parse(argv)
        exit_codes = r.vmrun_exit_codes
        if r.help:
            click.echo(USAGE, nl=False)
            sys.exit(0)
        if r.version:
            click.echo(f"vmrun kexec {_version()} (kexec-tools compatible front end; PE kernels and UKIs)")
            sys.exit(0)
        parent = ctx.parent.params if ctx.parent is not None else {}
        if not r.debug and not parent.get("verbose"):
            from vmrun import logs
            logs.configure(json_logs=bool(parent.get("json_logs")), quiet=True)
        elif r.debug:
            from vmrun import logs
            logs.configure(json_logs=bool(parent.get("json_logs")), verbose=2)
        status = run(r, debug=r.debug)
    except VmrunError as e:
        if debug_tb:
            raise
        code = e.exit_code
        click.echo(f"vmrun kexec: error: {e} [vmrun exit code {code}]", err=True)
        sys.exit(code if exit_codes else 1)
    sys.exit(status)
