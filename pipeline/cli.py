"""``omniembed run CONFIG.yaml`` and ``omniembed embed INPUT ...``: a thin shell over pipeline.graph.

Exit codes: 0 done; 2 usage or config error (one line, nothing written); 3 done, but the
error rate went past max_error_rate; 4 the run ended with fewer rows committed than planned.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Sequence

from pipeline.config import DUPLICATE_POLICIES

EXIT_OK, EXIT_USAGE, EXIT_ERROR_RATE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
EXIT_FOR_STATUS = {"complete": EXIT_OK, "failed_error_rate": EXIT_ERROR_RATE, "incomplete": EXIT_INCOMPLETE}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omniembed",
        description="Embed text, images and audio with Ray Data into aligned Parquet vectors.",
        epilog="Exit codes: 0 done; 2 usage or config error; 3 done, but the error rate went past --max-error-rate; "
        "4 fewer rows committed than planned (status incomplete).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,embed}")

    run = sub.add_parser(
        "run", help="run a YAML config", description="Run the pipeline described by a YAML config (see README)."
    )
    run.add_argument("config", help="path to the YAML config")
    _common(run)

    embed = sub.add_parser(
        "embed",
        help="embed one input from flags",
        description="Embed one input (file, folder or URI) from flags; builds the same config as the YAML.",
    )
    flag = embed.add_argument
    flag(
        "input",
        nargs="+",
        help="Parquet/JSONL/CSV file or folder, any pyarrow/fsspec URI, or a folder of .txt files; several "
        "(a.tar b.tar) are one source",
    )
    flag("--output", required=True, help="output folder or object-store URI")
    flag("--id-column", help="column holding unique row ids (cast to string); required for tables unless --derive-ids")
    flag("--derive-ids", action="store_true", help="derive deterministic ids '<file>:<row>' instead of an id column")
    flag(
        "--format",
        choices=("parquet", "jsonl", "csv", "webdataset"),
        help="input format when the suffix does not tell (webdataset: .tar shards; the id is each sample's key)",
    )
    flag(
        "--kind",
        choices=("table", "text", "image", "audio"),
        default=None,
        help="'text', 'image' or 'audio' for a folder of such files (id = relative path); default: table",
    )
    flag("--text-column", help="column with the text to embed ('text' for a folder of .txt files)")
    flag("--text-model", help="model reference: registry alias, hub id or local folder")
    flag("--output-name", help="output name: columns NAME_embedding and NAME_error (default: the text column's name)")
    flag("--image-column", help="column with image paths/URIs or bytes ('image' for a folder of images)")
    flag("--image-model", help="image model: registry alias (e.g. efficientnet-lite0) or local folder")
    flag("--image-output-name", help="output name of the image encoder (default: the image column's name)")
    flag("--max-pixels", type=int, help="images with more pixels are too_large errors (default 100000000)")
    flag("--audio-column", help="column with audio paths/URIs or bytes ('audio' for a folder of audio files)")
    flag(
        "--audio-model",
        help="audio model: registry alias (e.g. resemblyzer) or local folder (AST, wav2vec2, HuBERT, CLAP)",
    )
    flag("--audio-output-name", help="output name of the audio encoder (default: the audio column's name)")
    flag("--hop-seconds", type=float, help="audio: seconds between window starts (default: the window length)")
    flag("--max-windows", type=int, help="audio: windows per clip at most; the rest of a long clip is not read")
    flag("--pooling", choices=("mean", "cls", "max", "last"), help="override the model folder's pooling")
    flag(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalize vectors (default: as the model folder declares)",
    )
    flag("--prefix", help="text prepended to every input, e.g. 'passage: ' for E5")
    flag(
        "--long-text",
        choices=("truncate", "chunk"),
        help="text past max length: truncate (default) or pool overlapping chunks",
    )
    flag("--max-length", type=int, help="max tokens per sequence (default: the model folder's max_seq_length)")
    flag("--batch-rows", type=int, help="rows per encoder batch (default 2048 for text; sorted by length inside)")
    flag("--max-tokens", type=int, help="token budget of one padded micro-batch (default 8192)")
    flag("--gpus", help="GPUs per encoder actor: a number (fractions allowed) or 'auto' (default)")
    flag("--threads", type=int, help="torch threads per CPU encoder actor (default: the idle cores)")
    flag("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="every encoder's (default auto: see README)")
    flag("--backend", choices=("torch", "onnx"), help="the text encoder's: torch (default) or onnx (the onnx extra)")
    flag(
        "--output-format",
        choices=("parquet", "lance"),
        default="parquet",
        help="parquet part files (default), or a Lance dataset that lance and LanceDB open",
    )
    flag(
        "--output-index",
        choices=("ivf_pq", "ivf_flat", "ivf_hnsw_sq"),
        help="lance only: build this vector index on each embedding column at the end",
    )
    flag(
        "--vector-type",
        choices=("list", "fixed_size_list"),
        default="list",
        help="Arrow type of vectors (default list)",
    )
    flag("--dtype", choices=("float32", "float16"), default="float32", help="vector element type (default float32)")
    flag(
        "--on-duplicate-id",
        choices=DUPLICATE_POLICIES,
        default="error",
        help="what duplicate ids do: stop (error, the default), keep the first, or trust they are unique and skip the "
        "duplicate pass",
    )
    flag(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="fraction of rows allowed to fail before exit code 3 (default 0.01)",
    )
    flag(
        "--rows-per-file",
        type=int,
        help="rows per output part, one commit each (default: 2048 on CPU, 32768 on GPU: about a minute of work)",
    )
    _common(embed)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--takeover", action="store_true", help="take over the output's writer lease from a run that is gone"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="plan, find duplicates and count what an earlier run committed; print one JSON line; write nothing",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's output instead of resuming it"
    )
    parser.add_argument(
        "--address", help="join this Ray cluster (default: RAY_ADDRESS, else an embedded Ray on 127.0.0.1)"
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=None,
        help="seconds between progress lines (rows, rows/s, ETA); default 30, or 1 on a terminal",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-vv: also Ray Data's per-operator time at the end)",
    )


def _modalities(args: argparse.Namespace) -> list[str]:
    """The modalities ``omniembed embed`` embeds, in the order of its encoders."""
    return [m for m in MODALITY_FLAGS if args.kind == m or getattr(args, f"{m}_column") or getattr(args, f"{m}_model")]


def config_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import ConfigError

    wanted = _modalities(args)
    if not wanted:
        raise ConfigError(
            "--text-column/--text-model, --image-column/--image-model or --audio-column/--audio-model is required"
        )
    encoders = [_modality_encoder(args, modality) for modality in wanted]
    source: dict[str, Any] = {"path": args.input[0] if len(args.input) == 1 else list(args.input)}
    if args.kind and args.kind != "table":
        source["kind"] = args.kind
    for key in ("id_column", "format"):
        if getattr(args, key):
            source[key] = getattr(args, key)
    if args.derive_ids:
        source["derive_ids"] = True
    encode: dict[str, Any] = {}
    for key in ("batch_rows", "max_tokens", "threads"):
        if getattr(args, key) is not None:
            encode[key] = getattr(args, key)
    if args.gpus is not None:
        encode["gpus"] = args.gpus if args.gpus == "auto" else _number(args.gpus, "--gpus")
    return {
        "sources": [source],
        "encoders": encoders,
        "resources": {"encode": encode} if encode else {},
        "output": {
            "path": args.output,
            "vector_type": args.vector_type,
            "dtype": args.dtype,
            "on_duplicate_id": args.on_duplicate_id,
            "max_error_rate": args.max_error_rate,
            "rows_per_file": args.rows_per_file,
            "format": args.output_format,
            **({"index": args.output_index} if args.output_index else {}),
        },
    }


# modality -> (what its column holds, what its model reference is, its option flags)
MODALITY_FLAGS: dict[str, tuple[str, str, str]] = {
    "text": (
        "the text",
        "a registry alias, hub id or local folder",
        "pooling normalize prefix long_text max_length backend",
    ),
    "image": ("image paths, URIs or bytes", "a registry alias (e.g. efficientnet-lite0) or a folder", "max_pixels"),
    "audio": (
        "audio paths, URIs or bytes",
        "a registry alias (e.g. resemblyzer) or a folder",
        "hop_seconds max_windows",
    ),
}


def _modality_encoder(args: argparse.Namespace, modality: str) -> dict[str, Any]:
    """One encoder entry from a modality's flags; a folder of that kind names its own column."""
    from pipeline.config import ConfigError

    holds, model_hint, option_flags = MODALITY_FLAGS[modality]
    column, model = getattr(args, f"{modality}_column"), getattr(args, f"{modality}_model")
    output_name = getattr(args, "output_name" if modality == "text" else f"{modality}_output_name")
    if not column and args.kind != modality:
        raise ConfigError(f"--{modality}-column is required (the column holding {holds})")
    if not model:
        raise ConfigError(f"--{modality}-model is required ({model_hint})")
    column = column or modality
    encoder: dict[str, Any] = {"output": output_name or column, "column": column, "model": model}
    encoder.update({key: getattr(args, key) for key in option_flags.split() if getattr(args, key) is not None})
    if args.precision:
        encoder["precision"] = args.precision
    return encoder


