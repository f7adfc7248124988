"""marpipe: turn a PyTorch state_dict and a YAML spec into a TorchServe .mar that passed parity."""

__version__ = "0.1.0"
