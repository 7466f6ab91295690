"""The garbage collector settings PyPy is started with: a young generation sized for a training step,
and, before PyPy 7.3.16, marking in one step, which keeps clear of the incremental collector's
crash (bench/pypy_gc.py reproduces it). The trainer starts itself again with them; a value the user
set is kept; make and CI give pytest the same marking."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_nn.__main__ import FIXED_COLLECTOR, NURSERY, ONE_STEP_MARKING, interpreter_options, pypy_settings

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("PYPY_GC_NURSERY", "PYPY_GC_INCREMENT_STEP")


def test_the_settings_by_interpreter_and_version():
    assert pypy_settings("CPython", ()) == {}
    assert pypy_settings("PyPy", (7, 3, 11)) == {"PYPY_GC_NURSERY": NURSERY, "PYPY_GC_INCREMENT_STEP": ONE_STEP_MARKING}
    assert pypy_settings("PyPy", (7, 3, 15)) == pypy_settings("PyPy", (7, 3, 11))
    assert pypy_settings("PyPy", FIXED_COLLECTOR) == {"PYPY_GC_NURSERY": NURSERY}
    assert pypy_settings("PyPy", (7, 4, 0)) == {"PYPY_GC_NURSERY": NURSERY}


@pytest.mark.parametrize("user", [{}, {"PYPY_GC_NURSERY": "8MB"}])
def test_python_m_starts_again_with_them_and_keeps_the_user_s(user, tmp_path):
    (tmp_path / "show_settings.py").write_text(
        f"import os\nprint('again', *(os.environ.get(n, '-') for n in {NAMES!r}))\n")
    env = {name: value for name, value in os.environ.items() if name not in NAMES}
    env.update(user, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    start = ("from parallel_nn.__main__ import start_with_pypy_settings as start\n"
             "start('show_settings')\nprint('not again')\n")
    done = subprocess.run([sys.executable, "-c", start], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = {**pypy_settings(), **user}
    if expected == user:  # nothing to add: this interpreter is not started again
        assert done.stdout == "not again\n"
    else:
        assert done.stdout.split() == ["again", *(expected.get(name, "-") for name in NAMES)]


@pytest.mark.parametrize("options", [[], ["-X", "faulthandler", "-W", "ignore", "-O"]])
def test_a_start_again_keeps_the_arguments_in_a_c_locale_and_the_interpreter_s_options(options, tmp_path):
    """PyPy reads arguments as UTF-8 whatever the locale; in a C locale its file system encoding is
    ASCII, and a str argument outside it would not go back through execv."""
    (tmp_path / "show_start.py").write_text(
        "import sys\nprint(ascii(sys.argv[1:]), sorted(sys._xoptions), sys.warnoptions, sys.flags.optimize)\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    start = "from parallel_nn.__main__ import start_with_pypy_settings as start\nstart('show_start')\n"
    arguments = ["snow \u2603", "--run-dir", "/tmp/ü", "b\udcffyte"]
    done = subprocess.run([sys.executable, *options, "-c", start, *arguments], capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    if pypy_settings() == {}:
        assert done.stdout == b""  # nothing to add here: not started again
        return
    expected = ([] if not options else ["faulthandler"]), ([] if not options else ["ignore"]), (1 if options else 0)
    assert done.stdout.decode().split("\n")[0] == f"{ascii(arguments)} {expected[0]} {expected[1]} {expected[2]}"


def test_the_interpreter_options_are_written_as_given():
    assert set(interpreter_options()) <= {f"-W{w}" for w in sys.warnoptions} | {
        f"-X{k}" if v is True else f"-X{k}={v}" for k, v in sys._xoptions.items()} | {"-O", "-b", "-B", "-s", "-E"}


def test_make_and_ci_give_pytest_the_same_marking():
    setting = f"PYPY_GC_INCREMENT_STEP:-{ONE_STEP_MARKING}}}"
    makefile = (ROOT / "Makefile").read_text()
    assert f"PYTEST := PYPY_GC_INCREMENT_STEP=$${{{setting}" in makefile
    assert "\t$(PYTEST)\n" in makefile and makefile.count("$(PY) -m pytest") == 1  # every pytest is $(PYTEST)
    assert f'export PYPY_GC_INCREMENT_STEP="${{{setting}"' in (ROOT / ".ci" / "run").read_text()


def test_the_crash_study_runs_and_says_what_it_needs():
    study = [sys.executable, "-m", "bench.pypy_gc"]
    done = subprocess.run([*study, "--runs", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--runs must be at least 1" in done.stderr
    done = subprocess.run([*study, "--runs", "1", "--trainings", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if pypy_settings() == {}:
        assert done.returncode == 1 and "needs PyPy" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| in ")]
    assert len(rows) == 2 and all(row[2].strip() == "1" and row[5].strip().endswith(" s") for row in rows), done.stdout
