"""Packaging as users install it: from a fresh clone, an sdist, a wheel built from that sdist
(with ``pip wheel``, the build frontend the cibuildwheel configuration uses), installed into a
clean venv, which then serves; and the pure-Python wheel.

It needs the network (pip fetches the build requirements and pyzmq/msgpack) and takes about
a minute; ``FASTBACKEND_SKIP_PACKAGING=1`` skips it.  It tests what is committed (the clone),
not the working tree.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import msgpack
import pytest
import zmq
from peers.broker import REPO_ROOT, free_tcp_address

pytestmark = pytest.mark.skipif(os.environ.get("FASTBACKEND_SKIP_PACKAGING", "") not in ("", "0"),
                                reason="FASTBACKEND_SKIP_PACKAGING is set")


def _run(argv: list[str], cwd: Path, timeout: float, **env: str) -> str:
    full_env = {key: value for key, value in os.environ.items()
                if not key.startswith(("FASTBACKEND_", "PYTHON", "VIRTUAL_ENV"))}
    full_env.update(env)
    done = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, \
        f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _version(source: Path) -> str:
    return re.search(r'__version__ = "([^"]+)"', (source / "fastbackend" / "_version.py").read_text())[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Fresh clone -> sdist -> wheel from the sdist; returns their paths."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    _run(["git", "clone", "-q", str(REPO_ROOT), str(source)], root, 60)
    dist = root / "dist"
    # The sdist through setuptools' PEP 517 hook (what `python -m build --sdist` calls).
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
         source, 120)
    (sdist,) = dist.glob("fastbackend-*.tar.gz")
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(sdist)], root, 300)
    (wheel,) = wheels.glob("fastbackend-*.whl")
    return {"root": root, "source": source, "sdist": sdist, "wheel": wheel}


def test_sdist_has_the_sources_and_no_generated_c(built):
    import tarfile

    with tarfile.open(built["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("LICENSE", "pyproject.toml", "setup.py", "fastbackend/_libzmq.pxi",
                   "fastbackend/_broker_c.pyx", "fastbackend/_wire_c.pxd", "fastbackend/protocol/v09.py"):
        assert needed in names, needed
    assert not [name for name in names if name.endswith((".c", ".so"))]
    assert built["sdist"].name == f"fastbackend-{_version(built['source'])}.tar.gz"


def test_wheel_metadata_and_contents(built):
    version = _version(built["source"])
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"fastbackend-{version}.dist-info/METADATA").decode()
    assert not [name for name in names if name.endswith(".c")], names
    assert sum(name.endswith(".so") for name in names) == 3
    assert f"fastbackend-{version}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata and f"Version: {version}" in metadata
    assert "Provides-Extra: uvloop" in metadata and "Provides-Extra: metrics" in metadata


def test_wheel_installs_into_a_clean_venv_and_serves(built):
    root = built["root"]
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], root, 120)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(built["wheel"])], root, 300)
    version = _version(built["source"])
    assert _run([str(venv / "bin" / "fastbackend"), "--version"], root, 60).startswith(
        f"fastbackend {version} (c core, release build;")
    # The test command cibuildwheel runs on every wheel it builds, here on this one.
    import tomllib

    config = tomllib.loads((built["source"] / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    _run(["sh", "-c", config["test-command"]], root, 60, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")

    agent, client = free_tcp_address(), free_tcp_address()
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen([str(venv / "bin" / "fastbackend"), "serve", agent, client], cwd=root,
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(client)
        deadline = time.monotonic() + 20
        answer = None
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            sock.send(msgpack.packb({"type": "client_hello", "name": "packaging-test"}))
            if sock.poll(500):
                answer = msgpack.unpackb(sock.recv(), raw=False)
        assert answer == {"type": "backend_update_containers", "available_containers": []}, \
            (root / "serve.log").read_text()
    finally:
        sock.close(0)
        ctx.destroy(0)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            code = None
        log.close()
    text = (root / "serve.log").read_text()
    assert code == 0, text
    assert f"fastbackend started (c core): version {version}, release build" in text, text


def test_pure_python_wheel(built):
    wheels = built["root"] / "pure"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(built["source"])],
         built["root"], 300, FASTBACKEND_NO_EXTENSIONS="1")
    (wheel,) = wheels.glob("fastbackend-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        assert not [name for name in archive.namelist() if name.endswith((".so", ".c"))]


def test_version_is_written_once():
    """pyproject reads fastbackend/_version.py; no other file states the version."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "fastbackend._version.__version__" in pyproject
    project = pyproject.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.MULTILINE)
    assert "__version__ =" not in (REPO_ROOT / "fastbackend" / "__init__.py").read_text()
