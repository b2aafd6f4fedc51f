"""vmrun.measured.hosttpm against a real swtpm, driven through the real tpm2-tools.

Each test gets a fresh swtpm (TCP server on port P, control channel on P+1, as the swtpm TCTI
expects) with its own state directory. PCR values are checked against hashlib computations
made here and against what ``tpm2_pcrread`` itself prints.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import structlog

from vmrun.errors import VmrunError
from vmrun.measured import hosttpm
from vmrun.measured.hosttpm import (HostTpm, PartialExtend, TpmBankMismatch, TpmBusy, TpmError,
                                    TpmLockout, default_tcti, describe_rc, rc_name)

# measured: a swtpm 0.7 TPM 2.0 started without swtpm_setup allocates every bank it implements
FRESH_BANKS = ("sha1", "sha256", "sha384", "sha512")
SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
IBM = 0x49424D00


# --- swtpm ----------------------------------------------------------------------------------

def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setsid()


def _port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 at the moment of asking."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of TCP ports")


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds the listening socket on 127.0.0.1:``port`` (another
    test's swtpm may have taken the port between the check above and swtpm's bind)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


class Swtpm:
    def __init__(self, state: Path):
        self.state = state
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        log = self.state / "swtpm.log"
        for _ in range(20):
            port = _port_pair()
            proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,port={port}", "--ctrl", f"type=tcp,port={port + 1}",
                 "--tpmstate", f"dir={self.state}", "--flags", "not-need-init,startup-clear",
                 "--log", f"file={log},level=1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                if _listens(proc.pid, port) and _listens(proc.pid, port + 1):
                    self.proc, self.port = proc, port
                    return
                time.sleep(0.005)
            _kill(proc)            # lost a port race (it exited) or never came up: again
        raise RuntimeError(f"swtpm did not start: {log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc)
            self.proc = None


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@pytest.fixture
def swtpm(tmp_path):
    s = Swtpm(tmp_path / "tpm")
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def tcti(swtpm) -> str:
    return swtpm.tcti


# --- independent helpers ------------------------------------------------------------------------

def tool_pcrread(tcti: str, bank: str, index: int) -> bytes:
    """PCR ``index`` of ``bank`` as printed by tpm2_pcrread run here."""
    r = subprocess.run(["tpm2_pcrread", "-T", tcti, f"{bank}:{index}"],
                       capture_output=True, text=True, timeout=10, check=True)
    m = re.search(rf"^\s*{bank}:\s*\n\s*{index}\s*:\s*0x([0-9A-Fa-f]+)\s*$", r.stdout, re.M)
    assert m, r.stdout
    return bytes.fromhex(m.group(1))


def digests(text: str, banks=FRESH_BANKS) -> dict[str, bytes]:
    return {b: hashlib.new(b, text.encode()).digest() for b in banks}


def extended(old: bytes, bank: str, digest: bytes) -> bytes:
    return hashlib.new(bank, old + digest).digest()


def zeros(bank: str) -> bytes:
    return bytes(SIZES[bank])


# --- banks, properties, reading -----------------------------------------------------------------

def test_fresh_swtpm_banks_and_manufacturer(tcti):
    t = HostTpm(tcti)
    assert t.active_banks() == FRESH_BANKS
    assert t.unknown_banks == ()
    assert t.manufacturer() == IBM


def test_read_pcrs_of_fresh_tpm(tcti):
    pcrs = HostTpm(tcti).read_pcrs()
    assert tuple(pcrs) == FRESH_BANKS
    for bank, values in pcrs.items():
        assert sorted(values) == list(range(24)), bank
        for i in range(16):
            assert values[i] == zeros(bank), (bank, i)
        for i in range(17, 23):
            assert values[i] == b"\xff" * SIZES[bank], (bank, i)
        assert values[23] == zeros(bank)


def test_read_pcrs_selection(tcti):
    pcrs = HostTpm(tcti).read_pcrs(["SHA256", "sha1"], indices=[17, 0])
    assert list(pcrs) == ["sha1", "sha256"]                      # TPM_ALG_ID order
    assert pcrs["sha256"] == {0: bytes(32), 17: b"\xff" * 32}
    assert pcrs["sha1"] == {0: bytes(20), 17: b"\xff" * 20}


# --- extending ----------------------------------------------------------------------------------

def test_extend_pcr4_matches_hashlib_and_tpm2_pcrread(tcti):
    t = HostTpm(tcti)
    d = digests("vmrun hosttpm test event")
    with structlog.testing.capture_logs() as logs:
        t.extend(4, d)
    after = t.read_pcrs()
    for bank in FRESH_BANKS:
        want = extended(zeros(bank), bank, d[bank])
        assert after[bank][4] == want, bank
        assert tool_pcrread(tcti, bank, 4) == want, bank
        assert after[bank][5] == zeros(bank)
    assert [(e["event"], e["pcr"]) for e in logs if e["event"] == "pcr_extend"] == \
        [("pcr_extend", 4)]
    assert logs[0]["log_level"] == "debug"

    d2 = digests("second")                                       # from a non-zero value
    t.extend(4, d2)
    for bank in FRESH_BANKS:
        assert tool_pcrread(tcti, bank, 4) == extended(after[bank][4], bank, d2[bank])


def test_extend_events_across_three_pcrs(tcti):
    t = HostTpm(tcti)
    events = [(4, digests("a")), (5, digests("b")), (7, digests("c")), (4, digests("d"))]
    seen = []
    assert t.extend_events(events, progress=lambda done, total: seen.append((done, total))) == 4
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    want = {b: {i: zeros(b) for i in (4, 5, 7)} for b in FRESH_BANKS}
    for pcr, d in events:
        for b in FRESH_BANKS:
            want[b][pcr] = extended(want[b][pcr], b, d[b])
    assert t.read_pcrs(indices=[4, 5, 7]) == want
    assert tool_pcrread(tcti, "sha256", 7) == want["sha256"][7]


# --- errors from the TPM ------------------------------------------------------------------------

def test_extend_pcr17_at_locality_0_is_refused(tcti):
    t = HostTpm(tcti)
    with pytest.raises(TpmError) as ei:
        t.extend(17, digests("drtm"))
    e = ei.value
    assert type(e) is TpmError and e.exit_code == 60 and e.kind == "tpm"
    assert e.rc == 0x907
    assert "TPM_RC_LOCALITY (0x907)" in str(e) and "locality" in str(e)
    assert "PCR 17" in str(e) and tcti in str(e)
    assert t.read_pcrs(indices=[17])["sha256"][17] == b"\xff" * 32


def test_extend_events_stops_with_partial_extend(tcti):
    t = HostTpm(tcti)
    events = [(4, digests("e1")), (5, digests("e2")), (17, digests("e3")),
              (4, digests("e4")), (6, digests("e5"))]
    seen = []
    with pytest.raises(PartialExtend) as ei:
        t.extend_events(events, progress=lambda done, total: seen.append(done))
    e = ei.value
    assert (e.done, e.total, e.pcr) == (2, 5, 17)
    assert isinstance(e, TpmError) and e.exit_code == 64 and e.kind == "tpm_partial_extend"
    assert type(e.cause) is TpmError and e.cause.rc == 0x907
    assert str(e).startswith("extended 2 of 5 events; PCR 17 (event 3) failed: ")
    assert "TPM_RC_LOCALITY" in str(e)
    assert seen == [1, 2]
    pcrs = t.read_pcrs(indices=[4, 5, 6, 17])
    for b in FRESH_BANKS:                                        # exactly the first two
        assert pcrs[b][4] == extended(zeros(b), b, events[0][1][b]), b
        assert pcrs[b][5] == extended(zeros(b), b, events[1][1][b]), b
        assert pcrs[b][6] == zeros(b), b
        assert pcrs[b][17] == b"\xff" * SIZES[b], b


def test_digests_missing_a_bank_extend_nothing(tcti):
    t = HostTpm(tcti)
    short = digests("x", FRESH_BANKS[:-1])
    with pytest.raises(TpmBankMismatch) as ei:
        t.extend(4, short)
    assert ei.value.exit_code == 63
    assert f"missing {FRESH_BANKS[-1]}" in str(ei.value)
    # within a sequence, the bad event is caught before the first one is sent
    with pytest.raises(TpmBankMismatch) as ei:
        t.extend_events([(4, digests("ok")), (5, short)])
    assert "event 2" in str(ei.value)
    with pytest.raises(TpmBankMismatch, match="not active: sm3_256"):
        t.extend(4, {**digests("x"), "sm3_256": bytes(32)})
    with pytest.raises(ValueError, match="sha256 digest for PCR 4 is 20 bytes"):
        t.extend(4, {**digests("x"), "sha256": bytes(20)})
    pcrs = t.read_pcrs(indices=[4, 5])
    assert all(v == zeros(b) for b in FRESH_BANKS for v in pcrs[b].values())


def test_bank_deactivated_by_pcrallocate(swtpm):
    t = HostTpm(swtpm.tcti)
    keep, drop = ("sha1", "sha256"), ("sha384", "sha512")
    spec = "+".join([f"{b}:all" for b in keep] + [f"{b}:none" for b in drop])
    subprocess.run(["tpm2_pcrallocate", "-T", swtpm.tcti, spec], check=True, timeout=10,
                   capture_output=True)
    assert t.active_banks() == FRESH_BANKS                       # takes effect at TPM reset
    subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{swtpm.port + 1}", "-i"], check=True,
                   timeout=10, capture_output=True)
    with pytest.raises(TpmError, match="TPM_RC_INITIALIZE") as ei:
        t.active_banks()                                         # reset, not started yet
    assert ei.value.rc == 0x100
    subprocess.run(["tpm2_startup", "-T", swtpm.tcti, "-c"], check=True, timeout=10,
                   capture_output=True)
    assert t.active_banks() == keep
    assert tuple(t.read_pcrs()) == keep
    with pytest.raises(TpmBankMismatch, match=r"sha512 .*not active \(active: sha1, sha256\)"):
        t.read_pcrs(["sha256", "sha512"])
    with pytest.raises(TpmBankMismatch, match="not active: sha384, sha512"):
        t.extend(4, digests("x"))
    t.extend(4, digests("x", keep))
    assert tool_pcrread(swtpm.tcti, "sha256", 4) == extended(bytes(32), "sha256",
                                                               digests("x")["sha256"])


def test_read_pcrs_of_a_bank_the_tpm_lacks(tcti):
    with pytest.raises(TpmBankMismatch, match="sm3_256"):
        HostTpm(tcti).read_pcrs(["sm3_256"])


# --- errors reaching the TPM --------------------------------------------------------------------

def test_unreachable_tcti(tmp_path):
    with socket.socket() as s:                                  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        t0 = time.monotonic()
        with pytest.raises(TpmError) as ei:
            HostTpm(tcti).active_banks()
    assert time.monotonic() - t0 < 5
    e = ei.value
    assert type(e) is TpmError
    assert f"cannot reach the TPM at {tcti}" in str(e) and "Connection refused" in str(e)
    with pytest.raises(TpmError, match="cannot reach the TPM at device:.*No such file"):
        HostTpm(f"device:{tmp_path / 'tpmrm9'}").read_pcrs()


def test_tpm_that_never_answers_is_killed_at_timeout():
    with socket.socket() as srv, socket.socket() as ctrl:      # accept nothing, answer nothing
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        try:
            ctrl.bind(("127.0.0.1", port + 1))
            ctrl.listen(4)
        except OSError:
            pass
        t0 = time.monotonic()
        with pytest.raises(TpmError, match=r"did not answer within 0\.5 s .*killed"):
            HostTpm(f"swtpm:host=127.0.0.1,port={port}", timeout=0.5).manufacturer()
        assert time.monotonic() - t0 < 5


def test_missing_tpm2_tools(tcti, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TpmError, match=r"tpm2_getcap is not installed .*package tpm2-tools"):
        HostTpm(tcti).active_banks()


def test_default_tcti(tmp_path, monkeypatch):
    monkeypatch.setenv("VMRUN_TPM_TCTI", "swtpm:host=127.0.0.1,port=2321")
    assert default_tcti() == "swtpm:host=127.0.0.1,port=2321"
    monkeypatch.delenv("VMRUN_TPM_TCTI")
    monkeypatch.setattr(hosttpm, "TPMRM", str(tmp_path / "tpmrm0"))
    assert default_tcti() is None
    (tmp_path / "tpmrm0").touch()
    assert default_tcti() == f"device:{tmp_path / 'tpmrm0'}"


# --- stderr → error classes (texts as tpm2-tools 5.4 prints them) -------------------------

_BUSY_DEVICE = "".join(line + " \n" for line in (
    "ERROR:tcti:src/tss2-tcti/tcti-device.c:452:Tss2_Tcti_Device_Init() Failed to open "
    "specified TCTI device file /dev/tpm0: Device or resource busy",
    "ERROR:tcti:src/tss2-tcti/tctildr-dl.c:154:tcti_from_file() Could not initialize TCTI "
    "file: device",
    "ERROR:tcti:src/tss2-tcti/tctildr.c:428:Tss2_TctiLdr_Initialize_Ex() Failed to "
    "instantiate TCTI",
    'ERROR: Could not load tcti, got: "device:/dev/tpm0"'))


def _tool_rc_stderr(rc: int) -> str:
    return (f"WARNING:esys:src/tss2-esys/api/Esys_PCR_Extend.c:291:Esys_PCR_Extend_Finish() "
            f"Received TPM Error \nERROR:esys:src/tss2-esys/api/Esys_PCR_Extend.c:100:"
            f"Esys_PCR_Extend() Esys Finish ErrorCode ({rc:#010x}) \n"
            f"ERROR: Esys_PCR_Extend({rc:#x}) - {describe_rc(rc)}\n"
            f"ERROR: Unable to run tpm2_pcrextend\n")


@pytest.mark.parametrize("stderr, cls, exit_code, text", [
    (_BUSY_DEVICE, TpmBusy, 61, "is busy, cannot extend PCR 4: Failed to open specified TCTI "
                                "device file /dev/tpm0: Device or resource busy (another "
                                "process holds it; use device:/dev/tpmrm0"),
    (_tool_rc_stderr(0x921), TpmLockout, 62, "refused to extend PCR 4: TPM_RC_LOCKOUT (0x921)"),
    (_tool_rc_stderr(0x922), TpmBusy, 61, "TPM_RC_RETRY (0x922)"),
    (_tool_rc_stderr(0x908), TpmBusy, 61, "TPM_RC_YIELDED (0x908)"),
    (_tool_rc_stderr(0x90A), TpmBusy, 61, "TPM_RC_TESTING (0x90a)"),
    (_tool_rc_stderr(0x920), TpmBusy, 61, "TPM_RC_NV_RATE (0x920)"),
    (_tool_rc_stderr(0x2C4), TpmError, 60, "TPM_RC_VALUE (0x2c4): value is out of range or is "
                                           "not correct for the context (parameter 2)"),
    (_tool_rc_stderr(0xA000A), TpmError, 60, "cannot reach the TPM at device:/dev/tpm0 to "
                                             "extend PCR 4: tcti error 0xa000a: I/O failure"),
    ("ERROR: something new\nERROR: Unable to run tpm2_pcrextend\n", TpmError, 60,
     "cannot extend PCR 4 at device:/dev/tpm0: tpm2_pcrextend failed (exit status 1): "
     "something new"),
])
def test_stderr_classification(stderr, cls, exit_code, text):
    e = HostTpm("device:/dev/tpm0")._error("tpm2_pcrextend", "extend PCR 4", 1, stderr, pcr=4)
    assert type(e) is cls and isinstance(e, VmrunError)
    assert e.exit_code == exit_code
    assert text in str(e), str(e)


def test_describe_rc():
    assert describe_rc(0x907) == ("TPM_RC_LOCALITY (0x907): the command is not allowed at the "
                                  "current locality")
    assert rc_name(0x921) == "TPM_RC_LOCKOUT" and rc_name(0x100) == "TPM_RC_INITIALIZE"
    assert rc_name(0x1C4) == rc_name(0x984) == "TPM_RC_VALUE"
    assert describe_rc(0x984).endswith("(session 1)")
    assert describe_rc(0x143) == "TPM_RC_COMMAND_CODE (0x143): command code not supported"
    # not in the module's table: tpm2_rc_decode supplies the text
    assert describe_rc(0x152) == ("response code 0x152: tpm:error(2.0): handle for parent is "
                                  "not a valid parent")
