"""omniembed's Ray side: config, sources, stages, the encode adapter, the Parquet sink and the CLI.

Ray is imported lazily, so that entry points can bind a local Ray to loopback first.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config, ConfigError, config_from_dict, load_config

__all__ = ["Config", "ConfigError", "config_from_dict", "embed", "load_config", "run"]


def embed(dataset: Any, config: Any) -> Any:
    """Add ``<output>_embedding``/``<output>_error`` columns to a Ray Dataset (see pipeline.graph.embed)."""
    from pipeline.graph import embed as _embed

    return _embed(dataset, config)


def run(config: Any, overwrite: bool = False, dry_run: bool = False, takeover: bool = False) -> dict[str, Any]:
    """Embed the configured sources into the output folder (see pipeline.graph.run)."""
    from pipeline.graph import run as _run

    return _run(config, overwrite=overwrite, dry_run=dry_run, takeover=takeover)
