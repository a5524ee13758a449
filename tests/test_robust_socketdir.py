"""Issue 17 point 5: the socket directory cannot be taken over.

Without XDG_RUNTIME_DIR the default is $TMPDIR/dsd-<uid>/<instance> (TMPDIR defaults to /tmp):
here TMPDIR is a private sticky, world-writable directory standing in for /tmp, and "another
user" is uid 65534 (these tests chown, so they need root or CAP_CHOWN; on this machine they run
as root).  The daemon, `dsd stop` and clients refuse a directory another user owns or can write,
a symlink planted by another user, and a non-sticky world-writable parent."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsd.client import Client, DaemonNotRunning
from dsd.daemon.instance_dir import UnsafeSocketDir, check_instance_dir, make_instance_dir
from tests.test_daemon_util import REPO

OTHER = 65534


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.fail("these tests chown to another uid: run them as root (the dev VM does)")
    t = tmp_path / "tmp"
    t.mkdir()
    os.chmod(t, 0o1777)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("DSD_SOCKET_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(t))
    monkeypatch.setenv("DSD_INSTANCE", "probe")
    return t


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "DSD_SOCKET_DIR")}
    env.update(kw)
    return env


def _dsd(args, env):
    return subprocess.run([sys.executable, "-m", "dsd.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_default_dir_is_created_private(tmpdir_env):
    from dsd.daemon.protocol import resolve_socket_dir

    d = resolve_socket_dir()
    assert d == str(tmpdir_env / f"dsd-{os.getuid()}" / "probe")
    make_instance_dir(d)
    for p in (d, os.path.dirname(d)):
        st = os.lstat(p)
        assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
    check_instance_dir(d)


def test_dir_of_another_user_is_refused_by_start_stop_and_clients(tmpdir_env, tmp_path):
    user_dir = tmpdir_env / f"dsd-{os.getuid()}"
    user_dir.mkdir(mode=0o700)
    (user_dir / "probe").mkdir(mode=0o700)
    os.chown(user_dir, OTHER, OTHER)                  # created first by someone else
    env = _env(TMPDIR=str(tmpdir_env), DSD_INSTANCE="probe", DSD_LOG_FILE=str(tmp_path / "log"))
    for args in (["start", "--timeout", "30"], ["stop"], ["status"]):
        p = _dsd(args, env)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert f"belongs to uid {OTHER}, not you" in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert sorted(os.listdir(user_dir / "probe")) == []       # nothing written there
    with pytest.raises(UnsafeSocketDir, match="another user could replace"):
        Client().status()


@pytest.mark.parametrize("attack", ["group_writable", "other_owned_instance", "planted_symlink",
                                    "open_parent", "file_not_dir"])
def test_takeover_variants_are_refused(tmpdir_env, tmp_path, attack):
    user_dir = tmpdir_env / f"dsd-{os.getuid()}"
    inst = user_dir / "probe"
    if attack == "group_writable":
        user_dir.mkdir(mode=0o700)
        os.chmod(user_dir, 0o777)
        want = "is writable by other users"
    elif attack == "other_owned_instance":
        user_dir.mkdir(mode=0o700)
        inst.mkdir(mode=0o700)
        os.chown(inst, OTHER, OTHER)
        want = f"belongs to uid {OTHER}"
    elif attack == "planted_symlink":
        mine = tmp_path / "mine"
        mine.mkdir(mode=0o700)
        os.symlink(mine, user_dir)
        os.lchown(user_dir, OTHER, OTHER)     # the other user's link to a directory of ours
        want = "symbolic link"
    elif attack == "open_parent":
        os.chmod(tmpdir_env, 0o777)           # world-writable without the sticky bit
        want = "writable by other users and not sticky"
    else:
        user_dir.write_text("")
        want = "not a directory"
    with pytest.raises(UnsafeSocketDir, match=want):
        make_instance_dir(str(inst))
    with pytest.raises(UnsafeSocketDir, match=want):
        Client().status()


def test_missing_dir_is_daemon_not_running(tmpdir_env):
    with pytest.raises(DaemonNotRunning):
        Client().status()
