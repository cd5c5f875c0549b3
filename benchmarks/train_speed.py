"""Speed of the project's real train step (Trainer's compiled `advance`), as one JSON line.

    .venv/bin/python benchmarks/train_speed.py --model=resnet20 --batch=128 --seeds=1 --json

What is timed (all medians over `--repeats` calls, after a warm-up call):
  step        `Trainer.advance` for `--steps` steps: shard_map -> lax.scan -> seeds (vmap or lax.map)
              -> the single-model step, including the on-device batch gather and augmentation.
              This is `ms_per_step`, per step of all S seeds together.
  bare        (--loop) one jit-compiled step of the S seeds on a fixed on-device batch, called
              from Python: no data gathering, no augmentation, no scan.
  data        (--loop) the batch gather + augmentation alone, `--steps` of them in one scan.
  loop        (--loop) `runner.run`: the full loop with scan segments, evaluation on the test set
              and checkpoint saves, over `--loop_steps` steps; wall time per step.
Compile: `trace_s` (trace + lower) and `compile_s` (XLA compile, or a load from the persistent
cache) of the advance program, and `first_step_s`: from building the Trainer to the end of the
first step (what a rerun waits for). `process_first_step_s` adds Python and JAX start-up.

Data: synthetic uint8 images of the model's usual shape (32x32x3 for the ResNets/VGGs, 28x28x1
for the small models) unless `--dataset` names one (e.g. fashion_mnist_idx). `--preset=fashion_cpu`
uses the CPU preset's model, data and batch.

Environment knobs the package reads (see early_jax/runtime.py): XLA_FLAGS (if set, the package
applies none of its own), EARLY_JAX_XLA_FLAGS=0, EARLY_JAX_CACHE=0 / a dir,
EARLY_JAX_CONV_BARRIER=0/1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

T_PROCESS = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMALL_MODELS = ("convnet_small", "convnet_tiny", "lenet300_100")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--preset", default=None, help="start from a preset (e.g. fashion_cpu)")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (or the preset's)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed_parallel", default="auto", choices=("auto", "vmap", "map"))
    p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dataset", default=None, help="default: synthetic data of the model's shape")
    p.add_argument("--augment", default=None, choices=("true", "false"),
                   help="pad-4 crop + flip in the step (default: on, or the preset's)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed call (<= 50)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    p.add_argument("--loop", action="store_true",
                   help="also time the bare step, data+augmentation alone and the full runner loop")
    p.add_argument("--loop_steps", type=int, default=100)
    p.add_argument("--loop_eval_every", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print only one JSON line")
    return p.parse_args(argv)


def build_config(args):
    from early_jax import config as cfg
    base = cfg.PRESETS[args.preset] if args.preset else cfg.Config()
    model = args.model if not args.preset or args.model != "resnet20" else base.model.name
    small = model in SMALL_MODELS
    dataset = args.dataset or (base.data.name if args.preset else
                               "synthetic:28x28x1" if small else "synthetic:32x32x3")
    augment = base.data.augment if args.augment is None and args.preset else args.augment != "false"
    batch = args.batch or base.train.batch_size
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, name=model, compute_dtype=args.compute_dtype),
        data=dataclasses.replace(base.data, name=dataset, augment=augment),
        train=dataclasses.replace(base.train, batch_size=batch, seed_parallel=args.seed_parallel,
                                  duration="1000000it"),
        num_seeds=args.seeds)
    return cfg.validate(config)


def load_data(name: str):
    from early_jax import data
    if name.startswith("synthetic:"):
        shape = tuple(int(v) for v in name.split(":")[1].split("x"))
        return data.synthetic(num_train=2048, num_test=512, shape=shape, num_classes=10, seed=0)
    return data.load(name)


def sync(tree):
    import jax
    return jax.block_until_ready(tree)


def time_advance(trainer, states, steps: int, repeats: int):
    """Median seconds per step of Trainer.advance over `repeats` calls of `steps` steps."""
    from early_jax.train import current_step
    times = []
    for _ in range(repeats):
        start = current_step(states)
        t0 = time.perf_counter()
        states, _ = trainer.advance(states, start + steps)
        sync(states)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), times, states


def bare_step_fn(trainer):
    """`states -> (states, loss)`: one jitted step of the S seeds on a fixed on-device batch
    (forward, loss, gradient, optimizer update; no batch gather, augmentation or scan)."""
    import jax
    import jax.numpy as jnp
    from early_jax.data.device import normalize
    from early_jax.train import over_seeds
    fns = trainer.fns
    b = fns.batch_size
    x = normalize(jnp.asarray(trainer.dataset.x_train[:b]), trainer.dataset.mean, trainer.dataset.std)
    y = jnp.asarray(trainer.dataset.y_train[:b])

    def one(state, x, y):
        grad_fn = jax.value_and_grad(fns.loss_and_updates, has_aux=True)
        (loss, (_, batch_stats)), grads = grad_fn(state.params, state.batch_stats, x, y)
        updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - 0.01 * u, state.params, updates)
        return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state), loss

    step = jax.jit(over_seeds(one, trainer.parallel, 1), donate_argnums=0)
    return lambda states: step(states, x, y)


def time_bare(trainer, states, repeats: int, steps: int):
    """Median seconds per step of `bare_step_fn`, called from Python."""
    step = bare_step_fn(trainer)
    states, _ = sync(step(states))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            states, loss = step(states)
        sync(loss)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), states


def time_data(trainer, states, repeats: int, steps: int):
    """Batch gather + augmentation for every seed, `steps` of them inside one scan."""
    import jax
    import jax.numpy as jnp
    from early_jax.data.device import epoch_permutation, train_batch
    from early_jax.train import over_seeds
    fns, n = trainer.fns, len(trainer.dataset.x_train)

    def one(keys, arrays, t):
        perm = epoch_permutation(jax.random.wrap_key_data(keys["order"]), 0, n)
        x, y = train_batch(arrays, fns.prep, perm, t % fns.steps_per_epoch, fns.batch_size,
                           jax.random.fold_in(jax.random.wrap_key_data(keys["augment"]), t))
        return x.sum() + y.sum()

    seeds_fn = over_seeds(one, trainer.parallel, 1)

    @jax.jit
    def run(keys, arrays):
        return jax.lax.scan(lambda c, t: (c + seeds_fn(keys, arrays, t).sum(), None),
                            jnp.float32(0), jnp.arange(steps))[0]

    sync(run(states.keys, trainer.arrays))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(run(states.keys, trainer.arrays))
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def time_loop(trainer, config, steps: int, eval_every: int):
    """runner.run over `steps` steps with evaluation every `eval_every` and two checkpoint saves."""
    from early_jax import runner
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = runner.RunDir(tmp)
        trainer.config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, eval_every=f"{eval_every}it"))
        seeds = list(range(config.num_seeds))
        initial = trainer.init(seeds)
        trainer.evaluate(initial)  # compile evaluation outside the timed loop
        sync(initial)
        t0 = time.perf_counter()
        runner.run(trainer, run_dir, description={"kind": "bench", "seeds": seeds}, initial=lambda: initial,
                   end=steps, save_steps=(0, steps // 2), label="bench")
        return (time.perf_counter() - t0) / steps


def compile_events() -> dict:
    """Running totals of JAX's compile-phase durations (seconds), filled in by a listener."""
    import jax.monitoring
    names = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "compile",
             "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load"}
    totals: dict = {}

    def listener(event, duration, **_):
        if event in names:
            totals[names[event]] = totals.get(names[event], 0.0) + duration
    jax.monitoring.register_event_duration_secs_listener(listener)
    return totals


