"""The build stages, in order: load → export → parity → package. One module each."""