def _number(value: str, flag: str) -> float:
    from pipeline.config import ConfigError

    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{flag}: expected a number or 'auto', got {value!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.verbose >= 2:
        logging.getLogger("pipeline").setLevel(logging.DEBUG)
    return execute(args)


def console_main() -> None:
    """The ``omniembed`` command: ``main`` in a process of its own, which then exits at once.
    With torch loaded, Python's own teardown takes ~0.5-1 s (module and library destructors)
    after the work is done; everything that matters is settled before ``os._exit``: parts and
    manifest are closed, Ray is shut down, logs and output are flushed. Tests and Python callers
    use ``main``, which returns the exit code."""
    code = main()
    if "ray" in sys.modules:
        from pipeline.ray_env import shutdown_ray

        shutdown_ray()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def execute(args: argparse.Namespace) -> int:
    from pipeline.ray_env import prepare_environment

    prepare_environment(args.address)  # before Ray is first imported
    from pipeline.config import ConfigError, config_from_dict, load_config

    started = time.time()
    try:
        config = load_config(args.config) if args.command == "run" else config_from_dict(config_from_flags(args))
        from pipeline.filesystems import check_filesystems

        check_filesystems([p for s in config.sources for p in s.paths] + [config.output.path])  # before Ray starts
        from pipeline.preflight import preflight

        done = preflight(config, args.overwrite, getattr(args, "dry_run", False))
        if done is not None:
            print("omniembed: the output is complete for this config, and its inputs are unchanged", file=sys.stderr)
            print_summary(done, config.output.path, None)
            return EXIT_FOR_STATUS[done["status"]]
        # torch, the encoder families and Ray Data (~2 s of imports) load while Ray starts its
        # processes: ray.init mostly waits for them. Ray itself is imported here first, so the
        # two threads never import the same package at once.
        import ray  # noqa: F401

        from pipeline.ray_env import init_ray
        from pipeline.report import RowProgress, filtered_stderr, quiet_ray

        quiet_ray(bool(args.verbose))  # before the loader imports Ray Data
        loader = threading.Thread(target=_preload, daemon=True)
        loader.start()
        init_ray(args.address, quiet=not args.verbose)
        loader.join()
        from pipeline.graph import run  # re-raises here if the background import failed

        with contextlib.nullcontext() if args.verbose else filtered_stderr():
            manifest = run(
                config,
                overwrite=args.overwrite,
                dry_run=getattr(args, "dry_run", False),
                takeover=getattr(args, "takeover", False),
                progress=lambda total: RowProgress(total, args.progress_seconds),
            )
    except ConfigError as exc:
        print(f"omniembed: error: {as_flags(user_message(exc), args)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"omniembed: interrupted; {_committed(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a ConfigError raised inside a Ray task arrives wrapped
        cause = unwrap_config_error(exc)
        if cause is None:
            raise
        print(f"omniembed: error: {as_flags(str(cause).splitlines()[0], args)}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "dry_run", False):
        print(json.dumps(manifest))  # exactly one line of JSON on stdout
        return EXIT_OK
    print_summary(manifest, config.output.path, time.time() - started)
    return EXIT_FOR_STATUS[manifest["status"]]


def _preload() -> None:
    """The graph, Ray Data and every installed encoder family (torch with them)."""
    for name in ("pipeline.graph", "ray.data"):
        importlib.import_module(name)
    from encoders import FAMILIES

    FAMILIES.load_all()


def user_message(exc: BaseException) -> str:
    cause = unwrap_config_error(exc)
    return str(cause if cause is not None else exc).splitlines()[0]


def unwrap_config_error(exc: BaseException | None) -> BaseException | None:
    from pipeline.config import ConfigError

    seen = 0
    while exc is not None and seen < 10:
        if type(exc) is ConfigError:
            return exc
        inner = getattr(exc, "cause", None)
        if isinstance(inner, ConfigError):
            return inner
        exc = exc.__cause__ or exc.__context__ or (inner if isinstance(inner, BaseException) else None)
        seen += 1
    return None


def print_summary(manifest: dict[str, Any], path: str, wall: float | None) -> None:
    """The run's summary; its seconds and rows/s are the manifest's (``wall`` is unused but kept
    for callers)."""
    timing = manifest.get("timing", {})
    rows = [
        ("status", manifest["status"]),
        ("output", path),
        ("rows", f"{manifest['rows']:,} ({timing.get('rows_this_run', 0):,} this run)"),
        ("rows with errors", f"{manifest['rows_with_errors']:,} ({manifest['error_rate']:.2%})"),
    ]
    rows += [(f"  {code}", f"{count:,}") for code, count in manifest["errors"].items()]
    rows += [("seconds", f"{timing.get('seconds', 0.0):.1f}"), ("rows/s", f"{timing.get('rows_per_second') or 0:,.1f}")]
    rows += [("warning", line) for line in manifest.get("warnings", [])]
    width = max(len(k) for k, _ in rows)
    print("\nomniembed summary")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


def _committed(args: argparse.Namespace) -> str:
    """One line for Ctrl-C: what the output holds now, and how to go on."""
    output = getattr(args, "output", None)
    if args.command == "run":
        try:
            from pipeline.config import load_config

            output = load_config(args.config).output.path
        except Exception:  # noqa: BLE001 - the line is a courtesy: never a second traceback
            output = None
    if not output:
        return "nothing was committed"
    try:
        from pipeline.sink import committed_parts

        parts = committed_parts(output) or []
    except Exception:  # noqa: BLE001
        parts = []
    rows = sum(int(p.get("rows", 0)) for p in parts)
    return f"{rows:,} rows in {len(parts):,} parts are committed in {output}; run the same command again to resume"


def as_flags(message: str, args: argparse.Namespace) -> str:
    """``omniembed embed`` names its flags, not the config fields it fills in."""
    if args.command != "embed":
        return message
    modalities = _modalities(args)
    replacements = {
        "sources[0]: id_column is required (or set derive_ids: true for ids '<file>:<row>')": (
            "--id-column is required (or --derive-ids for ids '<file>:<row>')"
        ),
        "sources[0].id_column": "--id-column",
        "sources[0].path": "input",
        "sources[0].format": "--format",
        "output.path": "--output",
    }
    for i, modality in enumerate(modalities):
        replacements[f"encoders[{i}].column"] = f"--{modality}-column"
        replacements[f"encoders[{i}].model"] = f"--{modality}-model"
        replacements[f"encoders[{i}]"] = f"--{modality}-model"
    for field_name, flag in replacements.items():
        message = message.replace(field_name, flag)
    return message


if __name__ == "__main__":
    console_main()
