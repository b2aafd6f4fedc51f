"""The machine's real TPM 2.0, driven through tpm2-tools run as subprocesses.

Every operation runs one tool (``tpm2_getcap``, ``tpm2_pcrread``, ``tpm2_pcrextend``) with
``-T TCTI``: ``device:/dev/tpmrm0`` (the kernel's resource manager) on a real machine,
``swtpm:host=…,port=…`` for a software TPM. Failures never surface as tracebacks: the tools'
stderr is mapped to a :class:`TpmError` subclass whose message says what was attempted, at
which TCTI, and why (a decoded TPM response code such as ``TPM_RC_LOCALITY (0x907)``, a TCTI
that cannot be opened, a busy device, a missing tool, a TPM that did not answer in time).

Bank names are those of :data:`hostsvc.tpm.ALGS` (``sha1``, ``sha256``, ``sha384``,
``sha512``), always in TPM_ALG_ID order. A PCR extend passes a digest for every active bank in
one TPM2_PCR_Extend, so no bank is ever left behind; :meth:`HostTpm.extend_events` reports
how far a sequence got (:class:`PartialExtend`) so a half-extended state is never silent.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Callable, Iterable, Mapping, Sequence

import structlog

from hostsvc.tpm import ALGS, NUM_PCRS
from vmrun.errors import VmrunError

log = structlog.get_logger("vmrun.hosttpm")

TPMRM = "/dev/tpmrm0"
TCTI_ENV = "VMRUN_TPM_TCTI"
TOOLS_PACKAGE = "tpm2-tools"


# --- errors -----------------------------------------------------------------------------------

class TpmError(VmrunError):
    """The TPM could not be reached, or refused a command."""
    exit_code = 60
    kind = "tpm"

    @property
    def rc(self) -> int | None:
        """The TPM/TSS response code behind the failure, if there was one."""
        return self.details.get("rc")


class TpmBusy(TpmError):
    """The TPM device is held by another process, or the TPM asked to be asked again later
    (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_NV_RATE)."""
    exit_code = 61
    kind = "tpm_busy"


class TpmLockout(TpmError):
    """The TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT)."""
    exit_code = 62
    kind = "tpm_lockout"


class TpmBankMismatch(TpmError):
    """A PCR bank was asked for (or left out) that does not match the TPM's active banks."""
    exit_code = 63
    kind = "tpm_bank"


class PartialExtend(TpmError):
    """A sequence of extends stopped part-way: ``done`` of ``total`` events are in the PCRs."""
    exit_code = 64
    kind = "tpm_partial_extend"

    def __init__(self, done: int, total: int, cause: TpmError, pcr: int | None = None):
        where = f"PCR {pcr} (event {done + 1})" if pcr is not None else f"event {done + 1}"
        super().__init__(f"extended {done} of {total} events; {where} failed: {cause}",
                         done=done, total=total, pcr=pcr, cause_kind=cause.kind)
        self.done = done
        self.total = total
        self.cause = cause
        self.pcr = pcr


# --- response codes -----------------------------------------------------------------------------

_RC_VER1 = 0x100
_RC_FMT1 = 0x080
_RC_WARN = 0x900

