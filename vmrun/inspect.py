"""``vmrun inspect``: the anatomy of a PE/UKI file, without running it."""

from __future__ import annotations

import hashlib

from vmrun.formats import bzimage
from vmrun.formats import pe as PE

TEXT_SECTIONS = (".osrel", ".uname", ".cmdline", ".sbat", ".profile")
UKI_MARKERS = (".linux",)


def inspect_file(path) -> dict:
    """The anatomy of the PE at ``path``; a file that is not a usable PE raises the parser's
    VmrunError."""
    return describe(PE.load_file(path, allowed_subsystems=tuple(PE.EFI_SUBSYSTEMS)), path)


def describe(img: PE.PEImage, path) -> dict:
    """The anatomy of a parsed image (what ``inspect_file`` returns), ``path`` as given."""
    sections = []
    texts = {}
    for s in img.sections:
        data = s.data()
        sections.append({"name": s.name, "rva": hex(s.rva), "virtual_size": s.virtual_size,
                         "raw_size": s.raw_size, "sha256": hashlib.sha256(data).hexdigest()})
        if s.name in TEXT_SECTIONS:
            texts[s.name] = data.rstrip(b"\0").decode("utf-8", "replace")
    kind = "uki" if img.section(".linux") else ("linux-efi-stub" if bzimage.parse(img.data) else "efi-application")
    if img.section(".linux") is None and img.section(".cmdline") and not bzimage.parse(img.data):
        kind = "uki-addon"
    kernel = None
    linux = img.section(".linux")
    bz = bzimage.parse(linux.data() if linux else img.data)
    if bz is not None:
        kernel = {"version": bz.version, "boot_protocol": f"{bz.protocol[0]}.{bz.protocol[1]:02d}",
                  "compression": bz.compression, "compressed_size": len(bz.payload)}
    return {
        "path": str(path),
        "kind": kind,
        "size": len(img.data),
        "sha256": hashlib.sha256(img.data).hexdigest(),
        "machine": "x86_64" if img.machine == PE.MACHINE_AMD64 else hex(img.machine),
        "subsystem": PE.EFI_SUBSYSTEMS.get(img.subsystem, str(img.subsystem)),
        "image_base": hex(img.image_base),
        "size_of_image": img.size_of_image,
        "entry_rva": hex(img.entry_rva),
        "signed": img.signed,
        "sections": sections,
        "text": texts,
        "kernel": kernel,
    }


def format_text(info: dict) -> str:
    out = [f"{info['path']}: {info['kind']}, {info['size']} bytes, sha256 {info['sha256']}",
           f"  {info['machine']}, {info['subsystem']}, image base {info['image_base']}, entry rva {info['entry_rva']}, "
           f"{'signed (Authenticode certificate present)' if info['signed'] else 'not signed'}"]
    if info["kernel"]:
        k = info["kernel"]
        out.append(f"  kernel: {k['version']} (boot protocol {k['boot_protocol']}, {k['compression']}, "
                   f"{k['compressed_size']} bytes compressed)")
    out.append("  sections:")
    for s in info["sections"]:
        out.append(f"    {s['name']:<10} rva {s['rva']:>10}  {s['virtual_size']:>10} bytes  sha256 {s['sha256'][:16]}…")
    for name, text in info["text"].items():
        out.append(f"  {name}:")
        out += [f"    | {line}" for line in text.splitlines() or [""]]
    return "\n".join(out) + "\n"
