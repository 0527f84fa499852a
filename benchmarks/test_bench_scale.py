"""Scale and soak (issue 9, item 4): many connected agents, and a long run with kills and churn.

* ``test_scale_agents`` -- N agents (``FASTBACKEND_BENCH_AGENTS``: 500 by default, 50 in a
  smoke run, 10,000 for the issue's figure) on a few generator processes: registration
  time (every hello registered, read from ``--metrics``; else every agent pinged once),
  the broker's idle CPU with N agents being pinged, each agent's ping intervals, and how
  evenly M zero-time jobs spread over the agents.
* ``test_soak`` -- J jobs (``FASTBACKEND_BENCH_SOAK_JOBS``: 200,000 by default, 20,000 in a
  smoke run, times ``FASTBACKEND_BENCH_SCALE``) in segments, every ``kill_every``-th job
  killed by its client, agents closing and re-registering all along: every job must end
  with exactly one result (done, killed, or crashed with its agent), the broker's job
  tables must be empty after every segment (``fastbackend_jobs_waiting/running``), and its
  RSS (VmRSS) after warm-up flat within 5 %.

Both run for fastbackend (compiled) and, when its venv is named, the dialect's stock
backend (capped: ``FASTBACKEND_BENCH_STOCK_MAX_AGENTS``, ``FASTBACKEND_BENCH_STOCK_MAX_SOAK``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import time
import urllib.request
from pathlib import Path

import pytest
from bench_config import DIALECTS, SCALE, SMOKE, broker_kinds, scaled
from brokers import free_port
from harness import LoadSession, Peer
from test_bench_load import Scenario

SCALEGEN = Path(__file__).resolve().parent / "scalegen.py"
ENVIRONMENT = "bench-env-a"
#: Agents per generator process: one process polls this many sockets.
AGENTS_PER_PROCESS = int(os.environ.get("FASTBACKEND_BENCH_AGENTS_PER_PROCESS", "2500"))
AGENTS = int(os.environ.get("FASTBACKEND_BENCH_AGENTS", "50" if SMOKE else "500"))
IDLE_S = scaled(5.0, 2.2)
SOAK_JOBS = int(os.environ.get("FASTBACKEND_BENCH_SOAK_JOBS", "0")) or int(scaled(200_000, 20_000))
STOCK_MAX_AGENTS = int(os.environ.get("FASTBACKEND_BENCH_STOCK_MAX_AGENTS", "1000"))
# Stock moves ~40 jobs/s under the soak's kills and churn (2026-12-06): 5,000 jobs take it
# about two minutes per dialect; 50,000 took it 20 minutes each.
STOCK_MAX_SOAK = int(os.environ.get("FASTBACKEND_BENCH_STOCK_MAX_SOAK", "5000"))
#: Zero-time jobs of the spread measurement (default 10 per agent).
SPREAD_JOBS = int(os.environ.get("FASTBACKEND_BENCH_SPREAD_JOBS", "0"))
#: How long registration may take before the test goes on with the agents registered by then.
REGISTER_TIMEOUT = float(os.environ.get("FASTBACKEND_BENCH_REGISTER_TIMEOUT", "60"))
HAVE_METRICS = importlib.util.find_spec("prometheus_client") is not None


def cases() -> list[tuple[str, str]]:
    return [(d, k) for d in DIALECTS for k in broker_kinds(d) if k in ("fastbackend", "stock")]


def metrics_args(kind: str) -> tuple[tuple[str, ...], str | None]:
    """``--metrics`` for fastbackend when prometheus_client is there; the URL to scrape."""
    if kind != "fastbackend" or not HAVE_METRICS:
        return (), None
    port = free_port()
    return ("--metrics", f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}/metrics"


def scrape(url: str | None, timeout: float = 5.0) -> dict[str, float]:
    """Each metric's value summed over its labels (``name`` -> total); {} without a URL."""
    if url is None:
        return {}
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.rpartition(" ")
        totals[name.split("{", 1)[0]] = totals.get(name.split("{", 1)[0], 0.0) + float(value)
    return totals


