"""Build helper shared by the EFI-app tests."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
APPS_DIR = ROOT / "tests" / "efi" / "build"


def build_apps() -> pathlib.Path:
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "efi" / "build.py"), str(APPS_DIR)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building the EFI test apps failed:\n{r.stdout}\n{r.stderr}")
    return APPS_DIR
