"""The README's two opening commands are the ones CI and newcomers run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return blocks[:2]


def test_readme_opens_with_install_and_run_then_install_and_test():
    run, test = readme_commands()
    assert "pip install" in run and "omniembed run examples/" in run
    assert "pip install" in test and "pytest" in test
    config = run.split("omniembed run ")[1].split()[0]
    assert (ROOT / config).is_file()


def test_ci_runs_exactly_the_readme_test_command():
    _, test = readme_commands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in lines
