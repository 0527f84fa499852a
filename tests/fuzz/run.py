"""Run every fuzz harness, bounded; exit status 1 on any finding (tests/run.sh's fuzz step).

Harnesses: ``fuzz_wire.py``, ``fuzz_wire_native.py`` (the compiled wire module alone, its C
code instrumented: the fast one, for long runs) and ``fuzz_broker.py`` (atheris, in-process,
coverage-guided), and ``fuzz_process.py`` (a broker subprocess over real sockets).  Knobs:

* ``FASTBACKEND_FUZZ_SECONDS`` (30): seconds per harness; hours for a long run;
* ``FASTBACKEND_FUZZ_DIR`` (a fresh temporary folder): where the corpora and any crash
  input (``crash-*``, replayed by ``python tests/fuzz/fuzz_wire.py CRASH_FILE``) are kept;
  reuse one folder to let a long run start from the previous corpus;
* ``FASTBACKEND_FUZZ_ONLY`` (all): a comma-separated subset, e.g. ``wire_native,broker``
  (names: ``wire``, ``wire_native``, ``broker``, ``process``);
* the process harness's own knobs (``FASTBACKEND_FUZZ_SEED``, ``_FRAMES``, ``_BROKER``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    seconds = int(float(os.environ.get("FASTBACKEND_FUZZ_SECONDS", "30")))
    workdir = Path(os.environ.get("FASTBACKEND_FUZZ_DIR") or tempfile.mkdtemp(prefix="fastbackend-fuzz-"))
    only = set(filter(None, os.environ.get("FASTBACKEND_FUZZ_ONLY", "").split(",")))
    failed = []
    for name in ("wire", "wire_native", "broker", "process"):
        if only and name not in only:
            continue
        script = HERE / f"fuzz_{name}.py"
        if name == "process":
            argv = [sys.executable, str(script)]
        else:
            corpus = workdir / f"corpus-{name}"
            corpus.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, str(script), f"-max_total_time={seconds}", "-max_len=4096",
                    f"-artifact_prefix={workdir}/{name}-", "-print_final_stats=1", str(corpus)]
        env = {**os.environ, "FASTBACKEND_FUZZ_SECONDS": str(seconds)}
        result = subprocess.run(argv, capture_output=True, text=True, env=env)
        out = result.stdout + result.stderr
        runs = re.search(r"Done (\d+) runs in (\d+) second", out)
        lines = out.strip().splitlines()
        summary = f"{runs.group(1)} inputs in {runs.group(2)} s" if runs else (lines[-1] if lines else "")
        if name == "wire_native":
            summary += " (FALLBACK: C code not instrumented)" if "FALLBACK mode" in out else " (native)"
        print(f"fuzz {name}: {'ok' if result.returncode == 0 else 'FINDING'}: {summary}", flush=True)
        if result.returncode != 0:
            failed.append(name)
            print(out[-6000:], file=sys.stderr)
            print(f"fuzz {name}: crash inputs and corpus in {workdir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
