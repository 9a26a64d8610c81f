"""The repository's programs as Python modules, for the tools and the tests.

The programs have dash-named files (snf-image-host.py, tasks.d/10FixPartitionTable,
tools/build-test-image.py) that `import` cannot name; `load_script` loads one
by path, once per process. The tests use this module (tests may use tools,
never the other way round).
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_script(name, module_name=None):
    """Import a file of the repository (e.g. 'snf-image-host.py') as a module."""
    path = REPO / name
    module_name = module_name or path.stem.replace("-", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader = importlib.machinery.SourceFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_loader(module_name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    loader.exec_module(module)
    return module
