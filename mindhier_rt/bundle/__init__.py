"""The engine bundle: a folder of graphs (ONNX, TensorRT plans after ``build``), weight files, small tables and
``manifest.json``. ``export`` writes it; runtimes, the builder and C++ hosts read it.

A bundle is a closed, verified unit:

* ``manifest.py``: the manifest as typed dataclasses (``Manifest``), parsed field by field with one clear
  ``BundleError`` per malformed field; every file a reader opens must be listed in ``files`` with its SHA-256.
* ``files.py``: file names stay inside the folder (no absolute paths, ``..``, symlinks or device files) and
  reads are hashed as they happen, so the bytes used are the bytes checked.
* ``core.py``: ``Bundle.open`` / ``read_bytes`` / ``onnx_graph`` / ``load_table`` / ``checked_path``.
* ``tensorrt_plan.py``: the TensorRT binding plan ``build`` records (``DecodePlan``), checked as it is read;
  ``tensor_names.py``: the graph, tensor and table names the TensorRT side binds by name.
* ``writer.py``: ``write_manifest`` lists exactly the files the manifest refers to.
* ``staging.py``: ``staged_bundle`` writes a bundle beside its target and swaps it in when complete.

The format version is ``manifest.FORMAT_VERSION`` (the only place it is set).
"""

from mindhier_rt.bundle.core import Bundle, OnnxGraph
from mindhier_rt.bundle.files import FileEntry, sha256_file
from mindhier_rt.bundle.manifest import (
    FORMAT,
    FORMAT_VERSION,
    BatchSpec,
    Condition,
    GraphSpec,
    Manifest,
    PlanSpec,
    ScaleEntry,
    TensorSpec,
    parse_manifest,
)
from mindhier_rt.bundle.staging import staged_bundle
from mindhier_rt.bundle.tensorrt_plan import DecodePlan
from mindhier_rt.bundle.writer import referenced_files, write_manifest
from mindhier_rt.errors import BundleError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BatchSpec",
    "Bundle",
    "BundleError",
    "Condition",
    "DecodePlan",
    "FileEntry",
    "GraphSpec",
    "Manifest",
    "OnnxGraph",
    "PlanSpec",
    "ScaleEntry",
    "TensorSpec",
    "parse_manifest",
    "referenced_files",
    "sha256_file",
    "staged_bundle",
    "write_manifest",
]
