"""hostsvc.tpm: PCR extends, the crypto-agile event log (checked with Debian's tpm2_eventlog),
replay, and the Authenticode PE digest (checked against the digest Debian signed and against
pesign and osslsigncode, which scripts/setup installs)."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import uuid

import pytest

from hostsvc import tpm as T

ALL4 = ("sha1", "sha256", "sha384", "sha512")


# --- independent references -------------------------------------------------------------------

def pcr_listing(text: str) -> dict[str, dict[int, bytes]]:
    """PCR values from tpm2-tools' YAML listing ("  sha256:" then "    4 : 0x…" lines), as
    tpm2_pcrread prints it and tpm2_eventlog's 'pcrs:' section."""
    pcrs: dict[str, dict[int, bytes]] = {}
    bank = None
    for line in text.splitlines():
        m = re.match(r"^\s*(\w+):\s*$", line)
        if m:
            bank = m.group(1)
            pcrs[bank] = {}
            continue
        m = re.match(r"^\s*(\d+)\s*:\s*0x([0-9a-fA-F]+)\s*$", line)
        if m and bank:
            pcrs[bank][int(m.group(1))] = bytes.fromhex(m.group(2))
    return pcrs


def tpm2_eventlog_pcrs(path) -> dict[str, dict[int, bytes]]:
    """PCR values replayed by tpm2-tools' tpm2_eventlog (YAML 'pcrs:' section)."""
    exe = shutil.which("tpm2_eventlog")
    if exe is None:
        pytest.fail("tpm2_eventlog is missing: apt-get install tpm2-tools", pytrace=False)
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "\npcrs:\n" in text, text[-2000:]
    return pcr_listing(text.split("\npcrs:\n", 1)[1]), text


def chain(alg: str, start: bytes, digests) -> bytes:
    """PCR extend by hand: v = H(v || d) for each d."""
    v = start
    for d in digests:
        v = hashlib.new(alg, v + d).digest()
    return v


def signed_sha256_digest(pe: bytes) -> bytes:
    """The image digest inside the Authenticode signature (SpcIndirectDataContent's DigestInfo:
    OID sha256, NULL, OCTET STRING of 32 bytes) — computed by Debian's signing tool."""
    pattern = bytes.fromhex("0609608648016503040201" "0500" "0420")
    i = pe.rfind(pattern)
    assert i > 0, "no sha256 DigestInfo in the certificate table"
    return pe[i + len(pattern):i + len(pattern) + 32]


# --- PCR banks --------------------------------------------------------------------------------

def test_extend_known_sequence_by_hand():
    banks = T.PcrBanks(ALL4)
    data = [b"one", b"two", b"\0\0\0\0"]
    for d in data:
        banks.extend(3, {a: hashlib.new(a, d).digest() for a in ALL4})
    for a in ALL4:
        size = hashlib.new(a).digest_size
        expect = bytes(size)
        for d in data:
            expect = hashlib.new(a, expect + hashlib.new(a, d).digest()).digest()
        assert banks.values()[a][3] == expect
        assert banks.values()[a][2] == bytes(size)
    # a well-known value: sha256 of a PCR that saw only one EV_SEPARATOR (0x00000000)
    b = T.PcrBanks()
    b.extend_data(6, b"\0\0\0\0")
    assert b.read(6).hex() == "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"


def test_pcr_reset_values_and_base():
    b = T.PcrBanks(("sha256",), base={"sha256": {4: b"\x11" * 32}})
    v = b.values()["sha256"]
    assert v[4] == b"\x11" * 32
    assert v[0] == bytes(32) and v[16] == bytes(32) and v[23] == bytes(32)
    assert all(v[i] == b"\xff" * 32 for i in range(17, 23))
    assert T.PcrBanks(locality=3).read(0) == bytes(31) + b"\x03"


