"""The NSD evaluation protocol (REFERENCE §8): feature extractors, the metric suite, best-of-N selection and the
evaluation of a ``mindhier-rt decode`` folder against a data set's test split.

Protocol, as MindEye / MindEye2 and later work evaluate (ground truth: the test images, repeats averaged):

* ground truth and reconstructions are first resized to 256 x 256 (bilinear, antialiased: :func:`metrics.resize`);
* PixCorr: Pearson r of the flattened RGB images, at 425 px;
* SSIM: grayscale with ``skimage.color.rgb2gray``'s weights (BT.709), gaussian window sigma 1.5, at 425 px;
* two-way identification (:func:`metrics.two_way_identification`, chance 50%) on AlexNet ``features.4``
  (AlexNet(2)) and ``features.11`` (AlexNet(5)) at 256 px, Inception-v3 ``avgpool`` at 342 px and the CLIP
  ViT-L/14 image embedding (``encode_image``) at 224 px;
* correlation distance (:func:`metrics.correlation_distance`, lower is better) on EfficientNet-B1 ``avgpool`` at
  255 px and SwAV ResNet-50 ``avgpool`` at 224 px;
* every network input is the 256 px image resized (bilinear, antialiased) to the side above and normalised with
  the ImageNet mean and std (CLIP's own for CLIP); features are flattened.
* retrieval: top-1 accuracy among the N test images between the brain-predicted CLIP embedding (the encoder's
  pooled output, ``pooled.npy`` of decode) and the ground truth's embedding in the same space (the mean over the
  257 projected final-layer CLIP tokens, what the encoder was trained to predict), both ways: image retrieval
  (brain -> image) and brain retrieval (image -> brain). Chance is 1/N.

Several samples per scan: the sample kept is the one whose CLIP embedding (same space) is most similar to the
brain-predicted embedding. Comparing with the ground truth instead is an oracle (the reference code does it); it
is only done when asked for and is labelled as such in the results.

Weights come from local files only (nothing is downloaded): the networks and where their files are looked up
are in :mod:`mindhier_rt.feature_networks`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mindhier_rt.errors import InputError
from mindhier_rt.feature_networks import (
    CLIP_SIZE,
    HF_CLIP_FILES,
    NETWORKS,
    ClipFeatures,
    TapExtractor,
    load_network,
    weight_search_path,
)
from mindhier_rt.io import PathLike, read_voxels
from mindhier_rt.metrics import (
    LUMA_BT709,
    correlation_distance,
    pixcorr,
    resize,
    retrieval_accuracy,
    ssim,
    two_way_identification,
)

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SIZE",
    "LABELS",
    "LOW_LEVEL_SIZE",
    "METRICS",
    "PROTOCOL",
    "EvalSuite",
    "evaluate_decode",
    "match_rows",
    "select_best_of_n",
]

IMAGE_SIZE = 256  # everything is resized to this first
LOW_LEVEL_SIZE = 425  # PixCorr and SSIM
_CHUNK = 32  # images per chunk when reading, selecting and resizing

# metric -> (network, layer, comparison); network None: on pixels; "clip": the CLIP image embedding
METRICS: dict[str, tuple[str | None, str | None, str]] = {
    "pixcorr": (None, None, "pixcorr"),
    "ssim": (None, None, "ssim"),
    "alexnet2": ("alexnet", "features.4", "two_way"),
    "alexnet5": ("alexnet", "features.11", "two_way"),
    "inception": ("inception", "avgpool", "two_way"),
    "clip": ("clip", None, "two_way"),
    "effnet": ("effnet", "avgpool", "distance"),
    "swav": ("swav", "avgpool", "distance"),
    "retrieval": ("clip", None, "retrieval"),
}
LABELS = {
    "pixcorr": "PixCorr", "ssim": "SSIM", "alexnet2": "AlexNet(2)", "alexnet5": "AlexNet(5)",
    "inception": "Inception", "clip": "CLIP", "effnet": "EffNet-B", "swav": "SwAV",
}  # fmt: skip
PROTOCOL = {
    "image_size": IMAGE_SIZE,
    "pixcorr": f"Pearson r of flattened RGB at {LOW_LEVEL_SIZE} px",
    "ssim": f"grayscale (BT.709) SSIM, gaussian sigma 1.5, at {LOW_LEVEL_SIZE} px",
    "alexnet2": "two-way identification, AlexNet features.4 at 256 px",
    "alexnet5": "two-way identification, AlexNet features.11 at 256 px",
    "inception": "two-way identification, Inception-v3 avgpool at 342 px",
    "clip": f"two-way identification, CLIP image embedding at {CLIP_SIZE} px",
    "effnet": "correlation distance (lower is better), EfficientNet-B1 avgpool at 255 px",
    "swav": "correlation distance (lower is better), SwAV ResNet-50 avgpool at 224 px",
    "retrieval": "top-1 among the N test images, brain-predicted vs ground-truth pooled CLIP tokens",
}


# --------------------------------------------------------------------------------------------------
# the suite


def _parse_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    names = tuple(METRICS) if metrics is None else tuple(dict.fromkeys(metrics))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise InputError(f"expected metrics among {', '.join(METRICS)}, found {', '.join(unknown) or 'none'}")
    return names


class EvalSuite:
    """The protocol's metrics with weights from ``weights_dir``; networks are loaded on first use.

    Every weight file the chosen metrics need is looked up when the suite is made, and one
    :class:`InputError` names all that are missing.
    """

    def __init__(
        self,
        weights_dir: PathLike | None,
        metrics: Iterable[str] | None = None,
        clip_model: str = "ViT-L-14",
        device: str = "cpu",
        batch: int = 16,
        need_clip: bool = False,
    ) -> None:
        self.search_path = weight_search_path(weights_dir, clip_model)
        self.metrics = _parse_metrics(metrics)
        self.clip_model, self.device, self.batch = clip_model, device, batch
        nets = {METRICS[m][0] for m in self.metrics} - {None}
        if need_clip:
            nets.add("clip")
        self.files: dict[str, Path] = {}
        missing = []
        for net in sorted(nets):
            names = self.clip_files() if net == "clip" else NETWORKS[net].files
            found = next((d / n for d in self.search_path for n in names if (d / n).is_file()), None)
            if found is None:
                missing.append(f"{net} ({', '.join(names)})")
            else:
                self.files[net] = found
        if missing:
            raise InputError(
                f"expected local weight files, found none for: {'; '.join(missing)}; looked in "
                f"{', '.join(map(str, self.search_path))} (put them in the first, or pass --weights-dir)"
            )
        self._extractors: dict[str, TapExtractor] = {}
        self._clip: ClipFeatures | None = None

    def clip_files(self) -> tuple[str, ...]:
        return tuple(f"{self.clip_model}{ext}" for ext in (".pt", ".safetensors", ".bin")) + HF_CLIP_FILES

    def clip(self) -> ClipFeatures:
        if self._clip is None:
            self._clip = ClipFeatures(self.files["clip"], self.clip_model, self.device, self.batch)
        return self._clip

    def extractor(self, net: str) -> TapExtractor:
        if net not in self._extractors:
            spec = NETWORKS[net]
            model = load_network(spec, self.files[net])
            self._extractors[net] = TapExtractor(model, spec.layers, spec.size, device=self.device, batch=self.batch)
        return self._extractors[net]

    def features(self, images_N3HW: Tensor) -> dict[str, Tensor]:
        """What the chosen metrics compare, for images [N, 3, H, W] in [0, 1]: ``"pixels"`` (the images at
        256 px) and, per network and layer (``"alexnet:features.4"``, ``"clip:"``, ...), features [N, F]."""
        if images_N3HW.ndim != 4 or images_N3HW.shape[1] != 3:
            raise InputError(f"expected images [N, 3, H, W], found {tuple(images_N3HW.shape)}")
        pixels = _resize_chunked(images_N3HW, IMAGE_SIZE)
        out = {"pixels": pixels}
        for metric in self.metrics:
            net, _, kind = METRICS[metric]
            if net is None or kind == "retrieval" or any(k.startswith(f"{net}:") for k in out):
                continue
            if net == "clip":
                out["clip:"] = self.clip().embedding(pixels)
            else:
                out.update({f"{net}:{layer}": f for layer, f in self.extractor(net)(pixels).items()})
        return out

    def compare(self, recon: dict[str, Tensor], gt: dict[str, Tensor]) -> dict[str, float]:
        """Every chosen metric but retrieval, from the :meth:`features` of reconstructions and ground truth."""
        n = recon["pixels"].shape[0]
        if n < 2 or gt["pixels"].shape[0] != n:
            raise InputError(f"expected two sets of N >= 2 images of equal N, found {n} and {gt['pixels'].shape[0]}")
        out: dict[str, float] = {}
        if {"pixcorr", "ssim"} & set(self.metrics):
            pc = ss = 0.0
            for start in range(0, n, _CHUNK):
                r = resize(recon["pixels"][start : start + _CHUNK], LOW_LEVEL_SIZE)
                g = resize(gt["pixels"][start : start + _CHUNK], LOW_LEVEL_SIZE)
                if "pixcorr" in self.metrics:
                    pc += pixcorr(r, g) * r.shape[0]
                if "ssim" in self.metrics:
                    ss += ssim(r, g, luma=LUMA_BT709) * r.shape[0]
            if "pixcorr" in self.metrics:
                out["pixcorr"] = pc / n
            if "ssim" in self.metrics:
                out["ssim"] = ss / n
        for metric in self.metrics:
            net, layer, kind = METRICS[metric]
            if net is None or kind == "retrieval":
                continue
            key = f"{net}:{layer or ''}"
            if kind == "two_way":
                out[metric] = two_way_identification(recon[key], gt[key])
            else:
                out[metric] = correlation_distance(recon[key], gt[key])
        return {m: out[m] for m in self.metrics if m in out}

    def scores(self, recon_N3HW: Tensor, gt_N3HW: Tensor) -> dict[str, float]:
        """Every chosen metric but retrieval, for reconstructions and ground truth [N, 3, H, W] in [0, 1]."""
        return self.compare(self.features(recon_N3HW), self.features(gt_N3HW))


def _resize_chunked(images: Tensor, size: int) -> Tensor:
    return torch.cat([resize(images[i : i + _CHUNK].float(), size) for i in range(0, images.shape[0], _CHUNK)])


def select_best_of_n(candidates_NSD: Tensor, reference_ND: Tensor) -> Tensor:
    """Per scan, the sample whose embedding has the highest cosine similarity to the reference (ties: lowest)."""
    if candidates_NSD.ndim != 3 or reference_ND.shape != (candidates_NSD.shape[0], candidates_NSD.shape[2]):
        raise InputError(
            f"expected candidate embeddings [N, S, D] and references [N, D], found {tuple(candidates_NSD.shape)} "
            f"and {tuple(reference_ND.shape)}"
        )
    sim = F.cosine_similarity(candidates_NSD.double(), reference_ND.double().unsqueeze(1), dim=-1)
    return sim.argmax(dim=1)


# --------------------------------------------------------------------------------------------------
# a decode folder against the test split


def match_rows(query_nV: np.ndarray, table_mV: np.ndarray, atol: float = 1e-4) -> np.ndarray:
    """For each query row the index of the ``table`` row with the same values (max abs difference <= atol).

    Raises InputError naming the first query row that matches none.
    """
    q, t = np.asarray(query_nV, np.float32), np.asarray(table_mV, np.float32)
    if q.ndim != 2 or t.ndim != 2 or q.shape[1] != t.shape[1]:
        raise InputError(f"expected voxel rows of equal length, found {q.shape} and {t.shape}")
    t_sq = (t.astype(np.float64) ** 2).sum(1)
    out = np.empty(q.shape[0], dtype=np.int64)
    for start in range(0, q.shape[0], 256):
        qc = q[start : start + 256]
        d = t_sq[None, :] - 2.0 * (qc @ t.T).astype(np.float64)
        out[start : start + 256] = d.argmin(axis=1)
    for i, j in enumerate(out):
        if np.abs(q[i] - t[j]).max() > atol:  # rounding picked a neighbour: search exactly
            diffs = np.abs(t - q[i]).max(axis=1)
            j = int(diffs.argmin())
            if diffs[j] > atol:
                raise InputError(
                    f"expected every decoded scan to be a test-split row (repeats averaged), found scan row {i} "
                    f"matching none (closest differs by {diffs[j]:.3g})"
                )
            out[i] = j
    return out


@dataclass
class DecodedRun:
    """What ``mindhier-rt decode`` wrote: ``files[scan]`` lists the PNG of each sample."""

    folder: Path
    subject: str
    fmri: Path
    key: str | None
    files: dict[int, list[Path]] = field(default_factory=dict)
    pooled: np.ndarray | None = None  # [scans in the voxel file, D], NaN rows for skipped scans

    @property
    def scans(self) -> list[int]:
        return sorted(self.files)

    @property
    def samples(self) -> int:
        return len(next(iter(self.files.values())))


def read_decode_dir(folder: PathLike) -> DecodedRun:
    folder = Path(folder)
    meta_path = folder / "decode.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        subject, images = str(meta["subject"]), list(meta["images"])
        fmri = Path(meta.get("fmri_resolved") or meta["fmri"])
    except FileNotFoundError:
        raise InputError(f"{meta_path}: expected the decode.json of `mindhier-rt decode`, found no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{meta_path}: expected decode.json with subject, fmri and images, found ({e!r})") from e
    status = meta.get("status", "complete")  # decode.json written before run_folder had no status
    if status != "complete":
        raise InputError(
            f"{meta_path}: expected a complete decode, found status {status!r} (the run was interrupted or is still "
            "writing): decode again"
        )
    run = DecodedRun(folder, subject, fmri, meta.get("key"))
    per_scan: dict[int, dict[int, Path]] = {}
    for entry in images:
        per_scan.setdefault(int(entry["scan"]), {})[int(entry["sample"])] = folder / str(entry["file"])
    if not per_scan:
        raise InputError(f"{meta_path}: expected decoded images, found none")
    counts = {len(v) for v in per_scan.values()}
    if len(counts) != 1:
        raise InputError(f"{meta_path}: expected the same number of samples for every scan, found {sorted(counts)}")
    run.files = {scan: [v[s] for s in sorted(v)] for scan, v in per_scan.items()}
    pooled_path = folder / "pooled.npy"
    if pooled_path.is_file():
        try:
            run.pooled = np.load(pooled_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{pooled_path}: expected a .npy array [scans, D], found an unreadable file ({e})") from e
        if run.pooled.ndim != 2 or run.pooled.shape[0] <= max(run.files):
            raise InputError(
                f"{pooled_path}: expected [scans, D] covering scan {max(run.files)}, found {run.pooled.shape}"
            )
    return run


def _read_png(path: Path) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: expected a reconstruction PNG, found an unreadable or missing file ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def evaluate_decode(
    recon_dir: PathLike,
    data_root: PathLike,
    subject: str,
    weights_dir: PathLike | None,
    metrics: Iterable[str] | None = None,
    clip_model: str = "ViT-L-14",
    oracle_best_of_n: bool = False,
    device: str = "cpu",
    batch: int = 16,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score a decode folder against the subject's test split; returns the results as a JSON-ready dict.

    Each decoded scan is matched to the test-split row (repeats averaged) with the same voxels, which gives
    its ground-truth image. See the module docstring for the protocol and the best-of-N selection.
    """
    from mindhier_rt.data import open_dataset

    say = on_progress or (lambda _msg: None)
    run = read_decode_dir(recon_dir)
    if run.subject != subject:
        raise InputError(f"{run.folder}/decode.json: expected reconstructions of {subject}, found {run.subject}")
    names = _parse_metrics(metrics)
    samples = run.samples
    scans = run.scans
    brain = None
    if run.pooled is not None:
        brain = torch.from_numpy(np.asarray(run.pooled[scans], dtype=np.float32))
        if not torch.isfinite(brain).all():
            raise InputError(f"{run.folder}/pooled.npy: expected finite rows for every decoded scan")
    if samples > 1 and oracle_best_of_n:
        method = "oracle-ground-truth"
        note = "ORACLE: the sample most CLIP-similar to the ground truth was kept; not a fair score"
    elif samples > 1 and brain is not None:
        method, note = "brain-clip", "the sample most CLIP-similar to the brain-predicted embedding (pooled.npy)"
    elif samples > 1:
        method, note = "first-sample", "no pooled.npy (decode with a newer mindhier-rt): sample 0 of each scan"
    else:
        method, note = "single", "one sample per scan"
    selects = method in ("brain-clip", "oracle-ground-truth")
    wants_retrieval = "retrieval" in names and brain is not None
    suite = EvalSuite(weights_dir, names, clip_model, device, batch, need_clip=selects)

    if not run.fmri.is_file():
        raise InputError(
            f"{run.folder}/decode.json names the voxel file {run.fmri}, found no such file: evaluate matches the "
            "decoded scans to the test split through it"
        )
    decoded = read_voxels(run.fmri, key=run.key)
    if max(scans) >= decoded.shape[0]:
        raise InputError(f"{run.fmri}: expected at least {max(scans) + 1} scans, found {decoded.shape[0]}")
    data = open_dataset(data_root)
    say(f"reading the test split of {subject}")
    test_voxels, test_index = data.split(subject, "test", average_repeats=True)
    rows = match_rows(decoded[scans], test_voxels)
    image_index = test_index[rows]
    if np.unique(image_index).size != image_index.size:
        raise InputError(f"{run.folder}: expected each test image once, found repeated scans of the same image")
    n = len(scans)
    if n < 2:
        raise InputError(f"{run.folder}: expected at least 2 decoded test images, found {n}")

    clip = suite.clip() if selects or wants_retrieval else None
    if clip is not None and brain is not None and brain.shape[1] != clip.teacher.model.visual.output_dim:
        raise InputError(
            f"{run.folder}/pooled.npy: expected the encoder's pooled output of width "
            f"{clip.teacher.model.visual.output_dim} (CLIP {clip_model}), found {brain.shape[1]}"
        )
    say(f"reading {n} ground-truth images and {n * samples} reconstructions")
    recon_parts, gt_parts, gt_pooled_parts, chosen = [], [], [], []
    for start in range(0, n, _CHUNK):
        ids = scans[start : start + _CHUNK]
        gt = torch.from_numpy(data.images(image_index[start : start + _CHUNK]))
        gt_pooled = clip.pooled(gt) if clip is not None else None
        cands = [torch.stack([_read_png(p) for p in run.files[s]]) for s in ids]
        if selects:
            assert clip is not None and gt_pooled is not None
            emb = clip.pooled(torch.cat(cands)).view(len(ids), samples, -1)
            ref = gt_pooled if method == "oracle-ground-truth" else brain[start : start + len(ids)]
            pick = select_best_of_n(emb, ref).tolist()
        else:
            pick = [0] * len(ids)
        chosen += pick
        recon_parts.append(_resize_chunked(torch.stack([c[k] for c, k in zip(cands, pick, strict=True)]), IMAGE_SIZE))
        gt_parts.append(_resize_chunked(gt, IMAGE_SIZE))
        if gt_pooled is not None:
            gt_pooled_parts.append(gt_pooled)
    say("computing the metrics")
    scores = suite.scores(torch.cat(recon_parts), torch.cat(gt_parts))
    retrieval = None
    if wants_retrieval:
        assert brain is not None and clip is not None
        gt_pooled_all = torch.cat(gt_pooled_parts)
        retrieval = {
            "image_top1": retrieval_accuracy(brain, gt_pooled_all),
            "brain_top1": retrieval_accuracy(gt_pooled_all, brain),
            "n_way": n,
            "chance": 1.0 / n,
        }
    return {
        "recon": str(run.folder),
        "data": str(data_root),
        "subject": subject,
        "n_images": n,
        "samples_per_scan": samples,
        "selection": {"method": method, "note": note, "chosen_samples": chosen},
        "oracle_best_of_n": method == "oracle-ground-truth",
        "metrics": scores,
        "retrieval": retrieval,
        "retrieval_note": "needs pooled.npy from decode" if "retrieval" in names and retrieval is None else None,
        "image_index": image_index.tolist(),
        "protocol": {k: v for k, v in PROTOCOL.items() if k in names or k == "image_size"},
        "weights": {k: str(v) for k, v in suite.files.items()},
    }
