"""Our train step vs the same network's step in PyTorch, timed alternately in one run.

    .venv/bin/python benchmarks/vs_pytorch.py --model=resnet20 --batch=128 \\
        --torch_python=/work/torchenv/bin/python

PyTorch is a bench-only optional dependency (`pip install torch==2.13.0`, the CPU build). It runs
in a worker process started with `--torch_python` (default: this interpreter), so it may live in
another virtual environment than JAX. The two sides never run at the same time: each round times
`--steps` steps of ours, then `--steps` steps of PyTorch, and so on; the medians of the rounds and
their ratio (ours / PyTorch, < 1 means ours is faster) are printed as one JSON line.

Ours: the project's real step, `Trainer.advance` (scan over steps, on-device batch gather and
pad-4 crop + flip, seeds via the configured seed parallelism, S=1 by default), plus the bare
step (one jitted step on a fixed batch). PyTorch: forward, cross-entropy, backward and
SGD(momentum 0.9, weight decay 1e-4) on a fixed batch, channels_last by default
(benchmarks/torch_resnet20.py), with `--threads` intra-op threads (default: all cores).

Models: resnet20 (benchmarks/torch_resnet20.py, 272,474 parameters) and convnet_small (the CPU
preset's model, 28x28x1 inputs, same layers and parameter count as early_jax's).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

INPUT_SHAPES = {"resnet20": (3, 32, 32), "convnet_small": (1, 28, 28)}


# ----------------------------------------------------------------------------- PyTorch side
def build_convnet_small(num_classes: int = 10):
    """early_jax's `convnet_small`: [conv3x3 (no bias) - BN - ReLU - maxpool2] x (16, 32),
    flatten, dense 128 + ReLU, dense head."""
    import torch
    nn = torch.nn
    layers, cin = [], 1
    for width in (16, 32):
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        cin = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(inplace=True),
                         nn.Linear(128, num_classes))


def torch_step(model_name: str, batch: int, threads: int, channels_last: bool, seed: int = 0):
    """(one PyTorch SGD step of the model, its parameter count)."""
    import torch
    import torch_resnet20
    if model_name == "resnet20":
        return torch_resnet20.make_torch_step(batch, threads, seed, channels_last=channels_last), \
            torch_resnet20.EXPECTED_PARAMS
    torch.manual_seed(seed)
    model = build_convnet_small()
    step = torch_resnet20.make_sgd_step(model, INPUT_SHAPES[model_name], batch, threads, seed,
                                        channels_last)
    return step, sum(p.numel() for p in model.parameters())


def worker(args) -> None:
    """Reads a step count per line, answers with the seconds of each step as a JSON list."""
    import torch
    step, n_params = torch_step(args.model, args.batch, args.threads, not args.nchw)
    for _ in range(args.warmup):
        step()
    print(json.dumps({"ready": True, "params": n_params, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)


class TorchWorker:
    def __init__(self, args):
        cmd = [args.torch_python, os.path.abspath(__file__), "--worker", f"--model={args.model}",
               f"--batch={args.batch}", f"--threads={args.threads}", f"--warmup={args.warmup}"]
        if args.nchw:
            cmd.append("--nchw")
        env = dict(os.environ, PYTHONPATH=HERE)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the PyTorch worker did not start ({args.torch_python}); install the "
                             "bench-only dependency: pip install torch==2.13.0 (CPU build), or pass "
                             "--torch_python=<python of a venv that has it>")
        self.info = json.loads(line)

    def steps(self, k: int) -> list[float]:
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- our side
class Ours:
    def __init__(self, args):
        import jax
        import train_speed
        from early_jax import models
        from early_jax.train import Trainer
        argv = [f"--model={args.model}", f"--batch={args.batch}", "--seeds=1",
                f"--seed_parallel={args.seed_parallel}"]
        if args.model == "convnet_small":
            argv.append("--preset=fashion_cpu")  # its data (Fashion-MNIST) when it is installed
            if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
                argv.append("--dataset=synthetic:28x28x1")
        config = train_speed.build_config(train_speed.parse_args(argv))
        self.trainer = Trainer(config, train_speed.load_data(config.data.name))
        self.states = self.trainer.init([0])
        self.params = models.count_params(jax.tree.map(lambda p: p[0], self.states.params))
        self.states, _ = self.trainer.advance(self.states, 1)
        self.bare_states = self.trainer.init([0])
        self._bare = train_speed.bare_step_fn(self.trainer)
        self.bare_states, loss = self._bare(self.bare_states)
        jax.block_until_ready(loss)
        self.config = config

    def steps(self, k: int) -> float:
        """Seconds per step of Trainer.advance over k steps."""
        import jax
        from early_jax.train import current_step
        t0 = time.perf_counter()
        self.states, _ = self.trainer.advance(self.states, current_step(self.states) + k)
        jax.block_until_ready(self.states)
        return (time.perf_counter() - t0) / k

    def bare_steps(self, k: int) -> float:
        import jax
        t0 = time.perf_counter()
        for _ in range(k):
            self.bare_states, loss = self._bare(self.bare_states)
        jax.block_until_ready(loss)
        return (time.perf_counter() - t0) / k


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=sorted(INPUT_SHAPES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed PyTorch steps")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--nchw", action="store_true", help="PyTorch in NCHW instead of channels_last")
    p.add_argument("--seed_parallel", default="auto", choices=("auto", "vmap", "map"))
    p.add_argument("--no_bare", action="store_true", help="skip our bare step")
    p.add_argument("--wait_quiet", type=float, default=0.0,
                   help="before each round, wait up to this many seconds for other processes to "
                        "use < 10%% of the cores (the JSON reports the contention of each round)")
    p.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON", sys.executable))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    torch_worker = TorchWorker(args)
    ours = Ours(args)
    import jax
    from early_jax import runtime
    import train_speed
    meter = train_speed.CpuMeter([torch_worker.proc.pid])
    ours_t, bare_t, torch_t, loads, contention = [], [], [], [], []
    try:
        for r in range(args.rounds):
            train_speed.wait_until_quiet(meter, args.wait_quiet)
            loads.append(os.getloadavg()[0])
            meter.start()
            ours_t.append(ours.steps(args.steps))
            if not args.no_bare:
                bare_t.append(ours.bare_steps(args.steps))
            torch_t.append(statistics.median(torch_worker.steps(args.steps)))
            contention.append(meter.others())
            print(f"round {r}: ours {ours_t[-1] * 1e3:.1f} ms"
                  + ("" if args.no_bare else f", ours bare {bare_t[-1] * 1e3:.1f} ms")
                  + f", torch {torch_t[-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    finally:
        torch_worker.close()
    med = lambda xs: statistics.median(xs) if xs else None
    ms = lambda x: round(x * 1e3, 1) if x is not None else None
    out = {
        "model": args.model, "batch": args.batch, "params_ours": ours.params,
        "params_torch": torch_worker.info["params"], "rounds": args.rounds, "steps_per_round": args.steps,
        "ours_ms_per_step": ms(med(ours_t)), "ours_bare_ms_per_step": ms(med(bare_t)),
        "torch_ms_per_step": ms(med(torch_t)),
        "ratio_ours_over_torch": round(med(ours_t) / med(torch_t), 3),
        "ratio_bare_over_torch": round(med(bare_t) / med(torch_t), 3) if bare_t else None,
        "ratio_per_round": [round(a / b, 3) for a, b in zip(ours_t, torch_t)],
        "ours_rounds_ms": [ms(t) for t in ours_t], "torch_rounds_ms": [ms(t) for t in torch_t],
        "loadavg_1m": [round(v, 2) for v in loads], "cpus": os.cpu_count(),
        "contention_per_round": [None if c is None else round(c, 3) for c in contention],
        "torch": torch_worker.info["torch"], "torch_threads": torch_worker.info["threads"],
        "torch_channels_last": not args.nchw, "seed_parallel": ours.trainer.parallel,
        "dataset_ours": ours.config.data.name, "backend": jax.default_backend(),
        **runtime.describe(),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
