"""Issue 15, "nothing lost, nothing let in": hostile bundles, exports that must not touch the user's files, output
folders that belong to one run, batched samples and one-line errors. Each test is named for the attack it covers.

The bundle is the session's tiny scale-local export (copied before it is altered); decodes use the tiny
checkpoint with the torch backend or the bundle with onnxruntime, a few scans at most.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from mindhier_rt.bundle import Bundle, BundleError, staged_bundle, write_manifest
from mindhier_rt.errors import InputError, OutputError
from mindhier_rt.evaluate import read_decode_dir
from mindhier_rt.pipeline import decode_passes
from mindhier_rt.run_folder import claim_run_folder

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def shared(tiny_export) -> Bundle:
    return tiny_export("scale_local")[1]


@pytest.fixture()
def copy(shared, tmp_path):
    """``copy(edit=None) -> Path``: a private copy of the shared bundle; ``edit(manifest_dict, folder)`` may
    change its manifest (written back as JSON, checksums untouched) and its files."""

    def make(edit=None, name: str = "b") -> Path:
        folder = tmp_path / name
        shutil.copytree(shared.root, folder)
        if edit is not None:
            manifest = json.loads((folder / "manifest.json").read_text())
            edit(manifest, folder)
            (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    return make


@pytest.fixture()
def good4(tmp_path) -> Path:
    path = tmp_path / "good4.npy"
    np.save(path, np.random.default_rng(0).standard_normal((4, 96)).astype(np.float32))
    return path


def one_error(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit code 1 and exactly one ``error: ...`` line (no traceback) that contains every fragment."""
    code, _, err = result
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1, (code, err)
    assert len(errors) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def entry_of(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. integrity: only listed, hashed files inside the folder are read -----------------------------------
def test_deleted_files_entry_of_an_altered_decoder_is_refused(copy, cli, good4, tmp_path):
    def negate_and_unlist(m, folder):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(folder / "vq_decoder.onnx"))
        init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        onnx.save(model, str(folder / "vq_decoder.onnx"))
        del m["files"]["vq_decoder.onnx"]

    bundle = copy(negate_and_unlist)
    res = cli("decode", "--engine", bundle, "--fmri", good4, "--subject", "subj01", "--out", tmp_path / "o")
    one_error(res, "files", "no entry for vq_decoder.onnx")
    assert not list((tmp_path / "o").glob("*.png"))


def test_empty_files_map_turns_no_check_off(copy):
    bundle = copy(lambda m, _: m.__setitem__("files", {}))
    with pytest.raises(BundleError, match=r"no entry for encoder_subj01\.onnx.*rope_sin\.npy"):
        Bundle.open(bundle)


def test_dotdot_path_is_refused_even_when_listed_with_its_hash(copy, tmp_path):
    def outside(m, folder):
        shutil.copy(folder / "rope_cos.npy", tmp_path / "outside.npy")
        m["tables"]["rope_cos"] = "../outside.npy"
        m["files"]["../outside.npy"] = entry_of(tmp_path / "outside.npy")

    with pytest.raises(BundleError, match=r"tables\.rope_cos: .*'\.\.' parts.*'\.\./outside\.npy'"):
        Bundle.open(copy(outside))


def test_absolute_path_is_refused_even_when_listed_with_its_hash(copy, shared):
    target = str(shared.root / "context.onnx")

    def absolute(m, _):
        m["graphs"]["context"]["file"] = target
        m["files"][target] = m["files"]["context.onnx"]

    with pytest.raises(BundleError, match=r"graphs\.context\.file: .*absolute path"):
        Bundle.open(copy(absolute))


def test_dev_zero_and_other_non_regular_files_are_refused(copy):
    def dev_zero(m, folder):
        m["tables"]["rope_cos"] = "/dev/zero"

    with pytest.raises(BundleError, match="absolute path '/dev/zero'"):
        Bundle.open(copy(dev_zero, "abs"))

    def linked_zero(m, folder):
        (folder / "rope_cos.npy").unlink()
        os.symlink("/dev/zero", folder / "rope_cos.npy")

    with pytest.raises(BundleError, match=r"rope_cos\.npy: expected a regular file inside the bundle, found a symlink"):
        Bundle.open(copy(linked_zero, "link"))

    def fifo(m, folder):
        (folder / "rope_sin.npy").unlink()
        os.mkfifo(folder / "rope_sin.npy")

    with pytest.raises(BundleError, match=r"rope_sin\.npy: expected a regular file inside the bundle, found a FIFO"):
        Bundle.open(copy(fifo, "fifo"))  # and it returns: a FIFO is never opened for reading


