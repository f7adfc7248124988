"""What a spec points at: the architecture (a file, a factory, a Hugging Face folder) and the checkpoint (torch zip,
safetensors, shards, folders), read safely and normalised; `describe` reports on a checkpoint.

`source` holds the `ModelSource` record that `arch` and `hf` share. May import `pipeline.spec`, `pipeline.errors`,
`pipeline.digests` and the handler package (to construct models exactly as the server does); nothing above.
"""
