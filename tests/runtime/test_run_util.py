"""util.run: the one subprocess choke point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vmforge.util.run import CommandError, clean_env, run, spawn


def test_clean_environment_and_stdin(monkeypatch, tmp_path):
    monkeypatch.setenv("VMFORGE_SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    script = ("import os,sys; print(sorted(os.environ)); print(repr(sys.stdin.read()))")
    out = run([Path(sys.executable), "-c", script]).stdout.splitlines()
    names = eval(out[0])  # noqa: S307 - our own output
    assert "VMFORGE_SECRET_TOKEN" not in names and "LD_PRELOAD" not in names
    assert "PATH" in names and "LC_ALL" in names
    assert out[1] == "''"  # stdin is /dev/null, never the terminal


def test_fspath_arguments(tmp_path):
    target = tmp_path / "x y"
    run([sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('ok')", target])
    assert target.read_text() == "ok"


def test_failure_carries_code_command_and_output():
    with pytest.raises(CommandError) as info:
        run([sys.executable, "-c", "import sys; print('bad thing', file=sys.stderr); sys.exit(3)"])
    err = info.value
    assert err.returncode == 3 and "bad thing" in err.output
    assert "exited with code 3" in str(err) and "bad thing" in str(err) and "-c" in str(err)
    assert "\n" not in str(err)


def test_no_check_returns_result():
    res = run([sys.executable, "-c", "import sys; sys.exit(5)"], check=False)
    assert res.returncode == 5


def test_timeout_and_missing_program():
    with pytest.raises(CommandError, match="did not finish within 0.5 s"):
        run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    with pytest.raises(CommandError, match="cannot run") as info:
        run(["/nonexistent/vmforge-no-such-program"])
    assert info.value.hint and "installed" in info.value.hint
    with pytest.raises(CommandError, match="empty command"):
        run([])


def test_spawn_background():
    proc = spawn([sys.executable, "-c", "import os; print(os.getsid(0) == os.getpid())"],
                 stdout=-1, new_session=True)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == b"True"


def test_clean_env_extra():
    env = clean_env({"FOO": "1"})
    assert env["FOO"] == "1" and env["LC_ALL"] == "C"
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "TZ", "LC_ALL", "FOO"}
    assert os.environ.get("PATH") is None or env["PATH"] == os.environ["PATH"]
