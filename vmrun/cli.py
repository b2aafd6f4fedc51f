"""Command line: click commands only; the work is in vmrun.runner and friends."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from vmrun import kexec_cli, logs
from vmrun.errors import (OUTCOME_EXIT_CODES, BadOptionError, InputFileError, MalformedImageError,
                          VmrunError)
from vmrun.vm import layout as L

_SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in _SIZE_SUFFIX:
        mult, t = _SIZE_SUFFIX[t[-1]], t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise BadOptionError(f"--memory-cap {text!r}: expected a size like 512M or 2G") from None
    if value <= 0:
        raise BadOptionError(f"--memory-cap {text!r}: must be positive")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json-logs", is_flag=True, help="Logs as one JSON object a line (stderr).")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in the log.")
@click.option("--debug", is_flag=True, hidden=True, help="Show Python tracebacks.")
@click.pass_context
def cli(ctx, json_logs, verbose, quiet, debug):
    """Run PE/EFI kernels the way firmware would, in a KVM micro-VM, up to ExitBootServices."""
    logs.configure(json_logs=json_logs, verbose=verbose, quiet=quiet)
    ctx.obj = {"debug": debug}


def _run_options(f):
    opts = [
        click.option("--cmdline", default="", help="Kernel command line (LoadedImage LoadOptions, UTF-16)."),
        click.option("--initrd", type=click.Path(path_type=pathlib.Path), default=None,
                     help="Initrd served through LoadFile2 on the Linux initrd media device path."),
        click.option("--memmap", type=click.Path(path_type=pathlib.Path), default=None,
                     help="Target memory map (/proc/iomem, /sys/firmware/memmap copy, or BIOS-e820 lines); "
                          "default: this host's."),
        click.option("--timeout", type=float, default=L.DEFAULT_TIMEOUT_S, show_default=True,
                     help="Wall-clock limit of the run in seconds."),
        click.option("--memory-cap", default="2G", show_default=True,
                     help="Most guest memory the payload may allocate."),
        click.option("--var", "variables", multiple=True, metavar="NAME[:GUID]=VALUE",
                     help="Seed a UEFI variable (VALUE: hex:…, str:…, u8:N, u32:N or @FILE)."),
        click.option("--esp", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
                     help="Present this folder as the EFI System Partition the payload was loaded from."),
        click.option("--esp-path", default=None,
                     help="The payload's path on the ESP when it is not inside --esp (default \\EFI\\Linux\\NAME)."),
        click.option("--esp-writable", is_flag=True, help="Let the payload write to the --esp folder."),
        click.option("--esp-partuuid", default=None,
                     help="Partition GUID of the ESP's HD() device-path node (default: stable, from the folder path)."),
        click.option("--vars", "vars_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
                     help="Seed UEFI variables from a JSON list of {name, guid, data|text, attributes}."),
        click.option("--host-vars", is_flag=True, help="Seed UEFI variables from this machine's efivarfs."),
        click.option("--no-tpm", is_flag=True, help="Offer no EFI_TCG2_PROTOCOL (no measurements); same as --tpm=none."),
        click.option("--tpm", "tpm_mode", type=click.Choice(["auto", "host", "software", "none"]), default="auto",
                     show_default=True,
                     help="host: mirror this machine's TPM 2.0 and its event log (measured kexec; README "
                          "\"Measured kexec\"); software: a fresh software TPM; auto: host when /dev/tpmrm0 "
                          "exists (or $VMRUN_TPM_TCTI is set), else software."),
        click.option("--tpm-tcti", default=None, metavar="TCTI",
                     help="How to reach the host TPM (tpm2-tools TCTI; default device:/dev/tpmrm0)."),
        click.option("--tpm-firmware-log", type=click.Path(dir_okay=False), default=None,
                     help="The firmware event log of the host TPM (default: securityfs "
                          "tpm0/binary_bios_measurements)."),
        click.option("--tpm-userspace-log", type=click.Path(dir_okay=False), default=None,
                     help="systemd's measurement log (default /run/log/systemd/tpm2-measure.log)."),
        click.option("--pcrlock", "pcrlock_out", type=click.Path(dir_okay=False, path_type=pathlib.Path),
                     default=None, help="Write the payload's measurements (with --tpm=host: the kexec "
                                        "boundary first) as a systemd-pcrlock .pcrlock file."),
        click.option("--pcr-banks", default="sha256", show_default=True,
                     help="Software TPM: comma-separated PCR banks (sha1, sha256, sha384, sha512)."),
        click.option("--pcr-base", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
                     help="Software TPM: JSON {bank: {index: hex}} of PCR values to start from (default: reset values)."),
        click.option("--eventlog", "eventlog_out", type=click.Path(dir_okay=False, path_type=pathlib.Path),
                     default=None, help="Write the TCG event log (crypto-agile binary format) to this file."),
        click.option("--acpi-rsdp", default=None,
                     help="Physical address of the target's ACPI RSDP (default: this host's, when staging for it)."),
        click.option("--smbios", default=None, help="Physical address of the target's SMBIOS entry point."),
        click.option("--smbios3", default=None, help="Physical address of the target's SMBIOS 3 entry point."),
        click.option("--trace", is_flag=True, help="List every service call with arguments and status."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object (see README: JSON output)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _tpm_choice(tpm_mode, no_tpm, tpm_tcti, tpm_firmware_log, tpm_userspace_log, memmap) -> tuple[str, object]:
    """The TPM a run gets: ("none"|"software", None) or ("host", vmrun.measured.host.Sources)."""
    from vmrun.measured import hosttpm
    from vmrun.measured.host import Sources

    host_opts = _given(["tpm_tcti", "tpm_firmware_log", "tpm_userspace_log"])
    soft_opts = _given(["pcr_banks", "pcr_base"])
    if no_tpm:
        if tpm_mode not in ("auto", "none"):
            raise BadOptionError(f"--no-tpm contradicts --tpm={tpm_mode}")
        tpm_mode = "none"
    if tpm_mode == "auto":
        if soft_opts or memmap is not None:
            tpm_mode = "software"   # a software-TPM option, or staging for another machine
        else:
            tpm_mode = "host" if (tpm_tcti or hosttpm.default_tcti()) else "software"
    if tpm_mode == "host":
        if soft_opts:
            raise BadOptionError(f"--{soft_opts[0].replace('_', '-')} is for the software TPM; with --tpm=host the "
                                 "host TPM's banks and PCR values are used")
        if memmap is not None:
            raise BadOptionError("--tpm=host mirrors this machine's TPM; with --memmap (staging for another "
                                 "machine) use --tpm=software")
        tcti = tpm_tcti or hosttpm.default_tcti()
        if not tcti:
            raise BadOptionError(f"--tpm=host: this machine has no {hosttpm.TPMRM} (give --tpm-tcti)")
        src = Sources(tcti)
        if tpm_firmware_log:
            src.firmware_log = tpm_firmware_log
        if tpm_userspace_log:
            src.userspace_log = tpm_userspace_log
        return "host", src
    if host_opts:
        raise BadOptionError(f"--{host_opts[0].replace('_', '-')} only applies with --tpm=host")
    return tpm_mode, None


def _make_run_options(cmdline, initrd, memmap, timeout, memory_cap, variables, trace, esp, esp_path,
                      esp_writable, esp_partuuid, vars_file, host_vars, no_tpm, pcr_banks, pcr_base,
                      acpi_rsdp, smbios, smbios3, tpm_mode="auto", tpm_tcti=None, tpm_firmware_log=None,
                      tpm_userspace_log=None, **extra):
    import uuid

    from hostsvc import tpm as T
    from hostsvc.variables import host_variables, load_vars_file, parse_var_option
    from vmrun.runner import RunOptions

    if timeout <= 0:
        raise BadOptionError(f"--timeout {timeout:g}: must be positive")
    if esp_writable and esp is None:
        raise BadOptionError("--esp-writable needs --esp DIR (without it the payload's volume is empty "
                             "and read-only)")
    if esp is not None and not esp.is_dir():
        raise BadOptionError(f"--esp {esp}: not a folder")
    banks = tuple(b.strip().lower() for b in pcr_banks.split(",") if b.strip())
    try:
        banks = T.canonical_banks(banks)
    except (ValueError, KeyError) as e:
        raise BadOptionError(f"--pcr-banks {pcr_banks!r}: {e}") from None
    base = None
    if pcr_base is not None:
        try:
            raw = json.loads(pcr_base.read_text())
            base = {b: {int(i): bytes.fromhex(v) for i, v in vals.items()} for b, vals in raw.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise BadOptionError(f"--pcr-base {pcr_base}: {e}") from None
    try:
        partuuid = uuid.UUID(esp_partuuid) if esp_partuuid else None
    except ValueError:
        raise BadOptionError(f"--esp-partuuid {esp_partuuid!r}: not a GUID") from None
    mode, sources = _tpm_choice(tpm_mode, no_tpm, tpm_tcti, tpm_firmware_log, tpm_userspace_log, memmap)
    snap = mirror = None
    if mode == "host":
        from vmrun.measured import host
        snap = host.snapshot(sources)
        mirror = host.mirror(snap)
    seeds = host_variables() if host_vars else []
    if vars_file is not None:
        seeds += load_vars_file(vars_file)
    seeds += [parse_var_option(v) for v in variables]
    return RunOptions(cmdline=cmdline, initrd=initrd, memmap=memmap, timeout=timeout,
                      memory_cap=parse_size(memory_cap), trace=trace, variables=seeds, esp=esp,
                      esp_path=esp_path, esp_writable=esp_writable, esp_partuuid=partuuid, tpm=mode != "none",
                      tpm_banks=banks, pcr_base=base, tpm_mirror=mirror, tpm_snapshot=snap,
                      acpi_rsdp=_parse_address("--acpi-rsdp", acpi_rsdp) if acpi_rsdp else None,
                      smbios=_parse_address("--smbios", smbios) if smbios else None,
                      smbios3=_parse_address("--smbios3", smbios3) if smbios3 else None, **extra)


def _write_eventlog(result, path) -> None:
    if path is None:
        return
    if result.event_log is None:
        raise BadOptionError("--eventlog: the run had no TPM (--no-tpm)")
    path.write_bytes(result.event_log)


def _write_pcrlock(result, path, plan: dict | None = None) -> None:
    """``--pcrlock``: the run's extends (a measured kexec's planned ones) as a .pcrlock file."""
    if path is None:
        return
    from vmrun.measured.host import pcrlock
    tcg2 = result.firmware.tcg2 if result.firmware is not None else None
    if tcg2 is None:
        raise BadOptionError("--pcrlock: the run had no TPM (--no-tpm)")
    if plan is None:
        from hostsvc import tpm as T
        plan = {"extends": [{"pcr": p, "digests": {b: d.hex() for b, d in dg.items()}, "type": T.event_type_name(t)}
                            for p, dg, t in tcg2.extends]}
    try:
        path.write_text(json.dumps(pcrlock(plan), indent=2) + "\n")
    except OSError as e:
        raise BadOptionError(f"--pcrlock {path}: {e.strerror}") from None


def _measured_plan(result, options, *, crash: bool) -> dict | None:
    """With --tpm=host: the section written into the payload's log copy and the plan kept in the
    handoff's metadata (vmrun.measured.host.finish_stage)."""
    if options.tpm_snapshot is None or result.outcome != "exit_boot_services":
        return None
    from vmrun.measured import host
    return host.finish_stage(result, options.tpm_snapshot, crash=crash)


