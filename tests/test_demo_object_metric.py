"""The demo's evaluation reports the object read-out next to the image scores."""

from __future__ import annotations

import torch

from mindhier_rt.config import preset
from mindhier_rt.demo import DemoSettings, evaluate, synthesise, teacher_targets
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.object_probe import ATTRIBUTE_CLASSES, ProbeSettings, train_probe
from mindhier_rt.runtime.torch_backend import TorchBackend


def test_evaluate_reports_each_attribute_with_chance_and_ceiling(tmp_path) -> None:
    s = DemoSettings(n_train=24, n_test=8, repeats=2)
    cfg = preset(s.preset)
    data, images, _ = synthesise(tmp_path / "data", s)
    teacher, _, _ = teacher_targets(cfg, 0, images[:2], data.captions()[:2])
    backend = TorchBackend(MindHier.from_config(cfg, seed=0).eval())
    probe = train_probe(cfg.image_size, settings=ProbeSettings(n_images=200, steps=4))

    scores, recon, gt = evaluate(backend, data, s.decode_subject, s.sampling, teacher, probe)
    assert recon.shape == gt.shape == (8, 3, cfg.image_size, cfg.image_size)
    assert set(scores["object"]) == set(ATTRIBUTE_CLASSES)
    for name, k in ATTRIBUTE_CLASSES.items():
        score = scores["object"][name]
        assert score["chance"] == round(1 / k, 4)
        assert 0 <= score["recon"] <= 1 and 0 <= score["ground_truth"] <= 1
        assert round(score["recon"] * 8) == score["recon"] * 8  # a fraction of the 8 test images

    without, _, _ = evaluate(backend, data, s.decode_subject, s.sampling, teacher)
    assert "object" not in without
    assert {k: v for k, v in scores.items() if k != "object"} == without
    assert torch.equal(recon, evaluate(backend, data, s.decode_subject, s.sampling, teacher)[1])


def test_scaled_settings_scale_the_probe_and_quick_stays_short() -> None:
    s = DemoSettings()
    assert s.scaled(0.5).probe_steps == s.probe_steps // 2
    quick = s.quick()
    assert quick.probe_steps == max(2, int(s.probe_steps * 0.1)) and quick.n_train < s.n_train
