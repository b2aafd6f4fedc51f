"""Measured kexec on this machine, with swtpm as the host TPM (no kexec here: the last step,
kexec_load, is where the segments are taken instead). A firmware log is made up and extended
into swtpm with tpm2_pcrextend; `vmrun stage --tpm=host` runs the bookworm kernel (its EFI stub
copies the event log) against it, then the finalize step extends swtpm and rewrites the log
copy in the handoff. The log the next kernel would read (the copy, then the final events table
past the stub's count) is replayed with tpm2_eventlog and compared with tpm2_pcrread's values.
Also: a TPM that refuses part-way, a reload that fails, and the CLI's errors."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest

from hostsvc import kexeclog as KL
from hostsvc import tpm as T
from vmrun import kexec
from vmrun.handoff import elf
from vmrun.measured import host
from vmrun.measured.hosttpm import HostTpm, PartialExtend
from tests.unit.test_hosttpm import swtpm, tcti  # noqa: F401 - fixtures
from tests.unit.test_tpm import pcr_listing, tpm2_eventlog_pcrs

pytestmark = [pytest.mark.payloads]

VMRUN = [sys.executable, "-m", "vmrun.cli"]
BANKS = ("sha1", "sha256", "sha384", "sha512")


def _extend_tool(tcti: str, pcr: int, digests: dict[str, bytes]) -> None:
    spec = f"{pcr}:" + ",".join(f"{b}={d.hex()}" for b, d in digests.items())
    subprocess.run(["tpm2_pcrextend", "-T", tcti, spec], check=True, capture_output=True, timeout=30)


def _pcrread(tcti: str) -> dict[str, dict[int, bytes]]:
    out = subprocess.run(["tpm2_pcrread", "-T", tcti, "+".join(f"{b}:all" for b in BANKS)], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return pcr_listing(out)


@pytest.fixture
def machine(tmp_path, tcti):  # noqa: F811
    """swtpm holding a made-up firmware log's extends, and that log; a userspace log with one
    record whose extend happened and one extend without a record (PCR 8)."""
    log = T.EventLog(BANKS)
    for pcr, data in [(0, b"crtm"), (7, b"secure boot off"), (4, b"Calling EFI Application from Boot Option")] + \
            [(i, b"\0\0\0\0") for i in range(8)]:
        d = {b: hashlib.new(b, data).digest() for b in BANKS}
        log.append(pcr, T.EV_SEPARATOR if data == b"\0\0\0\0" else T.EV_EFI_ACTION, d, data)
        _extend_tool(tcti, pcr, d)
    fw = tmp_path / "fw.log"
    fw.write_bytes(log.to_bytes())
    d15 = {b: hashlib.new(b, b"machine-id").digest() for b in BANKS}
    _extend_tool(tcti, 15, d15)
    user = tmp_path / "tpm2-measure.log"
    user.write_bytes(b"\x1e" + json.dumps({"pcr": 15, "digests": [{"hashAlg": b, "digest": d.hex()}
                                                                   for b, d in d15.items()]}).encode() + b"\n")
    _extend_tool(tcti, 8, {b: hashlib.new(b, b"unrecorded").digest() for b in BANKS})
    return tcti, fw, user


def _stage(machine, bookworm_kernel, tmp_path, *extra) -> tuple[dict, list, int]:
    tcti, fw, user = machine
    out = tmp_path / "staged.elf"
    r = subprocess.run([*VMRUN, "-q", "stage", str(bookworm_kernel), "-o", str(out), "--tpm", "host",
                        "--tpm-tcti", tcti, "--tpm-firmware-log", str(fw), "--tpm-userspace-log", str(user),
                        "--json", *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data, h = kexec.read_handoff(out)
    meta = json.loads(h.notes[elf.NOTE_METADATA])
    view = memoryview(data)
    segs = [elf.LoadSegment(p, view[o:o + f], m) for o, f, p, m in h.segments]
    return meta["measured"], segs, h.entry


def _next_kernel_log(plan: dict, segs) -> bytes:
    """The log copy, then the final events table's events past the stub's preboot count."""
    table = int(plan["log_copy"]["table"], 16)
    size, preboot = struct.unpack("<II", host.read_segments(segs, table, 8))
    copy = host.read_segments(segs, table + 9, size)
    fe = int(plan["final_events_table"], 16)
    _version, count = struct.unpack("<QQ", host.read_segments(segs, fe, 16))
    spec = T.parse(copy)[0]
    head = spec.to_bytes()
    finals = T.parse(head + host.read_segments(segs, fe + 16, 0x8000 - 16))[1:1 + count]
    return copy + b"".join(e.to_bytes() for e in finals[preboot:])


def test_finalize_extends_the_tpm_and_the_log_replays_to_it(machine, bookworm_kernel, tmp_path):
    tcti = machine[0]
    plan, segs, entry = _stage(machine, bookworm_kernel, tmp_path, "--pcrlock", str(tmp_path / "k.pcrlock"))
    assert plan["banks"] == list(BANKS) and plan["log_copy"], plan
    assert [u["pcr"] for u in plan["at_stage"]["unexplained"]] == [8]
    before = _pcrread(tcti)
    # staging extended nothing; the staged log says the events were not measured
    staged = T.parse(_next_kernel_log(plan, segs))
    nm = [KL.decode(e) for e in staged if (KL.decode(e) or {}).get("kind") == "not_measured"]
    assert nm == [{"kind": "not_measured", "reason": "not_finalized", "measured": 0, "total": len(plan["extends"])}]
    loaded = []
    report = host.finalize(plan, segs, entry, load=lambda e, s: loaded.append((e, s)),
                           tpm=HostTpm(tcti))
    assert report["extended"] == report["total"] == len(plan["extends"]) and not report["mismatch"]
    (e, new), = loaded
    assert e == entry
    after = _pcrread(tcti)
    assert after != before
    nxt = _next_kernel_log(plan, new)
    path = tmp_path / "next.log"
    path.write_bytes(nxt)
    replayed, text = tpm2_eventlog_pcrs(path)
    for b in BANKS:
        for i in range(24):
            if i != 8:
                assert replayed[b].get(i, T.initial_pcr(i, b)) == after[b][i], (b, i)
    events = T.parse(nxt)
    kinds = [KL.decode(e)["kind"] for e in events if KL.decode(e)]
    assert kinds == ["carried_record", "pcr_state", "boundary"], kinds
    assert KL.replay_with_markers(events, BANKS)["sha256"][8] == after["sha256"][8]
    # the prediction at stage time is what the TPM holds now, and the .pcrlock lists the extends
    for b in BANKS:
        assert {int(i): bytes.fromhex(v) for i, v in plan["predicted"][b].items()} == after[b]
    lock = json.loads((tmp_path / "k.pcrlock").read_text())
    assert [r["pcr"] for r in lock["records"]] == [x["pcr"] for x in plan["extends"]]


def test_a_tpm_refusing_part_way_is_reported_and_marked(machine, bookworm_kernel, tmp_path):
    tcti = machine[0]
    plan, segs, entry = _stage(machine, bookworm_kernel, tmp_path)
    n = len(plan["extends"])
    # PCR 17 cannot be extended at locality 0: the third extend fails
    plan["extends"].insert(2, {"pcr": 17, "type": "EV_EFI_ACTION",
                               "digests": {b: hashlib.new(b, b"x").hexdigest() for b in BANKS}})
    loaded = []
    with pytest.raises(PartialExtend) as ei:
        host.finalize(plan, segs, entry, load=lambda e, s: loaded.append(s), tpm=HostTpm(tcti))
    assert ei.value.done == 2 and ei.value.total == n + 1 and "TPM_RC_LOCALITY" in str(ei.value)
    assert ei.value.report["extended"] == 2
    nm = [KL.decode(e) for e in T.parse(_next_kernel_log(plan, loaded[0]))
          if (KL.decode(e) or {}).get("kind") == "not_measured"]
    assert nm == [{"kind": "not_measured", "reason": "partial", "measured": 2, "total": n + 1}]


def test_a_failed_reload_after_extending_is_an_error_with_the_report(machine, bookworm_kernel, tmp_path):
    plan, segs, entry = _stage(machine, bookworm_kernel, tmp_path)

    def refuse(e, s):
        raise kexec.KexecError("kexec_load refused: test")
    with pytest.raises(host.MeasuredError, match="extended with .* events, but loading") as ei:
        host.finalize(plan, segs, entry, load=refuse, tpm=HostTpm(machine[0]))
    assert ei.value.report["extended"] == len(plan["extends"])


@pytest.mark.parametrize("args,code,message", [
    (["--tpm", "host"], 15, "has no /dev/tpmrm0"),
    (["--tpm", "host", "--tpm-tcti", "swtpm:host=127.0.0.1,port=1"], 60, "cannot reach the TPM"),
    (["--tpm", "host", "--tpm-tcti", "x", "--pcr-banks", "sha1"], 15, "--pcr-banks is for the software TPM"),
    (["--tpm", "software", "--tpm-tcti", "x"], 15, "--tpm-tcti only applies with --tpm=host"),
    (["--no-tpm", "--tpm", "host"], 15, "--no-tpm contradicts"),
])
def test_cli_errors(args, code, message, bookworm_kernel):
    r = subprocess.run([*VMRUN, "run", str(bookworm_kernel), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == code and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_firmware_log_is_a_clear_error(tcti, bookworm_kernel, tmp_path):  # noqa: F811
    r = subprocess.run([*VMRUN, "run", str(bookworm_kernel), "--tpm", "host", "--tpm-tcti", tcti,
                        "--tpm-firmware-log", str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 65 and "no firmware event log" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_finalize_with_nothing_loaded_does_nothing(tmp_path):
    r = subprocess.run([*VMRUN, "finalize", "--if-kexec", "kexec"], capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "VMRUN_STATE_DIR": str(tmp_path)})
    assert r.returncode == 0 and "nothing to finalize" in r.stderr, r.stderr
    r = subprocess.run([*VMRUN, "finalize", "--if-kexec", "reboot"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_changes_after_finalize_are_marked_at_the_end_of_the_log(machine, bookworm_kernel, tmp_path):
    tcti = machine[0]
    plan, segs, entry = _stage(machine, bookworm_kernel, tmp_path)
    loaded = []
    report = host.finalize(plan, segs, entry, load=lambda e, s: loaded.append(s), tpm=HostTpm(tcti))
    # nothing changed since: a second finalize neither extends nor reloads
    again = host.late_changes(plan, report, loaded[-1], entry, load=lambda e, s: loaded.append(s), tpm=HostTpm(tcti))
    assert again["late"] == [] and len(loaded) == 1
    _extend_tool(tcti, 11, {b: hashlib.new(b, b"shutdown").digest() for b in BANKS})   # e.g. systemd's shutdown phase
    late = host.late_changes(plan, report, loaded[-1], entry, load=lambda e, s: loaded.append(s), tpm=HostTpm(tcti))
    assert [x["pcr"] for x in late["late"]] == [11] and len(loaded) == 2
    tpm = _pcrread(tcti)
    events = T.parse(_next_kernel_log(plan, loaded[-1]))
    last = KL.decode(events[-1])
    assert last["kind"] == "pcr_state" and last["pcr"] == 11 and last["reason"] == "after_finalize", last
    assert KL.replay_with_markers(events, BANKS)["sha256"][11] == tpm["sha256"][11]
    assert T.replay(events, BANKS)["sha256"][11] != tpm["sha256"][11]   # the plain replay cannot: hence the marker


def test_extends_the_log_lacks_are_marked(machine, bookworm_kernel, tmp_path):
    """An extend the next kernel's log will not show (EFI_TCG2_EXTEND_ONLY, a full log): the
    plan lists it as unlogged and the section says so on its PCR."""
    tcti = machine[0]
    plan, segs, entry = _stage(machine, bookworm_kernel, tmp_path)
    plan["extends"].append({"pcr": 16, "type": "EV_EFI_ACTION",
                            "digests": {b: hashlib.new(b, b"extend only").hexdigest() for b in BANKS}})
    plan["unlogged"] = [16]
    loaded = []
    host.finalize(plan, segs, entry, load=lambda e, s: loaded.append(s), tpm=HostTpm(tcti))
    marks = [KL.decode(e) for e in T.parse(_next_kernel_log(plan, loaded[0])) if KL.decode(e)]
    assert {"kind": "unlogged", "pcr": 16, "count": 1} in marks, marks


def test_loader_finalizes_once(machine, bookworm_kernel, tmp_path, monkeypatch):
    """`vmrun load STAGED` then finalize twice through vmrun.loader, with swtpm as the TPM and the
    state in a temporary folder; kexec_load(2) is not available on this machine, so its two
    calls are replaced by a recorder (the UEFI target tests run the real ones)."""
    from vmrun import loader
    tcti = machine[0]
    _stage(machine, bookworm_kernel, tmp_path)
    state = tmp_path / "state"
    monkeypatch.setenv("VMRUN_STATE_DIR", str(state))
    calls = []
    monkeypatch.setattr(kexec, "load_segments", lambda entry, segs, **kw: calls.append(len(segs)))
    monkeypatch.setattr(kexec, "loaded", lambda crash=False: True)
    loader.load_file(tmp_path / "staged.elf", crash=False)
    rec = json.loads((state / "normal.json").read_text())
    assert rec["handoff"]["path"] == str(state / "normal.handoff") and (state / "normal.handoff").stat().st_mode & 0o777 == 0o600
    before = _pcrread(tcti)
    report = loader.finalize_measured()
    assert report["extended"] == report["total"] > 0 and len(calls) == 2     # the load, then the reload
    after = _pcrread(tcti)
    assert after != before
    again = loader.finalize_measured()                 # nothing changed since: no extend, no reload
    assert again["late"] == [] and len(calls) == 2 and _pcrread(tcti) == after
    assert json.loads((state / "normal.json").read_text())["measured"]["state"] == "finalized"
    # a record left "extending" (a finalize that died mid-way) blocks any further extend
    rec = json.loads((state / "normal.json").read_text())
    rec["measured"]["state"] = "extending"
    (state / "normal.json").write_text(json.dumps(rec))
    with pytest.raises(host.MeasuredError, match="interrupted while extending"):
        loader.finalize_measured()
    assert _pcrread(tcti) == after
    loader.forget("normal")
    monkeypatch.setattr(kexec, "unload", lambda crash=False: None)
    loader.unload(crash=False)
    assert not (state / "normal.handoff").exists()
