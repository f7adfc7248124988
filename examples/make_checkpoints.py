"""Create the example checkpoints deterministically (seeded; nothing is downloaded).

Each is saved the way training jobs really save them: SimpleNet as a plain state_dict, the CNN with the
``module.`` prefix that DataParallel/DDP adds (after a few training steps, so BatchNorm statistics are
real), the text model as a Lightning-style nested dict with ``model.`` prefixes and non-tensor extras.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "models"))

from cnn import SmallCNN  # noqa: E402
from simplenet import SimpleNet  # noqa: E402
from text import TextClassifier  # noqa: E402


def main(out: Path = HERE / "checkpoints") -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(SimpleNet().state_dict(), out / "simplenet.pth")

    cnn = SmallCNN(num_classes=10, width=16)
    opt = torch.optim.SGD(cnn.parameters(), lr=0.05)
    cnn.train()
    for _ in range(3):  # a few steps so BatchNorm's running statistics differ from their defaults
        images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        loss = torch.nn.functional.cross_entropy(cnn(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(torch.nn.DataParallel(cnn).state_dict(), out / "cnn_dataparallel.pth")

    text = TextClassifier(vocab_size=1000, dim=32, max_len=64, num_classes=4)
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {f"model.{k}": v for k, v in text.state_dict().items()},
        "hyper_parameters": {"vocab_size": 1000, "dim": 32, "lr": 1e-3},
    }
    torch.save(lightning, out / "text_lightning.ckpt")
    for p in sorted(out.iterdir()):
        print(f"wrote {p.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "checkpoints")
