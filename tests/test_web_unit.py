"""The browser extension's unit tests (`node --test web/tests/`), run from pytest so that one command and one exit
status cover both suites."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT


def test_web_unit_tests_pass():
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed: the web unit tests (node --test web/tests/) cannot run")
        pytest.skip("node is not installed: web unit tests (node --test web/tests/) not run")
    p = subprocess.run([node, "--test", "web/tests/"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"node --test web/tests/ failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}"
    # node's runner prints "# pass N" and "# fail 0": at least one test ran
    assert "# fail 0" in p.stdout and "# pass 0" not in p.stdout, p.stdout
