"""PyTorch CIFAR ResNet-20 training-step benchmark (the torch side of a speed comparison).

The network mirrors the JAX ResNet-20: a 3x3 conv stem (3->16, no bias) + BN + ReLU,
three stages of three basic blocks (widths 16/32/64, stride 2 at the first block
of stages 2 and 3, 1x1 stride-2 conv + BN projection shortcut when the shape
changes), global average pooling and a 64->10 linear head: 272,474 parameters.

torch is imported lazily, so this module can be imported (e.g. by a test
collector) in an environment without torch; calling into it then raises an
ImportError that says how to install it.

Usage (from a venv that has torch):
    python benchmarks/torch_resnet20.py --batch 128 --steps 30 --threads 2
prints one JSON line with the median ms/step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

EXPECTED_PARAMS = 272_474
INSTALL_HINT = "pip install torch==2.13.0 (CPU build)"

# Measured on the 2-core dev machine (torch 2.13.0+cpu, batch 128, 2 threads):
# channels_last (NHWC) was consistently faster than plain NCHW, by roughly
# 20-30% per step, so it is the default. --nchw switches it off to compare.
DEFAULT_CHANNELS_LAST = True


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"benchmarks/torch_resnet20.py needs PyTorch: {INSTALL_HINT}"
        ) from e
    return torch


def build_resnet20(num_classes: int = 10):
    """Return a freshly initialised CIFAR ResNet-20 as a torch ``nn.Module``."""
    torch = _torch()
    nn = torch.nn

    def conv3x3(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = conv3x3(cin, cout, stride)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = conv3x3(cout, cout)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(cout),
                )
            else:
                self.shortcut = nn.Identity()

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.shortcut(x))

    class ResNet20(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
            layers = []
            cin = 16
            for stage, width in enumerate((16, 32, 64)):
                for i in range(3):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    layers.append(BasicBlock(cin, width, stride))
                    cin = width
            self.blocks = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            x = torch.flatten(self.pool(x), 1)
            return self.fc(x)

    model = ResNet20(num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    if num_classes == 10:
        assert n_params == EXPECTED_PARAMS, f"ResNet-20 has {n_params} params, expected {EXPECTED_PARAMS}"
    return model


def make_torch_step(batch: int = 128, threads: int = 2, seed: int = 0,
                    channels_last: bool = DEFAULT_CHANNELS_LAST):
    """One ResNet-20 SGD step on a [batch, 3, 32, 32] batch (see `make_sgd_step`)."""
    _torch().manual_seed(seed)
    return make_sgd_step(build_resnet20(10), (3, 32, 32), batch, threads, seed, channels_last)


def make_sgd_step(model, input_shape, batch: int, threads: int, seed: int, channels_last: bool):
    """Return a zero-argument callable doing one full SGD training step of `model`.

    Forward in train mode, cross-entropy, backward and an SGD(lr=0.1, momentum=0.9,
    weight_decay=1e-4) update, on a fixed random float32 batch of shape [batch, *input_shape] with
    random labels. The callable returns the loss as a Python float (which also forces the step to
    finish).
    """
    torch = _torch()
    torch.set_num_threads(threads)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=gen, dtype=torch.float32)
    y = torch.randint(0, 10, (batch,), generator=gen)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def time_steps(step, steps: int, warmup: int = 3):
    """Run ``warmup`` untimed steps, then return per-step seconds for ``steps`` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nchw", dest="channels_last", action="store_false",
                   default=DEFAULT_CHANNELS_LAST,
                   help="use plain NCHW (contiguous) tensors instead of channels_last (the faster default)")
    args = p.parse_args(argv)

    torch = _torch()
    step = make_torch_step(args.batch, args.threads, args.seed, channels_last=args.channels_last)
    times = time_steps(step, args.steps, args.warmup)
    med = statistics.median(times)
    print(json.dumps({
        "framework": "torch",
        "ms_per_step": round(med * 1e3, 3),
        "images_per_s": round(args.batch / med, 1),
        "threads": args.threads,
        "batch": args.batch,
        "steps": args.steps,
        "channels_last": args.channels_last,
        "torch_version": torch.__version__,
    }))


if __name__ == "__main__":
    main()
