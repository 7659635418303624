"""The real Ray cluster launcher on this machine: sshd on 127.0.0.1 (key only, its own
config, host key and PID file), ``ray up -y`` of a copy of ``cluster.local.yaml``, a study
submitted through the Jobs API, its results queried, then ``ray down -y``.

Ray always connects by ssh on port 22, and ``ray up`` / ``ray down`` stop every Ray
process on the host: the test skips when port 22 is taken or sshd is missing, and it runs
alone in the sequential test session (CI installs openssh-server and rsync).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
BIN = Path(sys.executable).parent


def port_22_free() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 22))
        except OSError:
            return False
    return True


def run(*cmd: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


@pytest.fixture()
def sshd(tmp_path: Path) -> Iterator[Path]:
    """A private sshd on 127.0.0.1:22 that accepts one fresh key; yields the key's path."""
    if not os.path.exists(SSHD) or not shutil.which("rsync"):
        pytest.skip("needs openssh-server and rsync (CI installs them)")
    if os.geteuid() != 0 or not port_22_free():
        pytest.skip("needs root and a free port 22 (Ray's launcher always uses port 22)")
    key, host_key = tmp_path / "id_ed25519", tmp_path / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                       check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id_ed25519.pub").read_text())
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", "Port 22", f"HostKey {host_key}",
        f"PidFile {tmp_path / 'sshd.pid'}", f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "StrictModes no",
        "UsePAM no", "MaxSessions 50", "MaxStartups 50"]) + "\n")
    os.makedirs("/run/sshd", exist_ok=True)
    daemon = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE,
                              start_new_session=True)
    deadline = time.monotonic() + 20
    while port_22_free():
        assert daemon.poll() is None, daemon.stderr.read().decode()
        assert time.monotonic() < deadline, "sshd did not start"
        time.sleep(0.2)
    try:
        yield key
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=10)


@pytest.fixture()
def ray_on_login_path() -> Iterator[None]:
    """Ray runs its node commands (``ray start``, ``ray stop`` on ``ray down``) in an ssh
    login shell, which must find ``ray``: put this venv first in ~/.bashrc, then restore."""
    bashrc = Path.home() / ".bashrc"
    original = bashrc.read_bytes() if bashrc.exists() else None
    line = f"\nexport PATH={BIN}:$PATH  # added by dpstudy's launcher test\n"
    with open(bashrc, "a", encoding="utf-8") as f:
        f.write(line)
    try:
        yield
    finally:
        if original is None:
            bashrc.unlink()
        else:
            bashrc.write_bytes(original)


def launcher_config(tmp_path: Path, key: Path) -> Path:
    """``cluster.local.yaml`` with this test's key and only the token to mount."""
    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    config["cluster_name"] = "dpstudy-test"
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(key)}
    config["file_mounts"] = {"~/.ray/auth_token": "~/.ray/auth_token"}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def study_spec(tmp_path: Path) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec.update(name="launched", trials=2, scheduler="none", storage=str(tmp_path / "runs"),
                results=str(tmp_path / "results"),
                confirm={"top": 2, "seeds": 2})  # both trials (one is the baseline) x 2 seeds
    spec["search"].update(max_epochs=1, batch_size=500)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_ray_up_submit_query_ray_down(sshd: Path, ray_on_login_path: None, tmp_path: Path,
                                      job_state) -> None:
    config = launcher_config(tmp_path, sshd)
    up = run(str(BIN / "ray"), "up", "-y", "--no-config-cache", str(config), cwd=ROOT)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        address = "http://127.0.0.1:8265"
        submitted = run(sys.executable, "-m", "study.cli", "submit", str(study_spec(tmp_path)),
                        "--address", address, "--python", sys.executable, cwd=ROOT)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job_id = submitted.stdout.strip().splitlines()[-1]

        deadline = time.monotonic() + 400
        while (status := job_state(address, job_id)) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
            assert time.monotonic() < deadline, f"job still {status}"
            time.sleep(2)
        logs = run(sys.executable, "-m", "study.cli", "logs", job_id, "--address", address,
                   cwd=ROOT)
        assert status == "SUCCEEDED", logs.stdout[-3000:]

        rows = pq.read_table(tmp_path / "results" / "trials.parquet").to_pylist()
        stages = sorted(r["stage"] for r in rows)
        assert stages == ["confirm"] * 4 + ["search"] * 2  # the spec's confirm ran on the job
        assert all(r["epsilon_spent"] <= 3.0 for r in rows)
        query = run(sys.executable, "-m", "study.cli", "query", str(tmp_path / "results"),
                    "--columns", "trial_id,status", "--format", "csv", cwd=ROOT)
        assert query.returncode == 0 and query.stdout.count("completed") == 6
    finally:
        down = run(str(BIN / "ray"), "down", "-y", str(config), cwd=ROOT)
        assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
