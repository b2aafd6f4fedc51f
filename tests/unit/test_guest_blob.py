"""The committed guest blob is what guest/firmware.S builds to, and agrees with vmrun/vm/layout.py."""

import re
import subprocess
import sys

import iced_x86 as X

from vmrun.vm import cpu, layout as L

ROOT = cpu.GUEST_DIR.parent


def test_blob_rebuilds_identically():
    r = subprocess.run([sys.executable, "-m", "guest.build", "--check"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_constants_match_layout():
    src = (cpu.GUEST_DIR / "firmware.S").read_text()
    consts = {m[0]: int(m[1], 0) for m in re.findall(r"\.set\s+(\w+),\s*(0x[0-9a-fA-F]+|\d+)", src)}
    assert consts["HCALL_SVC"] == L.HCALL_SVC
    assert consts["HCALL_RET"] == L.HCALL_RET
    assert consts["PORT_EXC"] == L.PORT_EXC
    assert consts["NR_SVC_THUNKS"] == L.NR_SVC_THUNKS


def test_thunks_decode_as_documented():
    blob = cpu.load_blob()
    base = blob.symbols["svc_thunks"]
    assert blob.symbols["svc_thunks_end"] - base == L.SVC_THUNK_SIZE * L.NR_SVC_THUNKS
    assert len(blob.code) <= L.FW_BLOB_MAX
    for sid in (0, 1, 77, L.NR_SVC_THUNKS - 1):
        off = base + L.SVC_THUNK_SIZE * sid
        dec = X.Decoder(64, blob.code[off:off + L.SVC_THUNK_SIZE], ip=off)
        mov, store, ret = dec.decode(), dec.decode(), dec.decode()
        assert mov.mnemonic == X.Mnemonic.MOV and mov.immediate32 == sid
        assert store.mnemonic == X.Mnemonic.MOV and store.memory_displacement == L.HCALL_SVC
        assert ret.mnemonic == X.Mnemonic.RET


def test_exception_stubs_push_vector():
    blob = cpu.load_blob()
    for vec in range(32):
        off = blob.symbols["exc_stubs"] + 16 * vec
        dec = X.Decoder(64, blob.code[off:off + 16], ip=off)
        pushes = []
        while True:
            ins = dec.decode()
            if ins.mnemonic != X.Mnemonic.PUSH:
                assert ins.mnemonic == X.Mnemonic.JMP and ins.near_branch_target == blob.symbols["exc_common"]
                break
            pushes.append(ins.immediate32to64 if hasattr(ins, "immediate32to64") else ins.immediate8to64)
        has_error_code = vec in (8, 10, 11, 12, 13, 14, 17, 21, 29, 30)
        assert pushes[-1] == vec
        assert len(pushes) == (1 if has_error_code else 2)
