"""Reproducible artifacts: remove what the exporters record about the machine rather than the model.

TorchScript and ONNX exporters record the Python call stack of every traced operation: absolute paths of
the architecture source and of torch's own files (so the archive changed with the checkout or virtual
environment folder). TorchScript keeps it in `*.debug_pkl` records (used only to quote Python lines in
TorchScript error messages), the dynamo ONNX exporter in each node's `pkg.torch.onnx.stack_trace`
metadata. Both are dropped here, right after export, so parity checks the artifact that is archived.

TorchScript also names a class `<name>.___torch_mangle_<N>` when its compilation unit already holds a class of
that name, N counting every such clash in the process so far: the bytes of an archive would depend on what the
same process built before it (`marpipe build a.yaml b.yaml` against `marpipe build b.yaml`, `-j 1` against
`-j 2`). `fresh_jit_state` gives each export a compilation unit of its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ONNX_MACHINE_KEYS = ("pkg.torch.onnx.stack_trace",)


def fresh_jit_state() -> Any:
    """A new, empty TorchScript compilation unit for the next trace or script (returned, for `torch.jit.trace`).

    torch reads its Python compilation unit from `torch.jit._state._python_cu` (the C++ side too), and
    `_recursive`/`_trace` hold references of their own; the concrete-type cache maps classes to types of the
    old unit, so it is emptied with it. Modules exported before keep their own unit.

    TF32 is turned off as the parity stage turns it off: the tracer records `cudnn.allow_tf32` into every
    convolution, so a trace after an earlier build's parity stage would differ from one in a fresh process.
    """
    import torch
    import torch.jit._recursive as recursive
    import torch.jit._state as state
    import torch.jit._trace as trace

    from handlers.marpipe_serving.models import exact_float32

    exact_float32()
    unit = torch._C.CompilationUnit()
    state._python_cu = recursive._python_cu = trace._python_cu = unit
    recursive.concrete_type_store = recursive.ConcreteTypeStore()
    state._clear_class_state()
    return unit


def fresh_compiler_state() -> None:
    """Forget what torch's exporters learnt from earlier builds in this process, so that each export is as if alone.

    The ONNX exporter swaps in a loop-based GRU/LSTM decomposition (`torch.export._patches`) while it exports, and
    restores the op's kernel table afterwards, but not the op's dispatch cache: the next export of a model with a
    GRU then came out with its sequence length fixed to the example's (a spec built after another one of the same
    architecture failed parity at other lengths; `tests/test_repro.py`), and eager runs in between use the cached
    kernel. The caches of those ops are emptied here, and dynamo's (behind `torch.export`) reset.
    """
    import torch

    for packet in (torch.ops.aten.gru, torch.ops.aten.lstm, torch.ops.aten.rnn_tanh, torch.ops.aten.rnn_relu):
        for name in packet.overloads():
            getattr(packet, name)._dispatch_cache.clear()
    torch.compiler.reset()


def torchscript(path: Path) -> None:
    """Rewrite a TorchScript zip without its debug records (source paths and line numbers).

    The records are copied in their order through torch's own writer, which aligns them as torch.jit.load
    expects and derives `.data/serialization_id` from their content.
    """
    import torch

    reader = torch._C.PyTorchFileReader(str(path))
    records = reader.get_all_records()
    if not any(name.endswith(".debug_pkl") for name in records):
        return
    version = int(bytes(reader.get_record(".data/version")).decode().strip() or 0) if ".data/version" in records else 0
    tmp = path.with_name(path.name + ".strip")
    tmp.mkdir()
    try:
        out = tmp / path.name  # the writer names the zip's top folder after the file, as jit.save did
        writer = torch._C.PyTorchFileWriter(str(out))
        for name in records:
            if name.endswith(".debug_pkl") or name in (".data/version", ".data/serialization_id"):
                continue  # the version and the id are written by write_end_of_file
            data = reader.get_record(name)
            writer.write_record(name, data, len(data))
        if version:
            writer.set_min_version(version)
        writer.write_end_of_file()
        del writer, reader
        os.replace(out, path)
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def onnx(path: Path) -> None:
    """Rewrite an ONNX model without per-node stack traces and doc strings (external data left as it is)."""
    import onnx as onnx_lib

    model = onnx_lib.load(str(path), load_external_data=False)
    changed = False
    for graph in _graphs(model):
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key not in ONNX_MACHINE_KEYS]
            if len(keep) != len(node.metadata_props) or node.doc_string:
                changed = True
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
                node.doc_string = ""
    if changed:
        onnx_lib.save(model, str(path))


def _graphs(model) -> list:  # noqa: ANN001 (an onnx.ModelProto; onnx is imported lazily)
    """The main graph, the functions' bodies, and every subgraph (If/Loop/Scan) nested in them."""
    import onnx as onnx_lib

    found, todo = [], [model.graph, *model.functions]
    while todo:
        graph = todo.pop()
        found.append(graph)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx_lib.AttributeProto.GRAPH:
                    todo.append(attr.g)
                elif attr.type == onnx_lib.AttributeProto.GRAPHS:
                    todo.extend(attr.graphs)
    return found
