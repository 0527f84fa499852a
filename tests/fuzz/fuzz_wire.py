"""Coverage-guided fuzzing of the wire scanners and splicers (atheris), both dialects.

For arbitrary bytes, read as a client frame and as an agent frame of each dialect:

* the compiled and the pure twin agree: the same result, or the same WireError reason
  (and WrongDialect's dialect), for every API function;
* nothing but WireError (WrongDialect included) escapes either twin;
* every successful splice loads with the RECEIVER's loader (``receivers.py``) and has
  exactly the key set of the message it names; so does backend_job_started for every
  job id a scan returned.

atheris instruments the pure twin (and the protocol package) for coverage; the compiled
twin, a C extension, is reached through the differential check on the same inputs.
Run: ``python tests/fuzz/fuzz_wire.py [libFuzzer flags] [CORPUS_DIR]`` (``run.py`` does).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["fastbackend"]):
    from fastbackend import _wire_py, protocol  # noqa: E402

from fastbackend import _wire_c  # noqa: E402
from fuzz.wire_common import CALLS, DIALECTS, check_planned, check_receivers, outcome, seeds  # noqa: E402


def check(frame: bytes) -> None:
    for dialect in DIALECTS:
        for name, call in CALLS:
            py = outcome(call, _wire_py, frame, dialect)
            c = outcome(call, _wire_c, frame, dialect)
            if c != py:
                raise AssertionError(f"twins disagree on {name} (dialect {dialect}): c={c!r} py={py!r}")
            if py[0] != "ok":
                continue
            check_receivers(_wire_py, name, py[1], dialect)
            if name == "splice_new_job":
                check_planned(_wire_c, frame, c[1], dialect)
            if name in ("scan_client", "scan_agent"):
                job_id = py[1][2] if name == "scan_agent" else py[1][1]
                if job_id is not None:
                    assert _wire_c.job_started(job_id, dialect) == _wire_py.job_started(job_id, dialect)


def test_one_input(data: bytes) -> None:
    check(data)


def main() -> None:
    argv = list(sys.argv)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    for directory in corpus:
        os.makedirs(directory, exist_ok=True)
        for i, seed in enumerate(seeds()):
            with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
                f.write(seed)
    assert protocol.DIALECTS  # imported under instrumentation
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
