"""Operating fastbackend (issue 7): what ``--metrics`` costs, whether its counters are right,
and how long ``fastbackend status`` takes with a big queue.

* **metrics overhead** -- the throughput scenario (``test_bench_load.py``'s shape: 4 agents x
  8 slots, 4 client sockets x 64 unfinished zero-time jobs, 1 KiB input) run
  ``METRICS_PAIRS`` times with ``serve --metrics`` and as many times without, alternating
  (on/off, then off/on, ...) so that the machine's drift falls on both alike.  While a
  metrics-on run goes, the endpoint is scraped every ``SCRAPE_INTERVAL`` seconds (far more
  often than Prometheus's usual 15-60 s: the scrapes' own cost is in the figure).  After each
  metrics-on run, one more scrape must agree with the generator: ``jobs_submitted`` = jobs
  sent, ``jobs_finished{outcome=done}`` = results received, ``crashed`` = crash results
  received, ``killed`` = ``duplicate`` = 0, and nothing waiting or running.
* **status with a big queue** -- ``STATUS_WAITING`` (100,000) jobs wait for an environment
  no agent offers, 4 agents are connected; ``fastbackend status --json --metrics`` must
  report exactly that many waiting (queue answer and metrics both), then the table form is
  run; each is timed (wall, as the operator waits for it) with the broker CPU it cost.

Each runs once per dialect, for ``fastbackend`` only (``FASTBACKEND_BENCH_KINDS`` /
``FASTBACKEND_BENCH_DIALECTS`` select as elsewhere).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from bench_config import DIALECTS, METRICS_PAIRS, SCRAPE_INTERVAL, STATUS_WAITING, broker_kinds, scaled
from brokers import free_port
from harness import LoadSession
from loadgen import BLOCKED_ENVIRONMENT
from test_bench_load import (
    AGENTS,
    CLIENT_SOCKETS,
    ENVIRONMENTS,
    INPUT_SIZE,
    SLOTS,
    WINDOW,
    Scenario,
    per_job_us,
    run_measured,
)

from fastbackend.status import parse_exposition

HAVE_METRICS = importlib.util.find_spec("prometheus_client") is not None
pytestmark = pytest.mark.skipif(not HAVE_METRICS, reason="needs prometheus_client (fastbackend[metrics])")


def fastbackend_dialects() -> list[str]:
    return [d for d in DIALECTS if "fastbackend" in broker_kinds(d)]


def scrape_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read().decode()


def scrape(url: str, timeout: float = 5.0) -> list[tuple[str, dict[str, str], float]]:
    return parse_exposition(scrape_text(url, timeout))


def total(samples, name: str, **labels: str) -> float:
    """Sum of metric ``name`` over the samples whose labels include ``labels``."""
    return sum(value for n, lab, value in samples
               if n == name and all(lab.get(k) == v for k, v in labels.items()))


class Scraper:
    """Scrapes ``url`` every ``interval`` seconds on a thread until stopped (as Prometheus would)."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.count = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Bounded by the stop event, which stop() sets; each scrape by its own timeout.
        while not self._stop.wait(self.interval):
            try:
                scrape(self.url)
                self.count += 1
            except OSError:
                self.failures += 1

    def __enter__(self) -> Scraper:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