@cli.command()
@click.argument("payload", type=click.Path(path_type=pathlib.Path))
@_run_options
def run(payload, as_json, eventlog_out, pcrlock_out, **kw):
    """Run PAYLOAD to ExitBootServices and print a summary."""
    from vmrun.runner import run_payload

    result = run_payload(payload, _make_run_options(**kw))
    _write_eventlog(result, eventlog_out)
    _write_pcrlock(result, pcrlock_out)
    trace = kw["trace"]
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, default=str))
    else:
        _print_summary(result, trace)
    sys.exit(OUTCOME_EXIT_CODES.get(result.outcome, 1))


@cli.command()
@click.argument("payload", type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--output", type=click.Path(path_type=pathlib.Path), required=True,
              help="Where to write the handoff (ELF64 for kexec -l … -t elf-x86_64 --args-none).")
@click.option("--allow-stray-writes", is_flag=True, help="Stage even if the payload wrote memory it did not own.")
@_run_options
def stage(payload, output, allow_stray_writes, as_json, eventlog_out, pcrlock_out, **kw):
    """Run PAYLOAD to ExitBootServices and write the kexec handoff to OUTPUT."""
    from vmrun.handoff.stage import StageError, stage as do_stage
    from vmrun.runner import run_payload

    trace = kw["trace"]
    options = _make_run_options(**kw, dirty_log=True)
    result = run_payload(payload, options, keep=True)
    try:
        plan = _measured_plan(result, options, crash=False)
        _write_eventlog(result, eventlog_out)
        _write_pcrlock(result, pcrlock_out, plan)
        if result.outcome != "exit_boot_services":
            if as_json:
                click.echo(json.dumps({"run": result.to_json(), "stage": None}, indent=2, default=str))
            else:
                _print_summary(result, trace)
            sys.exit(OUTCOME_EXIT_CODES.get(result.outcome, 1))
        try:
            report = do_stage(result, output, allow_stray_writes=allow_stray_writes,
                              extra_metadata={"measured": plan} if plan else None)
        except StageError as e:
            if as_json:
                click.echo(json.dumps({"run": result.to_json(), "stage": {"error": str(e), **e.details}},
                                      indent=2, default=str))
            raise
        if as_json:
            click.echo(json.dumps({"run": result.to_json(), "stage": {
                "path": report.path, "entry": hex(report.entry), "bytes": report.size,
                "segments": report.segments, "stray_writes": report.stray_writes,
                "metadata": report.metadata}}, indent=2, default=str))
        else:
            _print_summary(result, trace)
            click.echo(f"staged:   {report.path} ({report.size} bytes, {len(report.segments)} segments, "
                       f"entry {report.entry:#x})")
            click.echo(f"          load with: vmrun load {report.path}   "
                       f"(or kexec -l {report.path} -t elf-x86_64 --args-none)")
            _print_measured(plan)
    finally:
        result.machine.close()


