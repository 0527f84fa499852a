"""``fastbackend serve --metrics``: real scrapes over HTTP, values checked against the jobs run.

A broker subprocess serves both dialects with metrics on a free port; raw peers of both
dialects run jobs that end every way a job can end (an agent's result, killed while
waiting, crashed with an agent that said hello again, refused as a duplicate id), and
each scrape must count exactly those.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from peers.broker import IMPL_CONFIGS
from peers.raw import RawAgent, RawClient, job_done_message, pack
from peers.raw09 import RawAgent09, RawClient09, job_done
from prometheus_client import parser as prometheus_parser

pytestmark = pytest.mark.brokers(*IMPL_CONFIGS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def metrics_port(broker) -> int:
    """The port of the broker's metrics endpoint (the broker is restarted with --metrics)."""
    port = _free_port()
    broker.stop()
    broker.extra_args = (*broker.extra_args, "--metrics", f"127.0.0.1:{port}")
    broker.start()
    broker.wait_log("INFO", "metrics on http://127.0.0.1:", timeout=10)
    return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def _run_05(zctx, broker) -> tuple:
    """30 jobs done, 1 duplicate, 2 killed while waiting, 1 left waiting (0.5)."""
    agent = RawAgent(zctx, broker.agent_addr)
    client = RawClient(zctx, broker.client_addr)
    agent.hello("worker05", 2, ("default",))
    client.hello("metrics")
    client.wait_containers("default")
    for i in range(30):
        client.new_job(f"j{i}", "default")
    client.new_job("j29", "default")  # j29 is waiting or running: a duplicate (dropped in 0.5)
    for _ in range(30):
        job = agent.recv_job(10)
        agent.done(job["job_id"])
    for i in range(3):
        client.new_job(f"w{i}", "absent")
    client.kill("w0")
    client.kill("w1")
    results = [client.recv_type("backend_job_done", 10) for _ in range(32)]
    assert sorted(r["job_id"] for r in results) == sorted([f"j{i}" for i in range(30)] + ["w0", "w1"])
    return agent, client  # kept: a client that is gone is forgotten when a frame for it fails


def _run_09(zctx, broker) -> tuple:
    """20 jobs done, 1 duplicate answered, 2 crashed with their agent (0.9)."""
    agent = RawAgent09(zctx, broker.agent_addr)
    client = RawClient09(zctx, broker.client_addr)
    agent.hello("worker09", 2, (("docker", "default"),))
    client.hello("metrics09")
    client.wait_environments(("docker", "default"))
    for i in range(20):
        client.new_job(f"n{i}", priority=i % 3)
        job = agent.recv_job(10)
        agent.send_message(job_done(job["job_id"]))
        assert client.recv_type("BackendJobDone", 10)["job_id"] == f"n{i}"
    client.new_job("c0")
    client.new_job("c1")
    agent.recv_job(10)
    agent.recv_job(10)
    client.new_job("c0")  # running: answered as a duplicate
    assert client.recv_type("BackendJobDone", 10)["result"] == ("crash", "Duplicate job id")
    agent.hello("worker09", 2, (("docker", "default"),))  # said hello again: c0 and c1 crash
    crashed = [client.recv_type("BackendJobDone", 10) for _ in range(2)]
    assert {c["job_id"] for c in crashed} == {"c0", "c1"}
    assert all(c["result"] == ("crash", "Agent restarted") for c in crashed)
    return agent, client