# format-zero codes (TPM 2.0 Part 2 §6.6.3): value → (name, what it means)
_RC_FMT0: dict[int, tuple[str, str]] = {
    0x000: ("TPM_RC_SUCCESS", "success"),
    0x100: ("TPM_RC_INITIALIZE", "the TPM has not been started (TPM2_Startup missing)"),
    0x101: ("TPM_RC_FAILURE", "the TPM is in failure mode"),
    0x103: ("TPM_RC_SEQUENCE", "improper use of a sequence handle"),
    0x120: ("TPM_RC_DISABLED", "the command is disabled"),
    0x121: ("TPM_RC_EXCLUSIVE", "the command failed because an audit sequence is required"),
    0x124: ("TPM_RC_AUTH_TYPE", "authorization handle is not correct for the command"),
    0x125: ("TPM_RC_AUTH_MISSING", "the command requires an authorization session"),
    0x126: ("TPM_RC_POLICY", "policy failure in math operation or an invalid authPolicy"),
    0x127: ("TPM_RC_PCR", "PCR check fail"),
    0x128: ("TPM_RC_PCR_CHANGED", "PCR have changed since checked"),
    0x12D: ("TPM_RC_UPGRADE", "the TPM is in field upgrade mode"),
    0x12E: ("TPM_RC_TOO_MANY_CONTEXTS", "context ID counter is at maximum"),
    0x12F: ("TPM_RC_AUTH_UNAVAILABLE", "authValue or authPolicy is not available"),
    0x130: ("TPM_RC_REBOOT", "a _TPM_Init and Startup(CLEAR) is required"),
    0x131: ("TPM_RC_UNBALANCED", "unbalanced hash algorithm strengths"),
    0x142: ("TPM_RC_COMMAND_SIZE", "command size inconsistent with the command"),
    0x143: ("TPM_RC_COMMAND_CODE", "command code not supported"),
    0x144: ("TPM_RC_AUTHSIZE", "authorization size out of range"),
    0x145: ("TPM_RC_AUTH_CONTEXT", "the command does not allow authorizations"),
    0x146: ("TPM_RC_NV_RANGE", "NV offset + size is out of range"),
    0x147: ("TPM_RC_NV_SIZE", "requested allocation size is larger than allowed"),
    0x148: ("TPM_RC_NV_LOCKED", "NV access locked"),
    0x149: ("TPM_RC_NV_AUTHORIZATION", "NV access authorization fails"),
    0x14A: ("TPM_RC_NV_UNINITIALIZED", "an NV index is used before being initialized"),
    0x14B: ("TPM_RC_NV_SPACE", "insufficient space for NV allocation"),
    0x14C: ("TPM_RC_NV_DEFINED", "NV index or persistent object already defined"),
    0x150: ("TPM_RC_BAD_CONTEXT", "context in TPM2_ContextLoad() is not valid"),
    0x153: ("TPM_RC_NEEDS_TEST", "the TPM needs a self-test first"),
    0x154: ("TPM_RC_NO_RESULT", "the command could not complete"),
    0x901: ("TPM_RC_CONTEXT_GAP", "gap for context ID is too large"),
    0x902: ("TPM_RC_OBJECT_MEMORY", "out of memory for object contexts"),
    0x903: ("TPM_RC_SESSION_MEMORY", "out of memory for session contexts"),
    0x904: ("TPM_RC_MEMORY", "out of shared object/session memory"),
    0x905: ("TPM_RC_SESSION_HANDLES", "out of session handles"),
    0x906: ("TPM_RC_OBJECT_HANDLES", "out of object handles"),
    0x907: ("TPM_RC_LOCALITY", "the command is not allowed at the current locality"),
    0x908: ("TPM_RC_YIELDED", "the TPM suspended the operation; try again"),
    0x909: ("TPM_RC_CANCELED", "the command was canceled"),
    0x90A: ("TPM_RC_TESTING", "the TPM is running self-tests"),
    0x920: ("TPM_RC_NV_RATE", "the TPM is rate-limiting NV writes; try again later"),
    0x921: ("TPM_RC_LOCKOUT", "the TPM is in dictionary-attack lockout"),
    0x922: ("TPM_RC_RETRY", "the TPM was not able to start the command; try again"),
    0x923: ("TPM_RC_NV_UNAVAILABLE", "the command may require writing of NV and NV is not "
                                     "accessible"),
}

