"""The run configuration: the YAML of DESIGN.md's contract, validated at load time.

Every error is a ``ConfigError`` whose message is one line naming the field, the bad value
and the fix. The CLI flags build the same objects.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

SOURCE_KINDS = ("table", "text", "image", "audio")
TABLE_FORMATS = ("parquet", "jsonl", "csv", "webdataset")
VECTOR_TYPES = ("list", "fixed_size_list")
VECTOR_DTYPES = ("float32", "float16")
OUTPUT_FORMATS = ("parquet", "lance")
LANCE_INDEXES = ("ivf_pq", "ivf_flat", "ivf_hnsw_sq")
DUPLICATE_POLICIES = ("error", "keep-first", "trust")
JOIN_MODES = ("left", "inner", "outer")
STAGES = ("read", "prepare", "encode", "write")
PREPARE_PLACES = ("auto", "tasks", "encoder")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(ValueError):
    """A usage or config error: one line for the user, exit code 2."""


@dataclass(frozen=True)
class StageResources:
    """Resources of one stage, as data; the adapter turns them into ``map_batches`` arguments.

    ``gpus`` is a number (fractions allowed) or ``"auto"``; ``pool`` is an actor pool's
    (min, max) size; ``threads`` is torch's thread count inside an encoder actor, which is not
    its CPU reservation (``None``: the node's otherwise idle cores).
    """

    cpus: float | None = None
    gpus: float | str = "auto"
    memory: int | None = None
    pool: tuple[int, int] | None = None
    batch_rows: int | None = None
    max_tokens: int = 8192
    threads: int | None = None
    resources: Mapping[str, float] | None = None  # Ray custom resources, to place the stage
    where: str = "auto"  # prepare only: in CPU tasks ("tasks") or in the encoder actor ("encoder")


@dataclass(frozen=True)
class SourceConfig:
    path: str | tuple[str, ...]  # a file, folder or glob, or a list of them read as one source
    kind: str = "table"
    format: str | None = None
    id_column: str | None = None
    derive_ids: bool = False
    passthrough: tuple[str, ...] | None = None
    infer_types: bool = False  # CSV: infer column types instead of reading text (ids stay text)
    join: str | None = None  # left | inner | outer: match rows by id to the sources above

    @property
    def paths(self) -> tuple[str, ...]:
        """The path, or each path of a list."""
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)


@dataclass(frozen=True)
class EncoderConfig:
    output: str
    model: str
    columns: Mapping[str, str]  # modality -> input column; {"*": col} until the family is known
    family: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    resources: StageResources | None = None
    dimensions: int | None = None  # keep the first N values, renormalized (Matryoshka models)


@dataclass(frozen=True)
class OutputConfig:
    path: str
    vector_type: str = "list"
    dtype: str = "float32"
    on_duplicate_id: str = "error"
    max_error_rate: float = 0.01
    rows_per_file: int | None = None  # rows per part: None picks about a minute of encoder work
    commit_seconds: float = 15.0  # commit-log flush period: a killed driver loses at most this much
    lease_seconds: float = 10.0  # writer-lease heartbeat; a lease 3 heartbeats old is abandoned
    format: str = "parquet"  # parquet | lance (a Lance dataset at path)
    index: str | None = None  # lance only: a vector index per embedding column, built at the end


@dataclass(frozen=True)
class Config:
    sources: tuple[SourceConfig, ...]
    encoders: tuple[EncoderConfig, ...]
    output: OutputConfig
    resources: Mapping[str, StageResources] = field(default_factory=dict)

    def stage(self, name: str, encoder: EncoderConfig | None = None) -> StageResources:
        if encoder is not None and encoder.resources is not None and name == "encode":
            return encoder.resources
        return self.resources.get(name, StageResources())

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (for the manifest and the resume fingerprint)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | Path) -> Config:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    return config_from_dict(data)


def config_from_dict(data: Any) -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError("config must be a mapping with sources, encoders and output")
    _no_unknown(data, ("sources", "encoders", "resources", "output"), "config")
    sources = tuple(_source(s, f"sources[{i}]") for i, s in enumerate(_list(data, "sources", "config")))
    if sources and sources[0].join:
        raise ConfigError("sources[0].join: the first source has no source above it to join")
    encoders = tuple(_encoder(e, f"encoders[{i}]") for i, e in enumerate(_list(data, "encoders", "config")))
    outputs = [e.output for e in encoders]
    for name in outputs:
        if outputs.count(name) > 1:
            raise ConfigError(f"encoders: output name {name!r} is used twice; give each encoder its own output")
    resources_data = data.get("resources") or {}
    if not isinstance(resources_data, Mapping):
        raise ConfigError("resources must be a mapping of stage name to resources")
    _no_unknown(resources_data, STAGES, "resources")
    resources = {name: _resources(spec, f"resources.{name}", name) for name, spec in resources_data.items()}
    if "output" not in data:
        raise ConfigError("config: output is required (output: {path: ...})")
    return Config(sources, encoders, _output(data["output"]), resources)


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty list")
    return value


def _no_unknown(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown field {key!r}; valid fields: {', '.join(allowed)}")


def _get(
    data: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    default: Any = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{where}.{key}: expected {kinds[0].__name__}, got {value!r}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}.{key}: expected {kinds[0].__name__}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}.{key}: {value!r} is not valid; valid values: {', '.join(choices)}")
    return value


def _mapping(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    return data


def _source(data: Any, where: str) -> SourceConfig:
    data = _mapping(data, where)
    _no_unknown(
        data, ("path", "kind", "format", "id_column", "derive_ids", "passthrough", "infer_types", "join"), where
    )
    path = _source_path(data.get("path"), where)
    passthrough = data.get("passthrough")
    if passthrough is not None and not (isinstance(passthrough, list) and all(isinstance(c, str) for c in passthrough)):
        raise ConfigError(f"{where}.passthrough must be a list of column names")
    fmt = _get(data, "format", str, where, None, TABLE_FORMATS)
    if fmt == "webdataset" and (data.get("id_column") or data.get("derive_ids")):
        raise ConfigError(
            f"{where}.id_column: a webdataset source's id is each sample's key; remove id_column/derive_ids"
        )
    return SourceConfig(
        path=path,
        kind=_get(data, "kind", str, where, "table", SOURCE_KINDS),
        format=fmt,
        id_column=_get(data, "id_column", str, where),
        derive_ids=_get(data, "derive_ids", bool, where, False),
        join=_get(data, "join", str, where, None, JOIN_MODES),
        passthrough=tuple(passthrough) if passthrough is not None else None,
        infer_types=_get(data, "infer_types", bool, where, False),
    )


def _source_path(path: Any, where: str) -> str | tuple[str, ...]:
    """A path, or a non-empty list of paths on one filesystem (they share one root)."""
    if path is None or path == "":
        raise ConfigError(f"{where}.path is required")
    if isinstance(path, str):
        return path
    if not isinstance(path, list) or not path:
        raise ConfigError(f"{where}.path must be a path or a list of paths, got {path!r}")
    for j, element in enumerate(path):
        if not isinstance(element, str) or not element:
            raise ConfigError(f"{where}.path must be a path or a list of paths; path[{j}] is {element!r}")
        if _filesystem(element) != _filesystem(path[0]):
            raise ConfigError(f"{where}.path[{j}]: {element!r} is on another filesystem than path[0]")
    return tuple(path)


def _filesystem(path: str) -> str:
    """Scheme and bucket or host; every local path (``file://`` too) is one filesystem."""
    if "://" not in path or path.startswith("file://"):
        return ""
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


_ENCODER_FIELDS = ("output", "model", "column", "columns", "family", "resources", "dimensions")


def _encoder(data: Any, where: str) -> EncoderConfig:
    data = _mapping(data, where)
    output = _get(data, "output", str, where)
    if not output or not _NAME.match(output):
        raise ConfigError(f"{where}.output must be a name of letters, digits and _, got {output!r}")
    model = _get(data, "model", str, where)
    if not model:
        raise ConfigError(f"{where}.model is required (a registry alias, hub id or local folder)")
    if ("column" in data) == ("columns" in data):
        raise ConfigError(f"{where}: give exactly one of column (one input) or columns (modality: column)")
    if "column" in data:
        columns: dict[str, str] = {"*": _get(data, "column", str, where)}
    else:
        raw = _mapping(data["columns"], f"{where}.columns")
        if not all(isinstance(v, str) for v in raw.values()) or set(raw) - {"text", "image", "audio"}:
            raise ConfigError(f"{where}.columns maps text/image/audio to column names, got {dict(raw)!r}")
        columns = dict(raw)
    options = {k: v for k, v in data.items() if k not in _ENCODER_FIELDS}
    resources = _resources(data["resources"], f"{where}.resources", "encode") if data.get("resources") else None
    dimensions = _get(data, "dimensions", int, where)
    if dimensions is not None and dimensions < 1:
        raise ConfigError(f"{where}.dimensions: must be a positive number of values, got {dimensions!r}")
    return EncoderConfig(output, model, columns, _get(data, "family", str, where), options, resources, dimensions)


def _resources(data: Any, where: str, stage: str) -> StageResources:
    data = _mapping(data, where)
    _no_unknown(data, tuple(StageResources.__dataclass_fields__), where)
    gpus = data.get("gpus", "auto")
    if not (gpus == "auto" or (isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and gpus >= 0)):
        raise ConfigError(f"{where}.gpus: expected a number >= 0 or 'auto', got {gpus!r}")
    pool = data.get("pool")
    if pool is not None:
        if isinstance(pool, int) and not isinstance(pool, bool):
            pool = [pool, pool]
        if not (
            isinstance(pool, list)
            and len(pool) == 2
            and all(isinstance(p, int) for p in pool)
            and 1 <= pool[0] <= pool[1]
        ):
            raise ConfigError(f"{where}.pool: expected [min, max] with 1 <= min <= max, got {pool!r}")
        pool = (pool[0], pool[1])
    result = StageResources(
        cpus=_get(data, "cpus", float, where),
        gpus=float(gpus) if gpus != "auto" else "auto",
        memory=_get(data, "memory", int, where),
        pool=pool,
        batch_rows=_get(data, "batch_rows", int, where),
        max_tokens=_get(data, "max_tokens", int, where, 8192),
        threads=_get(data, "threads", int, where),
        resources=_custom_resources(data.get("resources"), f"{where}.resources"),
        where=_get(data, "where", str, where, "auto", PREPARE_PLACES),
    )
    if result.where != "auto" and stage != "prepare":
        raise ConfigError(f"{where}.where: only resources.prepare has a place (tasks or encoder)")
    for name in ("cpus", "batch_rows", "max_tokens", "threads", "memory"):
        value = getattr(result, name)
        if value is not None and value <= 0 and not (name == "cpus" and value == 0):
            raise ConfigError(f"{where}.{name}: must be positive, got {value!r}")
    return result


def _custom_resources(data: Any, where: str) -> dict[str, float] | None:
    if data is None:
        return None
    data = _mapping(data, where)
    for name, amount in data.items():
        if name in ("CPU", "GPU", "memory") or not isinstance(name, str):
            raise ConfigError(f"{where}: {name!r} is not a custom resource; use cpus, gpus or memory")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigError(f"{where}.{name}: expected a number > 0, got {amount!r}")
    return {name: float(amount) for name, amount in data.items()}


def _output(data: Any) -> OutputConfig:
    where = "output"
    data = _mapping(data, where)
    _no_unknown(data, tuple(OutputConfig.__dataclass_fields__), where)
    path = _get(data, "path", str, where)
    if not path:
        raise ConfigError("output.path is required")
    rate = _get(data, "max_error_rate", float, where, 0.01)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"output.max_error_rate: must be between 0 and 1, got {rate!r}")
    rows_per_file = _get(data, "rows_per_file", int, where, None)
    if rows_per_file is not None and rows_per_file < 1:
        raise ConfigError(f"output.rows_per_file: must be positive, got {rows_per_file!r}")
    commit_seconds = _get(data, "commit_seconds", float, where, 15.0)
    if commit_seconds < 0:
        raise ConfigError(f"output.commit_seconds: must be >= 0, got {commit_seconds!r}")
    lease_seconds = _get(data, "lease_seconds", float, where, 10.0)
    if lease_seconds <= 0:
        raise ConfigError(f"output.lease_seconds: must be > 0, got {lease_seconds!r}")
    return OutputConfig(
        path=path,
        vector_type=_get(data, "vector_type", str, where, "list", VECTOR_TYPES),
        dtype=_get(data, "dtype", str, where, "float32", VECTOR_DTYPES),
        on_duplicate_id=_get(data, "on_duplicate_id", str, where, "error", DUPLICATE_POLICIES),
        max_error_rate=rate,
        rows_per_file=rows_per_file,
        commit_seconds=commit_seconds,
        lease_seconds=lease_seconds,
        format=_get(data, "format", str, where, "parquet", OUTPUT_FORMATS),
        index=_output_index(data, where),
    )


def _output_index(data: Mapping[str, Any], where: str) -> str | None:
    index = _get(data, "index", str, where, None, LANCE_INDEXES)
    if index is not None and data.get("format") != "lance":
        raise ConfigError(f"{where}.index: a vector index is built for format: lance only")
    return index
