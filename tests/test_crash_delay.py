"""Crash results within a second of an agent's connection closing, and never for a live agent.

The real INGInious 0.9.2 agent and client run as processes of their own
(:mod:`peers.netns`); the agent is SIGKILLed while it runs jobs, so its TCP connection
closes at once.  Stock waits for six missed pings (6-7 s); fastbackend's monitor on the
agent socket sees the connection close and removes the agent (see ``fastbackend.server``).

``python tests/test_crash_delay.py [CONFIG] [RUNS]`` (with ``.peers/0.9`` first on
``PYTHONPATH``) prints the delays for one broker configuration, ``stock-0.9`` included.
"""

from __future__ import annotations

import signal
import statistics
import sys
import time
from pathlib import Path

import pytest
import zmq
from peers.broker import CONFIGS, BrokerProcess
from peers.netns import PeerProcess
from peers.raw09 import RawAgent09, RawClient09

AGENT_LOST = ["crash", "Agent restarted"]


def crash_delays(broker: BrokerProcess, log_dir: Path, runs: int, slots: int = 2) -> list[float]:
    """SIGKILL an agent running ``slots`` jobs, ``runs`` times; the seconds until the last crash result."""
    client = PeerProcess(["client", broker.client_addr], log_path=log_dir / "client.log")
    delays = []
    try:
        for run in range(runs):
            agent = PeerProcess(["agent", broker.agent_addr, f"victim{run}", str(slots), "inf"],
                                log_path=log_dir / "agent.log")
            try:
                if run == 0:
                    client.wait("ready", timeout=30)
                client.send(f"submit {slots}")
                agent.wait("job", slots, timeout=30)
                killed = agent.kill()
                results = client.wait("result", slots * (run + 1), timeout=20)[slots * run:]
            finally:
                agent.stop()
            assert all(r["result"] == AGENT_LOST for r in results), results
            delays.append(max(r["at"] for r in results) - killed)
    finally:
        client.stop()
    return delays


@pytest.mark.brokers("c-uvloop", "py-asyncio")
def test_killed_agent_jobs_crash_within_a_second(broker, tmp_path):
    delays = crash_delays(broker, tmp_path, runs=5)
    assert max(delays) < 1.0, delays
    assert len(broker.log_lines("WARNING", "lost its connection: removing it")) == 5
    assert not broker.log_lines("WARNING", "did not answer")


def test_no_false_removal_under_load(broker, tmp_path):
    """Busy agents, a flood of jobs, and connections opened and closed on the agent port (each
    close makes the broker probe every agent): only the SIGKILLed agent is removed."""
    victim = PeerProcess(["agent", broker.agent_addr, "victim", "2", "inf"], log_path=tmp_path / "victim.log")
    client = PeerProcess(["client", broker.client_addr], log_path=tmp_path / "client.log")
    busy: list[PeerProcess] = []
    ctx = zmq.Context()
    try:
        client.wait("ready", timeout=30)
        client.send("submit 2")
        victim.wait("job", 2, timeout=20)
        busy += [PeerProcess(["agent", broker.agent_addr, f"busy{i}", "4", "0.005"],
                             log_path=tmp_path / "busy.log") for i in range(3)]
        broker.wait_log("INFO", "said hello", count=4, timeout=30)
        client.send("submit 1500")
        # Raw peers flooding the client socket with queue requests, and short-lived
        # connections (a hello, or nothing) on the agent socket.
        floods = [RawClient09(ctx, broker.client_addr) for _ in range(5)]
        for flood in floods:
            flood.hello()
        for round_ in range(20):
            for flood in floods:
                flood.send("ClientGetQueue")
            passer = RawAgent09(ctx, broker.agent_addr)
            if round_ % 2:
                passer.hello(f"passer{round_}", 1, (("docker", "other"),))
            time.sleep(0.05)
            passer.close()
            if round_ == 10:
                killed = victim.kill()
        results = client.wait("result", 1502, timeout=90)
        crashed = [r for r in results if r["result"] != ["success", "ok"]]
        assert sorted(r["seq"] for r in crashed) == [1, 2], crashed
        assert all(r["result"] == AGENT_LOST for r in crashed)
        assert max(r["at"] for r in crashed) - killed < 1.0
        lost = broker.log_lines("WARNING", "removing it")
        # The victim, and the passers that said hello then closed: no busy agent.
        assert any("(victim) lost its connection" in line for line in lost), lost
        assert not any("(busy" in line for line in lost), lost
        assert all(len(agent.of("start")) == 1 for agent in busy)
        wire = client.of("wire")
        assert len(wire) == len({w["job_id"] for w in wire}) == 1502
        for flood in floods:
            flood.close()
    finally:
        ctx.destroy(linger=0)
        for peer in (*busy, victim, client):
            peer.stop()


