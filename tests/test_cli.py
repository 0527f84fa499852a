"""``fastbackend serve``: arguments, addresses, logging, and clean exits on signals."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from peers.broker import CONFIGS, LOG_LINE, REPO_ROOT, BrokerProcess, free_tcp_address
from peers.raw import RawClient, assert_serving
from peers.raw09 import assert_serving_09


def _run(args: list[str], timeout: float = 10, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a short-lived command in the repository with extra environment variables."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run(args, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _broker(tmp_path, name: str = "c-uvloop", **kwargs) -> BrokerProcess:
    return BrokerProcess(CONFIGS[name], tmp_path / "broker.log", **kwargs)


def test_serve_help():
    done = _run([sys.executable, "-m", "fastbackend", "serve", "--help"])
    assert done.returncode == 0, done.stderr
    # The drop-in takes the stock script's arguments.
    for word in ("agent", "client", "--verbose", "--debugmode"):
        assert word in done.stdout


def test_console_script_is_declared_and_runs():
    """``fastbackend serve`` as the installed console script runs ``fastbackend.cli:main``."""
    # (tomllib is 3.11+; the project supports 3.10, so read the one line we need.)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    entry = re.search(r'^fastbackend\s*=\s*"([\w.]+:\w+)"', section, re.MULTILINE)
    assert entry, section
    module, _, function = entry[1].partition(":")
    # Exactly what the wrapper pip generates does.
    wrapper = (f"import sys; from {module} import {function}; "
               f"sys.argv = ['fastbackend', 'serve', '--help']; sys.exit({function}())")
    done = _run([sys.executable, "-c", wrapper])
    assert done.returncode == 0, done.stderr
    assert "agent" in done.stdout and "client" in done.stdout


def test_missing_arguments_is_a_usage_error():
    done = _run([sys.executable, "-m", "fastbackend", "serve", "tcp://127.0.0.1:1"])
    assert done.returncode == 2
    assert "usage" in done.stderr.lower()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("name", ["c-uvloop", "py-asyncio"])
def test_serve_tcp_and_exit_cleanly_on_signal(tmp_path, zctx, name, sig):
    broker = _broker(tmp_path, name)
    broker.start_on_free_ports()
    try:
        assert_serving(zctx, broker.agent_addr, broker.client_addr)
    finally:
        code = broker.stop(sig)
    broker.check_clean_exit(code)


def test_serve_ipc(tmp_path, zctx):
    broker = _broker(tmp_path, agent_addr=f"ipc://{tmp_path}/agent.sock",
                     client_addr=f"ipc://{tmp_path}/client.sock")
    broker.start()
    try:
        assert (tmp_path / "agent.sock").exists() and (tmp_path / "client.sock").exists()
        assert_serving(zctx, broker.agent_addr, broker.client_addr)
    finally:
        code = broker.stop(signal.SIGINT)
    broker.check_clean_exit(code)


@pytest.mark.parametrize("verbose", [True, False], ids=["-v", "default"])
def test_verbose_shows_debug_lines(tmp_path, zctx, verbose):
    broker = _broker(tmp_path, verbose=verbose)
    broker.start_on_free_ports()
    try:
        assert_serving(zctx, broker.agent_addr, broker.client_addr)
        if verbose:
            broker.wait_log("DEBUG")
        else:
            # The job above is over: the broker had its chance to log it.
            client = RawClient(zctx, broker.client_addr)
            client.hello()
            client.ping_roundtrip()
            client.close()
            assert broker.log_lines("DEBUG") == []
    finally:
        code = broker.stop()
    broker.check_clean_exit(code)
    # Every line is in the stock format: asctime - name - level - message.
    lines = broker.log().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    assert bool(broker.log_lines("DEBUG")) == verbose


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
def test_serve_raises_its_descriptor_limit_to_the_hard_one(tmp_path, zctx):
    """Each agent costs the broker a descriptor: at a soft limit of 1,024 (a shell's or a
    systemd service's default) it would stop accepting agents near a thousand."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"hard descriptor limit {hard}: nothing to raise the soft one to")
    broker = _broker(tmp_path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # the broker inherits it
    try:
        broker.start_on_free_ports()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        (line,) = broker.log_lines("INFO", "descriptor limit")
        assert f"raised from 512 to the hard limit, {hard}" in line, line
        limits = Path(f"/proc/{broker.proc.pid}/limits").read_text().splitlines()
        (row,) = [row for row in limits if row.startswith("Max open files")]
        assert row.split()[3:5] == [str(hard), str(hard)], row
        assert_serving(zctx, broker.agent_addr, broker.client_addr)
    finally:
        code = broker.stop()
    broker.check_clean_exit(code)


def test_bad_address_fails_with_a_clear_error(tmp_path):
    done = _run([sys.executable, "-m", "fastbackend", "serve", "bogus://nowhere", free_tcp_address()])
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if " - ERROR - " in line], done.stderr


def test_address_in_use_fails_with_a_clear_error(tmp_path):
    first = _broker(tmp_path)
    first.start_on_free_ports()
    try:
        done = _run([sys.executable, "-m", "fastbackend", "serve", first.agent_addr, first.client_addr])
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert "in use" in done.stderr.lower(), done.stderr
    finally:
        code = first.stop()
    first.check_clean_exit(code)


def test_unknown_loop_is_refused():
    done = _run([sys.executable, "-m", "fastbackend", "serve", free_tcp_address(), free_tcp_address()],
                FASTBACKEND_LOOP="tokio")
    assert done.returncode != 0
    assert "FASTBACKEND_LOOP" in done.stderr


BLOCK_COMPILED = """
import sys

class _BlockCompiled:
    # Make every compiled twin fail to import, as a broken build would.
    def find_spec(self, name, path=None, target=None):
        if name.startswith("fastbackend._") and name.endswith("_c"):
            raise ImportError(name + " blocked by the test")
        return None

sys.meta_path.insert(0, _BlockCompiled())
"""


def test_a_broken_build_cannot_pass_for_the_compiled_broker(tmp_path):
    """If the compiled modules do not import, the broker says so and the fixture refuses it:
    the "c" configurations can never silently test the pure-Python broker."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_COMPILED)
    broker = _broker(tmp_path, extra_env={"PYTHONPATH": str(tmp_path)})
    try:
        with pytest.raises(AssertionError):
            broker.start_on_free_ports()
        assert "pure-python" in broker.log().lower()
    finally:
        if broker.proc is not None:
            broker.stop()


# -- dialects ----------------------------------------------------------------------------------
def test_serve_help_names_the_dialect_option():
    done = _run([sys.executable, "-m", "fastbackend", "serve", "--help"])
    assert done.returncode == 0, done.stderr
    assert "--dialect" in done.stdout and "0.5" in done.stdout and "0.9" in done.stdout


def test_unknown_dialect_is_a_usage_error():
    done = _run([sys.executable, "-m", "fastbackend", "serve", free_tcp_address(), free_tcp_address(),
                 "--dialect", "0.7"])
    assert done.returncode == 2
    assert "usage" in done.stderr.lower() and "dialect" in done.stderr.lower()


@pytest.mark.parametrize("dialect", [None, "0.5", "0.9"], ids=["auto", "pin-0.5", "pin-0.9"])
@pytest.mark.parametrize("name", ["c-uvloop", "py-asyncio"])
def test_serve_each_dialect_and_exit_cleanly(tmp_path, zctx, name, dialect):
    """With no flag both dialects are served; a pinned dialect is served (the other is the
    subject of tests/test_mixed_dialects.py)."""
    extra = ("--dialect", dialect) if dialect else ()
    broker = _broker(tmp_path, name, extra_args=extra)
    broker.start_on_free_ports()
    try:
        if dialect in (None, "0.5"):
            assert_serving(zctx, broker.agent_addr, broker.client_addr)
        if dialect in (None, "0.9"):
            assert_serving_09(zctx, broker.agent_addr, broker.client_addr)
    finally:
        code = broker.stop()
    broker.check_clean_exit(code)


# -- operator details (issue 7) -----------------------------------------------------------------

def test_version():
    from fastbackend import __version__

    done = _run([sys.executable, "-m", "fastbackend", "--version"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fastbackend {__version__} (") and "core" in done.stdout


def test_no_command_prints_the_help_and_is_a_usage_error():
    done = _run([sys.executable, "-m", "fastbackend"])
    assert done.returncode == 2
    for word in ("serve", "status", "--version"):
        assert word in done.stderr


def test_bad_address_names_the_socket_and_the_expected_form():
    done = _run([sys.executable, "-m", "fastbackend", "serve", free_tcp_address(), "tcp://127.0.0.1"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if " - ERROR - " in line]
    assert "the client address 'tcp://127.0.0.1'" in line and "tcp://HOST:PORT" in line, line


def test_start_line_says_version_core_loop_and_the_bound_port(tmp_path, zctx):
    from fastbackend import __version__

    broker = _broker(tmp_path, agent_addr="tcp://127.0.0.1:*", client_addr=free_tcp_address())
    broker.start()
    try:
        (line,) = broker.log_lines("INFO", "fastbackend started")
        assert f"version {__version__}" in line and "(c core)" in line and "loop uvloop" in line
        assert " build" in line and "agents on tcp://127.0.0.1:*" not in line
        agent_addr = re.search(r"agents on (tcp://127\.0\.0\.1:\d+),", line)[1]
        assert_serving(zctx, agent_addr, broker.client_addr)
    finally:
        code = broker.stop()
    broker.check_clean_exit(code)
