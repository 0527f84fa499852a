"""``fastbackend status``: a client's view of a backend (fastbackend, or stock) in a table or JSON.

The broker runs as a subprocess with raw peers holding jobs running and waiting; ``status``
runs as its own subprocess, as an operator runs it, and every wait is bounded.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import zmq
from peers.broker import CONFIGS, REPO_ROOT, BrokerProcess, free_tcp_address
from peers.raw import RawAgent, RawClient, pack
from peers.raw09 import RawAgent09, RawClient09

from fastbackend import status


def _status(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "fastbackend", "status", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _status_json(*args: str) -> dict:
    done = _status(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _start(tmp_path, name: str, *extra: str) -> BrokerProcess:
    broker = BrokerProcess(CONFIGS[name], tmp_path / f"{name}.log", extra_args=extra)
    broker.start_on_free_ports()
    return broker


@pytest.fixture(params=["c-uvloop", "py-asyncio"])
def fb(request, tmp_path) -> Iterator[BrokerProcess]:
    broker = _start(tmp_path, request.param)
    yield broker
    broker.check_clean_exit(broker.stop())


def _load_05(zctx: zmq.Context, broker: BrokerProcess) -> tuple[RawAgent, RawClient]:
    """One agent (1 slot, "default") running job-0; job-1, job-2 wait for it; t2-0, t2-1 wait
    for "other", which no agent offers."""
    agent = RawAgent(zctx, broker.agent_addr)
    agent.hello("agent-1", 1, ("default",))
    client = RawClient(zctx, broker.client_addr)
    client.hello()
    client.wait_containers("default")
    for i in range(3):
        client.new_job(f"job-{i}", "default")
    for i in range(2):
        client.new_job(f"t2-{i}", "other", task_id="t2", launcher="webapp")
    job = agent.recv_job()
    agent.started(job["job_id"])
    client.ping_roundtrip()  # everything above has been handled
    return agent, client


def _check_05_view(doc: dict) -> None:
    assert doc["dialect"] == "0.5"
    assert doc["environments"] == [{"type": None, "name": "default"}]
    (running,) = doc["running"]
    assert running["job_id"] == "job-0" and running["agent"] == "agent-1"
    assert running["task"] == "course/task" and running["launcher"] == "raw"
    assert 0 <= running["age_seconds"] < 60
    waiting = doc["waiting"]
    assert waiting["total"] == 4
    assert {q["task"]: (q["count"], q["oldest_job_id"]) for q in waiting["by_task"]} == {
        "course/task": (2, "job-1"), "course/t2": (2, "t2-0")}


def test_status_shows_running_and_waiting_jobs_05(fb, zctx):
    agent, client = _load_05(zctx, fb)
    try:
        _check_05_view(_status_json(fb.client_addr, "--dialect", "0.5"))
        done = _status(fb.client_addr, "--dialect", "0.5")
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert "dialect 0.5" in text and "environments (1): default" in text
        assert "running: 1" in text and "agent-1" in text and "waiting: 4" in text
        row = next(line for line in text.splitlines() if "course/t2" in line)
        assert row.split()[:2] == ["course/t2", "2"] and "t2-0" in row
    finally:
        agent.close()
        client.close()
    # It said one hello and asked for the queue, nothing else.
    assert len(fb.log_lines("INFO", "new client")) == 3


def test_status_auto_detects_09_and_both_shows_each_dialect(fb, zctx):
    agent05, client05 = _load_05(zctx, fb)
    agent = RawAgent09(zctx, fb.agent_addr)
    client = RawClient09(zctx, fb.client_addr)
    try:
        env = ("docker", "py")
        agent.hello("agent-09", 1, (env,))
        client.hello()
        client.wait_environments(env)
        client.new_job("a", env[1], env[0])
        client.new_job("b", env[1], env[0], priority=5)
        job = agent.recv_job()
        assert job["job_id"] == "a"
        doc = _status_json(fb.client_addr)  # auto: 0.9 answers first
        assert doc["dialect"] == "0.9"
        assert doc["environments"] == [{"type": env[0], "name": env[1]}]
        assert [job["job_id"] for job in doc["running"]] == ["a"]
        assert doc["running"][0]["agent"] == "agent-09" and doc["running"][0]["time_estimate"] == 30
        assert doc["waiting"]["total"] == 1
        both = _status_json(fb.client_addr, "--dialect", "both")
        views = {view["dialect"]: view for view in both["dialects"]}
        _check_05_view(views["0.5"])
        assert views["0.9"]["waiting"]["total"] == 1
    finally:
        for peer in (agent, client, agent05, client05):
            peer.close()


def test_status_falls_back_to_05_against_a_broker_pinned_to_05(tmp_path, zctx):
    broker = _start(tmp_path, "py-asyncio", "--dialect", "0.5")
    try:
        agent, client = _load_05(zctx, broker)
        start = time.monotonic()
        doc = _status_json(broker.client_addr)
        assert time.monotonic() - start < status.PROBE_SECONDS + 5
        _check_05_view(doc)
        agent.close()
        client.close()
    finally:
        code = broker.stop()
    broker.check_clean_exit(code)
    assert broker.log_lines("WARNING", "dialect")  # the 0.9 probe, dropped with its one line


def test_status_without_a_backend_fails_clearly_and_quickly():
    start = time.monotonic()
    done = _status(free_tcp_address(), "--timeout", "1")
    assert time.monotonic() - start < 10
    assert done.returncode == 1
    assert "no backend answered" in done.stderr and "no connection could be made" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_bad_address_says_what_is_expected():
    done = _status("bogus://x", "--timeout", "1")
    assert done.returncode == 1 and "tcp://HOST:PORT" in done.stderr and "Traceback" not in done.stderr


def test_status_against_stock_05(tmp_path, zctx):
    broker = _start(tmp_path, "stock")
    try:
        agent, client = _load_05(zctx, broker)
        _check_05_view(_status_json(broker.client_addr, "--dialect", "0.5"))
        agent.close()
        client.close()
    finally:
        broker.stop()


def test_stock_05_stops_serving_on_a_09_hello_which_is_why_status_needs_dialect_there(tmp_path, zctx):
    """Documents the reason for ``--dialect`` against stock: no probe is safe for both stocks."""
    broker = _start(tmp_path, "stock")
    try:
        probe = zctx.socket(zmq.DEALER)
        probe.linger = 0
        probe.connect(broker.client_addr)
        probe.send(pack({"@type": "ClientHello", "name": "probe"}))
        time.sleep(0.5)
        probe.send(pack({"type": "ping"}))
        assert not probe.poll(2000), "stock 0.5 still answers after a 0.9 frame"
        probe.close()
    finally:
        broker.stop()


@pytest.mark.skipif("stock-0.9" not in CONFIGS, reason="no stock 0.9.2 broker configuration")
def test_status_against_stock_092(tmp_path, zctx):
    from peers import PEERS09_DIR

    if not (PEERS09_DIR / "inginious").is_dir():
        pytest.skip(f"INGInious 0.9.2 not installed in {PEERS09_DIR}")
    broker = _start(tmp_path, "stock-0.9")
    agent = RawAgent09(zctx, broker.agent_addr)
    client = RawClient09(zctx, broker.client_addr)
    try:
        env = ("docker", "default")
        agent.hello("stock-agent", 1, (env,))
        client.hello()
        client.wait_environments(env)
        client.new_job("s1", env[1], env[0])
        client.new_job("s2", env[1], env[0])
        agent.recv_job()
        time.sleep(0.3)
        doc = _status_json(broker.client_addr, "--dialect", "0.9")
        assert doc["dialect"] == "0.9"
        assert [job["job_id"] for job in doc["running"]] == ["s1"]
        assert doc["waiting"]["total"] == 1
    finally:
        agent.close()
        client.close()
        broker.stop()


EXPOSITION = """\
# HELP fastbackend_agents Agents registered.
# TYPE fastbackend_agents gauge
fastbackend_agents{dialect="0.5"} 2.0
fastbackend_agents{dialect="0.9"} 1.0
# TYPE fastbackend_slots gauge
fastbackend_slots{dialect="0.5",state="free"} 3.0
fastbackend_slots{dialect="0.5",state="busy"} 1.0
fastbackend_slots{dialect="0.9",state="free"} 0
fastbackend_slots{dialect="0.9",state="busy"} 2
fastbackend_jobs_waiting{dialect="0.5",environment="default"} 2
fastbackend_jobs_waiting{dialect="0.5",environment="odd \\"name\\", with\\\\ escapes"} 7
fastbackend_jobs_submitted_total{dialect="0.5"} 1.5e3 1700000000000
"""


@pytest.fixture
def metrics_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            body = EXPOSITION.encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_parse_exposition():
    samples = status.parse_exposition(EXPOSITION)
    assert ("fastbackend_agents", {"dialect": "0.5"}, 2.0) in samples
    assert ("fastbackend_jobs_waiting", {"dialect": "0.5", "environment": 'odd "name", with\\ escapes'},
            7.0) in samples
    assert ("fastbackend_jobs_submitted_total", {"dialect": "0.5"}, 1500.0) in samples
    summary = status.summarise_metrics(samples)
    assert summary["agents"] == 3 and summary["slots"] == {"free": 3, "busy": 3}
    assert summary["jobs_waiting"] == {"default": 2, 'odd "name", with\\ escapes': 7}


def test_metrics_url_forms():
    assert status.metrics_url("host:9100") == "http://host:9100/metrics"
    assert status.metrics_url("http://[::1]:9100") == "http://[::1]:9100/metrics"
    assert status.metrics_url("https://h/x/metrics") == "https://h/x/metrics"
    with pytest.raises(ValueError):
        status.metrics_url("ftp://h")


def test_status_adds_agents_and_slots_from_the_metrics(fb, zctx, metrics_server):
    agent, client = _load_05(zctx, fb)
    try:
        doc = _status_json(fb.client_addr, "--dialect", "0.5", "--metrics", metrics_server)
        assert doc["metrics"]["agents"] == 3 and doc["metrics"]["slots"] == {"free": 3, "busy": 3}
        assert doc["waiting"]["by_environment"]["default"] == 2
        text = _status(fb.client_addr, "--dialect", "0.5", "--metrics", metrics_server).stdout
        assert "agents: 3; slots: 3 busy, 3 free" in text and "per environment (from the metrics)" in text
        # An unreachable endpoint is reported; the queue is still shown.
        doc = _status_json(fb.client_addr, "--dialect", "0.5", "--metrics", free_tcp_address()[6:])
        assert "error" in doc["metrics"] and doc["waiting"]["total"] == 4
    finally:
        agent.close()
        client.close()


def test_watch_refreshes_and_ages_the_oldest_waiting(fb, zctx):
    agent, client = _load_05(zctx, fb)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-m", "fastbackend", "status", fb.client_addr, "--dialect", "0.5",
            "--watch", "0.3", "--json"]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[dict] = []
    # A thread reads, so that the wait below stays bounded whatever the child does.
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in proc.stdout),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while len(lines) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            code = None
        agent.close()
        client.close()
    reader.join(5)
    assert code == 0, proc.stderr.read()
    assert len(lines) >= 4
    lines = lines[:4]
    ages = [q["oldest_seen_seconds"] for doc in lines for q in doc["waiting"]["by_task"]
            if q["task"] == "course/t2"]
    assert ages[0] is None and ages[1:] == sorted(ages[1:]) and ages[-1] >= 0.6
    assert len(fb.log_lines("INFO", "new client")) == 2  # one hello for the whole watch


def test_status_with_100000_waiting_jobs(tmp_path, zctx, capsys):
    """The acceptance measurement: 100,000 jobs waiting (for an environment no agent offers)."""
    broker = _start(tmp_path, "c-uvloop")
    client = RawClient(zctx, broker.client_addr)
    try:
        client.hello()
        client.recv_type("backend_update_containers")
        for i in range(100_000):
            client.new_job(f"{i:06d}-{uuid.uuid4().hex[:8]}", "absent", launcher="bench",
                           task_id=f"task{i % 3}")
        client.ping_roundtrip(60)
        start = time.monotonic()
        done = _status(broker.client_addr, "--dialect", "0.5")
        elapsed = time.monotonic() - start
        assert done.returncode == 0, done.stderr
        assert "waiting: 100000" in done.stdout
        doc = _status_json(broker.client_addr, "--dialect", "0.5")
        assert doc["waiting"]["total"] == 100_000
        with capsys.disabled():
            print(f"\n--- fastbackend status with 100,000 waiting: {elapsed:.2f} s wall "
                  f"(queue answer {doc['query_seconds']:.3f} s) ---\n{done.stdout}")
        assert elapsed < 30
    finally:
        client.close()
        code = broker.stop()
    broker.check_clean_exit(code)
