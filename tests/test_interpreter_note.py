"""A machine without PyPy is told so: a run on CPython says, once, in one line, how much faster PyPy
trains and the README's command that installs it (tools/venv says the same when it builds a
CPython venv). On PyPy nothing is said."""

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_nn.kernels import INSTALL_PYPY, PYPY_EPOCH_SPEEDUP, slow_path_note

ROOT = Path(__file__).resolve().parent.parent
ON_PYPY = platform.python_implementation() == "PyPy"


def test_the_note_names_the_readme_s_command_and_figure():
    readme = (ROOT / "README.md").read_text()
    assert f"{INSTALL_PYPY}   # optional, recommended: PyPy trains {PYPY_EPOCH_SPEEDUP} faster" in readme
    assert "slow_path_note" in (ROOT / "tools" / "venv").read_text()  # the venv builder prints this very note
    if ON_PYPY:
        assert slow_path_note() == ""
    else:
        note = slow_path_note()
        assert "\n" not in note and INSTALL_PYPY in note and PYPY_EPOCH_SPEEDUP in note
        assert platform.python_version() in note


def cpython() -> str:
    """A CPython to run the trainer with: this one, or the machine's python3 (sharing this checkout)."""
    if not ON_PYPY:
        return sys.executable
    found = shutil.which("python3")
    if not found or "PyPy" in subprocess.run([found, "-c", "import platform; print(platform.python_implementation())"],
                                             capture_output=True, text=True).stdout:
        pytest.skip("no CPython on the PATH")
    if subprocess.run([found, "-c", "import psutil"], capture_output=True).returncode != 0:
        pytest.skip("the PATH's CPython has no psutil")
    return found


@pytest.mark.parametrize("which", ["CPython", "this interpreter"])
def test_a_run_says_it_once_on_cpython_only(which, tiny_data, tmp_path):
    exe = cpython() if which == "CPython" else sys.executable
    args = ["-m", "parallel_nn", "--workers", "1", "--epochs", "1", "--batch-size", "300", "--limit-train", "600",
            "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "run")]
    done = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    on_cpython = "PyPy" not in subprocess.run([exe, "-c", "import platform; print(platform.python_implementation())"],
                                              capture_output=True, text=True).stdout
    notes = [line for line in done.stdout.splitlines() if INSTALL_PYPY in line]
    assert len(notes) == (1 if on_cpython else 0)
    quiet = subprocess.run([exe, *args[:-2], "--run-dir", str(tmp_path / "quiet"), "--quiet"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert quiet.returncode == 0 and INSTALL_PYPY not in quiet.stdout + quiet.stderr  # --quiet stays quiet
