"""Boot loader entry discovery (vmrun.bootentry) on ESP trees built here: Type #1 snippets,
Type #2 UKIs (PE files with real .osrel/.linux sections from tests/unit/pebuilder.py), boot
counting, sorting, loader.conf and the Loader* EFI variables of an efivarfs folder."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest

from tests.unit.pebuilder import SCN_CODE, SCN_RDATA, Sec, build_pe
from vmrun import bootentry as B

SPEC_EXAMPLES = [("11", "11", 0), ("systemd-123", "systemd-123", 0), ("bar-123", "foo-123", -1),
                 ("123a", "123", 1), ("123.a", "123", 1), ("123.a", "123.b", -1), ("123a", "123.a", 1),
                 ("11α", "11β", 0), ("B", "a", -1), ("", "0", -1), ("0.", "0", 1), ("0.0", "0", 1),
                 ("0", "~", 1), ("", "~", 1), ("1_", "1", 0), ("_1", "1", 0), ("1_", "1.2", -1),
                 ("1_2_3", "1.3.3", 1), ("1+", "1", 0), ("+1", "1", 0), ("1+", "1.2", -1), ("1+2+3", "1.3.3", 1)]
SPEC_CHAIN = "122.1 123~rc1-1 123 123-a 123-a.1 123-1 123-1.1 123^post1 123.a-1 123.1-1 123a-1 124-1".split()


@pytest.mark.parametrize("a,b,want", SPEC_EXAMPLES)
def test_version_order_matches_the_specification_examples(a, b, want):
    assert B.verscmp(a, b) == want
    assert B.verscmp(b, a) == -want


def test_version_order_of_the_specification_chain():
    for (i, a), (j, b) in itertools.product(enumerate(SPEC_CHAIN), repeat=2):
        assert B.verscmp(a, b) == (i > j) - (i < j), (a, b)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_version_order_agrees_with_systemd_analyze():
    """systemd-analyze compare-versions (systemd ≥ 252) exits 0 (=), 11 (>) or 12 (<)."""
    words = ["6.1.0-18-amd64", "6.1.0-9-amd64", "6.12.1", "6.1~rc2", "6.1", "6.1a", "6.1.a", "6.1^p", "6.1-1",
             "debian-6.1", "Debian-6.1", "2", "10", "1.01", "1.1"]
    probe = subprocess.run(["systemd-analyze", "compare-versions", "1", "2"], capture_output=True)
    if probe.returncode not in (0, 11, 12):
        pytest.skip("this systemd-analyze has no compare-versions")
    for a, b in itertools.combinations(words, 2):
        rc = subprocess.run(["systemd-analyze", "compare-versions", a, b], capture_output=True).returncode
        assert B.verscmp(a, b) == {0: 0, 11: 1, 12: -1}[rc], (a, b)


@pytest.mark.parametrize("name,want", [
    ("foo.conf", ("foo.conf", None, None)),
    ("foo+3.conf", ("foo.conf", 3, None)),
    ("foo+3-1.conf", ("foo.conf", 3, 1)),
    ("foo+0-5.efi", ("foo.efi", 0, 5)),
    ("foo+03-00.EFI", ("foo.EFI", 3, 0)),
    ("foo+x.conf", ("foo+x.conf", None, None)),        # not a counter
    ("foo+3-.conf", ("foo+3-.conf", None, None)),
    ("a+1.b+2.conf", ("a+1.b.conf", 2, None)),         # the last '+' before the suffix
    ("noext", ("noext", None, None)),
])
def test_boot_counter_in_file_names(name, want):
    assert B.split_tries(name) == want


# --- building ESP trees --------------------------------------------------------------------------
def osrel(**kw) -> str:
    return "".join(f'{k}="{v}"\n' for k, v in kw.items())


def uki_bytes(osrel_text: str | None, *, cmdline: str = "root=/dev/sda1 quiet", machine: int = 0x8664,
              linux: bool = True) -> bytes:
    secs = [Sec(".text", b"\xc3" * 16, characteristics=SCN_CODE)]
    if osrel_text is not None:
        secs.append(Sec(".osrel", osrel_text.encode(), characteristics=SCN_RDATA))
    secs.append(Sec(".cmdline", cmdline.encode(), characteristics=SCN_RDATA))
    if linux:
        secs.append(Sec(".linux", b"MZ fake kernel" + bytes(64), characteristics=SCN_RDATA))
    return build_pe(sections=secs, machine=machine).data


def write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


@pytest.fixture
def esp(tmp_path):
    root = tmp_path / "esp"
    (root / "EFI" / "Linux").mkdir(parents=True)
    return root


def entry(root, name, **keys):
    lines = []
    for k, v in keys.items():
        for one in (v if isinstance(v, list) else [v]):
            lines.append(f"{k.replace('_', '-')} {one}")
    write(root / "loader" / "entries" / name, "# a comment\n\n" + "\n".join(lines) + "\n")


def ids(entries):
    return [e.id for e in entries]


def test_type1_entry_keys_and_paths(esp):
    write(esp / "mid" / "6.1" / "linux", b"k")
    write(esp / "mid" / "6.1" / "initrd", b"i")
    write(esp / "mid" / "6.1" / "ucode", b"u")
    entry(esp, "mid-6.1.conf", title="Debian", version="6.1.0-18-amd64", machine_id="4098b3f6", sort_key="debian",
          linux="/mid/6.1/linux", initrd=["mid/6.1/ucode", "/mid//6.1/initrd"], options=["root=/dev/sda1", "quiet"])
    [e] = B.load_entries(esp)
    assert (e.id, e.type, e.title, e.version, e.machine_id, e.sort_key) == \
        ("mid-6.1.conf", "type1", "Debian", "6.1.0-18-amd64", "4098b3f6", "debian")
    assert e.linux == esp / "mid" / "6.1" / "linux" and e.payload == e.linux and e.efi is None
    assert e.initrd == [esp / "mid" / "6.1" / "ucode", esp / "mid" / "6.1" / "initrd"]  # in order, normalized
    assert e.options == "root=/dev/sda1 quiet"


def test_type1_entries_that_cannot_boot_here_are_left_out(esp, tmp_path):
    write(tmp_path / "outside", b"x")
    entry(esp, "nothing.conf", title="no linux, no efi")
    entry(esp, "arm.conf", linux="/vmlinuz", architecture="aa64")
    entry(esp, "dotdot.conf", linux="/../outside")
    entry(esp, "trailing.conf", linux="/dir/")
    entry(esp, "bad name!.conf", linux="/vmlinuz")
    entry(esp, "ok.conf", linux="/vmlinuz", architecture="X64")
    entry(esp, "efi.conf", efi="/EFI/tool.efi")
    entry(esp, "uki.conf", uki="/other/uki.efi")
    (esp / "loader" / "entries" / "notes.txt").write_text("linux /vmlinuz\n")
    os.symlink(tmp_path / "outside", esp / "escape")
    entry(esp, "symlink.conf", linux="/escape")
    assert sorted(ids(B.load_entries(esp))) == ["efi.conf", "ok.conf", "uki.conf"]
    by = {e.id: e for e in B.load_entries(esp)}
    assert by["uki.conf"].payload == esp / "other" / "uki.efi"


def test_type2_ukis_from_their_osrel_section(esp):
    write(esp / "EFI" / "Linux" / "debian-6.1.efi",
          uki_bytes(osrel(PRETTY_NAME="Debian GNU/Linux 12 (bookworm)", NAME="Debian", ID="debian",
                          VERSION_ID="12", VERSION="12 (bookworm)"), cmdline="  root=/dev/vda1 ro \n"))
    write(esp / "EFI" / "Linux" / "image.efi", uki_bytes(osrel(NAME="Fancy", ID="fancy", IMAGE_ID="fancy-img",
                                                               IMAGE_VERSION="7", BUILD_ID="b1")))
    write(esp / "EFI" / "Linux" / "notuki.efi", uki_bytes(None))                    # no .osrel
    write(esp / "EFI" / "Linux" / "nolinux.efi", uki_bytes(osrel(ID="x"), linux=False))  # an addon, say
    write(esp / "EFI" / "Linux" / "arm.efi", uki_bytes(osrel(ID="x"), machine=0xAA64))
    write(esp / "EFI" / "Linux" / "junk.efi", b"not a PE at all")
    (esp / "EFI" / "Linux" / "debian-6.1.efi.extra.d").mkdir()
    by = {e.id: e for e in B.load_entries(esp)}
    assert set(by) == {"debian-6.1.efi", "image.efi"}
    d = by["debian-6.1.efi"]
    assert (d.type, d.title, d.version, d.sort_key, d.options) == \
        ("type2", "Debian GNU/Linux 12 (bookworm)", "12 (bookworm)", "debian", "root=/dev/vda1 ro")
    assert d.payload == esp / "EFI" / "Linux" / "debian-6.1.efi" and d.is_uki
    i = by["image.efi"]
    assert (i.title, i.version, i.sort_key) == ("fancy-img", "7", "fancy-img")   # IMAGE_ID before NAME


def test_sorting_follows_the_specification(esp, tmp_path):
    xb = tmp_path / "xbootldr"
    for n in ("a", "b", "c", "d", "e", "f", "g", "h"):
        write(esp / n, b"k")
        write(xb / n, b"k")
    # with sort-key: by sort-key, then machine-id (missing first), then version descending
    entry(esp, "fedora-1.conf", sort_key="fedora", version="6.1", linux="/a")
    entry(esp, "debian-old.conf", sort_key="debian", machine_id="bbb", version="6.1.0-9", linux="/b")
    entry(esp, "debian-new.conf", sort_key="debian", machine_id="bbb", version="6.1.0-18", linux="/c")
    entry(esp, "debian-other.conf", sort_key="debian", machine_id="aaa", version="5.10", linux="/d")
    entry(esp, "debian-nomid.conf", sort_key="debian", version="1", linux="/e")
    # without sort-key: after those, by id descending (version order)
    entry(xb, "zzz-5.conf", linux="/f")
    entry(xb, "zzz-10.conf", linux="/g")
    # a "bad" entry (no tries left) sorts last even with the best sort key
    entry(esp, "aaa+0-3.conf", sort_key="aaa", linux="/h")
    # one with tries left stays in place
    entry(esp, "debian-try+2-1.conf", sort_key="debian", machine_id="bbb", version="6.1.0-20", linux="/a")
    got = ids(B.load_entries(esp, xb))
    assert got == ["debian-nomid.conf", "debian-other.conf", "debian-try.conf", "debian-new.conf",
                   "debian-old.conf", "fedora-1.conf", "zzz-10.conf", "zzz-5.conf", "aaa.conf"]
    bad = B.load_entries(esp, xb)[-1]
    assert (bad.tries_left, bad.tries_done, bad.bad) == (0, 3, True)


def test_the_same_file_seen_twice_counts_once(esp):
    write(esp / "vmlinuz", b"k")
    entry(esp, "one.conf", linux="/vmlinuz")
    assert ids(B.load_entries(esp, esp)) == ["one.conf"]


def efivar(d, name, text, guid=B.LOADER_GUID):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}-{guid}").write_bytes(b"\x07\x00\x00\x00" + (text + "\0").encode("utf-16-le"))


@pytest.fixture
def menu(esp):
    write(esp / "vmlinuz", b"k")
    for n in ("debian-6.1.0-9.conf", "debian-6.1.0-18.conf", "arch.conf", "Fedora-40.conf"):
        entry(esp, n, linux="/vmlinuz", title=n)
    return esp


def test_default_is_the_first_entry_without_any_setting(menu, tmp_path):
    c = B.default_entry(menu, efivars=tmp_path / "no-efivars")
    assert c.entry.id == "debian-6.1.0-18.conf" and "first entry" in c.reason
    assert ids(c.entries)[0] == c.entry.id


def test_loader_conf_default_glob(menu, tmp_path):
    write(menu / "loader" / "loader.conf", "timeout 3\n# default arch.conf\ndefault  debian-*\n")
    c = B.default_entry(menu, efivars=tmp_path / "none")
    assert c.entry.id == "debian-6.1.0-18.conf" and "loader.conf" in c.reason     # the first match in menu order
    write(menu / "loader" / "loader.conf", "default FEDORA-*\n")                  # case-insensitive
    assert B.default_entry(menu, efivars=tmp_path / "none").entry.id == "Fedora-40.conf"
    write(menu / "loader" / "loader.conf", "default nothing-matches*\n")
    assert "first entry" in B.default_entry(menu, efivars=tmp_path / "none").reason


def test_efi_variables_come_before_loader_conf(menu, tmp_path):
    write(menu / "loader" / "loader.conf", "default debian-*\n")
    ev = tmp_path / "efivars"
    efivar(ev, "LoaderEntryDefault", "arch.conf")
    c = B.default_entry(menu, efivars=ev)
    assert c.entry.id == "arch.conf" and "LoaderEntryDefault" in c.reason
    efivar(ev, "LoaderEntryOneShot", "debian-6.1.0-9.conf")
    c = B.default_entry(menu, efivars=ev)
    assert c.entry.id == "debian-6.1.0-9.conf" and "LoaderEntryOneShot" in c.reason
    efivar(ev, "LoaderEntryOneShot", "gone.conf")       # names no entry: the next rule decides
    assert B.default_entry(menu, efivars=ev).entry.id == "arch.conf"
    efivar(ev, "LoaderEntryDefault", "x", guid="00000000-0000-0000-0000-000000000000")  # another vendor's
    assert B.default_entry(menu, efivars=ev).entry.id == "arch.conf"


def test_saved_means_the_entry_booted_this_time(menu, tmp_path):
    write(menu / "loader" / "loader.conf", "default @saved\n")
    ev = tmp_path / "efivars"
    efivar(ev, "LoaderEntrySelected", "Fedora-40.conf")
    assert B.default_entry(menu, efivars=ev).entry.id == "Fedora-40.conf"


def test_default_names_the_id_without_the_boot_counter(esp, tmp_path):
    write(esp / "vmlinuz", b"k")
    entry(esp, "new+3.conf", linux="/vmlinuz")
    entry(esp, "old.conf", linux="/vmlinuz")
    ev = tmp_path / "efivars"
    efivar(ev, "LoaderEntryDefault", "new.conf")
    assert B.default_entry(esp, efivars=ev).entry.source.name == "new+3.conf"


def test_no_entries_is_an_error_naming_where_it_looked(esp, tmp_path):
    with pytest.raises(B.BootEntryError, match=str(esp)):
        B.default_entry(esp, efivars=tmp_path)
    with pytest.raises(B.BootEntryError, match="not a folder"):
        B.default_entry(tmp_path / "missing", efivars=tmp_path)


# --- partitions -----------------------------------------------------------------------------------
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:2 / / rw,relatime - ext4 /dev/sda2 rw
40 27 8:3 / /boot rw,relatime - ext4 /dev/sda3 rw
41 40 8:1 / /boot/efi rw,relatime - vfat /dev/sda1 rw,fmask=0077
42 27 8:4 / /srv/my\\040files rw - vfat /dev/sda4 rw
"""


