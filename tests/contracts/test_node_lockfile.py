"""`make install` leaves the work tree as it found it: tools/package-lock.json is complete (every
optional platform package npm would otherwise add), so `npm ci` installs it unchanged, and the
lockfile in the work tree is the committed one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_the_lockfile_holds_every_optional_package_of_every_locked_package():
    lock = json.loads((TOOLS / "package-lock.json").read_text())
    packages = lock["packages"]
    assert packages[""]["dependencies"] == json.loads(
        (TOOLS / "package.json").read_text())["dependencies"]
    missing = [f"{path} -> {name}" for path, entry in packages.items()
               for name in entry.get("optionalDependencies", {})
               if f"node_modules/{name}" not in packages]
    assert missing == []
    assert all(entry.get("integrity") for path, entry in packages.items() if path)


def test_install_left_the_lockfile_as_committed():
    if shutil.which("git") is None or not (TOOLS.parent / ".git").exists():
        pytest.skip("not a git work tree")
    changed = subprocess.run(["git", "status", "--porcelain", "--", "package.json",
                              "package-lock.json"], cwd=TOOLS, capture_output=True, text=True)
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout == "", "make install (npm ci) must not rewrite the lockfile"