def main(argv=None):
    args = parse_args(argv)
    if args.steps > 50:
        raise SystemExit("--steps must be <= 50 (one compiled call)")
    t_import = time.perf_counter()
    import jax
    import early_jax
    from early_jax import runtime
    from early_jax.train import Trainer
    import_s = time.perf_counter() - t_import

    load_start = os.getloadavg()[0]
    config = build_config(args)
    dataset = load_data(config.data.name)
    events = compile_events()
    t0 = time.perf_counter()
    trainer = Trainer(config, dataset)
    states = sync(trainer.init(list(range(args.seeds))))
    t_init = time.perf_counter()
    before = dict(events)
    states, _ = trainer.advance(states, 1)  # traces, compiles (or loads from the cache), runs a step
    sync(states)
    t_first = time.perf_counter()
    first = {k: v - before.get(k, 0.0) for k, v in events.items()}

    ms, all_times, states = time_advance(trainer, states, args.steps, args.repeats)
    batch = config.train.batch_size
    result = {
        "model": config.model.name, "dataset": config.data.name, "batch": batch, "seeds": args.seeds,
        "seed_parallel": trainer.parallel, "compute_dtype": config.model.compute_dtype,
        "augment": config.data.augment,
        "ms_per_step": round(ms * 1e3, 2),
        "ms_per_seed_step": round(ms * 1e3 / args.seeds, 2),
        "images_per_s": round(batch * args.seeds / ms, 1),
        "step_times_ms": [round(t * 1e3, 1) for t in all_times],
        "init_s": round(t_init - t0, 3),
        "trace_s": round(first.get("trace", 0) + first.get("lower", 0), 3),
        "compile_s": round(first.get("compile", 0), 3),
        "cache_load_s": round(first.get("cache_load", 0), 3),
        "advance_first_call_s": round(t_first - t_init, 3),
        "first_step_s": round(t_first - t0, 3),
        "process_first_step_s": round(t_first - T_PROCESS, 3),
        "import_s": round(import_s, 3),
    }
    if args.loop:
        bare, states = time_bare(trainer, states, args.repeats, args.steps)
        data_s = time_data(trainer, states, args.repeats, args.steps)
        loop = time_loop(trainer, config, args.loop_steps, args.loop_eval_every)
        result.update({"bare_ms_per_step": round(bare * 1e3, 2),
                       "data_ms_per_step": round(data_s * 1e3, 2),
                       "data_share_of_step": round(data_s / ms, 4),
                       "loop_ms_per_step": round(loop * 1e3, 2),
                       "loop_over_step": round(loop / ms, 3), "loop_over_bare": round(loop / bare, 3),
                       "loop_steps": args.loop_steps, "loop_eval_every": args.loop_eval_every})
    from early_jax.models import layers
    result.update(runtime.describe())
    result["conv_barrier"] = layers.conv_barrier_enabled() and jax.default_backend() == "cpu"
    result["loadavg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    result["cpus"] = os.cpu_count()
    result.update({"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
                   "jax": jax.__version__, "early_jax": early_jax.__version__})
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
