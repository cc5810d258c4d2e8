"""The project metadata stays consistent: packages listed, README and CI agree."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(py["tool"]["setuptools"]["packages"])
    mapping = py["tool"]["setuptools"]["package-dir"]
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    # Subfolders of serve/ that are mapped elsewhere are not under serve/.
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1: readme.index("```bash") + 3]
    install, test = (line.split("#")[0].strip() for line in block)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci, "CI must run the README's test command"
    pip_args = re.search(r"pip install (.+?) &&", install).group(1)
    assert f"pip install -q {pip_args}" in ci, "CI must install what the README installs"