@pytest.mark.parametrize("bad", [
    lambda b: b.extend(24, {"sha256": bytes(32)}),
    lambda b: b.extend(-1, {"sha256": bytes(32)}),
    lambda b: b.extend(0, {"sha256": bytes(20)}),
    lambda b: b.extend(0, {"sha1": bytes(20)}),
])
def test_extend_rejects_bad_input(bad):
    b = T.PcrBanks()
    with pytest.raises(ValueError):
        bad(b)
    assert b.read(0) == bytes(32)


def test_unknown_bank_rejected():
    with pytest.raises(ValueError):
        T.PcrBanks(("md5",))
    with pytest.raises(ValueError):
        T.PcrBanks(())


# --- the log ----------------------------------------------------------------------------------

def test_spec_id_event_layout():
    log = T.EventLog(("sha256", "sha1"))  # any order in, TPM_ALG_ID order out
    raw = log.to_bytes()
    # TCG_PCR_EVENT: PCRIndex 0, EV_NO_ACTION, 20 zero bytes, EventSize
    assert raw[:8] == b"\0\0\0\0\x03\0\0\0" and raw[8:28] == bytes(20)
    size = int.from_bytes(raw[28:32], "little")
    body = raw[32:]
    assert len(body) == size == 16 + 4 + 4 + 4 + 2 * 4 + 1
    assert body[:16] == b"Spec ID Event03\0"
    assert body[16:20] == bytes(4)                      # platformClass: client
    assert body[20:24] == bytes([0, 2, 0, 2])           # minor 0, major 2, errata 0, uintnSize 2
    assert body[24:28] == (2).to_bytes(4, "little")     # numberOfAlgorithms
    assert body[28:36] == bytes.fromhex("0400 1400 0b00 2000".replace(" ", ""))
    assert body[36] == 0                                # vendorInfoSize


def _sample_log(banks=ALL4, *, no_action=True):
    """A log with the event kinds a boot produces; returns (log, live PcrBanks).

    ``no_action=False`` leaves out the EV_NO_ACTION StartupLocality event: Debian's tpm2-tools
    5.4 wrongly extends EV_NO_ACTION events (fixed upstream in 9735dc33, after 5.4)."""
    log = T.EventLog(banks)
    pcrs = T.PcrBanks(banks)

    def add(pcr, etype, data, hashed=None):
        d = T.hash_all(data if hashed is None else hashed, log.banks)
        if etype != T.EV_NO_ACTION:
            pcrs.extend(pcr, d)
        else:
            d = {b: bytes(T.ALGS[b].size) for b in log.banks}
        log.append(pcr, etype, d, data)

    if no_action:
        add(0, T.EV_NO_ACTION, b"StartupLocality\0\x00")
    add(0, T.EV_S_CRTM_VERSION, "1.0\0".encode("utf-16-le"))
    vd = T.variable_data("SecureBoot", uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c"), b"\0")
    add(7, T.EV_EFI_VARIABLE_DRIVER_CONFIG, vd)
    add(7, T.EV_SEPARATOR, b"\0\0\0\0")
    add(4, T.EV_EFI_ACTION, T.CALLING_EFI_APPLICATION)
    for i in range(7):
        add(i, T.EV_SEPARATOR, b"\0\0\0\0")
    add(4, T.EV_EFI_BOOT_SERVICES_APPLICATION, T.image_load_event(0x7e000000, 0x800000, 0, b"\x7f\xff\x04\x00"),
        hashed=b"pretend PE")
    add(9, T.EV_EVENT_TAG, T.tagged_event(0x8F3B22ED, b"Linux initrd\0"), hashed=b"initrd bytes")
    add(11, T.EV_IPL, b".linux\0")
    add(23, T.EV_IPL, b"debug pcr")
    add(5, T.EV_EFI_ACTION, T.EXIT_BOOT_SERVICES_INVOCATION)
    add(5, T.EV_EFI_ACTION, T.EXIT_BOOT_SERVICES_SUCCEEDED)
    return log, pcrs


@pytest.mark.parametrize("banks", [("sha256",), ("sha1", "sha256"), ALL4])
def test_tpm2_eventlog_parses_and_replays_our_log(tmp_path, banks):
    log, pcrs = _sample_log(banks, no_action=False)
    path = tmp_path / "log.bin"
    path.write_bytes(log.to_bytes())
    theirs, text = tpm2_eventlog_pcrs(path)
    assert set(theirs) == set(banks)
    assert text.count("EventNum:") == len(log.events)
    ours = pcrs.values()
    for b in banks:
        assert theirs[b], b
        for i, v in theirs[b].items():
            assert v == ours[b][i], (b, i)
        assert set(theirs[b]) >= {0, 4, 5, 7, 9, 11}
    # our replay agrees with the live banks on every PCR
    assert T.replay(T.parse(log.to_bytes()), banks) == ours
    # the startup-locality event is not extended (PCR 0 starts at 0: locality 0)
    assert ours["sha256"][0] == chain("sha256", bytes(32), [
        hashlib.sha256("1.0\0".encode("utf-16-le")).digest(), hashlib.sha256(b"\0\0\0\0").digest()])


def test_tpm2_eventlog_rejects_a_corrupt_log(tmp_path):
    """The reference can fail: a digest count that disagrees with the Spec ID event."""
    log, _ = _sample_log(("sha256",))
    raw = bytearray(log.to_bytes())
    first = log.events[1].offset
    raw[first + 8:first + 12] = (7).to_bytes(4, "little")
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(raw))
    out = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    with pytest.raises(ValueError):
        T.parse(bytes(raw))


