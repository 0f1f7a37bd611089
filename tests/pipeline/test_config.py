from __future__ import annotations

import textwrap

import pytest

from pipeline.cli import build_parser, config_from_flags
from pipeline.config import ConfigError, StageResources, config_from_dict, load_config

FULL_YAML = """
sources:
  - path: data/products.parquet
    id_column: sku
encoders:
  - output: title
    column: description
    model: sentence-transformers/all-MiniLM-L6-v2
    pooling: mean
    normalize: true
resources:
  encode: {gpus: auto, cpus: 1, pool: [1, 4], batch_rows: 256, max_tokens: 8192}
output:
  path: out/products
  vector_type: list
  dtype: float32
  on_duplicate_id: error
  max_error_rate: 0.01
"""


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_design_example_loads(tmp_path):
    config = load_config(_write(tmp_path, FULL_YAML))
    assert config.sources[0].id_column == "sku"
    encoder = config.encoders[0]
    assert encoder.columns == {"*": "description"}
    assert encoder.options == {"pooling": "mean", "normalize": True}
    assert config.stage("encode") == StageResources(cpus=1.0, gpus="auto", pool=(1, 4), batch_rows=256, max_tokens=8192)
    assert config.output.max_error_rate == 0.01


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"output": {"path": "o", "vector_type": "array"}}, "output.vector_type"),
        ({"output": {"path": "o", "max_error_rate": 2}}, "output.max_error_rate"),
        ({"output": {"path": "o", "on_duplicate_id": "last"}}, "output.on_duplicate_id"),
        ({"output": {"path": "o", "colour": 1}}, "'colour'"),
        ({"resources": {"encode": {"pool": [3, 1]}}}, "resources.encode.pool"),
        ({"resources": {"encode": {"gpus": "lots"}}}, "resources.encode.gpus"),
        ({"resources": {"encode": {"batch_rows": 0}}}, "resources.encode.batch_rows"),
        ({"resources": {"decode": {}}}, "'decode'"),
        ({"sources": []}, "sources"),
        ({"sources": [{"path": "x", "kind": "video"}]}, "sources[0].kind"),
        ({"encoders": [{"output": "bad name", "column": "c", "model": "m"}]}, "encoders[0].output"),
        ({"encoders": [{"output": "a", "model": "m"}]}, "encoders[0]"),
        (
            {"encoders": [{"output": "a", "column": "c", "model": "m"}, {"output": "a", "column": "d", "model": "m"}]},
            "'a'",
        ),
    ],
)
def test_bad_config_names_the_field(patch, field):
    data = {
        "sources": [{"path": "in.parquet", "id_column": "id"}],
        "encoders": [{"output": "t", "column": "c", "model": "m"}],
        "output": {"path": "out"},
    }
    data.update(patch)
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert field in message
    assert "\n" not in message


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(_write(tmp_path, "sources: [\n  - path: x\n bad"))


def test_flags_build_the_same_config_as_yaml(tmp_path):
    yaml_config = load_config(
        _write(
            tmp_path,
            """
        sources: [{path: in.parquet, id_column: sku}]
        encoders: [{output: description, column: description, model: m, pooling: cls, prefix: "passage: "}]
        resources: {encode: {batch_rows: 64, max_tokens: 4096}}
        output: {path: out, max_error_rate: 0.5}
    """,
        )
    )
    args = build_parser().parse_args(
        [
            "embed",
            "in.parquet",
            "--output",
            "out",
            "--id-column",
            "sku",
            "--text-column",
            "description",
            "--text-model",
            "m",
            "--pooling",
            "cls",
            "--prefix",
            "passage: ",
            "--batch-rows",
            "64",
            "--max-tokens",
            "4096",
            "--max-error-rate",
            "0.5",
        ]
    )
    assert config_from_dict(config_from_flags(args)) == yaml_config


def test_output_name_defaults_to_the_column():
    def output_for(*flags):
        args = build_parser().parse_args(
            ["embed", "in.parquet", "--output", "o", "--id-column", "id", "--text-model", "m", *flags]
        )
        return config_from_dict(config_from_flags(args)).encoders[0].output

    assert output_for("--text-column", "text") == "text"
    assert output_for("--text-column", "body") == "body"
    assert output_for("--text-column", "body", "--output-name", "doc") == "doc"


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--output",
        "--id-column",
        "--text-column",
        "--text-model",
        "--output-name",
        "--max-error-rate",
        "--batch-rows",
        "--max-tokens",
        "--overwrite",
    ):
        assert flag in out
    parser = build_parser()
    embed = parser._subparsers._group_actions[0].choices["embed"]
    undocumented = [a.dest for a in embed._actions if not a.help]
    assert undocumented == []


def test_precision_and_backend_flags_pin_the_encoders():
    def encoders(*flags):
        base = ["embed", "in.parquet", "--output", "o", "--id-column", "id", "--text-column", "t", "--text-model", "m"]
        base += ["--image-column", "img", "--image-model", "efficientnet-lite0"]
        return config_from_flags(build_parser().parse_args([*base, *flags]))["encoders"]

    assert all("precision" not in e and "backend" not in e for e in encoders())  # auto, torch: the defaults
    pinned = encoders("--precision", "fp32", "--backend", "onnx")
    assert [e["precision"] for e in pinned] == ["fp32", "fp32"]
    assert [e.get("backend") for e in pinned] == ["onnx", None]  # a text tower's option only
    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", "x", "--output", "o", "--precision", "int4"])
