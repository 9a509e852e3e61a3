"""Run one command as a child of a small, fresh process and report that child's own wall time and peak RSS.

    python -m benchmarks._measure RESULT.json -- COMMAND [ARGS ...]

Why a separate launcher: Linux folds the peak RSS of the address space a process had *before* exec() into
the ``ru_maxrss`` that ``wait4`` reports for it. A child forked straight from the benchmark harness (which has
imported torch and holds the phantom) would therefore report at least the harness's own peak. This launcher
is a freshly exec'd, small Python process; the command it starts inherits only the launcher's few MiB, and
``os.wait4`` on that one pid gives the peak RSS of that one child (plus any of its own children it waited
for, which neither benchmarked command has).

RESULT.json gets ``{"returncode", "wall_s", "maxrss_mib", "user_s", "sys_s", "launcher_maxrss_mib"}``
(the last is the launcher's own peak, a floor under the child's ``maxrss_mib``);
the command's stdout and stderr pass through unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _vm_hwm_kib() -> float:
    """Peak RSS of this launcher's own address space (``ru_maxrss`` of RUSAGE_SELF would include the
    harness's, inherited through exec, see above): the floor under the child's ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m benchmarks._measure RESULT.json -- COMMAND [ARGS ...]", file=sys.stderr)
        return 2
    result_path, cmd = argv[0], argv[2:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    own = _vm_hwm_kib()
    report = {"returncode": proc.returncode, "wall_s": wall, "maxrss_mib": usage.ru_maxrss / 1024.0,
              "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "launcher_maxrss_mib": own / 1024.0,
              "command": cmd}
    with open(result_path, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