def test_parse_round_trip_and_padding():
    log, _ = _sample_log()
    raw = log.to_bytes()
    for tail in (b"", b"\xff" * 4096, bytes(64)):
        events = T.parse(raw + tail)
        assert [(e.pcr, e.event_type, e.digests, e.data) for e in events] == \
               [(e.pcr, e.event_type, e.digests, e.data) for e in log.events]
    again = T.EventLog.from_bytes(raw)
    assert again.to_bytes() == raw
    assert [e.offset for e in T.parse(raw)] == [e.offset for e in log.events]


@pytest.mark.parametrize("cut", [10, 40, -1, -20])
def test_parse_truncated(cut):
    log, _ = _sample_log(("sha256",))
    with pytest.raises(ValueError):
        T.parse(log.to_bytes()[:cut])


def test_no_action_is_logged_not_extended_and_sets_locality():
    log = T.EventLog()
    log.append(0, T.EV_NO_ACTION, {"sha256": bytes(32)}, b"StartupLocality\0\x03")
    d = hashlib.sha256(b"crtm").digest()
    log.append(0, T.EV_S_CRTM_VERSION, {"sha256": d}, b"crtm")
    log.append(1, T.EV_NO_ACTION, {"sha256": bytes(32)}, b"anything")
    v = T.replay(T.parse(log.to_bytes()))["sha256"]
    assert v[0] == hashlib.sha256(bytes(31) + b"\x03" + d).digest()
    assert v[1] == bytes(32)


def test_parse_requires_spec_id():
    raw = bytearray(T.EventLog().to_bytes())
    raw[32:48] = b"Spec ID Event02\0"
    with pytest.raises(ValueError):
        T.parse(bytes(raw))


def test_log_limit_truncates():
    log = T.EventLog(max_size=200)
    d = T.hash_all(b"x", log.banks)
    log.append(8, T.EV_IPL, d, b"a" * 50)
    with pytest.raises(T.EventLogFull):
        log.append(8, T.EV_IPL, d, b"b" * 200)
    assert log.truncated
    with pytest.raises(T.EventLogFull):  # stays truncated, like EDK2
        log.append(8, T.EV_IPL, d, b"")
    assert len(log.events) == 2


def test_append_needs_every_bank():
    log = T.EventLog(("sha1", "sha256"))
    with pytest.raises(ValueError):
        log.append(1, T.EV_IPL, {"sha256": bytes(32)}, b"")


