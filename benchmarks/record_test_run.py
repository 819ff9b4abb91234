"""Run the README's default test command and record what it gave: benchmarks/results/test_run.json.

    python benchmarks/record_test_run.py [--out benchmarks/results/test_run.json]

The README quotes these counts and the time; ``tests/test_readme.py`` (left out of the recorded run) checks that the
README and this file agree and that the tests collected now are as many as when the run was recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected() -> int:
    """Tests the default run collects (a module skipped at import counts as one skip in a run, none here)."""
    cmd = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_readme.py"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600).stdout
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
    if match is None:
        raise SystemExit(f"pytest --co printed no count:\n{out[-2000:]}")
    return int(match[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "test_run.json")
    args = p.parse_args(argv)
    # tests/test_readme.py checks the README against this file, so it cannot be part of the run it records
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_readme.py"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", tail)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {
        "command": "python -m pytest -q --ignore=tests/test_readme.py",
        "summary": tail,
        "failures": [line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))],
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "skipped": counts.get("skipped", 0),
        "deselected": counts.get("deselected", 0),
        "collected": collected(),
        "seconds": round(seconds, 1),
        "commit": commit.stdout.strip(),
        "uncommitted_changes": bool(dirty),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine()},
    }
    if not counts:
        print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
        raise SystemExit("pytest reported no counts: nothing recorded")
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
