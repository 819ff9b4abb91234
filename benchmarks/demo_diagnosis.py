"""Where does a demo run lose the object? Read-outs along the chain from voxels to reconstruction.

    python benchmarks/demo_diagnosis.py --run runs/demo

takes a finished `mindhier-rt demo` folder (its synthetic data set and checkpoint) and measures, for the object
attributes of the held-out test images of one subject (category, colour, position, size; ``object_probe``'s labels):

1. ``voxels``: a ridge read-out from single training trials, applied to the test scans (repeats averaged): what
   the simulated brain data hold.
2. ``encoder``: the same read-out from the encoder's context (every level, flattened): what reaches the generator;
   ``encoder_levels``: the same from each level e_1 (shallow) .. e_M (deep) alone, with the scales that read it
   under the model's guidance.
3. ``vq_round_trip``: the object probe on the test stimuli passed through the VQ-VAE (tokens, then decoded): the
   best any generated token pyramid can do; ``vq_first_scales``: the same from only the first k scales of those
   tokens (the finer scales left out): what the coarse scales alone hold.
4. ``decode``: the object probe and PixCorr on reconstructions from the measured scans, with the demo's sampling
   and others (greedy, stronger guidance), and from noise-free scans (the forward model's signal through the same
   z-scoring): whether sampling or trial noise is what loses the object.
5. ``given_scales``: reconstructions from the measured scans whose first k scales take the test stimulus' own
   tokens and whose later scales the generator draws (demo sampling): which scales lose the object.
6. ``clean_condition`` (with ``--clean-condition``; it trains a generator, a few minutes): a generator trained
   with the run's stage-2 recipe on the teacher's own features of the training images instead of the encoder's
   outputs, then decoding the test stimuli's teacher features (a perfect encoder) and the measured scans: whether
   the generator, given everything the condition could hold, draws the object.

Writes ``<results>/demo_diagnosis_seed<seed>.{json,md}``. Eager PyTorch throughout (the exported bundle decodes the
same tokens; ``tests/test_onnx.py``).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mindhier_rt.checkpoint import read_checkpoint_header
from mindhier_rt.data.nsd import BrainDataset
from mindhier_rt.data.synthetic import SubjectModel
from mindhier_rt.demo import DemoSettings, teacher_targets
from mindhier_rt.io import atomic_write_text, write_json
from mindhier_rt.metrics import pixcorr, two_way_identification
from mindhier_rt.models.encoder import EncoderOutput
from mindhier_rt.models.mindhier import MindHier
from mindhier_rt.object_probe import ATTRIBUTE_CLASSES, ProbeSettings, attribute_labels, object_scores, train_probe
from mindhier_rt.pipeline import decode_features, reconstruct
from mindhier_rt.runtime.base import DecodeBackend
from mindhier_rt.runtime.torch_backend import TorchBackend
from mindhier_rt.sampling import SamplingConfig
from mindhier_rt.train.stages import TrialSet, load_trials, train_stage2


def ridge_accuracy(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray, classes: int,
                   lam: float) -> float:  # fmt: skip
    """Fraction of test rows whose one-vs-rest ridge regression (with a bias) picks the right class."""
    a = np.c_[train_X, np.ones(len(train_X))].astype(np.float64)
    b = np.c_[test_X, np.ones(len(test_X))].astype(np.float64)
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(classes)[train_y])
    return round(float(((b @ w).argmax(1) == test_y).mean()), 4)


def read_outs(train_X: np.ndarray, train_img: np.ndarray, test_X: np.ndarray, test_img: np.ndarray,
              labels: dict[str, np.ndarray], lam: float) -> dict[str, float]:  # fmt: skip
    return {
        name: ridge_accuracy(train_X, labels[name][train_img], test_X, labels[name][test_img], k, lam)
        for name, k in ATTRIBUTE_CLASSES.items()
    }


def noise_free_scans(data: BrainDataset, subject: str, seed: int, train: tuple, test_img: np.ndarray) -> np.ndarray:
    """The forward model's noise-free response to the test images, in the data set's z-scored units: each voxel's
    z-scoring is an affine map of signal + noise, fitted here from the training trials."""
    train_vox, train_img = train
    attrs, images = data.attributes(), data.images()
    model = SubjectModel(subject, train_vox.shape[1], seed=seed)
    sig_train = model.signal(images[train_img], attrs.subset(train_img))
    sig_test = model.signal(images[test_img], attrs.subset(test_img))
    centred = sig_train - sig_train.mean(0)
    slope = (centred * (train_vox - train_vox.mean(0))).mean(0) / np.maximum(centred.var(0), 1e-12)
    return (train_vox.mean(0) + slope * (sig_test - sig_train.mean(0))).astype(np.float32)


class GivenScales:
    """Proxy of a backend whose token choice at scales 0..len(given)-1 is ``given`` (each [N, n_i], one row per scan
    and one sample); every other scale, and everything else, is the backend's. ``pipeline.reconstruct`` drives it."""

    def __init__(self, backend: DecodeBackend, given: list[torch.Tensor]) -> None:
        self._backend, self._given = backend, given

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def choose_tokens(self, logits_BlV: torch.Tensor, scfg: SamplingConfig, scale: int, guidance: float | None,
                      scan_ids: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
        if scale < len(self._given):
            return self._given[scale].to(logits_BlV.device)
        return self._backend.choose_tokens(logits_BlV, scfg, scale, guidance, scan_ids, sample_ids)


def decode_given_scales(
    backend: DecodeBackend, voxels_NV: torch.Tensor, subject: str, sampling: SamplingConfig, given: list[torch.Tensor]
) -> torch.Tensor:
    """Images [N, 3, H, W] whose first len(given) scales take the tokens ``given`` and whose later scales the
    generator draws with ``sampling``: the decode loop of ``reconstruct``, one sample per scan."""
    return reconstruct(GivenScales(backend, given), voxels_NV, subject, sampling).images_NS3HW[:, 0]


def clean_condition_generator(models: MindHier, data: BrainDataset, settings: DemoSettings,
                              levels_NMTD: torch.Tensor, subject: str, out: Path) -> MindHier:  # fmt: skip
    """``models`` with a fresh generator (the demo's initialisation) trained by ``settings``' stage-2 recipe on the
    teacher's features ``levels_NMTD`` of every training image, in place of the encoder's outputs for the scans;
    the null condition is ``subject``'s encoding of all-zero voxels."""
    trials = load_trials(data)
    train_img = torch.unique(torch.cat([t.image_index_n for t in trials]))
    clean = EncoderOutput.from_levels(levels_NMTD[train_img], torch.empty(0))
    condition_set = TrialSet(subject, torch.empty(len(train_img), 0), train_img)  # no voxels: only the images count
    fresh = MindHier(models.cfg, models.encoder, MindHier.from_config(models.cfg, seed=settings.seed).generator,
                     models.vqvae)  # fmt: skip
    train_stage2(fresh, [condition_set], torch.from_numpy(data.images()), settings.train_config("stage2"), out,
                 resume=False, progress=False, conditions=[(clean.pooled_BD, clean.context_BSD())])  # fmt: skip
    return fresh.eval()


def run_settings(checkpoint: Path) -> DemoSettings:
    """The demo settings a checkpoint was trained with (its header's ``demo`` record), each of the type of its
    default; SystemExit if it has none or a value of another type."""
    found = read_checkpoint_header(checkpoint).extra.get("demo")
    try:
        settings = DemoSettings(**found)
    except TypeError:
        raise SystemExit(f"--clean-condition: {checkpoint} records no demo settings (not a demo run)") from None
    default = DemoSettings()
    for name, value in found.items():
        kind = type(getattr(default, name))
        allowed = (int, float) if kind is float else kind
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, allowed):
            raise SystemExit(f"--clean-condition: {checkpoint} records {name}={value!r}, not a {kind.__name__}")
    return settings


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `mindhier-rt demo --out` folder")
    ap.add_argument("--subject", default="subj01")
    ap.add_argument("--train-trials", type=int, default=3000, help="training trials the read-outs are fitted on")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", help="result file stem (default demo_diagnosis_seed<seed>)")
    ap.add_argument(
        "--clean-condition", action="store_true", help="also train a generator on teacher features (read-out 6)"
    )
    args = ap.parse_args(argv)
    if args.train_trials < 1:
        raise SystemExit(f"--train-trials must be at least 1, found {args.train_trials}")
    t_start = time.perf_counter()
    data = BrainDataset(args.run / "data")
    attrs, seed = data.attributes(), data.meta.get("seed")
    if data.kind != "synthetic" or attrs is None or not isinstance(seed, int):
        raise SystemExit(f"{args.run / 'data'} is not a synthetic set with its seed: it knows no object attributes")
    models = MindHier.load(args.run / "model.safetensors").eval()
    if args.clean_condition:  # checked before minutes of read-outs
        settings = run_settings(args.run / "model.safetensors")
        if settings.seed != seed:
            raise SystemExit(f"--clean-condition: the checkpoint's demo seed {settings.seed} is not its data's {seed}")
    images = torch.from_numpy(data.images())
    labels = attribute_labels(attrs)
    test_vox, test_img = data.split(args.subject, "test")
    train_vox, train_img = data.split(args.subject, "train", average_repeats=False)
    train_vox, train_img = train_vox[: args.train_trials], train_img[: args.train_trials]
    gt = images[test_img]

    report: dict = {"run": str(args.run), "seed": seed, "subject": args.subject, "n_test": len(test_img)}
    report["voxels"] = read_outs(train_vox, train_img, test_vox, test_img, labels, lam=100.0)
    with torch.no_grad():
        enc = models.encoder
        context = [
            enc(torch.from_numpy(v), args.subject).context_BSD().flatten(1).numpy() for v in (train_vox, test_vox)
        ]
    report["encoder"] = read_outs(context[0], train_img, context[1], test_img, labels, lam=1.0)
    schedule = models.cfg.schedule
    report["encoder_levels"] = {}
    for level in range(1, schedule.n_levels + 1):  # the context is deep-first: [e_M, ..., e_1]
        seg = schedule.n_levels - level
        cols = [c.reshape(len(c), schedule.n_levels, -1)[:, seg] for c in context]
        scales = [i + 1 for i, lv in enumerate(schedule.level_of_scale) if lv == level]
        report["encoder_levels"][level] = {
            "read_by_scales": scales,
            **read_outs(cols[0], train_img, cols[1], test_img, labels, lam=1.0),
        }

    probe = train_probe(models.cfg.image_size, seed=seed, settings=ProbeSettings())
    test_attrs = attrs.subset(test_img)

    def scored(recon: torch.Tensor) -> dict:
        objects = object_scores(probe, recon, gt, test_attrs)
        return {
            "pixcorr": round(pixcorr(recon, gt), 4),
            "two_way_pixel": round(two_way_identification(recon.flatten(1), gt.flatten(1)), 4),
            **{name: s["recon"] for name, s in objects.items()},
        }

    vq = models.vqvae
    with torch.no_grad():
        truth = vq.img_to_idx(gt)
        report["vq_round_trip"] = scored(vq.fhat_to_img(vq.idx_to_fhat(truth)))
        report["vq_first_scales"] = {}
        f_hat = vq.empty_fhat(len(gt))
        for k in range(1, len(truth)):
            f_hat, _ = vq.update_fhat(k - 1, f_hat, truth[k - 1])
            report["vq_first_scales"][k] = scored(vq.fhat_to_img(f_hat))
    report["ground_truth"] = {name: s["ground_truth"] for name, s in object_scores(probe, gt, gt, test_attrs).items()}
    report["chance"] = {name: round(1 / k, 4) for name, k in ATTRIBUTE_CLASSES.items()}

    demo = DemoSettings().sampling
    samplings = {
        "demo sampling": demo,
        "greedy": SamplingConfig(cfg_scale=demo.cfg_scale, greedy=True),
        "guidance 4, top-k 5": SamplingConfig(cfg_scale=4.0, top_k=5),
    }
    clean = noise_free_scans(data, args.subject, seed, (train_vox, train_img), test_img)
    backend = TorchBackend(models)
    report["decode"] = {}
    for name, sampling in samplings.items():
        recon = reconstruct(backend, torch.from_numpy(test_vox), args.subject, sampling).images_NS3HW[:, 0]
        report["decode"][f"measured scans, {name}"] = scored(recon)
    recon = reconstruct(backend, torch.from_numpy(clean), args.subject, demo).images_NS3HW[:, 0]
    report["decode"]["noise-free scans, demo sampling"] = scored(recon)
    report["given_scales"] = {
        k: scored(decode_given_scales(backend, torch.from_numpy(test_vox), args.subject, demo, truth[:k]))
        for k in range(1, len(truth))
    }
    if args.clean_condition:
        _, levels, _ = teacher_targets(models.cfg, settings.seed, images, data.captions())
        with tempfile.TemporaryDirectory() as tmp:
            clean_models = clean_condition_generator(models, data, settings, levels, args.subject, Path(tmp))
        clean_backend = TorchBackend(clean_models)
        test_levels = EncoderOutput.from_levels(levels[test_img], torch.empty(0))
        null = clean_backend.encode(torch.zeros(1, test_vox.shape[1]), args.subject)
        from_stimuli = decode_features(clean_backend, test_levels.pooled_BD, test_levels.context_BSD(), demo, null)
        from_scans = reconstruct(clean_backend, torch.from_numpy(test_vox), args.subject, demo)
        report["clean_condition"] = {
            "stage2_steps": settings.stage2_steps,
            "the test stimuli's teacher features": scored(from_stimuli.images_NS3HW[:, 0]),
            "measured scans": scored(from_scans.images_NS3HW[:, 0]),
        }
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["machine"] = f"{platform.machine()} CPU, torch {torch.__version__}"
    report["command"] = (
        f"python benchmarks/demo_diagnosis.py --run {args.run}"
        + (f" --name {args.name}" if args.name else "")
        + (" --clean-condition" if args.clean_condition else "")
    )

    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / (args.name or f"demo_diagnosis_seed{seed}")
    write_json(stem.with_suffix(".json"), report)
    atomic_write_text(stem.with_suffix(".md"), markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    names = list(ATTRIBUTE_CLASSES)
    lines = [
        f"# Where the demo loses the object (seed {r['seed']}, {r['subject']}, {r['n_test']} test scans)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}; {r['seconds']} s.",
        "",
        "| read-out | " + " | ".join(names) + " | PixCorr | two-way pixel |",
        "|---|" + "---|" * (len(names) + 2),
    ]

    def row(label: str, scores: dict) -> str:
        cells = [f"{scores[n]:.2f}" for n in names]
        cells += [f"{scores[k]:.3f}" if k in scores else "" for k in ("pixcorr", "two_way_pixel")]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(row("chance", r["chance"]))
    lines.append(row("ridge on the voxels (the data's ceiling)", r["voxels"]))
    lines.append(row("ridge on the encoder's context", r["encoder"]))
    for level, scores in r.get("encoder_levels", {}).items():
        scales = ", ".join(map(str, scores["read_by_scales"])) or "none"
        lines.append(row(f"ridge on level e_{level} alone (read by scales {scales})", scores))
    lines.append(row("probe on the test stimuli (its ceiling)", r["ground_truth"]))
    lines.append(row("probe on the VQ-VAE round trip", r["vq_round_trip"]))
    for k, scores in r.get("vq_first_scales", {}).items():
        lines.append(row(f"probe on the VQ-VAE round trip of scales 1-{k} only" if int(k) > 1 else
                         "probe on the VQ-VAE round trip of scale 1 only", scores))  # fmt: skip
    for label, scores in r["decode"].items():
        lines.append(row(f"probe on reconstructions: {label}", scores))
    for k, scores in r["given_scales"].items():
        given = f"scales 1-{k}" if int(k) > 1 else "scale 1"
        lines.append(row(f"probe on reconstructions, the stimulus' own tokens for {given}", scores))
    clean = r.get("clean_condition", {})
    for label, scores in clean.items():
        if label != "stage2_steps":
            lines.append(row(f"probe on reconstructions by a generator trained on teacher features: {label}", scores))
    lines += [
        "",
        "Ridge read-outs are fitted on single training trials and applied to the test scans (repeats averaged). The",
        "probe is `mindhier_rt.object_probe` (trained on rendered stimuli, never on test images or reconstructions).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