def wait_metrics(url: str, name: str, want: float, timeout: float) -> float | None:
    """Seconds until metric ``name`` reads ``want`` (polled every 20 ms), None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if scrape(url).get(name) == want:
                return time.monotonic() - t0
        except OSError:
            pass  # the endpoint is not up yet
        time.sleep(0.02)
    return None


def agent_peers(session: LoadSession, agents: int, **cfg) -> list[Peer]:
    procs = max(1, math.ceil(agents / AGENTS_PER_PROCESS))
    peers = []
    for p in range(procs):
        share = agents // procs + (1 if p < agents % procs else 0)
        peer = Peer("agents", {"addr": session.broker.agent_addr, "dialect": session.dialect,
                               "agents": share, "base": p, "environments": [ENVIRONMENT], **cfg},
                    script=SCALEGEN)
        session.peers.append(peer)
        peers.append(peer)
    return peers


def merged_stats(peers: list[Peer], reset: bool = True) -> dict:
    for peer in peers:
        peer.tell({"op": "stats", "reset": reset})
    parts = [peer.read(60) for peer in peers]
    out = {"jobs_per_agent": [], "never_pinged": 0, "all_pinged_s": 0.0, "max_open_gap_ms": 0.0}
    for part in parts:
        out["jobs_per_agent"] += part["jobs_per_agent"]
        out["never_pinged"] += part["never_pinged"]
        if part["all_pinged_s"] is None or out["all_pinged_s"] is None:
            out["all_pinged_s"] = None
        else:
            out["all_pinged_s"] = max(out["all_pinged_s"], part["all_pinged_s"])
        out["max_open_gap_ms"] = max(out["max_open_gap_ms"], part["max_open_gap_ms"] or 0.0)
        for key in ("jobs", "pings", "kills", "killed", "kill_unknown", "held_expired", "churned",
                    "lost_held"):
            out[key] = out.get(key, 0) + part[key]
    # Gap percentiles are per process; the worst process's figure is the one to report.
    gaps = [part["ping_gaps"] for part in parts if part["ping_gaps"]["n"]]
    out["ping_gaps"] = {
        "n": sum(g["n"] for g in gaps),
        "p50_ms": max((g["p50_ms"] for g in gaps), default=None),
        "p99_ms": max((g["p99_ms"] for g in gaps), default=None),
        "max_ms": max((g["max_ms"] for g in gaps), default=None),
    }
    return out


# --------------------------------------------------------------------------------------
# Many agents
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("scale_dialect", "scale_kind"), cases(), ids=[f"{d}-{k}" for d, k in cases()])
def test_scale_agents(benchmark, broker_factory, registry, scale_dialect, scale_kind):
    """N idle agents: registration, idle CPU, ping regularity, then the spread of M jobs."""
    n = min(AGENTS, STOCK_MAX_AGENTS) if scale_kind == "stock" else AGENTS
    jobs = SPREAD_JOBS or 10 * n
    sc = Scenario(benchmark, registry, f"{n:,} agents", scale_kind, scale_dialect, broker_factory)
    args, url = metrics_args(scale_kind)
    with LoadSession(broker_factory, scale_kind, scale_dialect, args) as s:
        peers = agent_peers(s, n, slots=1)
        clients = s.clients(4)
        for peer in peers:
            peer.wait_ready()
        clients.wait_ready()
        out: dict = {}

        def register() -> None:
            t0 = time.monotonic()
            for peer in peers:
                peer.tell({"op": "connect"})
            for peer in peers:
                out.setdefault("connect", []).append(peer.read(120))
            out["hellos_sent_s"] = time.monotonic() - t0
            out["registered_s"] = (wait_metrics(url, "fastbackend_agents", n, REGISTER_TIMEOUT)
                                   if url else None)
            out["registered"] = scrape(url).get("fastbackend_agents")
            if out["registered_s"] is not None:
                out["registered_s"] += out["hellos_sent_s"]

        benchmark.pedantic(register, rounds=1, iterations=1)
        # Every agent pinged at least once (the broker pings each registered agent every second).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            first = merged_stats(peers, reset=False)
            if not first["never_pinged"]:
                break
            time.sleep(0.5)
        merged_stats(peers)  # reset: the idle window starts now
        cpu0 = s.broker.cpu()
        time.sleep(IDLE_S)
        idle_cpu = (s.broker.cpu() - cpu0) / IDLE_S * 100
        idle = merged_stats(peers)
        answer = clients.ask({"op": "jobs", "jobs": jobs, "environments": [ENVIRONMENT], "window": 64,
                              "input_size": 64, "timeout": 300, "idle_timeout": 30}, 330)
        spread = merged_stats(peers)
        assert s.broker.alive(), s.broker.log_tail()
    per_agent = spread["jobs_per_agent"]
    mean = statistics.fmean(per_agent) if per_agent else 0.0
    cv = statistics.pstdev(per_agent) / mean if mean else None
    sc.figure("registration (every hello registered)", "s", out["registered_s"])
    sc.figure("registration (every agent pinged)", "s", first["all_pinged_s"])
    if url:
        sc.figure("agents registered", "", out["registered"])
    sc.figure("idle broker CPU", "% of a core", idle_cpu)
    sc.figure("ping interval p50", "ms", idle["ping_gaps"]["p50_ms"])
    sc.figure("ping interval p99", "ms", idle["ping_gaps"]["p99_ms"])
    sc.figure("ping interval max", "ms", idle["ping_gaps"]["max_ms"])
    sc.figure(f"{jobs:,} jobs: per agent min", "", min(per_agent, default=None))
    sc.figure(f"{jobs:,} jobs: per agent max", "", max(per_agent, default=None))
    sc.figure(f"{jobs:,} jobs: per agent CV", "", cv)
    sc.figure(f"{jobs:,} jobs: agents with none", "", sum(1 for c in per_agent if not c))
    sc.extra("jobs/s", answer["jobs_per_s"])
    sc.extra("hellos sent (s)", out["hellos_sent_s"])
    sc.extra("descriptor limit of the generators", [c["nofile"] for c in out["connect"]])
    sc.extra("pings in the idle window", idle["pings"])
    sc.extra("agents never pinged in the idle window", idle["never_pinged"])
    assert answer["done"] == jobs and answer["crashed"] == 0, answer
    assert len(per_agent) == n and sum(per_agent) == jobs, (len(per_agent), sum(per_agent))
    assert idle["never_pinged"] == 0, idle


# --------------------------------------------------------------------------------------
# Soak
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("scale_dialect", "scale_kind"), cases(), ids=[f"{d}-{k}" for d, k in cases()])
def test_soak(benchmark, broker_factory, registry, scale_dialect, scale_kind):
    """J jobs with kills and agent churn: no lost or duplicated result, flat RSS, empty tables."""
    total = min(SOAK_JOBS, STOCK_MAX_SOAK) if scale_kind == "stock" else SOAK_JOBS
    segments = 4 if SMOKE else 20
    size = total // segments
    agents, kill_every = 8, 50
    sc = Scenario(benchmark, registry, "soak", scale_kind, scale_dialect, broker_factory)
    args, url = metrics_args(scale_kind)
    rows: list[dict] = []
    with LoadSession(broker_factory, scale_kind, scale_dialect, args) as s:
        peers = agent_peers(s, agents, slots=4, kill_every=kill_every, hold_s=5.0,
                            churn_every_s=0.1, churn_count=1)
        clients = Peer("soak-clients", {"addr": s.broker.client_addr, "dialect": scale_dialect,
                                        "clients": 4, "environment": ENVIRONMENT}, script=SCALEGEN)
        s.peers.append(clients)
        for peer in peers:
            peer.ask({"op": "connect"}, 60)
        clients.wait_ready()
        if url:
            assert wait_metrics(url, "fastbackend_agents", agents, 30) is not None
        for peer in peers:
            peer.ask({"op": "churn", "on": True}, 30)

        def soak() -> None:
            for seg in range(segments):
                cpu0 = s.broker.cpu()
                answer = clients.ask({"op": "segment", "jobs": size, "first": seg * size, "window": 32,
                                      "kill_every": kill_every, "timeout": 3600, "idle_timeout": 30}, 3700)
                answer["cpu_s"] = s.broker.cpu() - cpu0
                answer["rss"] = s.broker.rss()
                answer["tables"] = scrape(url)
                rows.append(answer)
                if answer["lost"] or not s.broker.alive():
                    break

        benchmark.pedantic(soak, rounds=1, iterations=1)
        for peer in peers:
            peer.ask({"op": "churn", "on": False}, 30)
        agent_side = merged_stats(peers)
        assert s.broker.alive(), s.broker.log_tail()
    warm = max(1, segments // 10)  # the first tenth of the run is warm-up
    rss = [r["rss"] for r in rows]
    after = rss[warm - 1:] if len(rss) >= warm else rss
    mid = after[len(after) // 2]
    growth = (max(after) - after[0]) / after[0] * 100
    totals = {key: sum(r[key] for r in rows) for key in
              ("sent", "finished", "lost", "done", "killed", "crashed", "duplicates", "strays", "kills_sent")}
    rates = [r["jobs_per_s"] for r in rows]
    sc.figure("jobs", "", totals["sent"])
    sc.figure("lost results", "", totals["lost"])
    sc.figure("duplicated results", "", totals["duplicates"] + totals["strays"])
    sc.figure("killed / crashed", "", f"{totals['killed']:,} / {totals['crashed']:,}")
    sc.figure("RSS after warm-up / middle / end", "MiB",
              " / ".join(f"{v / 2**20:.1f}" for v in (after[0], mid, after[-1])))
    sc.figure("RSS growth after warm-up (max)", "%", growth)
    sc.figure("jobs/s per segment min / median / max", "",
              f"{min(rates):,.0f} / {statistics.median(rates):,.0f} / {max(rates):,.0f}")
    sc.figure("broker CPU per job", "us", sum(r["cpu_s"] for r in rows) / max(1, totals["finished"]) * 1e6)
    sc.figure("agents churned", "", agent_side["churned"])
    # A held job's kill that never reached its agent within hold_s: the agent then says "done".
    sc.figure("kills of running jobs: delivered / lost", "",
              f"{agent_side['killed']:,} / {agent_side['held_expired']:,}")
    sc.extra("segments", [{k: r[k] for k in ("jobs_per_s", "rss", "lost", "killed", "crashed", "tables")}
                          for r in rows])
    sc.extra("agent side", {k: v for k, v in agent_side.items() if k != "jobs_per_agent"})
    leftover = [(i, r["tables"].get("fastbackend_jobs_waiting"), r["tables"].get("fastbackend_jobs_running"))
                for i, r in enumerate(rows) if r["tables"].get("fastbackend_jobs_waiting", 0)
                or r["tables"].get("fastbackend_jobs_running", 0)]
    if url:
        sc.figure("segments ending with jobs in the tables", "", len(leftover))
    assert totals["lost"] == 0 and totals["duplicates"] == 0 and totals["strays"] == 0, totals
    assert len(rows) == segments, rows[-1]
    assert agent_side["held_expired"] == 0, agent_side
    assert agent_side["churned"] > 0, agent_side
    assert not leftover, leftover
    if not SMOKE and SCALE >= 1:
        assert growth <= 5.0, rss