# format-one codes: the error number (with RC_FMT1), then which handle/parameter/session
_RC_FMT1_NAMES: dict[int, tuple[str, str]] = {
    0x081: ("TPM_RC_ASYMMETRIC", "asymmetric algorithm not supported or not correct"),
    0x082: ("TPM_RC_ATTRIBUTES", "inconsistent attributes"),
    0x083: ("TPM_RC_HASH", "hash algorithm not supported or not appropriate"),
    0x084: ("TPM_RC_VALUE", "value is out of range or is not correct for the context"),
    0x085: ("TPM_RC_HIERARCHY", "hierarchy is not enabled or is not correct for the use"),
    0x087: ("TPM_RC_KEY_SIZE", "key size is not supported"),
    0x088: ("TPM_RC_MGF", "mask generation function not supported"),
    0x089: ("TPM_RC_MODE", "mode of operation not supported"),
    0x08A: ("TPM_RC_TYPE", "the type of the value is not appropriate for the use"),
    0x08B: ("TPM_RC_HANDLE", "the handle is not correct for the use"),
    0x08C: ("TPM_RC_KDF", "unsupported key derivation function"),
    0x08D: ("TPM_RC_RANGE", "value was out of allowed range"),
    0x08E: ("TPM_RC_AUTH_FAIL", "the authorization HMAC check failed and the DA counter "
                                "was incremented"),
    0x08F: ("TPM_RC_NONCE", "invalid nonce size or nonce value mismatch"),
    0x090: ("TPM_RC_PP", "authorization requires assertion of physical presence"),
    0x092: ("TPM_RC_SCHEME", "unsupported or incompatible scheme"),
    0x095: ("TPM_RC_SIZE", "structure is the wrong size"),
    0x096: ("TPM_RC_SYMMETRIC", "unsupported symmetric algorithm or key size"),
    0x097: ("TPM_RC_TAG", "incorrect structure tag"),
    0x098: ("TPM_RC_SELECTOR", "union selector is incorrect"),
    0x09A: ("TPM_RC_INSUFFICIENT", "the TPM was unable to unmarshal a value"),
    0x09B: ("TPM_RC_SIGNATURE", "the signature is not valid"),
    0x09C: ("TPM_RC_KEY", "key fields are not compatible with the selected use"),
    0x09D: ("TPM_RC_POLICY_FAIL", "a policy check failed"),
    0x09F: ("TPM_RC_INTEGRITY", "integrity check failed"),
    0x0A0: ("TPM_RC_TICKET", "invalid ticket"),
    0x0A1: ("TPM_RC_RESERVED_BITS", "reserved bits not set to zero as required"),
    0x0A2: ("TPM_RC_BAD_AUTH", "authorization failure without DA implications"),
    0x0A3: ("TPM_RC_EXPIRED", "the policy has expired"),
    0x0A4: ("TPM_RC_POLICY_CC", "the command code in the policy is not the command code "
                                "of the command"),
    0x0A5: ("TPM_RC_BINDING", "public and sensitive portions of an object are not "
                              "cryptographically bound"),
    0x0A6: ("TPM_RC_CURVE", "curve not supported"),
    0x0A7: ("TPM_RC_ECC_POINT", "point is not on the required curve"),
}

_BUSY_RCS = frozenset({0x908, 0x90A, 0x920, 0x922})   # YIELDED, TESTING, NV_RATE, RETRY
_LOCKOUT_RC = 0x921
_LOCALITY_RC = 0x907

# TSS2 layers (tss2_common.h): bits 16-23 of a TSS2_RC
_LAYERS = {0: "tpm", 6: "fapi", 7: "esapi", 8: "sys", 9: "mu", 10: "tcti", 11: "resmgr",
           12: "resmgr-tpm"}
_TSS_TPM_LAYERS = frozenset({0, 11, 12})   # layers whose low 16 bits are TPM response codes
_TSS_TCTI_LAYER = 10
_TSS_BASE_RC = {
    1: "general failure", 2: "not implemented", 3: "bad context", 4: "ABI mismatch",
    5: "bad reference", 6: "insufficient buffer", 7: "bad sequence", 8: "no connection",
    9: "try again", 10: "I/O failure", 11: "bad value", 12: "not permitted",
    13: "invalid sessions", 16: "bad size", 17: "malformed response",
    18: "insufficient context", 19: "insufficient response", 20: "incompatible TCTI",
    21: "not supported", 22: "bad TCTI structure", 23: "out of memory",
}
_TSS_TRY_AGAIN = 9


def rc_name(rc: int) -> str | None:
    """``TPM_RC_…`` for a TPM response code (without a TSS layer), or None if not in the
    table. Format-one codes name the error only (``TPM_RC_VALUE`` for 0x1C4)."""
    rc &= 0xFFFF
    if rc & _RC_FMT1:
        entry = _RC_FMT1_NAMES.get(_RC_FMT1 | (rc & 0x3F))
    else:
        entry = _RC_FMT0.get(rc)
    return entry[0] if entry else None


def _tpm_rc_base(rc: int) -> int:
    """The code to classify by: format-one codes lose their handle/parameter number."""
    rc &= 0xFFFF
    return _RC_FMT1 | (rc & 0x3F) if rc & _RC_FMT1 else rc