def test_counters_match_the_jobs_run_in_both_dialects(broker, zctx, metrics_port) -> None:
    before = scrape(metrics_port)
    assert value(before, "fastbackend_jobs_submitted_total", dialect="0.5") == 0
    peers = _run_05(zctx, broker) + _run_09(zctx, broker)
    # A malformed frame and a result for no job, both dropped.
    stray = RawAgent(zctx, broker.agent_addr)
    stray.hello("stray", 1, ("other",))
    stray.socket.send(b"\xc1 not msgpack")
    stray.socket.send(pack(job_done_message((b"nobody", "nothing"))))
    deadline = time.monotonic() + 10
    while value(scrape(metrics_port), "fastbackend_frames_dropped_total", reason="not_running") < 1:
        assert time.monotonic() < deadline, "the stray result was never counted"
        time.sleep(0.05)

    samples = scrape(metrics_port)
    assert value(samples, "fastbackend_jobs_submitted_total", dialect="0.5") == 34
    assert value(samples, "fastbackend_jobs_submitted_total", dialect="0.9") == 23
    expected = {("0.5", "done"): 30, ("0.5", "killed"): 2, ("0.5", "crashed"): 0, ("0.5", "duplicate"): 1,
                ("0.9", "done"): 20, ("0.9", "killed"): 0, ("0.9", "crashed"): 2, ("0.9", "duplicate"): 1}
    for (dialect, outcome), count in expected.items():
        assert value(samples, "fastbackend_jobs_finished_total", dialect=dialect, outcome=outcome) == count
    # Every submission is finished, but the one still waiting (0.5 "w2").
    for dialect, submitted in (("0.5", 34), ("0.9", 23)):
        finished = sum(value(samples, "fastbackend_jobs_finished_total", dialect=dialect, outcome=o)
                       for o in ("done", "killed", "crashed", "duplicate"))
        assert finished == submitted - (1 if dialect == "0.5" else 0)
    assert value(samples, "fastbackend_jobs_waiting", dialect="0.5", environment="absent") == 1
    assert value(samples, "fastbackend_jobs_waiting", dialect="0.9", environment="docker/default") == 0
    assert value(samples, "fastbackend_jobs_running", dialect="0.5", environment="default") == 0
    assert value(samples, "fastbackend_agents", dialect="0.5") == 2
    assert value(samples, "fastbackend_agents", dialect="0.9") == 1
    assert value(samples, "fastbackend_slots", dialect="0.5", state="free") == 3
    assert value(samples, "fastbackend_slots", dialect="0.9", state="busy") == 0
    assert value(samples, "fastbackend_clients", dialect="0.5") == 1
    assert value(samples, "fastbackend_clients", dialect="0.9") == 1
    assert value(samples, "fastbackend_frames_dropped_total", reason="malformed") == 1
    assert value(samples, "fastbackend_agents_removed_total", reason="hello_again") == 1
    assert value(samples, "fastbackend_agents_removed_total", reason="missed_pings") == 0
    assert value(samples, "fastbackend_agents_removed_total", reason="disconnected") == 0
    # Wait times: every dispatched job; run times: every agent's result.
    assert value(samples, "fastbackend_job_wait_seconds_count", dialect="0.5") == 30
    assert value(samples, "fastbackend_job_wait_seconds_count", dialect="0.9") == 22
    assert value(samples, "fastbackend_job_run_seconds_count", dialect="0.9") == 20
    assert value(samples, "fastbackend_job_run_seconds_bucket", dialect="0.5", le="+Inf") == 30
    assert 0 < value(samples, "fastbackend_job_run_seconds_sum", dialect="0.5") < 30
    assert 0 <= value(samples, "fastbackend_heartbeat_lag_seconds") < 1
    assert len(peers) == 4
    # An agent whose connection closes is removed at once, and counted so.
    stray.close()
    deadline = time.monotonic() + 5
    while value(scrape(metrics_port), "fastbackend_agents_removed_total", reason="disconnected") < 1:
        assert time.monotonic() < deadline, "the closed agent was never removed"
        time.sleep(0.05)
    assert value(scrape(metrics_port), "fastbackend_agents", dialect="0.5") == 1


def test_scrape_with_a_big_queue_is_quick_and_keeps_heartbeats(broker, zctx, metrics_port) -> None:
    client = RawClient(zctx, broker.client_addr)
    client.hello("flood")
    client.recv_type("backend_update_containers")
    frames = [pack({**_job(i), "type": "client_new_job"}) for i in range(100_000)]
    for frame in frames:
        client.socket.send(frame)
    deadline = time.monotonic() + 60
    while value(scrape(metrics_port), "fastbackend_jobs_waiting", dialect="0.5",
                environment="absent") < 100_000:
        assert time.monotonic() < deadline, "the 100,000 jobs were never all queued"
        time.sleep(0.2)
    agent = RawAgent(zctx, broker.agent_addr)
    agent.hello("idle", 1, ("elsewhere",))
    worst = 0.0
    for _ in range(5):
        start = time.monotonic()
        samples = scrape(metrics_port)
        worst = max(worst, time.monotonic() - start)
        assert value(samples, "fastbackend_jobs_waiting", dialect="0.5", environment="absent") == 100_000
        assert client.ping_roundtrip(5) < 1.0
    assert worst < 1.0, f"a scrape took {worst:.2f} s"
    agent.socket.send(pack({"type": "pong"}))
    assert value(scrape(metrics_port), "fastbackend_agents", dialect="0.5") == 1


def _job(i: int) -> dict:
    return dict(job_id=f"q{i}", course_id="c", task_id="t", inputdata={}, environment="absent",
                enable_network=False, time_limit=30, hard_time_limit=90, mem_limit=100, debug=False,
                launcher="flood")


def test_metrics_address_must_be_host_port(tmp_path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastbackend", "serve", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*",
                          "--metrics", "9100"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "--metrics takes HOST:PORT" in out.stderr
