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
import os
import sys
import traceback
from pathlib import Path

from maas_jobs.progress import ProgressReporter, exit_when_parent_dies
from maas_runtime.errors import MaasError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", type=Path, help="the job's directory holding run.json")
    arguments = parser.parse_args(argv)
    exit_when_parent_dies()
    reporter = ProgressReporter()
    try:
        # Imported here: the parent watch is armed before the slow torch import.
        from maas_compressor.pipeline import run_compression
        from maas_compressor.plan import RunConfig

        run_compression(RunConfig.read(arguments.workdir), arguments.workdir, reporter)
    except MaasError as error:
        reporter.error(error.code, error.message)
        return 1
    except Exception as error:  # reported, then the traceback goes to the job's log
        reporter.error("INTERNAL", f"compression failed: {type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and closed; skipping torch's slow teardown frees the slot sooner.
    os._exit(exit_code)
