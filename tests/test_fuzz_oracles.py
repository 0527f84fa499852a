"""The fuzz harnesses' own oracles, on the cases long runs showed they got wrong.

A harness that reports protocol behaviour as a finding is soon ignored, and one whose
exception swallows real defects proves nothing: each case here holds both halves.
"""

from __future__ import annotations

import collections

import msgpack
import pytest

pytest.importorskip("atheris")

from fuzz import fuzz_broker, fuzz_process  # noqa: E402

from fastbackend.protocol import V05, V09  # noqa: E402


def _done(job_id: str, result: tuple[str, str]) -> bytes:
    return msgpack.packb({"@type": "BackendJobDone", "job_id": job_id, "result": result, "grade": 0.0,
                          "problems": {}, "tests": {}, "custom": {}, "state": "", "archive": None,
                          "stdout": "", "stderr": ""})


def _inbox(d1: list[bytes]) -> dict[str, list[bytes]]:
    return {name: (d1 if name == "d1" else []) for name in fuzz_broker.CLIENTS + fuzz_broker.AGENTS}


def _sent(**counts: int) -> dict[str, collections.Counter]:
    sent = {name: collections.Counter() for name in fuzz_broker.CLIENTS}
    sent["d1"].update(counts)
    return sent


DUPLICATE = ("crash", "Duplicate job id")


def test_broker_oracle_allows_the_answers_to_an_id_sent_several_times():
    """A long fuzz_broker run: a mutated new job that kept its id, sent three times, got two
    "Duplicate job id" answers, which the oracle took for results after a result."""
    no_jobs = {name: [] for name in fuzz_broker.CLIENTS}
    inbox = _inbox([_done("d1-m0", DUPLICATE), _done("d1-m0", DUPLICATE)])
    fuzz_broker.check(inbox, no_jobs, _sent(**{"d1-m0": 3}))


def test_broker_oracle_still_refuses_a_second_result_for_an_id_sent_once():
    submitted = {name: [] for name in fuzz_broker.CLIENTS}
    submitted["d1"] = ["d1-0-0"]
    inbox = _inbox([_done("d1-0-0", ("success", "ok")), _done("d1-0-0", ("success", "ok"))])
    with pytest.raises(AssertionError, match="after its result"):
        fuzz_broker.check(inbox, submitted, _sent(**{"d1-0-0": 1}))
    with pytest.raises(AssertionError, match="no result"):
        fuzz_broker.check(_inbox([]), submitted, _sent(**{"d1-0-0": 1}))


def test_process_oracle_lets_an_adversary_be_answered_in_a_dialect_it_spoke():
    """A long fuzz_process run: a 0.5 adversary client that had sent a (mutated, still valid)
    0.9 Ping got the broker's 0.9 Unknown, which the oracle read with the 0.5 loader."""
    unknown09 = msgpack.packb({"@type": "Unknown"})
    message, dialect = fuzz_process.received(b"evil", V05, unknown09, {V05, V09})
    assert (message, dialect) == ({"@type": "Unknown"}, V09)
    with pytest.raises(fuzz_process.Finding, match="loader refuses"):
        fuzz_process.received(b"good-client-05", V05, unknown09, {V05})


@pytest.mark.parametrize("dialect", [V05, V09])
def test_wire_oracle_checks_the_planned_splice(dialect):
    """The wire harnesses compare the planned new-job splice with the scanned one: equal bytes
    pass, a splice that differs by one byte is a finding."""
    from fuzz.wire_common import IDENT, check_planned, seeds

    from fastbackend import wire

    if wire.IMPL != "c":
        pytest.skip("the planned splice is the compiled module's")
    compiled = wire._impl
    frame = seeds()[0 if dialect == V05 else 2]  # the seed client new-job frames
    spliced = compiled.splice_new_job(frame, IDENT, dialect)
    check_planned(compiled, frame, spliced, dialect)
    with pytest.raises(AssertionError, match="planned new-job splice differs"):
        check_planned(compiled, frame, spliced[:-1] + bytes((spliced[-1] ^ 1,)), dialect)
