"""OpenVINO's tests (``openvino_cases.py``) in a child process, so that OpenVINO is never loaded in
the test run's own process: with it loaded, a later ``fork`` there (``subprocess.run`` in other
tests) crashed the whole run. Skipped without the openvino package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
if __import__("importlib").util.find_spec("openvino") is None:
    pytest.skip("openvino is not installed (pip install 'vitq[openvino]')", allow_module_level=True)


def test_openvino_cases_in_a_child_process():
    cases = Path(__file__).with_name("openvino_cases.py")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                          cwd=root, capture_output=True, text=True, env={**os.environ, "VITQ_OPENVINO_CHILD": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
