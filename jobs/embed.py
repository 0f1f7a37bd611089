"""Ray job entry point: ``python -m jobs.embed --config CONFIG.yaml``.

Does what ``omniembed run`` does. Submitted with ``ray job submit``, it joins the cluster
(RAY_ADDRESS is set by the job); run by hand, it starts an embedded Ray on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import execute


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.embed", description="Run the omniembed pipeline as a Ray job."
    )
    parser.add_argument("--config", required=True, help="path to the YAML config (relative to the working dir)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's output instead of resuming it"
    )
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded Ray on 127.0.0.1)")
    parser.add_argument("--dry-run", action="store_true", help="plan and count only; print one JSON line")
    parser.add_argument("--takeover", action="store_true", help="take the writer lease from a run that is gone")
    parser.add_argument(
        "--progress-seconds", type=float, default=None, help="seconds between progress lines (default 30)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    args = parser.parse_args(argv)
    args.command = "run"
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
