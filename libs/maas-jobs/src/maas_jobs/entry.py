"""What every job process's entry point does around its work: report a failure, exit fast.

Imported by a job process at every start, before its slow imports: keep it light.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from maas_runtime.errors import MaasError

from maas_jobs.progress import ProgressReporter


def run_reporting_failure(work: Callable[[], None], reporter: ProgressReporter, what: str) -> int:
    """Runs `work`; the exit code of the job process: 0 when it returns, 1 when it raises.

    The error is reported on `reporter` first, so the job fails with a reason instead of an
    exit status: a `MaasError` with its code and message, anything else as INTERNAL
    "<what> failed: ..." with its traceback on stderr (the job's log).
    """
    try:
        work()
    except MaasError as error:
        reporter.error(error.code, error.message)
        return 1
    except Exception as error:  # reported, then the traceback goes to the job's log
        reporter.error("INTERNAL", f"{what} failed: {type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


def exit_now(exit_code: int) -> NoReturn:
    """Flushes stdout and stderr and exits with `exit_code`, skipping the interpreter's teardown.

    Everything the job produced is written, fsynced and closed by then; torch's teardown
    takes the better part of a second, and skipping it frees the worker slot that much sooner.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
