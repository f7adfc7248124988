"""Tiny deterministic models for the tests: each exercises one edge of the contract."""

import torch
from torch import nn


class Linear(nn.Module):
    """nn.Linear with weights fixed by the test: expected outputs are exact."""

    def __init__(self, n_in: int = 4, n_out: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ShapeBranch(nn.Module):
    """A Python branch on the batch size: a trace at batch >= 2 freezes the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.fc(x) * 2.0
        return self.fc(x)


class TwoInTwoOut(nn.Module):
    """Two inputs (one with a dynamic dim), a tuple of two outputs."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(dim, 3)
        self.b = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = seq.mean(dim=1)
        return self.a(x) + self.b(pooled), self.b(seq)


class DictOut(nn.Module):
    """A dict of outputs, matched to output names by key."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(x)
        return {"score": h.sum(dim=1, keepdim=True), "embedding": torch.tanh(h)}


class TraceDrift(nn.Module):
    """Returns two outputs; the traced model shifts the second by exactly 1e-3 (to test per-output tolerances)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        z = y * 1.0
        if torch.jit.is_tracing():
            z = z + 1e-3
        return y, z


class WithBuffer(nn.Module):
    """A non-persistent buffer: not in the state_dict, so meta construction alone would leave it empty."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class Unscriptable(nn.Module):
    """Python that torch.jit.script rejects (a generator expression); trace and eager are fine."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.fc(x) * k for k in (1.0, 2.0))


class Plain:
    """Not an nn.Module: a custom object as a careless trainer might pickle under 'model'."""

    def __init__(self) -> None:
        self.weights = [1.0, 2.0]


class Noisy(nn.Module):
    """Adds fresh noise on every call: no artifact reproduces its outputs, not even its own weights (eager parity fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + torch.rand_like(y)


class TinyImage(nn.Module):
    """An image classifier over [batch, 3, 16, 16]: conv, pool, five classes."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))


class TinyText(nn.Module):
    """A text classifier over token ids: embedding, mean over the unmasked tokens, three classes."""

    def __init__(self, vocab: int = 32, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.fc(pooled)


class ImagePool(nn.Module):
    """A 3x224x224 image model of trivial cost: what is large is its input (a batch of 4 is 12.4 MB as JSON)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(3 * 4 * 4, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(image).flatten(1))


class SlowEager(nn.Module):
    """Sleeps 30 ms on every eager call; a trace records only the linear layer: TorchScript is clearly faster."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            import time

            time.sleep(0.03)
        return self.fc(x)


class NoisyUnscriptable(nn.Module):
    """Fails torch.jit.script (a generator expression) and every parity check (fresh noise on each call)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(self.fc(x) * k for k in (1.0, 2.0))
        return y + torch.rand_like(y)


class TokenGRU(nn.Module):
    """A recurrent classifier over token ids [batch, seq]: embedding, GRU, the last step's state, four classes."""

    def __init__(self, vocab: int = 32, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.fc = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(ids))
        return self.fc(out[:, -1])


class GeluMLP(nn.Module):
    """Linear layers with GELU between them: what int8 dynamic quantization speeds up (benchmarks use 512 wide)."""

    def __init__(self, n_in: int = 16, hidden: int = 32, layers: int = 3, classes: int = 4) -> None:
        super().__init__()
        dims = [n_in] + [hidden] * (layers - 1) + [classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = nn.functional.gelu(layer(x))
        return self.layers[-1](x)
