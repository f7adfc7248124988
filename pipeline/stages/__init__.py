"""The build stages, in order: load → export → parity → package, one module each, with what they alone use:
the generated test inputs (`inputs`), the parity samples stored in archives (`samples`), the model at the spec's
precision (`precision`) and the accuracy gate below fp32 (`gate`).

May import `pipeline.sources`, `pipeline.spec`, `pipeline.store` (package writes through it), the handler package
(parity runs artifacts as the server does) and the ground modules (`errors`, `digests`); never `build` or
`torchserve`.
"""
