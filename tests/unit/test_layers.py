"""The layers of vmrun import downwards only (README "Architecture").

    machine & formats   vmrun.vm.*, vmrun.formats.*, vmrun.errors (and the vmrun package root)
    UEFI services       hostsvc.*
    upper               every other vmrun module: runner, handoff, kexec, kdump, loader, cli, …

The machine layer imports neither hostsvc nor an upper module; hostsvc imports no upper module
and reaches the VM only through vmrun.vm.port (GuestPort) and the layout and memory types.
Every import statement counts, wherever it is (inside functions, under TYPE_CHECKING), and so
does importlib.import_module/__import__ with a literal name. Read with ``ast``, never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("vmrun", "hostsvc")

MACHINE, SERVICES, UPPER = "machine & formats", "UEFI services (hostsvc)", "upper vmrun"
# what hostsvc may import of vmrun.vm: the narrow interface and plain data types
HOSTSVC_VM_ALLOWED = {"vmrun.vm", "vmrun.vm.port", "vmrun.vm.layout", "vmrun.vm.memory"}


def layer(module: str) -> str:
    if module == "hostsvc" or module.startswith("hostsvc."):
        return SERVICES
    if module in ("vmrun", "vmrun.errors", "vmrun.vm", "vmrun.formats") or \
            module.startswith(("vmrun.vm.", "vmrun.formats.")):
        return MACHINE
    return UPPER


ALLOWED = {MACHINE: {MACHINE}, SERVICES: {MACHINE, SERVICES}, UPPER: {MACHINE, SERVICES, UPPER}}


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted name → file of every module under vmrun/ and hostsvc/."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source``; ``from P import x`` names
    ``P.x`` when that is a module, else ``P``; relative imports are resolved."""
    found = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[:len(package) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(modules: dict[str, tuple[str, str, bool]]) -> list[str]:
    """``modules``: name → (shown path, source, is_package). One message per upward import."""
    known = set(modules)
    out = []
    for name, (shown, source, is_package) in sorted(modules.items()):
        own = layer(name)
        for line, target in imports(name, source, is_package, known):
            if target.split(".")[0] not in PACKAGES:
                continue  # the standard library and third-party packages
            other = layer(target)
            if other not in ALLOWED[own]:
                out.append(f"{shown}:{line}: {name} ({own} layer) imports {target} ({other} layer)")
            elif own == SERVICES and target.startswith("vmrun.vm") and target not in HOSTSVC_VM_ALLOWED:
                out.append(f"{shown}:{line}: {name} imports {target}: hostsvc reaches the VM only "
                           f"through {', '.join(sorted(HOSTSVC_VM_ALLOWED - {'vmrun.vm'}))}")
    return out


def _load(root: Path = REPO) -> dict[str, tuple[str, str, bool]]:
    return {name: (str(path.relative_to(root)), path.read_text(), path.name == "__init__.py")
            for name, path in project_modules(root).items()}


def test_every_layer_is_scanned():
    mods = _load()
    assert {"vmrun.vm.machine", "vmrun.vm.port", "vmrun.vm.kvm.vm", "vmrun.formats.pe", "vmrun.errors",
            "hostsvc.firmware", "hostsvc.protocols.filesystem", "vmrun.runner", "vmrun.handoff.stage",
            "vmrun.cli"} <= set(mods)
    assert {layer(m) for m in mods} == {MACHINE, SERVICES, UPPER}


def test_imports_point_down_only():
    bad = violations(_load())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    fake = {
        "vmrun.vm.machine": ("vmrun/vm/machine.py",
                             "import os\n"
                             "def f():\n    from hostsvc.firmware import Firmware\n", False),
        "vmrun.formats.pe": ("vmrun/formats/pe.py", "from .. import runner\n", False),
        "vmrun.errors": ("vmrun/errors.py", "import importlib\nimportlib.import_module('vmrun.cli')\n", False),
        "hostsvc.firmware": ("hostsvc/firmware.py",
                             "from vmrun.vm.port import GuestPort\nfrom vmrun.vm import layout\n"
                             "from vmrun.errors import VmrunError\nfrom vmrun.formats import pe\n"
                             "def g():\n    import vmrun.kdump\n    from vmrun.vm.machine import Machine\n",
                             False),
        "hostsvc.protocols": ("hostsvc/protocols/__init__.py", "from ..firmware import Firmware\n", True),
        "vmrun.runner": ("vmrun/runner.py", "from hostsvc.firmware import Firmware\nfrom vmrun.vm import machine\n",
                         False),
        "vmrun.cli": ("vmrun/cli.py", "", False),
        "vmrun.kdump": ("vmrun/kdump.py", "", False),
        "vmrun.vm.layout": ("vmrun/vm/layout.py", "", False),
    }
    assert violations(fake) == [
        "hostsvc/firmware.py:6: hostsvc.firmware (UEFI services (hostsvc) layer) imports vmrun.kdump "
        "(upper vmrun layer)",
        "hostsvc/firmware.py:7: hostsvc.firmware imports vmrun.vm.machine: hostsvc reaches the VM only "
        "through vmrun.vm.layout, vmrun.vm.memory, vmrun.vm.port",
        "vmrun/errors.py:2: vmrun.errors (machine & formats layer) imports vmrun.cli (upper vmrun layer)",
        "vmrun/formats/pe.py:1: vmrun.formats.pe (machine & formats layer) imports vmrun.runner "
        "(upper vmrun layer)",
        "vmrun/vm/machine.py:3: vmrun.vm.machine (machine & formats layer) imports hostsvc.firmware "
        "(UEFI services (hostsvc) layer)",
    ]