def test_frozen_agent_removed_by_missed_pings_then_returns(tmp_path):
    """A frozen agent (SIGSTOP) keeps its connection open: it is removed by the missed pings
    (6-7 s, not sooner), its connection stays open while it is frozen (its kernel still
    acknowledges; the agent socket has no ZMTP heartbeat, see ``server.AGENT_TCP_TIMEOUT_MS``),
    and once thawed the real agent restarts itself and registers again."""
    broker = BrokerProcess(CONFIGS["c-uvloop"], tmp_path / "broker.log", verbose=True)
    broker.start_on_free_ports()
    frozen = PeerProcess(["agent", broker.agent_addr, "frozen", "2", "inf", "0.1"],
                         log_path=tmp_path / "a.log")
    client = PeerProcess(["client", broker.client_addr], log_path=tmp_path / "client.log")
    steady: PeerProcess | None = None
    try:
        client.wait("ready", timeout=30)
        client.send("submit 2")
        frozen.wait("job", 2, timeout=20)
        steady = PeerProcess(["agent", broker.agent_addr, "steady", "1", "0.1"], log_path=tmp_path / "s.log")
        broker.wait_log("INFO", "(steady) said hello", timeout=30)
        frozen.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        results = client.wait("result", 2, timeout=15)
        assert all(r["result"] == AGENT_LOST for r in results), results
        assert 5.5 < max(r["at"] for r in results) - stopped < 8.5
        (removal,) = broker.log_lines("WARNING", "removing it")
        assert "(frozen) did not answer 6 pings" in removal
        # Past the TCP timeout (10 s): the kernel closed nothing, a frozen process's kernel acks.
        time.sleep(max(0.0, stopped + 12 - time.monotonic()))
        assert not broker.log_lines("DEBUG", "an agent connection closed")
        frozen.proc.send_signal(signal.SIGCONT)
        broker.wait_log("INFO", "(frozen) said hello", count=2, timeout=20)
        client.send("submit 3")
        results = client.wait("result", 5, timeout=20)
        assert all(r["result"] == ["success", "ok"] for r in results[2:]), results
        assert len(broker.log_lines("WARNING", "removing it")) == 1
        assert steady.of("start")[1:] == []
    finally:
        for peer in (frozen, client, steady):
            if peer is not None:
                if peer.proc.poll() is None:
                    peer.proc.send_signal(signal.SIGCONT)
                peer.stop()
        broker.check_clean_exit(broker.stop())


def removal_counts(broker: BrokerProcess, runs: int) -> tuple[int, int]:
    """(killed agents removed, false removals) from the broker's log: both backends log a WARNING
    with "removing" and the agent's friendly name; each ``victimN`` was SIGKILLed, anything else
    removed (or a victim removed twice) is a false removal."""
    lines = broker.log_lines("WARNING", "removing")
    victims = [sum(f"(victim{run})" in line for line in lines) for run in range(runs)]
    return sum(1 for n in victims if n), len(lines) - sum(1 for n in victims if n)


if __name__ == "__main__":
    import tempfile

    name = sys.argv[1] if len(sys.argv) > 1 else "c-uvloop"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    with tempfile.TemporaryDirectory() as folder:
        process = BrokerProcess(CONFIGS[name], Path(folder) / "broker.log")
        process.start_on_free_ports()
        try:
            found = crash_delays(process, Path(folder), runs)
            removed, false_removals = removal_counts(process, runs)
        finally:
            process.stop()
    print(f"{name}: crash result after SIGKILL of the agent, {runs} runs: "
          f"p50 {statistics.median(found):.3f} s, max {max(found):.3f} s "
          f"({', '.join(f'{d:.3f}' for d in found)}); "
          f"killed agents removed {removed}/{runs}, false removals {false_removals}")
