"""Raw protocol peers on plain (blocking) pyzmq sockets, for what the real peers cannot send.

The real INGInious client and agent only ever send well-formed messages; robustness tests
need a peer that sends garbage, wrong types, several frames, floods, or reads slowly.
These peers speak the 0.5 dialect exactly as the real ones do (one frame per message,
``packb(..., use_bin_type=True)``), and every receive is bounded by a timeout.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any

import msgpack
import zmq


def pack(message: dict[str, Any]) -> bytes:
    """Encode a message as the 0.5 peers do."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    """Decode a message as the 0.5 peers do (str as str, arrays as tuples)."""
    return msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=False)


def new_job_message(job_id: str, environment: str, **overrides: Any) -> dict[str, Any]:
    """A complete, valid ``client_new_job`` message; ``overrides`` replace fields."""
    message = {
        "type": "client_new_job",
        "job_id": job_id,
        "course_id": "course",
        "task_id": "task",
        "inputdata": {"q1": "print('hello')"},
        "environment": environment,
        "enable_network": False,
        "time_limit": 30,
        "hard_time_limit": 90,
        "mem_limit": 100,
        "debug": False,
        "launcher": "raw",
    }
    message.update(overrides)
    return message


def job_done_message(job_id: Any, result: tuple[str, str] = ("success", "ok"), **overrides: Any) -> dict:
    """A complete, valid ``agent_job_done`` message for the backend job id ``job_id``."""
    message = {
        "type": "agent_job_done",
        "job_id": job_id,
        "result": result,
        "grade": 100.0,
        "problems": {},
        "tests": {},
        "custom": {},
        "archive": None,
        "stdout": "",
        "stderr": "",
    }
    message.update(overrides)
    return message


class RawPeer:
    """A DEALER socket with bounded, decoding receive helpers (0.5 frames; 0.9 in ``raw09``)."""

    #: The key naming a message's type, and the heartbeat types ``expect_silence`` lets pass.
    TYPE_KEY = "type"
    HEARTBEATS: tuple[str, ...] = ("pong", "ping")

    def __init__(self, ctx: zmq.Context, addr: str, rcvhwm: int | None = None) -> None:
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.linger = 0
        if rcvhwm is not None:
            self.socket.rcvhwm = rcvhwm
        self.socket.connect(addr)
        self.received: list[dict[str, Any]] = []  # messages skipped by recv_type

    def send(self, msgtype: str, **fields: Any) -> None:
        self.socket.send(pack({self.TYPE_KEY: msgtype, **fields}))

    def send_message(self, message: dict[str, Any]) -> None:
        self.socket.send(pack(message))

    def send_frames(self, *frames: bytes) -> None:
        """Send raw frames as ONE multipart message (one frame is the protocol's norm)."""
        self.socket.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message; TimeoutError after ``timeout`` seconds."""
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"nothing received within {timeout}s")
        frames = self.socket.recv_multipart()
        assert len(frames) == 1, f"the broker sent {len(frames)} frames in one message"
        return unpack(frames[0])

    def recv_type(self, msgtype: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of ``msgtype``; others are answered (pings) or kept in ``received``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {msgtype} within {timeout}s; got {self.received[-5:]}")
            message = self.recv(remaining)
            if message.get(self.TYPE_KEY) == msgtype:
                return message
            self.on_other(message)

    def on_other(self, message: dict[str, Any]) -> None:
        self.received.append(message)

    def expect_silence(self, duration: float, ignore: tuple[str, ...] | None = None) -> None:
        """Assert nothing but ``ignore`` types (the heartbeats by default) arrives during ``duration`` s."""
        if ignore is None:
            ignore = self.HEARTBEATS
        deadline = time.monotonic() + duration
        while (remaining := deadline - time.monotonic()) > 0:
            if self.socket.poll(int(remaining * 1000) + 1):
                message = unpack(self.socket.recv())
                if message.get(self.TYPE_KEY) in ignore:
                    self.on_other(message)
                    continue
                raise AssertionError(f"unexpected message {message!r}")

    def close(self) -> None:
        self.socket.close(linger=0)


class RawClient(RawPeer):
    """A client made of a raw DEALER socket."""

    def hello(self, name: str = "raw-client") -> None:
        self.send("client_hello", name=name)

    def wait_containers(self, *environments: str, timeout: float = 5.0) -> tuple[str, ...]:
        """Wait for a ``backend_update_containers`` listing all ``environments``."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv_type("backend_update_containers", max(deadline - time.monotonic(), 0.001))
            if set(environments) <= set(message["available_containers"]):
                return message["available_containers"]

    def new_job(self, job_id: str, environment: str, **overrides: Any) -> None:
        self.socket.send(pack(new_job_message(job_id, environment, **overrides)))

    def kill(self, job_id: str) -> None:
        self.send("client_kill_job", job_id=job_id)

    def ping_roundtrip(self, timeout: float = 5.0) -> float:
        """Send a ping and wait for its pong; return the round trip in seconds."""
        start = time.monotonic()
        self.send("ping")
        self.recv_type("pong", timeout)
        return time.monotonic() - start


class RawAgent(RawPeer):
    """An agent made of a raw DEALER socket; it answers pings while it waits."""

    def hello(self, name: str = "raw-agent", slots: int = 1,
              environments: tuple[str, ...] = ("default",)) -> None:
        containers = {env: {"id": f"sha256:{env}", "created": 1} for env in environments}
        self.send("agent_hello", friendly_name=name, available_job_slots=slots,
                  available_containers=containers)

    def on_other(self, message: dict[str, Any]) -> None:
        if message["type"] == "ping":
            self.send("pong")
        self.received.append(message)

    def recv_job(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.recv_type("backend_new_job", timeout)

    def started(self, job_id: Any) -> None:
        self.send("agent_job_started", job_id=job_id)

    def done(self, job_id: Any, result: tuple[str, str] = ("success", "ok"), **overrides: Any) -> None:
        self.socket.send(pack(job_done_message(job_id, result, **overrides)))


def assert_serving(ctx: zmq.Context, agent_addr: str, client_addr: str, timeout: float = 10.0) -> None:
    """A fresh raw agent and raw client run one job end to end through the broker."""
    environment = f"check-{uuid.uuid4().hex[:8]}"
    agent = RawAgent(ctx, agent_addr)
    client = RawClient(ctx, client_addr)
    try:
        agent.hello("checker", 1, (environment,))
        client.hello("checker")
        client.wait_containers(environment, timeout=timeout)
        job_id = str(uuid.uuid4())
        client.new_job(job_id, environment, inputdata={"check": job_id})
        job = agent.recv_job(timeout)
        assert job["job_id"][1] == job_id and job["inputdata"] == {"check": job_id}
        assert isinstance(job["job_id"][0], bytes)
        agent.started(job["job_id"])
        agent.done(job["job_id"], ("success", "checked"), custom={"check": job_id})
        done = client.recv_type("backend_job_done", timeout)
        assert done["job_id"] == job_id
        assert done["result"] == ("success", "checked") and done["custom"] == {"check": job_id}
    finally:
        agent.close()
        client.close()


class EchoAgentThread:
    """A raw agent in its own thread that finishes every job at once (started + done).

    The socket is created, used and closed in the thread only (ZeroMQ sockets are not
    thread-safe).  ``answered`` counts finished jobs; ``stop()`` ends the thread.
    """

    def __init__(self, ctx: zmq.Context, addr: str, slots: int, environments: tuple[str, ...],
                 name: str = "echo-agent", send_started: bool = True, stdout: str = "") -> None:
        self.ctx, self.addr, self.slots, self.environments = ctx, addr, slots, environments
        self.name, self.send_started, self.stdout = name, send_started, stdout
        self.answered = 0
        self.max_running = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EchoAgentThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        agent = RawAgent(self.ctx, self.addr)
        try:
            agent.hello(self.name, self.slots, self.environments)
            pong = pack({"type": "pong"})
            sock = agent.socket
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                # Drain everything queued before polling again.
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    message = unpack(frame)
                    if message["type"] == "ping":
                        sock.send(pong)
                    elif message["type"] == "backend_new_job":
                        job_id = message["job_id"]
                        if self.send_started:
                            sock.send(pack({"type": "agent_job_started", "job_id": job_id}))
                        text = str(message["inputdata"].get("n", ""))
                        sock.send(pack(job_done_message(job_id, ("success", text), stdout=self.stdout)))
                        self.answered += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            agent.close()

    def wait_answered(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.answered < count:
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"echo agent answered {self.answered}/{count} jobs in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "echo agent thread did not stop"
        if self.error is not None:
            raise self.error


class ZmtpPeer:
    """A peer speaking ZMTP 3.0 by hand over a plain TCP socket (NULL security, DEALER type).

    pyzmq cannot send a frame whose length header lies; this can: it is how a test claims
    a gigantic frame without sending it.  Every read is bounded by ``timeout``.
    """

    def __init__(self, addr: str, timeout: float = 5.0) -> None:
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        greeting = (b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00")
                    + b"\x00" + bytes(31))
        self.sock.sendall(greeting)
        self._read_exact(64)  # the broker's greeting
        name, value = b"Socket-Type", b"DEALER"
        body = b"\x05READY" + bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
        self.sock.sendall(bytes([0x04, len(body)]) + body)
        flags, command = self.read_frame()
        assert flags & 0x04 and command.startswith(b"\x05READY"), (flags, command[:16])

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data

    def read_frame(self) -> tuple[int, bytes]:
        """One ZMTP frame: (flags, body)."""
        flags = self._read_exact(1)[0]
        size = int.from_bytes(self._read_exact(8 if flags & 0x02 else 1), "big")
        return flags, self._read_exact(size)

    def send_frame(self, body: bytes) -> None:
        """A single-frame message (short or long form as its size needs)."""
        if len(body) < 256:
            self.sock.sendall(bytes([0x00, len(body)]) + body)
        else:
            self.sock.sendall(b"\x02" + len(body).to_bytes(8, "big") + body)

    def send_header_claiming(self, size: int, sample: bytes = b"x" * 64) -> None:
        """A long-frame header announcing ``size`` bytes, followed by only ``sample``."""
        self.sock.sendall(b"\x02" + size.to_bytes(8, "big") + sample)

    def closed_by_peer(self, within: float) -> bool:
        """True if the broker closes the connection within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