def test_symlink_leading_out_of_the_bundle_is_refused(copy, shared, tmp_path):
    def linked_file(m, folder):  # same bytes, same hash: only the link gives it away
        (folder / "rope_cos.npy").unlink()
        os.symlink(shared.root / "rope_cos.npy", folder / "rope_cos.npy")

    with pytest.raises(BundleError, match=r"rope_cos\.npy: expected a regular file inside the bundle, found a symlink"):
        Bundle.open(copy(linked_file, "file"))

    def linked_folder(m, folder):
        os.symlink(shared.root, folder / "elsewhere")
        m["graphs"]["context"]["file"] = "elsewhere/context.onnx"
        m["files"]["elsewhere/context.onnx"] = m["files"]["context.onnx"]

    with pytest.raises(BundleError, match="expected elsewhere to be a folder inside the bundle, found a symlink"):
        Bundle.open(copy(linked_folder, "folder"))


def test_file_swapped_after_open_is_refused_at_load(copy):
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    folder = copy()
    backend = OnnxRuntimeBackend(folder)  # opened and verified; graphs are loaded lazily
    backend.session("context")
    swapped = folder / "vq_decoder.onnx"
    data = bytearray(swapped.read_bytes())
    data[-64:] = bytes(64)  # same size, other weights
    swapped.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vq_decoder\.onnx was altered \(checksum mismatch"):
        backend.session("vq_decoder")
    (folder / "rope_cos.npy").write_bytes((folder / "rope_sin.npy").read_bytes())
    with pytest.raises(BundleError, match=r"rope_cos\.npy was altered"):
        backend.bundle.load_table("rope_cos")


def test_external_weights_are_read_from_checked_bytes_and_never_by_the_models_own_name(copy):
    """A graph whose weights live in a .onnx.data file (as export writes large graphs) runs from the checked
    bytes of that file; with the manifest's external_data dropped, the model's own reference is refused."""
    from mindhier_rt.runtime.onnxruntime_backend import OnnxRuntimeBackend

    def externalise(m, folder):  # as export saves graphs above EXTERNAL_DATA_BYTES (onnxscript's ir.save)
        from onnxscript import ir

        ir.save(ir.load(folder / "vq_decoder.onnx"), folder / "vq_decoder.onnx", external_data="vq_decoder.onnx.data")
        m["graphs"]["vq_decoder"]["external_data"] = "vq_decoder.onnx.data"
        write_manifest(folder, m)
        m.clear()
        m.update(json.loads((folder / "manifest.json").read_text()))

    f_hat = torch.randn(2, 8, 4, 4)
    inline = OnnxRuntimeBackend(copy(name="inline")).decode_image(f_hat)
    folder = copy(externalise, "external")
    assert (folder / "vq_decoder.onnx.data").stat().st_size > (folder / "vq_decoder.onnx").stat().st_size
    torch.testing.assert_close(OnnxRuntimeBackend(folder).decode_image(f_hat), inline, rtol=0, atol=0)

    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"]["vq_decoder"]["external_data"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"reads weights from vq_decoder\.onnx\.data; expected only"):
        OnnxRuntimeBackend(folder).session("vq_decoder")


MALFORMED = {
    "graphs_is_a_list": (lambda m: m.__setitem__("graphs", []), "manifest field graphs: expected an object, found []"),
    "files_is_a_list": (lambda m: m.__setitem__("files", []), "manifest field files: expected an object"),
    "missing_graph_inputs": (lambda m: m["graphs"]["context"].pop("inputs"), "graphs.context: missing key 'inputs'"),
    "missing_scales": (lambda m: m.pop("scales"), "manifest.json: manifest: missing key 'scales'"),
    "batch_scans_is_a_string": (lambda m: m["batch"].__setitem__("scans", "2"), "batch.scans: expected an integer"),
    "shape_dim_is_a_float": (
        lambda m: m["graphs"]["vq_decoder"]["inputs"][0]["shape"].__setitem__(1, 8.5),
        "graphs.vq_decoder.inputs[0].shape[1]: expected an integer, found 8.5",
    ),
    "graph_file_is_dot": (lambda m: m["graphs"]["context"].__setitem__("file", "."), "graphs.context.file"),
    "dtype_not_matching_the_graphs": (lambda m: m.__setitem__("dtype", "float16"), "input voxels is float32"),
    "unknown_dtype": (lambda m: m.__setitem__("dtype", "float64"), "dtype: expected one of float32, float16"),
    "sha256_not_hex": (lambda m: m["files"]["context.onnx"].__setitem__("sha256", "x"), "64 lowercase hex"),
    "missing_step_graph": (lambda m: m["graphs"].pop("generator_step"), "missing: generator_step"),
    "scales_disagree_with_config": (lambda m: m["scales"][1].__setitem__("offset", 7), "scale 1 with tokens, offset"),
    "sampling_unknown_key": (lambda m: m["sampling"].__setitem__("temperature", 2), "unknown sampling config keys"),
    "config_is_a_string": (lambda m: m.__setitem__("config", "tiny"), "config: expected an object"),
    "manifest_is_a_list": (None, "expected the manifest to be a JSON object, found list"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_field_is_one_error_line(case, copy, cli, good4, tmp_path):
    edit, message = MALFORMED[case]
    folder = copy(None if edit is None else lambda m, _: edit(m))
    if edit is None:
        (folder / "manifest.json").write_text("[]")
    res = cli("decode", "--engine", folder, "--fmri", good4, "--subject", "subj01", "--out", tmp_path / "o")
    one_error(res, message)


# ---- 2. export: never deletes or adopts a file it did not write ------------------------------------------
def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"the user's graph")
    (folder / "model.onnx.data").write_bytes(b"the user's weights")
    (folder / "notes.txt").write_text("not a bundle")
    return folder


def test_export_into_a_folder_of_user_files_leaves_them_untouched(cli, tiny_ckpt, tmp_path):
    folder = user_folder(tmp_path)
    before = tree(folder)
    one_error(cli("export", "--ckpt", tiny_ckpt, "--out", folder), "found files no bundle there lists", "model.onnx")
    assert tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing left beside it


def test_export_refuses_a_bundle_folder_holding_unlisted_user_files(copy, cli, tiny_ckpt):
    folder = copy()
    (folder / "my_notes.onnx").write_text("mine")
    before = tree(folder)
    one_error(cli("export", "--ckpt", tiny_ckpt, "--out", folder), "my_notes.onnx", "choose another --out")
    assert tree(folder) == before


def test_interrupted_export_leaves_the_old_bundle_intact(copy, shared, tiny_export):
    from mindhier_rt.export.onnx_export import export_bundle

    folder = copy()
    before = tree(folder)
    seen = []

    def interrupt(name: str) -> None:
        seen.append(name)
        if len(seen) == 2:  # one graph written into the new folder, then the user presses Ctrl-C
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_export("scale_local")[0], folder, batch=2, samples=2, on_graph=interrupt)
    assert tree(folder) == before
    Bundle.open(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["b"]  # the half-written folder is gone


def test_write_manifest_never_adopts_unrelated_files(copy):
    folder = copy()
    (folder / "notes.txt").write_text("the user's")
    (folder / "other.onnx").write_bytes(b"the user's graph")
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = set(manifest["files"])
    write_manifest(folder, manifest)
    assert set(json.loads((folder / "manifest.json").read_text())["files"]) == listed
    assert listed == set(Bundle.open(folder).spec.read_files())  # exactly what readers open


def test_staged_bundle_replaces_a_bundle_only_when_the_new_one_is_complete(copy):
    folder = copy()
    with staged_bundle(folder) as stage:
        assert stage.parent == folder.parent and stage != folder
        (stage / "new.txt").write_text("new")
        Bundle.open(folder)  # the old bundle is still there, whole, while the new one is written
    assert tree(folder) == {"new.txt": b"new"}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["b"]


def test_export_to_a_file_or_a_path_under_a_file_is_one_error_line(cli, tiny_ckpt, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    one_error(cli("export", "--ckpt", tiny_ckpt, "--out", afile), "expected a folder for the bundle, found a file")
    one_error(cli("export", "--ckpt", tiny_ckpt, "--out", afile / "b"), f"expected {afile} to be a folder")
    assert afile.read_text() == "x"


def read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` read-only; as root (which writes there anyway) creating files in it fails as it would."""
    folder.mkdir()
    folder.chmod(0o555)
    if not AS_ROOT:
        return
    real_open, real_mkdtemp = os.open, tempfile.mkdtemp

    def denied(path) -> None:
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            denied(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdtemp(suffix=None, prefix=None, dir=None):
        denied(Path(dir) / "x")
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(tempfile, "mkdtemp", fake_mkdtemp)


def test_export_into_a_read_only_folder_is_one_error_line(cli, tiny_ckpt, tmp_path, monkeypatch):
    locked = tmp_path / "ro"
    read_only(locked, monkeypatch)
    try:
        one_error(cli("export", "--ckpt", tiny_ckpt, "--out", locked / "b"), "cannot create a folder beside it")
    finally:
        locked.chmod(0o755)


# ---- 3. an output folder belongs to one run --------------------------------------------------------------
def decode_torch(cli, ckpt, fmri, out, *extra):
    return cli("decode", "--ckpt", ckpt, "--fmri", fmri, "--subject", "subj01", "--out", out, "--cfg", 0, *extra)


def test_concurrent_decode_into_one_folder_is_refused_by_the_lock(cli, tiny_ckpt, good4, tmp_path):
    out = tmp_path / "o"
    with claim_run_folder(out):  # another run holds the folder (flock is per open file: this works in-process)
        one_error(decode_torch(cli, tiny_ckpt, good4, out, "--seed", 2), "found it in use", f"process {os.getpid()}")
        assert not (out / "decode.json").exists()
        with pytest.raises(OutputError, match="in use"), claim_run_folder(out):
            pass
    assert decode_torch(cli, tiny_ckpt, good4, out, "--seed", 1)[0] == 0
    report = json.loads((out / "decode.json").read_text())
    assert report["status"] == "complete" and report["sampling"]["seed"] == 1 and len(report["images"]) == 4
    assert not (out / ".lock").exists()


def test_interrupted_decode_leaves_status_running(cli, tiny_ckpt, good4, tmp_path, monkeypatch):
    import mindhier_rt.pipeline as pipeline

    out = tmp_path / "o"
    assert decode_torch(cli, tiny_ckpt, good4, out)[0] == 0  # an earlier, complete run
    real, calls = pipeline.reconstruct, []

    class Killed(Exception):
        """The process dies in pass two (click turns KeyboardInterrupt into an exit, so another exception)."""

    def killed_in_pass_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "reconstruct", killed_in_pass_two)
    with pytest.raises(Killed):
        decode_torch(cli, tiny_ckpt, good4, out, "--batch", 1, "--seed", 5)
    report = json.loads((out / "decode.json").read_text())
    assert report["status"] == "running" and report["sampling"]["seed"] == 5 and report["images"] == []
    with pytest.raises(InputError, match="expected a complete decode, found status 'running'"):
        read_decode_dir(out)  # evaluate tells the interrupted folder from a finished one
    assert not list(out.glob(".*"))  # no temp files; the lock was released and removed
    monkeypatch.setattr(pipeline, "reconstruct", real)
    assert decode_torch(cli, tiny_ckpt, good4, out, "--seed", 5)[0] == 0
    assert json.loads((out / "decode.json").read_text())["status"] == "complete"
    assert len(read_decode_dir(out).files) == 4


def test_decode_to_a_file_or_a_path_under_a_file_is_one_error_line(cli, tiny_ckpt, good4, tmp_path):
    one_error(decode_torch(cli, tiny_ckpt, good4, good4), "expected a folder, found a file")
    one_error(decode_torch(cli, tiny_ckpt, good4, good4 / "o"), f"expected {good4} to be a folder")


def test_decode_into_a_read_only_folder_is_one_error_line(cli, tiny_ckpt, good4, tmp_path, monkeypatch):
    locked = tmp_path / "ro"
    read_only(locked, monkeypatch)
    try:
        one_error(decode_torch(cli, tiny_ckpt, good4, locked), "cannot write into the folder")
    finally:
        locked.chmod(0o755)


# ---- 4. samples are batched like scans -------------------------------------------------------------------
def test_200000_samples_are_split_into_passes_of_batch_rows():
    passes = decode_passes(3, 200_000, 8)
    assert max(len(p.scans) * len(p.samples) for p in passes) == 8
    assert sum(len(p.scans) * len(p.samples) for p in passes) == 3 * 200_000
    assert [(len(p.scans), len(p.samples)) for p in decode_passes(5, 2, 8)] == [(4, 2), (1, 2)]


def test_samples_beyond_batch_are_decoded_in_passes_with_the_same_images(cli, tiny_ckpt, good4, tmp_path, monkeypatch):
    import mindhier_rt.pipeline as pipeline

    real, rows = pipeline.reconstruct, []

    def spy(backend, voxels, *args, samples=1, **kwargs):
        rows.append(len(voxels) * samples)
        return real(backend, voxels, *args, samples=samples, **kwargs)

    monkeypatch.setattr(pipeline, "reconstruct", spy)
    one = tmp_path / "one.npy"
    np.save(one, np.load(good4)[:1])
    assert decode_torch(cli, tiny_ckpt, one, tmp_path / "split", "--samples", 5, "--batch", 2, "--cfg", 3)[0] == 0
    assert rows == [2, 2, 1]
    rows.clear()
    assert decode_torch(cli, tiny_ckpt, one, tmp_path / "whole", "--samples", 5, "--batch", 8, "--cfg", 3)[0] == 0
    assert rows == [5]
    names = [f"scan00000_s{s}.png" for s in range(5)]
    assert [(tmp_path / "split" / n).read_bytes() for n in names] == [
        (tmp_path / "whole" / n).read_bytes() for n in names
    ]


# ---- 5. one error line ------------------------------------------------------------------------------------
def test_cfg_1e39_is_one_error_line(cli, tiny_ckpt, good4, tmp_path):
    res = cli("decode", "--ckpt", tiny_ckpt, "--fmri", good4, "--subject", "subj01", "--out", tmp_path / "o",
              "--cfg", "1e39")  # fmt: skip
    one_error(res, "cfg_scale must be a finite float in [0, 1000]", "1e+39")
    assert not (tmp_path / "o").exists()
