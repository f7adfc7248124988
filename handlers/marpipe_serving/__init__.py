"""The serving side of marpipe: what runs inside TorchServe, shipped in every archive beside its entry point.

Self-contained: only the standard library, numpy, torch and (for ONNX) onnxruntime are imported, because the
inference node has none of marpipe's or the training repo's code. TorchServe puts the model folder on
``sys.path``, so this package imports from there. The modules follow the request's path:

* ``codecs``  — a request body (JSON, npz) into named arrays, and answers back out;
* ``npz``     — .npz bodies read and written without zipfile;
* ``models``  — loading the archive's artifact and running it (eager, TorchScript, ONNX), thread choice;
* ``service`` — TorchServe's entry: decode each request on its own, batch, predict, encode.
"""
