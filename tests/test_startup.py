"""Commands that neither merge nor evaluate start without importing torch (seconds on a small machine)."""

from __future__ import annotations

import subprocess
import sys

from simmerge_bandit.lazy import LazyModule

_PROBE = """
import sys
import simmerge_bandit.cli, simmerge_bandit.engine, simmerge_bandit.daemon, simmerge_bandit.backend
from simmerge_bandit import descriptor
from simmerge_bandit.methods import get_method, method_names
for name in method_names():
    get_method(name).validate({})
descriptor.current()
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_the_cli_engine_and_daemon_import_without_torch():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_lazy_module_imports_on_first_attribute_read():
    lazy = LazyModule("json")
    assert "not imported yet" in repr(lazy)
    assert lazy.dumps([1]) == "[1]"
    assert "(imported)" in repr(lazy)
    import json

    assert lazy.loads is json.loads
