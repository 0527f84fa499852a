"""Coverage-guided fuzzing of the compiled wire module's own C code (libFuzzer), both dialects.

Why a second wire harness: ``fuzz_wire.py`` runs the atheris-instrumented pure twin beside
the compiled one on every input, so it manages about 1,300 inputs/s, and its coverage is
the Python twin's.  Here ``_wire_c`` is rebuilt with clang's ``-fsanitize=fuzzer-no-link``
and AddressSanitizer (an out-of-bounds read in a scanner would otherwise go unseen), so
libFuzzer is steered by the C code's own branches and comparisons, and each input runs the
compiled module only.  Per input, in both dialects, for every API function:

* nothing but WireError (WrongDialect included) escapes;
* every successful splice loads with the RECEIVER's loader (``receivers.py``) and has
  exactly the key set of the message it names; so does ``job_started`` for every job id a
  scan returned.

The pure twin is checked on a sample: when the fuzzing ends, every corpus entry (the seeds
and every input that grew coverage) is replayed through ``fuzz_wire.check``, which makes
the two twins agree on each API function (a disagreement is written next to libFuzzer's
crash inputs as ``diff-*`` and fails the run).

How: this script (the parent) builds the instrumented module once per source version, in
a cache folder under the temporary directory (``_wire_c.pyx`` cythonized with setup.py's
directives, compiled with ``FB_DEBUG=1`` so the invariant checks run too), plus a shared
libFuzzer (atheris's ``libclang_rt.fuzzer_no_main.a``, whole).  It then runs itself as a
child with that libFuzzer and clang's ASan runtime preloaded (the module's coverage hooks
must resolve in the global namespace: atheris's own libFuzzer is loaded privately), and
the child loads the instrumented module beside the installed one.  Without clang
(``FASTBACKEND_FUZZ_CLANG``, ``clang`` on PATH, or ``/usr/lib/llvm-*/bin/clang``) it falls
back to the installed ``_wire_c`` with only this harness's Python code instrumented, and
says so.

Run: ``python tests/fuzz/fuzz_wire_native.py [libFuzzer flags] CORPUS_DIR`` (``run.py``
does); ``python tests/fuzz/fuzz_wire_native.py CRASH_FILE`` replays a crash input.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from fuzz.wire_common import CALLS, DIALECTS, check_planned, check_receivers, outcome, seeds  # noqa: E402

#: Set in the child: the instrumented module to load ("" in the fallback mode).
CHILD_ENV = "FASTBACKEND_FUZZ_NATIVE_MODULE"
#: setup.py's Cython directives (``DIRECTIVES``): the fuzzed C must be the shipped C.
CYTHON_DIRECTIVES = ("language_level=3", "embedsignature=True", "boundscheck=True", "wraparound=True")
CFLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-DFB_DEBUG=1")
#: ASan options for the child: Python's own allocations "leak" at exit; the link order check
#: would refuse libFuzzer preloaded ahead of ASan, which is what gives libFuzzer's strong
#: coverage hooks precedence over ASan's weak ones; a small quarantine keeps RSS bounded.
ASAN_OPTIONS = "detect_leaks=0:verify_asan_link_order=0:quarantine_size_mb=64:abort_on_error=0"


def find_clang() -> str | None:
    explicit = os.environ.get("FASTBACKEND_FUZZ_CLANG")
    if explicit:
        return shutil.which(explicit)  # "none" (or any missing path) forces the fallback mode
    found = shutil.which("clang")
    if found:
        return found

    def version(path: str) -> int:
        match = re.search(r"llvm-(\d+)", path)
        return int(match.group(1)) if match else 0

    candidates = sorted(glob.glob("/usr/lib/llvm-*/bin/clang"), key=version)
    return candidates[-1] if candidates else None


def clang_file(clang: str, name: str) -> Path | None:
    """A runtime file of clang's, or None (``-print-file-name`` echoes unknown names)."""
    out = subprocess.run([clang, f"-print-file-name={name}"], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    return path if path.is_absolute() and path.exists() else None


def libfuzzer_archive(clang: str) -> Path | None:
    """atheris's libFuzzer (the version its Python driver was built against), else clang's."""
    import atheris

    bundled = Path(atheris.path()) / "libclang_rt.fuzzer_no_main.a"
    return bundled if bundled.exists() else clang_file(clang, "libclang_rt.fuzzer_no_main-x86_64.a")


def build(clang: str) -> tuple[Path, list[Path]] | None:
    """The instrumented module and the libraries to preload, built once per input version
    into a cache folder; None when a piece (libFuzzer's archive) is missing."""
    archive = libfuzzer_archive(clang)
    if archive is None:
        return None
    asan = clang_file(clang, "libclang_rt.asan-x86_64.so")
    sanitize = "address,fuzzer-no-link" if asan else "fuzzer-no-link"
    pyx, pxd = ROOT / "fastbackend" / "_wire_c.pyx", ROOT / "fastbackend" / "_wire_c.pxd"
    key = hashlib.sha256()
    for part in (pyx.read_bytes(), pxd.read_bytes(), clang.encode(), str(archive).encode(),
                 str(asan).encode(), " ".join((*CFLAGS, sanitize, *CYTHON_DIRECTIVES)).encode(),
                 sys.version.encode()):
        key.update(part + b"\0")
    folder = Path(tempfile.gettempdir()) / f"fastbackend-fuzz-native-{key.hexdigest()[:16]}"
    module = folder / ("_wire_c" + sysconfig.get_config_var("EXT_SUFFIX"))
    preload = [folder / "libfuzzer.so", *([asan] if asan else [])]
    if module.exists() and preload[0].exists():
        return module, preload
    staging = Path(tempfile.mkdtemp(prefix="fastbackend-fuzz-native-build-"))
    try:
        source = staging / "_wire_c.c"
        directives = [arg for d in CYTHON_DIRECTIVES for arg in ("-X", d)]
        subprocess.run([sys.executable, "-m", "cython", *directives, "--module-name", "fastbackend._wire_c",
                        "-o", str(source), str(pyx)], cwd=ROOT, check=True)
        include = sysconfig.get_paths()["include"]
        subprocess.run([clang, "-shared", "-fPIC", *CFLAGS, f"-fsanitize={sanitize}", f"-I{include}",
                        str(source), "-o", str(staging / module.name), "-ldl"], check=True)
        # libFuzzer as a shared library of its own, so that it can be preloaded.
        subprocess.run([f"{clang}++", "-shared", "-fPIC", "-Wl,--whole-archive", str(archive),
                        "-Wl,--no-whole-archive", "-lpthread", "-o", str(staging / "libfuzzer.so")],
                       check=True)
        try:
            staging.rename(folder)
        except OSError:  # another run built it meanwhile
            if not module.exists():
                raise
        return module, preload
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The child: libFuzzer on the instrumented module.


def check_compiled(wire: ModuleType, frame: bytes) -> None:
    for dialect in DIALECTS:
        for name, call in CALLS:
            result = outcome(call, wire, frame, dialect)
            if result[0] == "ok":
                check_receivers(wire, name, result[1], dialect)
                if name == "splice_new_job":
                    check_planned(wire, frame, result[1], dialect)


def child(module_path: str) -> None:
    import atheris

    import fastbackend.wire  # the package and the installed _wire_c, first

    if module_path:
        # The same module name in a file of its own: a second, independent copy.
        spec = importlib.util.spec_from_file_location("fastbackend._wire_c", module_path)
        assert spec is not None and spec.loader is not None
        wire = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(wire)
        assert wire is not fastbackend.wire._impl

        def test_one_input(data: bytes) -> None:
            check_compiled(wire, data)
    else:
        from fastbackend import _wire_c

        instrumented = atheris.instrument_func(check_compiled)

        def test_one_input(data: bytes) -> None:
            instrumented(_wire_c, data)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


# ---------------------------------------------------------------------------------------------
# The parent: build, fuzz in the child, replay the corpus through both twins.


def replay(corpora: list[Path], artifact_prefix: str) -> int:
    """Every corpus entry through fuzz_wire.check (the twins agree); the number replayed."""
    from fuzz import fuzz_wire

    count = 0
    for corpus in corpora:
        for path in sorted(corpus.iterdir()):
            if not path.is_file():
                continue
            data = path.read_bytes()
            try:
                fuzz_wire.check(data)
            except Exception:
                out = f"{artifact_prefix}diff-{hashlib.sha1(data).hexdigest()}"
                Path(out).write_bytes(data)
                print(f"fuzz_wire_native: the twins disagree on {path} (copied to {out}); "
                      f"replay: python tests/fuzz/fuzz_wire.py {out}", file=sys.stderr, flush=True)
                raise
            count += 1
    return count


def main() -> int:
    if CHILD_ENV in os.environ:
        child(os.environ[CHILD_ENV])
        return 0  # not reached: libFuzzer exits

    args = sys.argv[1:]
    corpora = [Path(a) for a in args if not a.startswith("-") and not Path(a).is_file()]
    prefix = next((a.split("=", 1)[1] for a in args if a.startswith("-artifact_prefix=")), "./")
    for corpus in corpora:
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i}").write_bytes(seed)

    clang = find_clang()
    built = None
    if clang:
        try:
            built = build(clang)
        except (OSError, subprocess.CalledProcessError) as exc:  # a toolchain problem, not a finding
            print(f"fuzz_wire_native: building the instrumented module failed: {exc}", flush=True)
    env = dict(os.environ)
    if built is None:
        print(f"fuzz_wire_native: FALLBACK mode (clang: {clang or 'not found'}; if found, no libFuzzer"
              f" archive or the build failed): the installed _wire_c, Python-level coverage of the"
              f" harness only", flush=True)
        env[CHILD_ENV] = ""
    else:
        module, preload = built
        print(f"fuzz_wire_native: native mode: {module} (clang {clang}), preloading "
              f"{' '.join(map(str, preload))}", flush=True)
        env[CHILD_ENV] = str(module)
        env["LD_PRELOAD"] = " ".join(map(str, preload))
        env["ASAN_OPTIONS"] = ASAN_OPTIONS
        # Every Python object from malloc, not from pymalloc's arenas: ASan puts its redzones
        # around malloc blocks only, so a read past the end of a small frame (a bytes object
        # of under 512 bytes) would otherwise land on a neighbour in the arena, unseen.
        env["PYTHONMALLOC"] = "malloc"
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env)
    if result.returncode != 0:
        return result.returncode
    replayed = replay(corpora, prefix)
    print(f"fuzz_wire_native: replayed {replayed} corpus entries through both twins: they agree", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
