"""Where archives live: writing them atomically and reproducibly (`archive` for `.mar`, `archive_dir` for directory
archives, `layout` for what either layout shares: its digest and its verification, `faults` for what verification
finds), stores (local folders and
fsspec URLs, `stores`), the store's `index`, archives' signatures (`signing`, with model-signing), and the
reproducible-export helpers (`repro`).

Beside the stages, below the build: imports only `pipeline.errors` and `pipeline.digests`.
"""
