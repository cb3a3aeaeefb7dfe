"""How the tests lay out a tritonserver's state directory."""

from __future__ import annotations

from pathlib import Path

from maas_inference.triton import TritonProcessConfig


def triton_process_config(state_dir: Path) -> TritonProcessConfig:
    return TritonProcessConfig(state_dir=state_dir, model_repository=state_dir / "model-repository")
