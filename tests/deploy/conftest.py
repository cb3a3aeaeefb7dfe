"""Fixtures shared by the deploy tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

HELM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "helm"
SERVICE_CHARTS = ("registry", "trainer", "compressor", "inference")


@pytest.fixture(scope="session")
def umbrella_dir(tmp_path_factory) -> Path:
    """A copy of deploy/helm whose maas/charts/ holds the service charts, as `helm dependency
    build` would leave it for the file:// dependencies (hashicorp/consul is not vendored)."""
    root = tmp_path_factory.mktemp("helm")
    shutil.copytree(HELM_DIR, root, dirs_exist_ok=True)
    charts = root / "maas" / "charts"
    charts.mkdir(exist_ok=True)
    for name in SERVICE_CHARTS:
        shutil.copytree(HELM_DIR / name, charts / name)
    return root / "maas"