def _parse_address(opt: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise BadOptionError(f"{opt} {text!r}: expected an address such as 0xf5270") from None


def _given(names) -> list[str]:
    """The options among ``names`` the user set on the command line."""
    from click.core import ParameterSource
    ctx = click.get_current_context()
    return [n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]


@cli.command()
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("--crash", is_flag=True, help="Load into the crash (kdump) slot, like kexec -p.")
@click.option("--kdump-append", default=None, metavar="TEXT",
              help="With --crash and a payload: what to add to the kdump kernel's command line "
                   "(default: see README, kdump).")
@click.option("--allow-stray-writes", is_flag=True, help="Load even if the payload wrote memory it did not own.")
@_run_options
def load(file, crash, kdump_append, allow_stray_writes, as_json, eventlog_out, pcrlock_out, **kw):
    """Load FILE with kexec_load(2) (needs root): a PE payload (run for this machine and staged
    in memory, like kexec -l) or a handoff written by `vmrun stage`."""
    from vmrun import loader

    slot = "the crash kernel" if crash else "the kexec image"
    if loader.is_staged_file(file):
        misplaced = _given(["kdump_append", "allow_stray_writes", "as_json", "eventlog_out", "pcrlock_out", *kw])
        if misplaced:
            raise BadOptionError(f"{file} is a staged handoff: --{misplaced[0].replace('_', '-')} only applies "
                                 "when loading a PE payload")
        meta = loader.load_file(file, crash=crash)
        click.echo(f"loaded {file} ({meta.get('payload', {}).get('name', '?')}, cmdline {meta.get('cmdline', '')!r}) "
                   f"as {slot}" + ("" if crash else "; `vmrun exec` boots it"))
        return
    if kw.get("memmap") is not None:
        raise BadOptionError("--memmap: `vmrun load` runs the payload for this machine; use `vmrun stage "
                             "--memmap` to stage for another one")
    if kdump_append is not None and not crash:
        raise BadOptionError("--kdump-append only applies with --crash")
    from vmrun import kexec
    from vmrun.formats import pe as PE
    PE.load_file(file)  # a bad file is named as such first
    kexec.precheck()    # then what would make kexec_load fail for sure: before the payload runs
    from vmrun.handoff.stage import build
    from vmrun.runner import run_payload

    trace = kw["trace"]
    kdump = None
    options = _make_run_options(**kw, dirty_log=True)
    if crash:
        from vmrun import kdump as K
        kdump = K.CrashLoad(file, options, append=kdump_append)
        options = kdump.options
    result = run_payload(file, options, keep=True)
    try:
        plan = _measured_plan(result, options, crash=crash)
        _write_eventlog(result, eventlog_out)
        _write_pcrlock(result, pcrlock_out, plan)
        if result.outcome != "exit_boot_services":
            if kdump is not None:
                kdump.check_outcome(result)
            if as_json:
                click.echo(json.dumps({"run": result.to_json(), "load": None}, indent=2, default=str))
            else:
                _print_summary(result, trace)
            sys.exit(OUTCOME_EXIT_CODES.get(result.outcome, 1))
        extra_meta, extra_segments, not_staged = kdump.finish(result) if kdump is not None else ({}, [], [])
        if plan:
            extra_meta = {**extra_meta, "measured": plan}
        handoff = build(result, allow_stray_writes=allow_stray_writes, extra_metadata=extra_meta,
                        extra_segments=extra_segments, not_staged=not_staged)
        meta = loader.load_handoff(handoff, crash=crash, source={
            "kind": "payload", "path": str(file.resolve()), "options": _options_record(kw, kdump_append)})
        if as_json:
            click.echo(json.dumps({"run": result.to_json(), "load": {
                "slot": "crash" if crash else "normal", "entry": hex(handoff.entry),
                "segments": meta["segments"], "stray_writes": handoff.stray_writes, "metadata": meta}},
                indent=2, default=str))
        else:
            _print_summary(result, trace)
            click.echo(f"loaded:   {file.name} as {slot}: {len(handoff.segments)} segments, entry "
                       f"{handoff.entry:#x}" + ("" if crash else "; `vmrun exec` boots it"))
            if kdump is not None:
                click.echo(f"kdump:    cmdline {meta['kdump']['cmdline']!r}")
            _print_measured(plan)
    finally:
        result.machine.close()


def _options_record(kw: dict, kdump_append) -> dict:
    """The run options a load used, for `vmrun status` (paths as given, defaults left out)."""
    given = _given(list(kw))
    rec = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in kw.items() if k in given}
    if kdump_append is not None:
        rec["kdump_append"] = kdump_append
    return rec


