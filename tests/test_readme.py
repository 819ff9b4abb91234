"""The README's numbers that drift come from recorded results: the test run, the demo, the serving load test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"


def test_test_counts_match_the_recorded_run_and_the_tests_collected_now():
    run = json.loads((RESULTS / "test_run.json").read_text())
    m = re.search(r"(\d+) passed, (\d+) skipped .*? in ([\d.]+) minutes", README, re.S)
    assert m, "the README no longer states the test run's counts"
    assert (int(m[1]), int(m[2])) == (run["passed"], run["skipped"]) and run["failed"] == 0
    assert float(m[3]) == round(run["seconds"] / 60, 1)
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_readme.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", collect.stdout)
    assert collected, collect.stdout[-2000:]
    assert int(collected[1]) == run["collected"], "tests were added or removed: re-record the run"


def test_demo_numbers_match_the_recorded_demo():
    path = re.search(r"\(mean (\d+\.\d) s a seed; `benchmarks/results/(demo_[\w.]+\.json)`\)", README)
    assert path, "the README no longer cites the demo's recorded metrics"
    demo = json.loads((RESULTS / path[2]).read_text())
    spread = demo["spread"]
    assert float(path[1]) == round(spread["seconds"]["mean"], 1)
    assert re.search(rf"over {len(demo['seeds'])} seeds", README), "the README no longer says how many seeds"
    for label, key in (("pixels", "two_way_pixel"), ("teacher features", "two_way_feature"), ("PixCorr", "pixcorr"),
                       ("SSIM", "ssim"), ("object category", "object_category"), ("object colour", "object_colour"),
                       ("object position", "object_position"), ("object size", "object_size")):  # fmt: skip
        row = re.search(rf"\| [^|]*{label}[^|]* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", README)
        assert row, label
        recorded = (spread[key]["mean"], spread[key]["min"], spread[key]["max"])
        assert tuple(float(x) for x in row.groups()) == recorded, (label, row.groups(), recorded)


def test_serving_claim_matches_the_recorded_load_test():
    load = json.loads((RESULTS / "serve_load_tiny_cpu.json").read_text())
    m = re.search(r"(\d+) clients sending (\d+) requests", README)
    assert m and (int(m[1]), int(m[2])) == (load["clients"], load["requests"])
    assert load["passed"] and load["counts"]["wrong"] == 0 and load["counts"]["lost"] == 0
