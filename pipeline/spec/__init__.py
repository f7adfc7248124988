"""The spec: the YAML a training job hands over, read once and validated into typed records (`spec.Spec`).

Owns the reader that names the file and field of every error (`reader`), the architecture and checkpoint parts
(`model`), the request parts — images, text, labels, hooks (`requests`) —, what each format's precision may be
(`precision`) and the whole spec (`spec`). The lowest
floor of the pipeline: imports only `pipeline.errors`, never torch.
"""
