"""Build Unified Kernel Images and addons from Debian's systemd-stub with binutils objcopy
(as systemd's documentation shows for systems without ukify)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

from vmrun import pe as PE

PAGE = 0x1000
ORDER = (".osrel", ".cmdline", ".uname", ".initrd", ".linux")  # the kernel last (largest)


def _objcopy() -> str:
    for tool in ("objcopy", "x86_64-w64-mingw32-objcopy"):
        if shutil.which(tool):
            return tool
    raise RuntimeError("objcopy not found (scripts/setup installs binutils)")


def add_sections(stub: pathlib.Path, out: pathlib.Path, sections: dict[str, bytes]) -> pathlib.Path:
    """Copy ``stub`` to ``out`` with ``sections`` appended after its last section, each at a
    page-aligned VMA, in :data:`ORDER` (unknown names first)."""
    img = PE.load_file(stub)
    vma = img.image_base + ((img.size_of_image + PAGE - 1) & ~(PAGE - 1))
    work = out.parent / (out.name + ".parts")
    work.mkdir(parents=True, exist_ok=True)
    args = [_objcopy()]
    names = sorted(sections, key=lambda n: ORDER.index(n) if n in ORDER else -1)
    for name in names:
        part = work / name.lstrip(".")
        part.write_bytes(sections[name])
        args += ["--add-section", f"{name}={part}", "--change-section-vma", f"{name}={vma:#x}"]
        vma += (len(sections[name]) + PAGE - 1) & ~(PAGE - 1)
    args += [str(stub), str(out)]
    subprocess.run(args, check=True, capture_output=True)
    shutil.rmtree(work)
    built = PE.load_file(out)
    for name in names:
        sec = built.section(name)
        assert sec is not None and sec.data()[:len(sections[name])] == sections[name], name
    return out


def build_uki(stub: pathlib.Path, out: pathlib.Path, *, linux: pathlib.Path, initrd: bytes | None,
              cmdline: str, osrel: str = 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n',
              uname: str | None = None) -> pathlib.Path:
    sections = {".osrel": osrel.encode(), ".cmdline": cmdline.encode(), ".linux": linux.read_bytes()}
    if initrd is not None:
        sections[".initrd"] = initrd
    if uname:
        sections[".uname"] = uname.encode()
    return add_sections(stub, out, sections)


def build_addon(addon_stub: pathlib.Path, out: pathlib.Path, *, cmdline: str) -> pathlib.Path:
    return add_sections(addon_stub, out, {".cmdline": cmdline.encode()})
