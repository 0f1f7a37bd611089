"""What every job entry point shares: logging, one-line user errors with exit code 2, and the
Ray start (an embedded Ray on 127.0.0.1, or the cluster a ``ray job submit`` runs in).

Exit codes, as ``omniembed``'s: 0 done; 2 usage error (missing file, missing column, wrong
dimension, ...), one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Callable, Sequence

EXIT_OK, EXIT_USAGE = 0, 2
# Ray Train's placement-group cleaner asks the State API, which a Ray without a dashboard (the
# embedded one) does not serve, whether the controller lives, and warns every few seconds that it
# could not; the cleanup it guards still happens when the run ends. Kept for -v.
JOB_NOISE = ("Failed to query Ray Train Controller actor state",)
log = logging.getLogger(__name__)


class JobError(ValueError):
    """A user error: the message is one line naming the input, the problem and the fix."""


EXIT_EPILOG = "Exit codes: 0 done; 2 usage error (one line)."


def job_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """``python -m jobs.<name>``'s parser: its module docstring's first paragraph as the description."""
    return argparse.ArgumentParser(
        prog=f"python -m {name}", description=(doc or "").split("\n\n")[0], epilog=EXIT_EPILOG
    )


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="join this Ray cluster (default: RAY_ADDRESS, as inside `ray job submit`, "
        "else an embedded Ray on 127.0.0.1)",
    )


def start_ray(address: str | None) -> None:
    """Call before Ray is first imported by the job: binds an embedded Ray to loopback."""
    from pipeline.ray_env import init_ray

    init_ray(address, quiet=not logging.getLogger().isEnabledFor(logging.INFO))  # Ray's own lines with -v


def run_job(
    name: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int], argv: Sequence[str] | None
) -> int:
    """Parse, run ``body`` and turn user errors into one line and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    from pipeline.ray_env import prepare_environment
    from pipeline.report import NOISE, filtered_stderr

    prepare_environment(getattr(args, "address", None))  # before anything imports Ray
    try:
        with contextlib.nullcontext() if args.verbose else filtered_stderr(NOISE + JOB_NOISE):
            return body(args)
    except JobError as exc:
        print(f"{name}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        cause = _user_error(exc)
        if cause is None:
            raise
        print(f"{name}: error: {str(cause).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE


def _user_error(exc: BaseException | None) -> BaseException | None:
    """A JobError or ConfigError, raised here or inside a Ray worker (where it arrives wrapped)."""
    from pipeline.config import ConfigError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (JobError, ConfigError)):
            return exc
        inner = getattr(exc, "cause", None)
        if isinstance(inner, (JobError, ConfigError)):
            return inner
        exc = exc.__cause__ or exc.__context__ or (inner if isinstance(inner, BaseException) else None)
        seen += 1
    return None
