"""The whole tree is pyflakes-clean: the programs, the tasks (Python scripts
without a .py suffix included), the tests and the tools."""

import subprocess
import sys

from conftest import REPO

PYTHON_SHEBANGS = (b"#!/usr/bin/python3", b"#!/usr/bin/env python3")


def python_sources():
    sources = sorted(REPO.glob("*.py")) + sorted(REPO.glob("tests/*.py")) + sorted(REPO.glob("tools/*.py"))
    for path in sorted(REPO.glob("tasks.d/*")) + sorted(REPO.glob("tests/recording-tasks/*")):
        if path.is_file() and (path.suffix == ".py" or path.read_bytes().startswith(PYTHON_SHEBANGS)):
            sources.append(path)
    return sources


def test_sources_found():
    names = {path.name for path in python_sources()}
    assert {"snf-image-host.py", "snf-image-helper.py", "snf-image-update-helper.py",
            "50ChangePassword", "snf_image_tasklib.py", "conftest.py"} <= names


def test_pyflakes_clean():
    result = subprocess.run([sys.executable, "-m", "pyflakes", *map(str, python_sources())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tools_do_not_import_tests():
    """One-way dependencies: tests may use tools/, tools never use tests/."""
    import ast
    test_modules = {path.stem for path in REPO.glob("tests/*.py")}
    for path in sorted(REPO.glob("tools/*.py")):
        source = path.read_text()
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & test_modules, f"{path.name} imports {imported & test_modules}"
        assert '"tests"' not in source and "'tests'" not in source, f"{path.name} reaches into tests/"
