"""An exported graph whose weights are graph inputs, and the index saying where each weight's bytes lie.

A TensorRT plan built from such a graph holds no weights by construction, and its build never copies them, so it
needs about a tenth of the host memory whatever the depth. The engine runner binds each weight, read from the files
the index names, as an input (docs/hardware.md: TensorRT-RTX's own weight-stripped plans need a CUDA driver at build
time, so on a CPU-only machine this is the way to a weightless plan).

Every float initializer of two or more dimensions moves (the matrices and convolution kernels: all but a fraction
of a percent of the bytes); vectors, scalars and integer tensors stay constants, so shape logic and small tables
still fold. The fp8 and int8 weights of a Q/DQ graph move too, in their own type: a DequantizeLinear reads them
as it read the constant, and TensorRT still builds the quantized GEMM (an fp8 or int8 weight moved as a wider float
would be no quantized weight at all). The derived folder hard-links the source's external data files (no copy: a derived graph of a 28.6 GB
expert takes a few MB), so the constants it keeps external still resolve beside it and the weights outlive an
eviction of the source entry; weights the source held inline (graphs under protobuf's 2 GB) are written out.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harness.cache import MANIFEST, DiskCache, content_digest
from harness.export import GRAPH_FILE, META_FILE, ExportedGraph

INDEX_FILE = "weights.json"
INLINE_FILE = "weights.data"  # the moved weights that the source graph held inline
# Bumped when the rewrite changes which tensors move or how the index reads.
FORMAT = "floats-2d-qdq-v2"


@dataclass(frozen=True)
class WeightEntry:
    """One moved weight: its input name, ONNX dtype name and shape, and its bytes in `file` of the derived folder."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class WeightInputs:
    """The derived graph (`path`), its index, and the content digest of its cache entry."""

    path: Path
    weights: tuple[WeightEntry, ...]
    content: str

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def weight_bytes(self) -> int:
        return sum(w.length for w in self.weights)


def weight_inputs(graph: ExportedGraph, cache: DiskCache) -> WeightInputs:
    """The weights-as-inputs twin of `graph`, through the cache (keyed on the source graph's content)."""
    spec = {"source": graph.content, "format": FORMAT}
    cached = cache.fetch("onnx-weight-inputs", graph.case.id, spec, lambda folder: _derive(graph.path, folder),
                         read_index)
    return WeightInputs(cached.path / GRAPH_FILE, cached.value, content_digest(cached.path))


def _moves(tensor) -> bool:
    import onnx

    weights = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT8)
    return tensor.data_type in weights and len(tensor.dims) >= 2


def _derive(source: Path, folder: Path) -> None:
    """Write the derived graph, its index and links to the source's external data into `folder`."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)  # the graph alone: a few MB at any depth
    kept, entries = [], []
    with open(folder / INLINE_FILE, "wb") as inline:
        for tensor in model.graph.initializer:
            if not _moves(tensor):
                kept.append(tensor)
                continue
            entries.append(_entry(tensor, source.parent, inline))
            model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for data in source.parent.iterdir():  # initializers and Constant nodes alike may hold external data
        if data.is_file() and data.name not in (GRAPH_FILE, META_FILE, MANIFEST):
            _link(data, folder / data.name)
    onnx.save(model, str(folder / GRAPH_FILE))
    (folder / INDEX_FILE).write_text(json.dumps([asdict(e) for e in entries], indent=0))


def _entry(tensor, source_folder: Path, inline) -> WeightEntry:
    """Where `tensor`'s bytes are: in a source external data file (a TorchScript per-tensor file has no length:
    the rest of the file), or appended to the derived folder's INLINE_FILE."""
    import onnx
    from onnx import numpy_helper

    dtype, shape = onnx.TensorProto.DataType.Name(tensor.data_type), tuple(tensor.dims)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        where = {item.key: item.value for item in tensor.external_data}
        offset = int(where.get("offset", 0))
        length = int(where["length"]) if "length" in where else (source_folder / where["location"]).stat().st_size - offset
        return WeightEntry(tensor.name, dtype, shape, where["location"], offset, length)
    data = numpy_helper.to_array(tensor).tobytes()
    offset = inline.tell()
    inline.write(data)
    return WeightEntry(tensor.name, dtype, shape, INLINE_FILE, offset, len(data))


def _link(source: Path, target: Path) -> None:
    """A hard link (no copy, and the data outlives the source entry); a symbolic link where the filesystem has none."""
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source.resolve(), target)


def read_index(folder: Path) -> tuple[WeightEntry, ...]:
    """The index of a derived folder; each entry's range must lie inside its file (else the entry is rebuilt)."""
    entries = tuple(WeightEntry(**{**e, "shape": tuple(e["shape"])})
                    for e in json.loads((folder / INDEX_FILE).read_text()))
    for e in entries:
        if e.offset + e.length > (folder / e.file).stat().st_size:
            raise ValueError(f"{INDEX_FILE}: {e.name} reaches past the end of {e.file}")
    return entries


def weight_bytes_view(folder: Path, entry: WeightEntry) -> np.ndarray:
    """The weight's bytes, memory-mapped copy-on-write (nothing is read until used, and the file is never written)."""
    return np.memmap(folder / entry.file, dtype=np.uint8, mode="c", offset=entry.offset, shape=(entry.length,))

