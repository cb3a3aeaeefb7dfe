"""The drills target itself: `make drills` collects this folder and `make test` leaves it out."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_make_test_excludes_drills_and_ci_runs_both() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--ignore=tests/drills" in makefile
    assert "pytest -q tests/drills" in makefile
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.index("make test") < ci.index("make drills")
