"""The package as a user gets it: a wheel, installed non-editably into a fresh virtual environment,
run from outside the checkout. In a checkout every path resolves whatever the packaging says; only
an installed wheel shows whether the bundled model and the `rnnlm.daemon`/`rnnlm.clients` packages
really ship."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import zmq
import msgpack

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the files git knows, so nothing left in build/ by an earlier build ships."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    listed = run("git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, source, timeout=600)
    (built,) = out.glob("rnnlm-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A new virtual environment holding the wheel and nothing of the checkout.

    Its third-party dependencies (torch, numba, …) are this test environment's, reached through a
    plain path line: installing torch again would cost a minute and a gigabyte and test pip, not us.
    A path line does not run the .pth files there, so the checkout's editable install stays out.
    """
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_carries_the_bundled_files_and_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ["rnnlm/data/default.pt", "rnnlm/data/sample.txt", "rnnlm/__main__.py",
                   "rnnlm/daemon/server.py", "rnnlm/clients/client.py"]:
        assert needed in names, f"{needed} is not in {wheel.name}"
    assert not any(n.startswith(("daemon/", "clients/", "tests/")) for n in names), "generic top-level packages shipped"


def test_the_installed_package_is_the_wheel_not_the_checkout(fresh_venv, tmp_path):
    where = run(fresh_venv / "bin" / "python", "-c",
                "import rnnlm, rnnlm.daemon.server as s; print(rnnlm.__file__); print(s.DEFAULT_MODEL)",
                cwd=tmp_path).stdout.split()
    assert all(str(fresh_venv) in path for path in where), where
    assert Path(where[1]).is_file()


def test_python_dash_m_rnnlm_is_the_command(fresh_venv, tmp_path):
    result = run(fresh_venv / "bin" / "python", "-m", "rnnlm", "--help", cwd=tmp_path)
    for command in ("train", "eval", "serve", "stream"):
        assert command in result.stdout


def test_installed_serve_with_no_model_answers_ping_and_serves_metrics(fresh_venv, tmp_path):
    port_file = tmp_path / "ports.json"
    log = open(tmp_path / "serve.log", "w+")
    daemon = subprocess.Popen(
        [fresh_venv / "bin" / "rnnlm", "serve", "--bind", "tcp://127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
         "--port-file", port_file],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ""})
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert daemon.poll() is None, (log.seek(0), log.read())[1]
            assert time.monotonic() < deadline, "the installed daemon did not start in 120 s"
            time.sleep(0.1)
        ports = json.loads(port_file.read_text())
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 30_000)
            sock.connect(ports["endpoint"])
            sock.send_multipart([b"", msgpack.packb({"v": 1, "op": "ping", "id": 7})])
            reply = msgpack.unpackb(sock.recv_multipart()[-1])
        assert reply["ok"] is True and reply["id"] == 7, reply
        with urllib.request.urlopen(ports["metrics"], timeout=10) as response:
            text = response.read().decode()
        assert "rnnlm_model_info" in text
    finally:
        daemon.terminate()
        assert daemon.wait(60) == 0
        log.close()
