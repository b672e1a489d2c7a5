"""The C kernel under AddressSanitizer and UndefinedBehaviorSanitizer (CI runs this after the test suite).

    python tests/sanitize/run_asan.py                                   # the selections below
    python tests/sanitize/run_asan.py tests/test_executors.py -k auto   # one pytest selection of your own

Each selection runs in its own pytest process with the sanitizer runtimes preloaded (``LD_PRELOAD``;
an instrumented library cannot be loaded into a process that started without them) and
``HF_MEMOPT_SANITIZE=address,undefined``, under which ``cpu_kernel.load()`` builds an instrumented copy of
``memopt_cpu.c`` under its own cache name. ``HF_MEMOPT_REQUIRE_EXECUTORS=cpu`` turns a kernel that does
not build, or a runtime that is not loaded, into failed tests instead of skipped ones. A report aborts
the process (``halt_on_error``); pytest captures at the Python level only (``--capture=sys``), so what
the sanitizers write to file descriptor 2 reaches this script, which passes it on and looks for reports.
The run fails on any report, any failed test, or a selection that selects nothing (a renamed test must
not quietly leave the run).

First a canary: a read one element past a tensor must be reported, or nothing here proves that the
sanitizer is on. Python itself leaks on exit, so leak detection is off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: One pytest process each (starting torch under ASan costs seconds; a renamed file or node id fails).
SELECTIONS: list[list[str]] = [
    # the "cpu" and "auto" rows (auto runs the kernel on CPU): the rule matrix, Critical Momenta, every user
    # action of issue 20's table, checkpoints moving to and from "cpu", bad checkpoint values
    [
        *("tests/test_rule_matrix.py", "tests/test_critical_momenta.py", "tests/test_executor_safety.py"),
        *("tests/test_checkpoint.py", "tests/test_checkpoint_validation.py", "tests/test_user_actions.py"),
        *("-k", "cpu or auto"),
    ],
    # the loader and the executor choice; the kernel split over 1-3 threads at chunk boundaries
    [
        "tests/test_executors.py",
        "tests/test_reference_match.py::test_kernel_path_is_taken_by_default",
        "tests/test_reference_match.py::test_kernel_is_exact_at_every_thread_count",
    ],
]
#: A selection may take this long (the whole run is a few minutes).
TIMEOUT_S = 600

CANARY = """
import numpy as np, torch
from hf_memopt.engine.executors import cpu_kernel
t = torch.ones(1000)
cpu_kernel.sq_norms(np.array([t.data_ptr()]), np.array([t.numel()]), 1)  # in bounds: no report
cpu_kernel.sq_norms(np.array([t.data_ptr()]), np.array([t.numel() + 1]), 1)  # one element past the end
"""


def runtime(cc: str, name: str) -> str:
    """The path of the compiler's sanitizer runtime ``name`` (``libasan.so``); an error where it has none."""
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        sys.exit(f"run_asan: {cc} has no {name} (install the compiler's sanitizer runtimes, e.g. libasan8 libubsan1)")
    return path


#: What the sanitizers print at the start of a report.
REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "Sanitizer:DEADLYSIGNAL")


def sanitized_env() -> dict[str, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    env = dict(os.environ)
    env.update(
        # ASan's runtime must come first in the initial library list; UBSan's follows it
        LD_PRELOAD=f"{runtime(cc, 'libasan.so')} {runtime(cc, 'libubsan.so')}",
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1",
        HF_MEMOPT_SANITIZE="address,undefined",
        HF_MEMOPT_REQUIRE_EXECUTORS="cpu",
    )
    return env


def run(cmd: list[str], env: dict[str, str], echo: bool = True) -> tuple[int, str]:
    """Run ``cmd`` (at most :data:`TIMEOUT_S`), passing its output on (``echo``); its exit status and output."""
    proc = subprocess.Popen(
        ["timeout", str(TIMEOUT_S), *cmd],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    for line in proc.stdout:
        if echo:
            print(line, end="", flush=True)
        out.append(line)
    return proc.wait(), "".join(out)


def run_canary(env: dict[str, str]) -> None:
    rc, out = run([sys.executable, "-c", CANARY], env, echo=False)
    if rc == 0 or "heap-buffer-overflow" not in out:
        sys.exit(
            f"{out}\nrun_asan: the canary's read past a buffer was not reported (exit {rc}): no instrumented kernel"
        )
    print("run_asan: the canary's read one element past a tensor was reported, as it must be", flush=True)


def main(argv: list[str]) -> int:
    selections = [argv] if argv else SELECTIONS
    env = sanitized_env()
    run_canary(env)
    failed = []
    for selection in selections:
        start = time.monotonic()
        print(f"run_asan: {' '.join(selection)}", flush=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", *selection]
        rc, out = run(cmd, env)
        found = [m for m in REPORT_MARKERS if m in out]
        print(
            f"run_asan: exit {rc}, sanitizer reports: {found or 'none'}, {time.monotonic() - start:.0f} s", flush=True
        )
        if rc != 0 or found:
            failed.append(" ".join(selection))
    if failed:
        print("run_asan: FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
