"""Code that runs inside TorchServe. Each handler module is self-contained: it is copied into archives."""
