"""The demo over seeds and the hierarchy ablation: the spread over seeds, when a direction is stated, the reports."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from benchmark_scripts import load

from mindhier_rt.seed_spread import separation, spread


def test_spread_is_mean_min_max_per_key() -> None:
    got = spread([{"a": 0.8, "b": 1.0}, {"a": 0.9, "b": 3.0}, {"a": 0.85, "b": 2.0}])
    assert got == {"a": {"mean": 0.85, "min": 0.8, "max": 0.9}, "b": {"mean": 2.0, "min": 1.0, "max": 3.0}}
    with pytest.raises(ValueError, match="at least one row"):
        spread([])
    with pytest.raises(ValueError, match="the keys"):
        spread([{"a": 1.0}, {"b": 1.0}])


def test_a_direction_needs_every_seed_on_one_side() -> None:
    assert separation([0.9, 0.91, 0.95], [0.8, 0.85, 0.89]) == ">"
    assert separation([0.8, 0.85], [0.86, 0.9]) == "<"
    assert separation([0.8, 0.9], [0.85, 0.95]) == "overlap"  # means differ, spreads overlap
    assert separation([0.9], [0.1]) == "overlap"  # one seed separates nothing


def _metrics(seed: int) -> dict:
    chance = (("category", 0.1667), ("colour", 0.125), ("position", 0.1111), ("size", 0.3333))
    obj = {name: {"recon": 0.5 + 0.01 * seed, "ground_truth": 0.99, "chance": c} for name, c in chance}
    return {"two_way_pixel": 0.9 + 0.01 * seed, "two_way_feature": 0.92, "pixcorr": 0.5, "ssim": 0.4,
            "seconds": 400.0 + seed, "object": obj}  # fmt: skip


def test_demo_seeds_report_lists_every_metric_with_its_spread() -> None:
    demo_seeds = load("demo_seeds")
    rows = [demo_seeds.flat_scores(_metrics(seed)) for seed in range(3)]
    assert rows[2]["object_category"] == 0.52 and rows[0]["object_size_ground_truth"] == 0.99
    report = {
        "command": "python benchmarks/demo_seeds.py --out x --n-seeds 3",
        "machine": "test",
        "seconds": 1.0,
        "seeds": [0, 1, 2],
        "spread": spread(rows),
        "object_chance": {k: v["chance"] for k, v in _metrics(0)["object"].items()},
    }
    md = demo_seeds.markdown(report)
    assert "| two_way_pixel | 0.9100 | 0.9000 | 0.9200 | 0.5 |" in md
    assert "| object_category | 0.5100 | 0.5000 | 0.5200 | 0.167 |" in md
    assert "| seconds | 401.0000 | 400.0000 | 402.0000 |  |" in md


def test_the_recipe_of_a_smoke_run_overrides_only_what_it_names() -> None:
    demo_seeds = load("demo_seeds")
    args = argparse.Namespace(out=Path("o"), n_seeds=2, steps_scale=0.5, n_train=40, n_test=None)
    s = demo_seeds.recipe(3, args)
    full = demo_seeds.DemoSettings(seed=3)
    assert (s.seed, s.n_train, s.n_test, s.vq_steps) == (3, 40, full.n_test, full.vq_steps // 2)
    assert demo_seeds.command_line("demo_seeds", args) == (
        "python benchmarks/demo_seeds.py --out o --n-seeds 2 --steps-scale 0.5 --n-train 40"
    )


def test_ablation_states_a_direction_only_where_the_seeds_separate() -> None:
    ablation = load("ablation_hierarchy")
    rows = []
    for seed in range(3):
        for name, base in (("hierarchical_c2f", 0.9), ("hierarchical_f2c", 0.7), ("single_feature", 0.88)):
            value = base + 0.01 * seed * (1 if name != "single_feature" else 3)
            rows.append({"variant": name, "seed": seed, **{m: value for m in ablation.METRICS}})
    found = {(d["a"], d["b"], d["metric"]): d["direction"] for d in ablation.directions(rows)}
    assert found[("hierarchical_c2f", "hierarchical_f2c", "two_way_pixel")] == ">"
    assert found[("hierarchical_c2f", "single_feature", "two_way_pixel")] == "overlap"  # 0.90-0.92 vs 0.88-0.94
    assert found[("hierarchical_f2c", "single_feature", "pixcorr")] == "<"
    report = {
        "command": "c", "machine": "m", "seconds": 1.0, "seeds": [0, 1, 2], "directions": ablation.directions(rows),
        "spread": {n: spread([{m: r[m] for m in ablation.METRICS} for r in rows if r["variant"] == n])
                   for n in ablation.VARIANTS},
    }  # fmt: skip
    md = ablation.markdown(report)
    assert "| hierarchical_c2f | 0.910 [0.900, 0.920]" in md
    assert "- two_way_pixel: hierarchical_c2f > hierarchical_f2c" in md
    assert "hierarchical_c2f > single_feature" not in md and "single_feature > hierarchical_c2f" not in md


@pytest.mark.slow
def test_demo_seeds_and_the_ablation_run_end_to_end_on_a_tiny_setting(tmp_path) -> None:
    demo_seeds, ablation = load("demo_seeds"), load("ablation_hierarchy")
    results = tmp_path / "results"
    tiny = ["--n-seeds", "2", "--steps-scale", "0.003", "--n-train", "48", "--n-test", "6"]
    demo_seeds.main(["--out", str(tmp_path / "run"), *tiny, "--results", str(results), "--name", "smoke"])
    report = json.loads((results / "smoke.json").read_text())
    assert report["seeds"] == [0, 1] and [r["seed"] for r in report["runs"]] == [0, 1]
    assert {"two_way_pixel", "object_category", "object_category_ground_truth"} <= set(report["spread"])
    assert report["settings"]["n_train"] == 48

    # the ablation trained from scratch
    ablation.main(["--out", str(tmp_path / "trained"), *tiny, "--results", str(tmp_path / "trained_results")])
    trained = json.loads((tmp_path / "trained_results" / "ablation_hierarchy.json").read_text())
    assert trained["seeds"] == [0, 1] and len(trained["rows"]) == 2 * len(ablation.VARIANTS)
    assert set(trained["spread"]) == set(ablation.VARIANTS) and "--n-train 48" in trained["command"]
    assert not trained["demo_checkpoints"]
    assert (tmp_path / "trained_results" / "ablation_hierarchy.md").read_text().startswith("# Hierarchy ablation")

    # and on the demo's runs: each seed's demo models are its hierarchical_c2f, nothing of theirs is retrained,
    # and every variant scores exactly as when trained from scratch (the two flows train the same weights)
    ablation.main(["--out", str(tmp_path / "ablation"), *tiny, "--results", str(results),
                   "--demo-runs", str(tmp_path / "run")])  # fmt: skip
    ablated = json.loads((results / "ablation_hierarchy.json").read_text())
    assert ablated["rows"] == trained["rows"]
    assert ablated["command"].endswith(f"--demo-runs {tmp_path / 'run'}")
    assert set(ablated["demo_checkpoints"]) == {"0", "1"}
    assert "hierarchical_c2f is each seed's demo checkpoint" in (results / "ablation_hierarchy.md").read_text()
    for seed, run in zip((0, 1), report["runs"], strict=True):
        c2f = next(r for r in ablated["rows"] if r["seed"] == seed and r["variant"] == "hierarchical_c2f")
        # the demo decoded through its ONNX bundle, the ablation through eager PyTorch: the same tokens
        assert c2f["two_way_pixel"] == run["two_way_pixel"]
        assert c2f["pixcorr"] == pytest.approx(run["pixcorr"], abs=2e-4)
        folders = {d.name for d in (tmp_path / "ablation" / f"seed{seed}").iterdir()}
        assert "stage1_single" in folders and "stage2_single_feature" in folders
        assert not folders & {"vqvae", "stage1_hierarchical", "stage2_hierarchical_c2f"}


def _recipe(seed: int):
    return load("demo_seeds").recipe(seed, argparse.Namespace(steps_scale=1.0, n_train=None, n_test=None))


def _demo_checkpoint(runs: Path, seed: int, preset_name: str = "demo", **changes) -> Path:
    """An untrained checkpoint saved the way `run_demo` saves one, its demo settings changed by ``changes``."""
    from mindhier_rt.config import preset
    from mindhier_rt.models.mindhier import MindHier

    demo = {k: v for k, v in dataclasses.asdict(_recipe(seed)).items() if k != "sampling"} | changes
    path = runs / f"seed{seed}" / "model.safetensors"
    path.parent.mkdir(parents=True)
    MindHier.from_config(preset(preset_name), seed=seed).save(path, extra={"demo": demo})
    return path


def test_the_ablation_reuses_only_a_demo_checkpoint_of_its_own_recipe(tmp_path) -> None:
    ablation = load("ablation_hierarchy")
    s = _recipe(0)
    good = _demo_checkpoint(tmp_path / "good", 0)
    assert ablation.demo_checkpoint(tmp_path / "good", s) == good
    with pytest.raises(SystemExit, match="found none"):
        ablation.demo_checkpoint(tmp_path / "empty", s)
    _demo_checkpoint(tmp_path / "other", 0, stage2_steps=5)
    with pytest.raises(SystemExit, match="stage2_steps differ"):
        ablation.demo_checkpoint(tmp_path / "other", s)
    _demo_checkpoint(tmp_path / "tiny", 0, preset_name="tiny")
    with pytest.raises(SystemExit, match="config is not the recipe's"):
        ablation.demo_checkpoint(tmp_path / "tiny", s)
    (tmp_path / "linked" / "seed0").mkdir(parents=True)
    (tmp_path / "linked" / "seed0" / "model.safetensors").symlink_to(good)  # a file outside the folder given
    with pytest.raises(SystemExit, match="outside"):
        ablation.demo_checkpoint(tmp_path / "linked", s)
    (tmp_path / "garbage" / "seed0").mkdir(parents=True)
    (tmp_path / "garbage" / "seed0" / "model.safetensors").write_bytes(b"\xff" * 64)  # not a checkpoint
    with pytest.raises(SystemExit, match=r"--demo-runs: .*model\.safetensors"):
        ablation.demo_checkpoint(tmp_path / "garbage", s)
