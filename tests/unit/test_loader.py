"""`vmrun load`'s up-front checks and `vmrun status`'s records (no kexec needed)."""

import json

import pytest

from vmrun import kexec, loader

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009efff : System RAM
000f0000-000fffff : System ROM
00100000-7fdeffff : System RAM
  2a000000-2affffff : Kernel code
  70000000-77ffffff : Crash kernel
7fdf0000-7fffffff : Reserved
"""


def test_precheck_names_a_kernel_without_kexec(tmp_path):
    with pytest.raises(kexec.KexecError, match="without kexec support .*kexec_loaded is missing"):
        kexec.precheck(sys_kernel=str(tmp_path), proc=str(tmp_path))


def test_precheck_names_the_sysctl(tmp_path):
    (tmp_path / "kexec_loaded").write_text("0\n")
    (tmp_path / "sys" / "kernel").mkdir(parents=True)
    (tmp_path / "sys" / "kernel" / "kexec_load_disabled").write_text("1\n")
    with pytest.raises(kexec.KexecError, match="kexec_load_disabled=1"):
        kexec.precheck(sys_kernel=str(tmp_path), proc=str(tmp_path))


def test_cap_sys_boot_is_read_from_capeff(tmp_path):
    st = tmp_path / "status"
    st.write_text("Name:\tx\nCapEff:\t0000000000400000\n")  # bit 22 = CAP_SYS_BOOT (capabilities(7))
    assert kexec._has_cap_sys_boot(str(st))
    st.write_text("Name:\tx\nCapEff:\t00000000003fffff\n")
    assert not kexec._has_cap_sys_boot(str(st))


def test_iomem_ram_digest_follows_top_level_system_ram_only():
    a = loader.iomem_ram_digest(IOMEM)
    assert a and a == loader.iomem_ram_digest(IOMEM.replace("2a000000-2affffff", "2b000000-2bffffff"))
    hotplugged = IOMEM + "100000000-17fffffff : System RAM\n"
    assert loader.iomem_ram_digest(hotplugged) != a
    # read without root, /proc/iomem shows zeros: no digest rather than a meaningless one
    assert loader.iomem_ram_digest(IOMEM.replace("00100000-7fdeffff", "00000000-00000000")
                                   .replace("00001000-0009efff", "00000000-00000000")) == ""


def test_record_is_kept_per_boot(tmp_path, monkeypatch):
    monkeypatch.setenv("VMRUN_STATE_DIR", str(tmp_path))
    meta = {"payload": {"name": "uki.efi", "sha256": "ab" * 32}, "cmdline": "quiet",
            "segments": [], "kdump": {"cmdline": "quiet elfcorehdr=0x1000@0x70000000"}}
    loader.record("crash", meta, {"kind": "payload", "path": "/boot/uki.efi"})
    rec = json.loads((tmp_path / "crash.json").read_text())
    assert rec["boot_id"] == loader.boot_id() and rec["source"]["path"] == "/boot/uki.efi"
    assert loader._recorded("crash")["payload"]["name"] == "uki.efi"
    rec["boot_id"] = "another-boot"
    (tmp_path / "crash.json").write_text(json.dumps(rec))
    assert loader._recorded("crash") is None  # a record from an earlier boot says nothing
    loader.forget("crash")
    assert not (tmp_path / "crash.json").exists()