def describe_rc(rc: int) -> str:
    """One phrase for a TSS2/TPM response code, e.g. ``TPM_RC_LOCALITY (0x907): the command is
    not allowed at the current locality``. Codes missing from this module's table are
    described by ``tpm2_rc_decode`` when it is available."""
    layer = (rc >> 16) & 0xFF
    low = rc & 0xFFFF
    if layer in _TSS_TPM_LAYERS:
        if low & _RC_FMT1:
            entry = _RC_FMT1_NAMES.get(_RC_FMT1 | (low & 0x3F))
            n = (low >> 8) & 0xF
            if low & 0x40:
                where = f"parameter {n}"
            elif n & 0x8:
                where = f"session {n & 0x7}"
            else:
                where = f"handle {n}"
            if entry:
                return f"{entry[0]} ({rc:#x}): {entry[1]} ({where})"
        else:
            entry = _RC_FMT0.get(low)
            if entry:
                prefix = "" if layer == 0 else f"{_LAYERS[layer]} "
                return f"{prefix}{entry[0]} ({rc:#x}): {entry[1]}"
    elif layer in _LAYERS and low in _TSS_BASE_RC:
        return f"{_LAYERS[layer]} error {rc:#x}: {_TSS_BASE_RC[low]}"
    text = _tool_rc_decode(rc)
    return f"response code {rc:#x}: {text}" if text else f"response code {rc:#x}"


