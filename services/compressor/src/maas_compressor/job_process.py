"""Entry point of a compression job's process: `python -m maas_compressor.job_process <dir>`.

Started by the service once the job's inputs are staged. Reads `run.json`, runs the pipeline
and reports progress on stdout (`maas_jobs.progress`). Exits 0 after writing the result
artifact and `result.json`; on failure it reports the error's code and message first, so the
job fails with a reason instead of an exit status. A job resumed after a restart runs again
from its staged inputs: a compression is minutes at most, and a half-written `work/` is
simply overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maas_jobs.entry import exit_now, run_reporting_failure
from maas_jobs.progress import ProgressReporter, exit_when_parent_dies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", type=Path, help="the job's directory holding run.json")
    arguments = parser.parse_args(argv)
    exit_when_parent_dies()
    reporter = ProgressReporter()

    def compress() -> None:
        # Imported here: the parent watch is armed before the slow torch import.
        from maas_compressor.pipeline import run_compression
        from maas_compressor.plan import RunConfig

        run_compression(RunConfig.read(arguments.workdir), arguments.workdir, reporter)

    return run_reporting_failure(compress, reporter, "compression")


if __name__ == "__main__":
    exit_now(main())
