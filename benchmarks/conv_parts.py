"""Where a CPU training step's convolution time goes: one 3x3 convolution of each ResNet-20 stage.

  .venv/bin/python benchmarks/conv_parts.py [--torch_python=/path/to/venv-with-torch/bin/python]

Times (median ms, batch 128) the forward convolution, the input gradient and the kernel gradient
as `early_jax.models.cpu_conv` computes them on CPU (the kernel gradient whole and over chunks of
KERNEL_GRAD_CHUNK examples), each jitted alone under the XLA flags in effect. With a PyTorch
interpreter it also times PyTorch's forward and forward + both gradients (channels_last) for the
same shapes. Prints one JSON line.
"""
import argparse
import json
import subprocess
import time

SHAPES = ((32, 16), (16, 32), (8, 64))  # (height = width, channels) of ResNet-20's three stages
BATCH = 128

TORCH_SNIPPET = f"""
import json, time, torch
def median_ms(f, n=20):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return round(1000 * sorted(ts)[n // 2], 2)
out = {{}}
for hw, c in {SHAPES}:
    x = torch.randn({BATCH}, c, hw, hw).to(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    g = torch.randn_like(conv(x))
    with torch.no_grad():
        forward = median_ms(lambda: conv(x))
    both = median_ms(lambda: torch.autograd.grad(conv(x), (x, conv.weight), g))
    out[f"{{hw}}x{{c}}"] = {{"torch_forward": forward, "torch_forward_and_grads": both}}
print(json.dumps(out))
"""


def median_ms(fn, *args, repeats: int = 20) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return round(1000 * sorted(times)[repeats // 2], 2)


def jax_parts() -> dict:
    import jax
    import early_jax  # noqa: F401  (applies the package's XLA flags before the backend starts)
    from early_jax import runtime
    from early_jax.models import cpu_conv

    pads, strides, out = ((1, 1), (1, 1)), (1, 1), {"xla_flags": runtime.describe()["xla_flags"]}
    for hw, c in SHAPES:
        x, g = (jax.random.normal(jax.random.key(i), (BATCH, hw, hw, c)) for i in (0, 1))
        w = jax.random.normal(jax.random.key(2), (3, 3, c, c))
        out[f"{hw}x{c}"] = {
            "forward": median_ms(jax.jit(lambda x, w: cpu_conv._forward(x, w, strides, pads)), x, w),
            "input_grad": median_ms(jax.jit(lambda g, w: cpu_conv._input_grad(g, w, x.shape, strides, pads)), g, w),
            "kernel_grad_whole": median_ms(
                jax.jit(lambda g, x: cpu_conv._kernel_grad_whole(g, x, w.shape, strides, pads)), g, x),
            "kernel_grad": median_ms(jax.jit(lambda g, x: cpu_conv._kernel_grad(g, x, w.shape, strides, pads)), g, x),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch_python", default="", help="an interpreter with torch installed")
    args = p.parse_args()
    out = jax_parts()
    if args.torch_python:
        proc = subprocess.run([args.torch_python, "-c", TORCH_SNIPPET], capture_output=True, text=True, check=True)
        for shape, times in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            out[shape].update(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
