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


def test_wheel_ships_every_non_python_file_the_code_reads(tmp_path):
    """A non-editable install (the Docker image) needs the CPU kernels' C source next to cpu_lib.py."""
    import subprocess
    import sys
    import zipfile

    import pytest

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip("the build needs setuptools>=68 (pyproject.toml); .ci/run installs it")
    import shutil

    src = tmp_path / "src"  # a copy: setuptools writes build/ next to the project
    for name in ("serve", "kernels", "loadtest"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("packserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"packserve/kernels/csrc/cpu_ops.cpp", "packserve/kernels/csrc/cpu_kernels.h", "packserve/kernels/csrc/varlen_attention.h", "packserve/kernels/cpu_lib.py"} <= set(names)