@cli.command()
@click.option("--crash", is_flag=True, help="Unload the crash (kdump) kernel.")
def unload(crash):
    """Unload the kexec image (or, with --crash, the crash kernel)."""
    from vmrun import loader
    loader.unload(crash=crash)
    click.echo("unloaded the crash kernel" if crash else "unloaded")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(as_json):
    """What is loaded in the normal and the crash slot, from which payload, since when."""
    from vmrun import loader
    st = loader.status()
    click.echo(json.dumps(st, indent=2, default=str) if as_json else loader.format_status(st), nl=as_json)


@cli.command()
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def inspect(file, as_json):
    """Show the anatomy of a PE/UKI: sections with sizes and hashes, .osrel/.uname/.cmdline/.sbat,
    signature, embedded kernel version."""
    from vmrun.inspect import format_text, inspect_file
    info = inspect_file(file)
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info), nl=as_json)


@cli.command()
@click.argument("logfile", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Events and replayed PCRs as JSON.")
def eventlog(logfile, as_json):
    """Pretty-print a TCG event log (crypto-agile binary format) and the PCRs it replays to."""
    from hostsvc import tpm as T
    try:
        data = logfile.read_bytes()
    except OSError as e:
        raise InputFileError(f"cannot read {logfile}: {e.strerror}") from None
    try:
        events = T.parse(data)
    except (ValueError, IndexError, KeyError) as e:
        raise MalformedImageError(f"{logfile} is not a TCG event log: {e}") from None
    if as_json:
        banks = tuple(dict.fromkeys(alg for e in events if not e.sha1_format for alg in e.digests)) or ("sha256",)
        pcrs = T.replay(events, banks)
        click.echo(json.dumps({
            "events": [{"pcr": e.pcr, "type": e.type_name, "digests": {a: d.hex() for a, d in e.digests.items()},
                        "data": e.data.hex()} for e in events],
            "pcrs": {b: {str(i): v.hex() for i, v in vals.items()} for b, vals in pcrs.items()}}, indent=2))
    else:
        click.echo(T.format_log(events), nl=False)


def _print_measured(plan: dict | None) -> None:
    if not plan:
        return
    from vmrun.loader import SUMMARY_PCRS
    click.echo(f"measured: host TPM ({', '.join(plan['banks'])}); {len(plan['extends'])} extends planned after the "
               f"kexec boundary (PCR {plan['boundary']['pcr']}); "
               + ("the log copy is in the handoff" if plan["log_copy"] else "the payload handed on NO event log"))
    for s in plan["at_stage"]["unexplained"]:
        click.echo(f"          PCR {s['pcr']}: {s['reason']} (the log cannot replay it; marked in the log)")
    for bank, vals in plan["predicted"].items():
        shown = [(int(i), v) for i, v in vals.items() if int(i) in SUMMARY_PCRS]
        click.echo(f"          next kernel {bank}: " + ", ".join(f"{i}={v[:16]}…" for i, v in shown))


@cli.command(name="exec")
@click.option("--unmeasured", is_flag=True,
              help="Do not extend the TPM for a measured kexec: the next kernel's log says the kexec "
                   "was not measured (README \"Measured kexec\").")
def exec_(unmeasured):
    """Reboot into the loaded handoff now (like kexec -e); a measured kexec is finalized first."""
    from vmrun import kexec, loader
    if not unmeasured:
        report = loader.finalize_measured()
        if report:
            _print_finalized(report)
    kexec.execute()


def _print_finalized(report: dict, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"measured: extended {report['extended']} of {report['total']} events into the TPM; log "
               f"{report.get('log')}" + (f"; PCRs differing from the prediction: {', '.join(report['mismatch'])}"
                                         if report.get("mismatch") else ""), err=True)
    for s in report.get("unexplained", []):
        click.echo(f"          PCR {s['pcr']}: {s['reason']} (marked in the log)", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--if-kexec", "verb", default=None, metavar="VERB",
              help="Do nothing unless VERB is 'kexec' (systemd-shutdown passes its verb to its hooks).")
def finalize(as_json, verb):
    """Finish a measured kexec now: extend the TPM with the loaded payload's measurements and
    reload it with the final event log. `vmrun exec` does this itself; systemd's
    system-shutdown hook (scripts/install-units) runs it as the last step before a kexec."""
    from vmrun import loader
    if verb is not None and verb != "kexec":
        return
    report = loader.finalize_measured()
    if report is None:
        if as_json:
            click.echo("null")
        else:
            click.echo("nothing to finalize: no measured kexec is loaded", err=True)
        return
    _print_finalized(report, as_json)


cli.add_command(kexec_cli.kexec)  # `vmrun kexec`: the kexec-tools options (vmrun/kexec_cli.py)


@cli.command()
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="Listen here when not socket-activated (default /run/vmrun/io.vmrun.Manager).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Configuration file (default /etc/vmrun/vmrun.conf; missing: defaults).")
@click.option("--exit-idle", type=float, default=None, metavar="S",
              help="Exit after S seconds without clients or work (for socket activation).")