def throughput_run(factory, dialect: str, benchmark, metrics: bool) -> dict:
    """One throughput run (test_load_throughput's shape); with ``metrics``, scraped meanwhile
    and checked against the generator's counts at the end."""
    duration = scaled(3.0, 0.5)
    url = None
    args: tuple[str, ...] = ()
    if metrics:
        port = free_port()
        args = ("--metrics", f"127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}/metrics"
    with LoadSession(factory, "fastbackend", dialect, extra_args=args) as s:
        s.agents(AGENTS, SLOTS, ENVIRONMENTS)
        clients = s.clients(CLIENT_SOCKETS)
        s.settle(0.5)
        op = {"op": "jobs", "jobs": int(60_000 * duration), "environments": ENVIRONMENTS,
              "window": WINDOW, "input_size": INPUT_SIZE, "duration": duration,
              "timeout": duration + 60, "idle_timeout": 15}
        if url is None:
            answer, cpu = s.measured(clients, op, duration + 90)
            run = {"scrapes": 0}
        else:
            with Scraper(url, SCRAPE_INTERVAL) as scraper:
                if benchmark is None:
                    answer, cpu = s.measured(clients, op, duration + 90)
                else:
                    answer, cpu = run_measured(benchmark, s, clients, op, duration + 90)
            text = scrape_text(url)
            run = {"scrapes": scraper.count, "scrape_failures": scraper.failures,
                   "samples": parse_exposition(text),
                   "job_lines": [line for line in text.splitlines() if line.startswith("fastbackend_jobs_")]}
    run.update(answer=answer, cpu=cpu, us=per_job_us(cpu, answer["done"]))
    return run


def check_counters(samples, answer: dict, dialect: str) -> dict[str, float]:
    """The scrape's job counters against what the generator sent and received."""
    label = dialect  # fastbackend's dialect label is the dialect's name, as loadgen's
    got = {
        "submitted": total(samples, "fastbackend_jobs_submitted_total", dialect=label),
        "submitted (all dialects)": total(samples, "fastbackend_jobs_submitted_total"),
        "done": total(samples, "fastbackend_jobs_finished_total", dialect=label, outcome="done"),
        "crashed": total(samples, "fastbackend_jobs_finished_total", dialect=label, outcome="crashed"),
        "killed": total(samples, "fastbackend_jobs_finished_total", outcome="killed"),
        "duplicate": total(samples, "fastbackend_jobs_finished_total", outcome="duplicate"),
        "waiting": total(samples, "fastbackend_jobs_waiting"),
        "running": total(samples, "fastbackend_jobs_running"),
        "run histogram count": total(samples, "fastbackend_job_run_seconds_count", dialect=label),
    }
    want = {"submitted": answer["sent"], "submitted (all dialects)": answer["sent"], "done": answer["done"],
            "crashed": answer["crashed"], "killed": 0, "duplicate": 0, "waiting": 0, "running": 0,
            "run histogram count": answer["done"] + answer["crashed"]}
    assert got == want, f"scrape {got} != generator {want}"
    return got


@pytest.mark.parametrize("dialect", fastbackend_dialects())
def test_metrics_overhead(benchmark, broker_factory, registry, dialect):
    """Broker CPU per zero-time job with ``--metrics`` (scraped) and without, alternating."""
    sc = Scenario(benchmark, registry, "--metrics on vs off (throughput)", "fastbackend", dialect,
                  broker_factory)
    pairs = []
    for i in range(METRICS_PAIRS):
        order = (True, False) if i % 2 == 0 else (False, True)
        runs = {}
        for metrics in order:
            # The first metrics-on run is the benchmark's timed round (pytest-benchmark wants one).
            bench = benchmark if metrics and i == 0 else None
            runs[metrics] = throughput_run(broker_factory, dialect, bench, metrics)
        on, off = runs[True], runs[False]
        counters = check_counters(on["samples"], on["answer"], dialect)
        for run in (on, off):
            assert run["answer"]["unfinished"] == 0 and run["answer"]["crashed"] == 0, run["answer"]
        pairs.append({"order": "on,off" if order[0] else "off,on", "on_us": on["us"], "off_us": off["us"],
                      "ratio": on["us"] / off["us"], "on_jobs": on["answer"]["done"],
                      "off_jobs": off["answer"]["done"], "on_cpu_s": on["cpu"], "off_cpu_s": off["cpu"],
                      "on_jobs_per_s": on["answer"]["jobs_per_s"],
                      "off_jobs_per_s": off["answer"]["jobs_per_s"],
                      "scrapes": on["scrapes"], "scrape_failures": on["scrape_failures"],
                      "counters": counters, "job_lines": on["job_lines"]})
    on_us = [p["on_us"] for p in pairs]
    off_us = [p["off_us"] for p in pairs]
    ratios = [p["ratio"] for p in pairs]
    pooled = (sum(p["on_cpu_s"] for p in pairs) / sum(p["on_jobs"] for p in pairs)) / \
             (sum(p["off_cpu_s"] for p in pairs) / sum(p["off_jobs"] for p in pairs))
    sc.figure("CPU per job, --metrics off (median)", "us", statistics.median(off_us))
    sc.figure("CPU per job, --metrics on (median)", "us", statistics.median(on_us))
    sc.figure("on / off, median of pairs", "", f"{statistics.median(ratios):.3f}x", comparable=False)
    sc.figure("on / off, pooled (all jobs)", "", f"{pooled:.3f}x", comparable=False)
    sc.figure("on / off, spread of pairs", "", f"{min(ratios):.3f}x - {max(ratios):.3f}x", comparable=False)
    for n, p in enumerate(pairs, 1):
        sc.figure(f"pair {n} ({p['order']}): on / off", "us",
                  f"{p['on_us']:.2f} / {p['off_us']:.2f} = {p['ratio']:.3f}x", comparable=False)
    sc.figure("scrapes during the metrics-on runs", "", sum(p["scrapes"] for p in pairs), comparable=False)
    sc.extra("pairs", pairs)
    sc.extra("scrape interval (s)", SCRAPE_INTERVAL)
    # A sample of the last scrape's job counters, for the record (they matched the generator).
    sc.extra("last scrape: counters", pairs[-1]["counters"])
    sc.extra("last scrape: job lines", pairs[-1]["job_lines"])
    assert all(p["scrape_failures"] == 0 for p in pairs), pairs


def run_status(env: dict, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fastbackend", "status", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return done, time.monotonic() - t0


@pytest.mark.parametrize("dialect", fastbackend_dialects())
def test_status_with_a_big_queue(benchmark, broker_factory, registry, dialect):
    """``fastbackend status`` against STATUS_WAITING jobs waiting (100,000 by default)."""
    waiting = STATUS_WAITING
    sc = Scenario(benchmark, registry, f"status, {waiting:,} waiting", "fastbackend", dialect, broker_factory)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    _, env = broker_factory.command("fastbackend", "", "", dialect)
    args = ("--metrics", f"127.0.0.1:{port}")
    with LoadSession(broker_factory, "fastbackend", dialect, extra_args=args) as s:
        s.agents(AGENTS, SLOTS, ENVIRONMENTS)
        clients = s.clients(1)
        s.settle(0.5)
        flood = clients.ask({"op": "flood", "jobs": waiting, "environment": BLOCKED_ENVIRONMENT,
                             "input_size": INPUT_SIZE, "timeout": 600}, 660)
        assert flood["ponged"], flood
        assert total(scrape(url), "fastbackend_jobs_waiting") == waiting
        common = (s.broker.client_addr, "--dialect", dialect, "--metrics", url)
        out: dict = {}

        def measured() -> None:
            cpu0 = s.broker.cpu()
            out["done"], out["wall"] = run_status(env, *common, "--json")
            out["cpu"] = s.broker.cpu() - cpu0

        benchmark.pedantic(measured, rounds=1, iterations=1)
        done = out["done"]
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["waiting"]["total"] == waiting, doc["waiting"]
        env_label = BLOCKED_ENVIRONMENT if dialect == "0.5" else f"docker/{BLOCKED_ENVIRONMENT}"
        by_env = doc["waiting"]["by_environment"]  # the agents' environments too, at 0
        assert by_env[env_label] == waiting and sum(by_env.values()) == waiting, by_env
        assert sum(q["count"] for q in doc["waiting"]["by_task"]) == waiting
        cpu1 = s.broker.cpu()
        table, table_wall = run_status(env, *common)
        table_cpu = s.broker.cpu() - cpu1
        assert table.returncode == 0, table.stderr
        assert f"waiting: {waiting}" in table.stdout, table.stdout
    sc.figure("status --json: wall", "s", out["wall"])
    sc.figure("status --json: queue answer", "s", doc["query_seconds"])
    sc.figure("status --json: broker CPU", "s", out["cpu"])
    sc.figure("status (table): wall", "s", table_wall)
    sc.figure("status (table): broker CPU", "s", table_cpu)
    sc.figure("waiting reported", "jobs", doc["waiting"]["total"], comparable=False)
    sc.extra("status output", table.stdout)
    sc.extra("flood: wall seconds", flood["ingest_s"])