def test_format_log_mentions_everything():
    log, pcrs = _sample_log(("sha256",))
    text = T.format_log(log.events)
    assert "Spec ID Event03" in text
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in text and "image at 0x7e000000" in text
    assert "'Exit Boot Services Invocation'" in text
    assert "variable SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c = 00" in text
    assert "tag 0x8f3b22ed" in text
    assert f"  5: {pcrs.read(5).hex()}" in text


# --- Authenticode -----------------------------------------------------------------------------

def test_authenticode_of_debian_kernel_equals_signed_digest(bookworm_kernel):
    pe = bookworm_kernel.read_bytes()
    ours = T.authenticode_digests(pe, ("sha256", "sha1"))
    assert ours["sha256"] == signed_sha256_digest(pe)
    assert ours["sha256"] != hashlib.sha256(pe).digest()


def _tool_digest(tool, path) -> bytes:
    if shutil.which(tool) is None:  # a reference tool: never skipped
        pytest.fail(f"{tool} is missing: apt-get install {tool} (scripts/setup installs it)",
                    pytrace=False)
    if tool == "pesign":
        out = subprocess.run(["pesign", "-h", "-d", "sha256", "-i", str(path)], capture_output=True,
                             text=True, timeout=120)
        m = re.search(r"hash:\s*([0-9a-f]{64})", out.stdout)
    else:
        out = subprocess.run(["osslsigncode", "verify", "-in", str(path)], capture_output=True,
                             text=True, timeout=120)
        m = re.search(r"Calculated message digest\s*:\s*([0-9A-F]{64})", out.stdout)
    assert m, out.stdout + out.stderr
    return bytes.fromhex(m.group(1))


@pytest.mark.parametrize("tool", ["pesign", "osslsigncode"])
def test_authenticode_of_debian_kernel_equals_tools(bookworm_kernel, tool):
    ours = T.authenticode_digests(bookworm_kernel.read_bytes())["sha256"]
    assert ours == _tool_digest(tool, bookworm_kernel)


def test_authenticode_of_systemd_stubs_equals_pesign(stub_252, stub_257):
    """Unsigned images with data after the last section (252 has gaps pesign warns about)."""
    for p in (stub_252, stub_257):
        assert T.authenticode_digests(p.read_bytes())["sha256"] == _tool_digest("pesign", p), p


def test_authenticode_synthetic_pe_by_hand():
    """A built PE hashed by hand from the PE/COFF rules: header minus CheckSum and the
    certificate directory entry, sections by file offset, then the tail minus the certificate."""
    from tests.unit.pebuilder import Sec, build_pe
    cert = b"\x30\x82" + bytes(100)
    b = build_pe(sections=[Sec(".text", b"\x90" * 700), Sec(".data", b"D" * 300)], certificate=cert)
    pe = bytearray(b.data)
    nt = struct.unpack_from("<I", pe, 0x3C)[0]
    opt = nt + 24
    checksum, certdir = opt + 64, opt + 112 + 4 * 8
    soh = struct.unpack_from("<I", pe, opt + 60)[0]
    cert_off, cert_size = struct.unpack_from("<II", pe, certdir)
    assert cert_size > 0 and cert_off + cert_size == len(pe)
    expect = hashlib.sha256(pe[:checksum] + pe[checksum + 4:certdir] + pe[certdir + 8:cert_off]).digest()
    assert T.authenticode_digests(bytes(pe))["sha256"] == expect
    # the excluded fields really are excluded; everything else counts
    pe2 = bytearray(pe)
    pe2[checksum:checksum + 4] = b"\xaa" * 4
    assert T.authenticode_digests(bytes(pe2))["sha256"] == expect
    pe2[soh] ^= 1
    assert T.authenticode_digests(bytes(pe2))["sha256"] != expect
    with pytest.raises(T.PeHashError):
        T.authenticode_digests(b"MZ" + bytes(100))