@pytest.fixture
def system(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(MOUNTINFO)
    udev = tmp_path / "udev"
    udev.mkdir()
    (udev / "b8:1").write_text(f"S:disk/by-partuuid/1111\nE:ID_PART_ENTRY_TYPE={B.ESP_TYPE}\n"
                               "E:ID_PART_ENTRY_UUID=11111111-2222-3333-4444-555555555555\n")
    (udev / "b8:3").write_text(f"E:ID_PART_ENTRY_TYPE={B.XBOOTLDR_TYPE.upper()}\n")
    (udev / "b8:4").write_text("E:ID_PART_ENTRY_TYPE=0fc63daf-8483-4772-8e79-3d69d8477de4\n")  # Linux data
    return mi, udev


def test_mount_of_a_file(system):
    mi, _ = system
    assert B.mount_of("/boot/efi/EFI/Linux/x.efi", mi).mount_point == "/boot/efi"
    assert B.mount_of("/boot/vmlinuz", mi).mount_point == "/boot"
    assert B.mount_of("/bootx", mi).mount_point == "/"
    assert B.mount_of("/srv/my files/a", mi).mount_point == "/srv/my files"   # \040 in mountinfo


def test_esp_and_xbootldr_by_partition_type(system):
    mi, udev = system
    esp, xb = B.find_partitions(mi, udev)
    assert str(esp.root) == "/boot/efi" and esp.kind == "esp"
    assert esp.partuuid == "11111111-2222-3333-4444-555555555555"
    assert str(xb.root) == "/boot" and xb.kind == "xbootldr"
    p = B.partition_of("/boot/efi/EFI/Linux/x.efi", mi, udev)
    assert p.kind == "esp" and str(p.root) == "/boot/efi"
    assert B.partition_of("/srv/my files/x.efi", mi, udev) is None      # vfat, but not an ESP's type
    assert B.partition_of("/etc/passwd", mi, udev) is None


def test_esp_without_udev_needs_vfat_and_an_efi_folder(tmp_path):
    root = tmp_path / "mnt"
    (root / "efi").mkdir(parents=True)                      # lower case: vfat is case-insensitive
    mi = tmp_path / "mountinfo"
    mi.write_text(f"27 1 8:2 / / rw - ext4 /dev/sda2 rw\n50 27 8:9 / {root} rw - vfat /dev/sdb1 rw\n")
    p = B.partition_of(root / "x.efi", mi, tmp_path / "no-udev")
    assert p is not None and p.kind == "esp" and "EFI folder" in p.why
    mi.write_text(f"27 1 8:2 / / rw - ext4 /dev/sda2 rw\n50 27 8:9 / {root} rw - ext4 /dev/sdb1 rw\n")
    assert B.partition_of(root / "x.efi", mi, tmp_path / "no-udev") is None
