"""Where archives live: writing them atomically and reproducibly (`archive` for `.mar`, `archive_dir` for directory
archives, `layout` for what either layout shares: its digest and its verification, `faults` for what verification
finds), stores (local folders and
fsspec URLs, `stores`), the store's `index`, archives' signatures (`signing`, with model-signing), and the
reproducible-export helpers (`repro`), and what `marpipe inspect` says of an archive (`summary`).

Beside the sources, below the stages: imports `pipeline.errors`, `pipeline.digests` and the handler package (an aoti
archive's platform is checked against this machine as the server checks it).
"""