def daemon(socket_path, config_path, exit_idle):
    """Serve the Varlink interface io.vmrun.Manager (README: Running as a service)."""
    from vmrun.service.config import load_config
    from vmrun.service.daemon import run_daemon
    ctx = click.get_current_context().find_root()
    json_logs = True if ctx.params.get("json_logs") else None
    run_daemon(load_config(config_path), socket_path, exit_idle=exit_idle, json_logs=json_logs,
               verbose=ctx.params.get("verbose", 0))


@cli.command(name="kdump-arm")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="kdump configuration (default /etc/vmrun/kdump.conf).")
def kdump_arm(config_path):
    """Arm the crash kernel configured in /etc/vmrun/kdump.conf (vmrun-kdump.service)."""
    from vmrun.service.kdumpconf import arm
    sys.exit(arm(config_path))


def _print_summary(result, trace: bool) -> None:
    echo = click.echo
    if trace and result.trace:
        for t in result.trace:
            args = ", ".join(f"{k}={v}" for k, v in t["args"].items())
            mark = "" if t["implemented"] else "  [UNIMPLEMENTED]"
            note = f"  ({t['note']})" if t["note"] else ""
            echo(f"{t['seq']:5d} {'  ' * (t['depth'])}{t['service']}({args}) = {t['status']}{mark}{note}")
    p = result.payload
    echo(f"payload:  {p['name']} ({p['size']} bytes, sha256 {p['sha256'][:16]}…, "
         f"{'signed' if p['signed'] else 'unsigned'})")
    echo(f"outcome:  {result.outcome} after {result.seconds:.3f} s, {result.calls} service calls")
    if result.error:
        echo(f"error:    {result.error['message']}")
    if result.exit_status is not None:
        from hostsvc.status import name
        echo(f"status:   {name(result.exit_status)}")
    echo("services: " + ", ".join(f"{k}×{v}" for k, v in sorted(result.services.items())))
    if result.unimplemented:
        echo("unimplemented (answered EFI_UNSUPPORTED): "
             + ", ".join(f"{k}×{v}" for k, v in sorted(result.unimplemented.items())))
    if result.emulated:
        echo("emulated: " + ", ".join(f"{k}×{v}" for k, v in sorted(result.emulated.items())))
    if result.pcrs:
        for bank, vals in result.pcrs.items():
            used = {i: v for i, v in vals.items() if int(i) in (4, 5, 7, 9, 11, 12, 13)}
            echo(f"pcrs:     {bank}: " + ", ".join(f"{i}={v[:16]}…" for i, v in used.items()))
    lx = result.linux
    if lx:
        proto = f" (boot protocol {lx['protocol']})" if lx["protocol"] != "0.00" else ""
        echo(f"linux:    boot_params at {lx['boot_params']:#x}{proto}, cmdline {lx['cmdline']!r}")
        e820 = f"{len(lx['e820'])} e820 entries" if lx["e820"] else "e820 built by the stub after ExitBootServices"
        echo(f"          initrd {lx['ramdisk_size']} bytes at {lx['ramdisk_image']:#x}; {e820}; "
             f"EFI system table {'ok' if lx['efi_systab_matches'] else 'MISMATCH'}, "
             f"memory map {lx['efi_memmap_size']} bytes at {lx['efi_memmap']:#x}")
    if result.console.strip():
        echo("console:")
        for line in result.console.replace("\r", "").rstrip("\n").split("\n"):
            echo(f"  | {line}")


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vmrun: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except VmrunError as e:
        if debug:
            raise
        click.echo(f"vmrun: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("vmrun: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 — the promise is: no traceback unless --debug
        if debug:
            raise
        click.echo(f"vmrun: internal error: {type(e).__name__}: {e} (run with --debug for a traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
