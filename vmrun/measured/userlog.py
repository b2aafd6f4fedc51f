"""systemd's userspace measurement log: ``/run/log/systemd/tpm2-measure.log``.

systemd (v254 and later; documented at systemd.io "TPM2 PCR Measurements Made by systemd")
appends one record to this file for every PCR extend it makes from userspace (systemd-pcrextend:
boot phases into PCR 11, machine id and file systems into PCR 15, …). The file is a JSON text
sequence (RFC 7464): each record starts with the RS character (0x1E) and ends with a newline,
and is a TCG CEL-JSON record without record number::

    {"pcr": 11, "digests": [{"hashAlg": "sha256", "digest": "…"}, …],
     "content_type": "systemd", "content": {"string": "enter-initrd", "eventType": "phase", …}}

Only ``pcr`` and ``digests`` matter for carrying a record into the next kernel's event log;
the record's own text goes along as the event's data. A record this module cannot read is kept
as :class:`Record` with ``error`` set (it cannot explain anything), never raised: the log is
written by other programs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from hostsvc import tpm as T

DEFAULT_PATH = "/run/log/systemd/tpm2-measure.log"
#: the most of the file read (a larger log is an error, not a memory risk)
MAX_LOG_BYTES = 16 << 20
#: the most records kept
MAX_RECORDS = 100_000
RS = b"\x1e"


class UserLogError(ValueError):
    """The file cannot be used at all (unreadable, too large)."""


@dataclass
class Record:
    index: int                      # position in the file, from 0
    pcr: int | None
    digests: dict[str, bytes] = field(default_factory=dict)   # bank name -> digest
    text: bytes = b""               # the record as written (without RS and the newline)
    error: str | None = None        # why this record cannot be used

    def describe(self) -> str:
        try:
            content = json.loads(self.text).get("content", {})
            if isinstance(content, dict):
                what = content.get("string") or content.get("eventType")
                if what:
                    return str(what)
        except (ValueError, AttributeError):
            pass
        return f"record {self.index}"


def parse(data: bytes) -> list[Record]:
    """Records of a JSON-SEQ measurement log (also accepts newline-separated JSON without RS)."""
    if len(data) > MAX_LOG_BYTES:
        raise UserLogError(f"{len(data)} bytes is more than the {MAX_LOG_BYTES >> 20} MiB read")
    chunks = data.split(RS) if RS in data else data.split(b"\n")
    out: list[Record] = []
    for chunk in chunks:
        text = chunk.strip(b"\n\r\t ")
        if not text:
            continue
        if len(out) >= MAX_RECORDS:
            raise UserLogError(f"more than {MAX_RECORDS} records")
        out.append(_record(len(out), text))
    return out


def _record(index: int, text: bytes) -> Record:
    try:
        obj = json.loads(text)
    except ValueError as e:
        return Record(index, None, text=text, error=f"not JSON ({getattr(e, 'msg', e)})")
    except RecursionError:
        return Record(index, None, text=text, error="not JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return Record(index, None, text=text, error="not a JSON object")
    pcr = obj.get("pcr")
    if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr <= T.MAX_PCR_INDEX:
        return Record(index, None, text=text, error=f"no PCR index 0-{T.MAX_PCR_INDEX} ({pcr!r})")
    digests: dict[str, bytes] = {}
    raw = obj.get("digests")
    if not isinstance(raw, list) or not raw:
        return Record(index, pcr, text=text, error="no digests")
    for d in raw:
        if not isinstance(d, dict):
            return Record(index, pcr, text=text, error="a digest entry is not an object")
        alg = str(d.get("hashAlg", "")).lower().replace("-", "")
        try:
            value = bytes.fromhex(str(d.get("digest", "")))
        except ValueError:
            return Record(index, pcr, text=text, error=f"{alg} digest is not hex")
        if alg not in T.ALGS:
            continue  # a bank vmrun does not know cannot be checked; others still can
        if len(value) != T.ALGS[alg].size:
            return Record(index, pcr, text=text, error=f"{alg} digest of {len(value)} bytes")
        digests[alg] = value
    if not digests:
        return Record(index, pcr, text=text, error="no digest in a known bank")
    return Record(index, pcr, digests, text)


def read(path: str | os.PathLike = DEFAULT_PATH) -> list[Record]:
    """The records of ``path``; an absent file is an empty log (systemd writes it only when it
    measures)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LOG_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserLogError(f"cannot read {path}: {e.strerror}") from None
    return parse(data)
