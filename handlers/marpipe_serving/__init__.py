"""The serving side of marpipe: what runs inside TorchServe, shipped in every archive beside its entry point.

Self-contained: only the standard library, numpy, torch and (for ONNX) onnxruntime are imported, because the
inference node has none of marpipe's or the training repo's code; an eager archive also imports what its
architecture needs (recorded as its requirements, e.g. transformers). TorchServe puts the model folder on
``sys.path``, so this package imports from there. The modules follow the request's path:

* ``codecs``  — a request body (JSON, npz) into named arrays, and answers back out;
* ``bodies``  — a body or multipart part read as JSON or npz (shared by ``codecs`` and ``contract``);
* ``contract`` — what the archive's inputs are: checks, casts, images, text, multipart parts;
* ``npz``     — .npz bodies read and written without zipfile;
* ``models``  — loading the archive's artifact and running it (eager, TorchScript, ONNX, aoti), thread choice;
* ``aoti``    — an aoti package: its platform record checked against this server, then loaded;
* ``architectures`` — building the eager model from marpipe.json (file, factory, transformers), tied weights;
* ``precision`` — an archive's precision: fp16/bf16 casts, int8 quantization and the int8 eager rebuild;
* ``requirements`` — the third-party distributions an eager archive needs, checked at load;
* ``service`` — TorchServe's entry: decode each request on its own, batch, predict, encode.
"""