def _tool_rc_decode(rc: int) -> str | None:
    try:
        r = subprocess.run(["tpm2_rc_decode", f"{rc:#x}"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=5, env=_tool_env())
    except (OSError, subprocess.SubprocessError):
        return None
    text = r.stdout.strip()
    return text if r.returncode == 0 and text else None


# --- running the tools ---------------------------------------------------------------------------

def default_tcti() -> str | None:
    """``$VMRUN_TPM_TCTI`` if set, else ``device:/dev/tpmrm0`` if that device exists, else None."""
    env = os.environ.get(TCTI_ENV)
    if env:
        return env
    if os.path.exists(TPMRM):
        return f"device:{TPMRM}"
    return None


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"        # strerror() texts are matched below
    return env


_RE_TOOL_RC = re.compile(r"^ERROR: (\w+)\((0x[0-9A-Fa-f]+)\) - (.*)$", re.M)
_RE_ESYS_RC = re.compile(r"ErrorCode \((0x[0-9A-Fa-f]+)\)")
_RE_LOG_PREFIX = re.compile(r"^(?:ERROR|WARNING):\w+:\S+:\d+:\w+\(\) ")
_TCTI_LOAD_FAILED = ("Could not load tcti", "Failed to instantiate TCTI")
# tcti log lines that only say that loading failed, without the reason
_TCTI_GENERIC = ("Could not initialize TCTI", "Failed to instantiate TCTI",
                 "Could not load tcti", "tcti_from_file", "Tss2_TctiLdr")


def _clean(line: str) -> str:
    return _RE_LOG_PREFIX.sub("", line.strip()).removeprefix("ERROR: ").strip()


def _tcti_reason(stderr: str) -> str:
    """The most specific line of a TCTI failure ("Failed to open … : Device or resource busy")."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    specific = [ln for ln in lines if ":tcti:" in ln and not any(g in ln for g in _TCTI_GENERIC)]
    if specific:
        return _clean(specific[0])
    return "no TCTI of that name could be loaded" if lines else "no diagnostic from the tool"


def _last_error_line(stderr: str) -> str:
    lines = [_clean(ln) for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith("ERROR: Unable to run")]
    return lines[-1] if lines else "no diagnostic from the tool"


class HostTpm:
    """One TPM reached through a TCTI string; stateless apart from :attr:`unknown_banks`."""

    def __init__(self, tcti: str, *, timeout: float = 30.0):
        if not tcti:
            raise TpmError("no TPM TCTI given (no /dev/tpmrm0 on this machine; set "
                           f"${TCTI_ENV}, e.g. swtpm:host=127.0.0.1,port=2321)")
        self.tcti = tcti
        self.timeout = timeout
        self.unknown_banks: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"HostTpm({self.tcti!r})"

    # --- queries --------------------------------------------------------------------------------

    def active_banks(self) -> tuple[str, ...]:
        """The banks with PCRs allocated, in TPM_ALG_ID order. Banks this module has no hash
        for (``sm3_256``, …) are left out and listed in :attr:`unknown_banks`."""
        allocated = self._allocation()
        known = [b for b, pcrs in allocated.items() if pcrs and b in ALGS]
        self.unknown_banks = tuple(b for b, pcrs in allocated.items()
                                   if pcrs and b not in ALGS)
        return tuple(sorted(known, key=lambda b: ALGS[b].alg_id))

    def _allocation(self) -> dict[str, frozenset[int]]:
        out = self._run("tpm2_getcap", ["pcrs"], "list the PCR banks")
        bad = TpmError(f"cannot list the PCR banks of the TPM at {self.tcti}: unexpected "
                       f"output from tpm2_getcap pcrs: {out.strip()[:200]!r}", tcti=self.tcti)
        if "selected-pcrs:" not in out:
            raise bad
        banks: dict[str, frozenset[int]] = {}
        for m in re.finditer(r"^\s*-\s*([\w-]+)\s*:\s*\[([^\]]*)\]", out, re.M):
            items = m.group(2).replace(",", " ").split()
            if not all(x.isdigit() for x in items):
                raise bad
            banks[m.group(1).lower()] = frozenset(int(x) for x in items)
        return banks

    def manufacturer(self) -> int:
        """TPM2_PT_MANUFACTURER (four ASCII bytes as a big-endian integer: 0x49424D00 "IBM")."""
        out = self._run("tpm2_getcap", ["properties-fixed"], "read the TPM's fixed properties")
        m = re.search(r"^TPM2_PT_MANUFACTURER:\s*\n\s+raw:\s*(0x[0-9A-Fa-f]+|\d+)", out, re.M)
        if not m:
            raise TpmError(f"cannot read the manufacturer of the TPM at {self.tcti}: "
                           "tpm2_getcap properties-fixed printed no TPM2_PT_MANUFACTURER",
                           tcti=self.tcti)
        return int(m.group(1), 0)

    def read_pcrs(self, banks: Iterable[str] | None = None,
                  indices: Iterable[int] = range(NUM_PCRS)) -> dict[str, dict[int, bytes]]:
        """``{bank: {index: value}}`` for the given banks (default: all active ones) and PCR
        indices, read with one ``tpm2_pcrread``. A bank that is not active raises
        :class:`TpmBankMismatch`."""
        idx = sorted(set(_check_index(i) for i in indices))
        if not idx:
            raise ValueError("no PCR index to read")
        allocation = None
        if banks is None:
            wanted = self.active_banks()
            if not wanted:
                raise TpmBankMismatch(f"the TPM at {self.tcti} has no active PCR bank",
                                      tcti=self.tcti)
        else:
            names = _bank_names(banks)
            allocation = self._allocation()
            self.unknown_banks = tuple(b for b, p in allocation.items() if p and b not in ALGS)
            active = [b for b, p in allocation.items() if p and b in ALGS]
            missing = [b for b in names if b not in active]
            if missing:
                raise TpmBankMismatch(
                    f"cannot read PCR bank{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(missing)} of the TPM at {self.tcti}: not active (active: "
                    f"{', '.join(_sorted_banks(active)) or 'none'})",
                    tcti=self.tcti, missing=missing)
            wanted = _sorted_banks(names)
        spec = "+".join(f"{b}:{','.join(map(str, idx))}" for b in wanted)
        what = f"read PCRs {_ranges(idx)} of bank{'s' if len(wanted) > 1 else ''} " \
               f"{', '.join(wanted)}"
        out = self._run("tpm2_pcrread", [spec], what)
        values = self._parse_pcrread(out, what)
        result: dict[str, dict[int, bytes]] = {}
        for b in wanted:
            got = values.get(b, {})
            absent = [i for i in idx if i not in got]
            if absent:
                if allocation is None:
                    allocation = self._allocation()
                unallocated = [i for i in absent if i not in allocation.get(b, ())]
                if unallocated:
                    raise TpmBankMismatch(
                        f"cannot read PCR {_ranges(unallocated)} of bank {b} of the TPM at "
                        f"{self.tcti}: not allocated in that bank", tcti=self.tcti)
                raise TpmError(f"cannot {what} at {self.tcti}: tpm2_pcrread returned no "
                               f"value for {b} PCR {_ranges(absent)}", tcti=self.tcti)
            for i in idx:
                if len(got[i]) != ALGS[b].size:
                    raise TpmError(f"cannot {what} at {self.tcti}: {b} PCR {i} is "
                                   f"{len(got[i])} bytes, expected {ALGS[b].size}",
                                   tcti=self.tcti)
            result[b] = {i: got[i] for i in idx}
        return result

    def _parse_pcrread(self, out: str, what: str) -> dict[str, dict[int, bytes]]:
        values: dict[str, dict[int, bytes]] = {}
        bank = None
        for line in out.splitlines():
            if not line.strip():
                continue
            m = re.match(r"^\s*([\w-]+)\s*:\s*$", line)
            if m:
                bank = m.group(1).lower()
                values.setdefault(bank, {})
                continue
            m = re.match(r"^\s*(\d+)\s*:\s*0x((?:[0-9A-Fa-f]{2})*)\s*$", line)
            if m and bank is not None:
                values[bank][int(m.group(1))] = bytes.fromhex(m.group(2))
                continue
            raise TpmError(f"cannot {what} at {self.tcti}: unexpected line from tpm2_pcrread: "
                           f"{line.strip()[:120]!r}", tcti=self.tcti)
        return values

    # --- extends --------------------------------------------------------------------------------

    def extend(self, pcr: int, digests: Mapping[str, bytes]) -> None:
        """One TPM2_PCR_Extend of ``pcr`` with a digest for each active bank (exactly those:
        a missing or extra bank raises :class:`TpmBankMismatch` before anything is sent)."""
        self._extend(pcr, self._check_digests(pcr, digests, self.active_banks()))

    def extend_events(self, events: Sequence[tuple[int, Mapping[str, bytes]]], *,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Extend ``(pcr, digests)`` events in order, one TPM2_PCR_Extend each. All events are
        checked against the active banks before the first is sent. If one fails, raises
        :class:`PartialExtend` saying how many went in; ``progress(done, total)`` is called
        after each. Returns the number of events extended."""
        events = list(events)
        total = len(events)
        if not total:
            return 0
        active = self.active_banks()
        checked = [(pcr, self._check_digests(pcr, d, active, event=k + 1))
                   for k, (pcr, d) in enumerate(events)]
        for done, (pcr, digests) in enumerate(checked):
            try:
                self._extend(pcr, digests)
            except TpmError as e:
                log.debug("pcr_extend_stopped", tcti=self.tcti, done=done, total=total,
                          pcr=pcr, error=str(e))
                raise PartialExtend(done, total, e, pcr) from e
            if progress is not None:
                progress(done + 1, total)
        return total

    def _check_digests(self, pcr: int, digests: Mapping[str, bytes], active: Sequence[str],
                       event: int | None = None) -> list[tuple[str, bytes]]:
        _check_index(pcr)
        given = {}
        for name, value in digests.items():
            b = _bank_name(name)
            if b in given:
                raise ValueError(f"bank {b} given twice for PCR {pcr}")
            given[b] = value
        missing = [b for b in active if b not in given]
        extra = [b for b in given if b not in active]
        if missing or extra:
            ev = f" (event {event})" if event is not None else ""
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"not active: {', '.join(extra)}"] if extra else [])
            raise TpmBankMismatch(
                f"cannot extend PCR {pcr}{ev} at {self.tcti}: the digests must cover exactly "
                f"the active banks ({', '.join(active) or 'none'}); {'; '.join(parts)}",
                tcti=self.tcti, missing=missing, extra=extra)
        out = []
        for b in active:
            value = bytes(given[b])
            if len(value) != ALGS[b].size:
                raise ValueError(f"{b} digest for PCR {pcr} is {len(value)} bytes, "
                                 f"expected {ALGS[b].size}")
            out.append((b, value))
        return out

    def _extend(self, pcr: int, digests: list[tuple[str, bytes]]) -> None:
        spec = f"{pcr}:" + ",".join(f"{b}={v.hex()}" for b, v in digests)
        log.debug("pcr_extend", tcti=self.tcti, pcr=pcr,
                  digests={b: v.hex() for b, v in digests})
        self._run("tpm2_pcrextend", [spec], f"extend PCR {pcr}", pcr=pcr)

    # --- subprocess -----------------------------------------------------------------------------

    def _run(self, tool: str, args: list[str], what: str, *, pcr: int | None = None) -> str:
        cmd = [tool, "-T", self.tcti, *args]
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               errors="replace", timeout=self.timeout, env=_tool_env())
        except FileNotFoundError:
            raise TpmError(f"cannot {what}: {tool} is not installed (install the Debian "
                           f"package {TOOLS_PACKAGE})", tcti=self.tcti, tool=tool) from None
        except PermissionError as e:
            raise TpmError(f"cannot {what}: {tool} cannot be executed ({e.strerror}; it comes "
                           f"from the Debian package {TOOLS_PACKAGE})",
                           tcti=self.tcti, tool=tool) from None
        except subprocess.TimeoutExpired:
            raise TpmError(f"the TPM at {self.tcti} did not answer within {self.timeout:g} s "
                           f"while trying to {what} ({tool} was killed)",
                           tcti=self.tcti, tool=tool, timeout=self.timeout) from None
        if r.returncode == 0:
            return r.stdout
        raise self._error(tool, what, r.returncode, r.stderr, pcr=pcr)

    def _error(self, tool: str, what: str, status: int, stderr: str, *,
               pcr: int | None = None) -> TpmError:
        tcti = self.tcti
        details = dict(tcti=tcti, tool=tool, status=status)
        if "Device or resource busy" in stderr:
            hint = ("another process holds it; use device:/dev/tpmrm0, the kernel's resource "
                    "manager" if re.search(r"/dev/tpm\d", tcti) else "try again")
            return TpmBusy(f"the TPM at {tcti} is busy, cannot {what}: {_tcti_reason(stderr)} "
                           f"({hint})", **details)
        if any(s in stderr for s in _TCTI_LOAD_FAILED):
            reason = _tcti_reason(stderr)
            if "Permission denied" in reason and tcti.startswith("device:"):
                reason += " (vmrun needs root or membership of the tss group)"
            return TpmError(f"cannot reach the TPM at {tcti} to {what}: {reason}", **details)
        rc = None
        m = _RE_TOOL_RC.search(stderr)
        if m:
            rc = int(m.group(2), 16)
        else:
            m = _RE_ESYS_RC.search(stderr)
            if m:
                rc = int(m.group(1), 16)
        if rc is not None:
            details["rc"] = rc
            layer = (rc >> 16) & 0xFF
            text = describe_rc(rc)
            if layer == _TSS_TCTI_LAYER:
                cls = TpmBusy if rc & 0xFFFF == _TSS_TRY_AGAIN else TpmError
                return cls(f"cannot reach the TPM at {tcti} to {what}: {text}", **details)
            if layer in _TSS_TPM_LAYERS:
                base = _tpm_rc_base(rc)
                cls = (TpmLockout if base == _LOCKOUT_RC else
                       TpmBusy if base in _BUSY_RCS else TpmError)
                msg = f"the TPM at {tcti} refused to {what}: {text}"
                if base == _LOCALITY_RC and pcr is not None:
                    msg += (f" (PCR {pcr} cannot be extended at the locality this TCTI uses"
                            + ("; PCRs 17-22 belong to the dynamic root of trust)"
                               if 17 <= pcr <= 22 else ")"))
                return cls(msg, **details)
            cls = TpmBusy if rc & 0xFFFF == _TSS_TRY_AGAIN else TpmError
            return cls(f"cannot {what} at {tcti}: {text}", **details)
        return TpmError(f"cannot {what} at {tcti}: {tool} failed (exit status {status}): "
                        f"{_last_error_line(stderr)}", **details)


# --- helpers ------------------------------------------------------------------------------------

def _check_index(i) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise ValueError(f"PCR index must be an integer, got {i!r}")
    if not 0 <= i < NUM_PCRS:
        raise ValueError(f"PCR index {i} out of range 0-{NUM_PCRS - 1}")
    return i


def _bank_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "")


def _bank_names(banks: Iterable[str]) -> list[str]:
    if isinstance(banks, str):
        banks = [banks]
    out: list[str] = []
    for b in banks:
        b = _bank_name(b)
        if b not in out:
            out.append(b)
    if not out:
        raise ValueError("no PCR bank to read")
    return out


def _sorted_banks(banks: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(banks, key=lambda b: (ALGS[b].alg_id if b in ALGS else 1 << 16, b)))


def _ranges(indices: Iterable[int]) -> str:
    """``0-15,17`` for a set of PCR indices."""
    idx = sorted(set(indices))
    parts, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts)
