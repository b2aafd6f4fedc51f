"""What changed the TPM's PCRs since boot, as far as the machine's logs can say.

The firmware log (``binary_bios_measurements``) explains the PCRs up to ExitBootServices of
this boot; userspace extends systemd made since are in its measurement log
(:mod:`vmrun.measured.userlog`). :func:`explain` replays the firmware log, then, PCR by PCR,
the userspace records in their order, and compares with what the TPM holds now:

- a PCR the firmware log alone explains carries no record;
- a PCR that a prefix of its records explains carries that prefix (a record written for an
  extend that then failed is left out, and reported);
- a PCR nothing explains (an extend without a record, a record missing a bank) carries all its
  usable records and then a PCR-state marker (:mod:`hostsvc.kexeclog`) with the value the log
  replays to and the TPM's value: the next kernel's log says so instead of disagreeing
  silently. PCR 10 belongs to IMA, whose measurement list is not a TCG firmware log and does
  not survive kexec_load; its marker gives the reason ``ima``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from hostsvc import kexeclog as K
from hostsvc import tpm as T
from vmrun.measured.userlog import Record

IMA_PCR = 10


@dataclass
class Explanation:
    banks: tuple[str, ...]
    carried: list[Record] = field(default_factory=list)     # in the userspace log's order
    states: list[K.PcrState] = field(default_factory=list)  # PCRs the log cannot explain
    ignored: list[tuple[Record, str]] = field(default_factory=list)

    def section_events(self) -> list[T.Event]:
        ev = [K.carried_record(r.pcr, r.digests, r.text, self.banks) for r in self.carried]
        ev += [K.pcr_state(s, self.banks) for s in self.states]
        return ev

    def to_json(self) -> dict:
        return {
            "carried": [{"pcr": r.pcr, "record": r.index, "what": r.describe()} for r in self.carried],
            "unexplained": [s.to_json() for s in self.states],
            "ignored": [{"record": r.index, "pcr": r.pcr, "why": why} for r, why in self.ignored],
        }


def explain(fw_events: Iterable[T.Event], records: list[Record], tpm: Mapping[str, Mapping[int, bytes]],
            banks: Iterable[str], pcrs: Iterable[int] = range(T.NUM_PCRS)) -> Explanation:
    banks = T.canonical_banks(banks)
    base = T.replay(list(fw_events), banks)
    out = Explanation(banks)
    by_pcr: dict[int, list[Record]] = {}
    for r in records:
        if r.error:
            out.ignored.append((r, r.error))
            continue
        missing = [b for b in banks if b not in r.digests]
        if missing:
            out.ignored.append((r, f"no digest for the TPM's bank(s) {', '.join(missing)}"))
            continue   # its PCR is then judged without it (unexplained if its extend happened)
        by_pcr.setdefault(r.pcr, []).append(r)
    carried: list[Record] = []
    for pcr in pcrs:
        recs = by_pcr.get(pcr, [])
        want = {b: bytes(tpm[b][pcr]) for b in banks}
        vals = {b: base[b][pcr] for b in banks}
        best = 0 if vals == want else None
        for k, r in enumerate(recs, 1):
            vals = {b: K.extend(vals[b], r.digests[b], b) for b in banks}
            if vals == want:
                best = k
        if best is not None:
            carried += recs[:best]
            out.ignored += [(r, "its extend is not in the TPM (the PCR matches without it)") for r in recs[best:]]
            continue
        carried += recs
        out.states.append(K.PcrState(pcr, K.IMA if pcr == IMA_PCR else K.UNEXPLAINED, vals, want))
    out.carried = sorted(carried, key=lambda r: r.index)
    out.ignored.sort(key=lambda x: x[0].index)
    return out
