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
              and checkpoint saves, over `--loop_steps` steps (default: one epoch of the real
              dataset with the config's early save steps 0, 25, 50, 100, 250 inside it and an
              evaluation at its end; the runner evaluates twice there); wall time per step.
              `epoch_loop_over_step`: a later epoch, from measured parts: (steps of one epoch +
              one evaluation + one checkpoint save) / steps of one epoch.
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
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed call, <= 50 (default 50 for the small models, 20 otherwise; "
                        "each call has a fixed cost, ~0.1 s on CPU, that training pays every 50 steps)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    p.add_argument("--min_quiet", type=int, default=0,
                   help="on a shared machine: repeat (up to 3x --repeats) until this many timed calls "
                        "ran while other processes used < 10%% of the cores")
    p.add_argument("--loop", action="store_true",
                   help="also time the bare step, data+augmentation alone and the full runner loop")
    p.add_argument("--loop_steps", type=int, default=None,
                   help="steps of the timed loop (default: one epoch of the real dataset)")
    p.add_argument("--loop_eval_every", type=int, default=None,
                   help="evaluate every this many steps (default: the config's, one epoch)")
    p.add_argument("--json", action="store_true", help="print only one JSON line")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME:ENV=V,ENV=V",
                   help="compare settings that need their own process (XLA_FLAGS, the conv barrier): "
                        "one worker per variant, timed alternately for --rounds rounds; e.g. "
                        "plain:XLA_FLAGS=,EARLY_JAX_CONV_BARRIER=0 default:")
    p.add_argument("--rounds", type=int, default=4, help="timing rounds of --variants and --sweep_seeds")
    p.add_argument("--wait_quiet", type=float, default=0.0,
                   help="before each round of --variants, wait up to this many seconds for the "
                        "machine to be quiet (other processes < 10%% of the cores)")
    p.add_argument("--sweep_seeds", default=None, metavar="1,2,4,8",
                   help="sweep mode: time every combination of these seed counts, --sweep_parallel "
                        "and --sweep_dtypes in this process, alternately for --rounds rounds, and "
                        "report per-seed cost and images/s relative to the smallest seed count")
    p.add_argument("--sweep_parallel", default="map,vmap")
    p.add_argument("--sweep_dtypes", default="float32")
    p.add_argument("--budget_s", type=float, default=None,
                   help="sweep mode: start no new configuration after 60%% of this, and no new "
                        "round after 85%% (results so far are still printed)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
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
        # a CIFAR/MNIST-sized test set, so that evaluation costs what it does on the real data
        return data.synthetic(num_train=10_000, num_test=10_000, shape=shape, num_classes=10, seed=0)
    return data.load(name)


class CpuMeter:
    """How much of the machine's CPU other processes used while we timed something.

    Reads /proc (Linux); elsewhere `others()` is None. `pids`: our processes (this one by default,
    plus e.g. a PyTorch worker); everything else counts as contention.
    """

    def __init__(self, pids=()):
        self.pids = [os.getpid(), *pids]
        self.ok = os.path.exists("/proc/stat")
        self.ticks = os.sysconf("SC_CLK_TCK") if self.ok else 100

    def _read(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
        ours = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return busy, ours, time.perf_counter()

    def start(self):
        self._start = self._read() if self.ok else None

    def others(self):
        """Fraction of all cores used by other processes since `start()` (0 = quiet, 1 = all)."""
        if not self.ok or self._start is None:
            return None
        busy, ours, t = self._read()
        elapsed_ticks = (t - self._start[2]) * self.ticks * os.cpu_count()
        other = (busy - self._start[0]) - (ours - self._start[1])
        return max(0.0, other / elapsed_ticks) if elapsed_ticks > 0 else None


QUIET = 0.10  # a timed call counts as uncontended when others used < 10% of the cores


def summarize(times, contention) -> dict:
    """Median over all calls, and over the uncontended ones (None when there were none)."""
    quiet = [t for t, c in zip(times, contention) if c is not None and c < QUIET]
    return {"median": statistics.median(times), "quiet_median": statistics.median(quiet) if quiet else None,
            "min": min(times), "quiet_calls": len(quiet), "calls": len(times),
            "contention": [None if c is None else round(c, 3) for c in contention]}


def best(summary: dict) -> float:
    """The uncontended median when there is one, else the median of all calls."""
    return summary["quiet_median"] if summary["quiet_median"] is not None else summary["median"]


def timing_fields(name: str, summary: dict) -> dict:
    ms = lambda v: None if v is None else round(v * 1e3, 2)
    return {f"{name}_median_all_ms": ms(summary["median"]), f"{name}_quiet_median_ms": ms(summary["quiet_median"]),
            f"{name}_min_ms": ms(summary["min"]),
            f"{name}_quiet_calls": f"{summary['quiet_calls']}/{summary['calls']}",
            f"{name}_contention": summary["contention"]}


def sync(tree):
    import jax
    return jax.block_until_ready(tree)


def enough(times, contention, repeats: int, min_quiet: int) -> bool:
    """Stop after `repeats` calls, or keep going (up to 3x) until `min_quiet` calls were quiet."""
    quiet = sum(1 for c in contention if c is not None and c < QUIET)
    return len(times) >= repeats and (quiet >= min_quiet or len(times) >= 3 * repeats)


def time_advance(trainer, states, steps: int, repeats: int, meter: CpuMeter, min_quiet: int = 0):
    """Seconds per step of Trainer.advance, one sample per call of `steps` steps."""
    from early_jax.train import current_step
    times, contention = [], []
    while not enough(times, contention, repeats, min_quiet):
        start = current_step(states)
        meter.start()
        t0 = time.perf_counter()
        states, _ = trainer.advance(states, start + steps)
        sync(states)
        times.append((time.perf_counter() - t0) / steps)
        contention.append(meter.others())
    return summarize(times, contention), states


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


def time_bare(trainer, states, repeats: int, steps: int, meter: CpuMeter):
    """Seconds per step of `bare_step_fn`, called from Python."""
    step = bare_step_fn(trainer)
    states, _ = sync(step(states))
    times, contention = [], []
    for _ in range(repeats):
        meter.start()
        t0 = time.perf_counter()
        for _ in range(steps):
            states, loss = step(states)
        sync(loss)
        times.append((time.perf_counter() - t0) / steps)
        contention.append(meter.others())
    return summarize(times, contention), states


def time_data(trainer, states, repeats: int, steps: int, meter: CpuMeter):
    """Batch gather + augmentation for every seed, `steps` of them inside one scan."""
    import jax
    import jax.numpy as jnp
    from early_jax.data.device import epoch_permutation, train_batch
    from early_jax.train import over_seeds
    fns, n = trainer.fns, len(trainer.dataset.x_train)

    def one(keys, arrays, t):
        x, y = train_batch(arrays, fns.prep, perm_of(keys), t % fns.steps_per_epoch, fns.batch_size,
                           jax.random.fold_in(jax.random.wrap_key_data(keys["augment"]), t))
        # The batch is written to memory, as for the step's first convolution, before a checksum
        # keeps it alive: a sum fused into the normalisation costs XLA:CPU more than the batch
        # itself (0.79 vs 0.06 ms for a Fashion-MNIST batch, measured).
        x, y = jax.lax.optimization_barrier((x, y))
        return x.sum() + y.sum()

    # the permutation is drawn once per epoch in training, so it is drawn outside the timed scan
    perm_of = lambda keys: keys["perm"]
    seeds_fn = over_seeds(one, trainer.parallel, 1)

    @jax.jit
    def run(keys, arrays):
        return jax.lax.scan(lambda c, t: (c + seeds_fn(keys, arrays, t).sum(), None),
                            jnp.float32(0), jnp.arange(steps))[0]

    perms = jax.jit(jax.vmap(lambda k: epoch_permutation(jax.random.wrap_key_data(k), 0, n)))(
        states.keys["order"])
    keys = {"augment": states.keys["augment"], "perm": perms}
    sync(run(keys, trainer.arrays))
    times, contention = [], []
    for _ in range(repeats):
        meter.start()
        t0 = time.perf_counter()
        sync(run(keys, trainer.arrays))
        times.append((time.perf_counter() - t0) / steps)
        contention.append(meter.others())
    return summarize(times, contention)


def loop_plan(config, image_shape, steps: int | None, eval_every: int | None) -> tuple[int, int, list]:
    """(steps, eval_every, save steps) of the timed loop: by default one epoch of the real dataset
    (CIFAR-10: 391 steps, Fashion-MNIST: 469 at batch 128), evaluated at its end, with the config's
    early save steps (0, 25, 50, 100, 250 ...) inside it."""
    from early_jax.config import to_steps
    from early_jax.data.device import steps_per_epoch
    real_train = 60_000 if tuple(image_shape) == (28, 28, 1) else 50_000
    epoch = steps_per_epoch(real_train, config.train.batch_size)
    eval_every = eval_every or to_steps(config.train.eval_every, epoch)
    steps = steps or eval_every
    saves = sorted({to_steps(s, epoch) for s in config.train.save_steps} & set(range(steps + 1)))
    return steps, eval_every, saves


def time_loop(trainer, config, steps: int, eval_every: int, saves, meter: CpuMeter):
    """runner.run over `steps` steps with evaluation every `eval_every` and the given saves."""
    import contextlib
    from early_jax import runner, runs
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        trainer.config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, eval_every=f"{eval_every}it"))
        trainer.total_steps = steps  # the benchmark's loop ends here, not at the config's duration
        seeds = list(range(config.num_seeds))
        initial = trainer.init(seeds)
        trainer.evaluate(initial)  # compile evaluation outside the timed loop
        sync(initial)
        meter.start()
        t0 = time.perf_counter()
        runner.run(trainer, runs.Dense(config.model, config.train, True, "bench", (), tuple(seeds)),
                   workdir=tmp, initial=lambda: initial, save_steps=saves, label="bench")
        return (time.perf_counter() - t0) / steps, meter.others()


def time_eval_and_save(trainer, states) -> tuple[float, float]:
    """Seconds of one evaluation on the test set and of one (Orbax) checkpoint save."""
    from early_jax.checkpoint import Checkpoints
    trainer.evaluate(states)
    t0 = time.perf_counter()
    trainer.evaluate(states)
    eval_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        store = Checkpoints(tmp, writable=True)
        store.save(0, states)
        t0 = time.perf_counter()
        store.save(1, states)
        save_s = time.perf_counter() - t0
    return eval_s, save_s


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


def serve(trainer, states, steps: int, meter: CpuMeter, ready: dict) -> None:
    """Worker of --variants: answers each input line with one timed call of `steps` steps."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        summary, states = time_advance(trainer, states, steps, 1, meter)
        print(json.dumps({"s_per_step": summary["median"], "contention": summary["contention"][0]}),
              flush=True)


def wait_until_quiet(meter: CpuMeter, max_wait_s: float) -> float:
    """Sleep (up to `max_wait_s`) until other processes use < 10% of the cores over 2 s."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        meter.start()
        time.sleep(2.0)
        others = meter.others()
        if others is None or others < QUIET:
            break
    return time.perf_counter() - t0


def compare_variants(args, argv) -> None:
    """Run one worker per variant (its own environment), time them alternately, print one line."""
    import subprocess
    raw = list(argv if argv is not None else sys.argv[1:])
    passed, skip = [], False
    for a in raw:
        if a == "--variants":
            skip = True
            continue
        if skip and (a in args.variants):
            continue
        skip = False
        if not a.startswith(("--variants=", "--rounds", "--json", "--wait_quiet")):
            passed.append(a)
    workers = {}
    for spec in args.variants:
        name, _, envs = spec.partition(":")
        env = dict(os.environ)
        for item in filter(None, envs.split(",")):
            key, _, value = item.partition("=")
            env[key] = value
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", *passed]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()  # one at a time: compiling in parallel would skew compile_s
        if not line:
            raise SystemExit(f"variant {name!r} failed to start")
        workers[name] = (proc, json.loads(line), [])
    meter = CpuMeter([proc.pid for proc, _, _ in workers.values()])
    for _ in range(args.rounds):
        wait_until_quiet(meter, args.wait_quiet)
        for name, (proc, _, samples) in workers.items():
            proc.stdin.write("1\n")
            proc.stdin.flush()
            samples.append(json.loads(proc.stdout.readline()))
    for proc, _, _ in workers.values():
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
    out = {"model": args.model, "batch": args.batch, "seeds": args.seeds, "steps_per_call": args.steps,
           "rounds": args.rounds, "variants": {}}
    for name, (_, ready, samples) in workers.items():
        summary = summarize([x["s_per_step"] for x in samples], [x["contention"] for x in samples])
        out["variants"][name] = {"ms_per_step": round(best(summary) * 1e3, 2),
                                 **timing_fields("step", summary), **ready}
    first = next(iter(out["variants"]))
    for name, v in out["variants"].items():
        v[f"ratio_to_{first}"] = round(v["ms_per_step"] / out["variants"][first]["ms_per_step"], 3)
    print(json.dumps(out), flush=True)


def sweep(args, combos=None, t_start=None) -> dict:
    """Per-seed cost over seed counts x seed parallelism x compute dtypes, one process, alternating.

    `combos`: (dtype, parallel, seeds) in the order to build them (default: every combination of
    --sweep_dtypes, --sweep_parallel, --sweep_seeds); the budget may cut the tail of the list.
    """
    import jax
    from early_jax.train import Trainer
    t_start = t_start or time.perf_counter()
    budget = args.budget_s or float("inf")
    if combos is None:
        seeds_list = [int(v) for v in args.sweep_seeds.split(",")]
        combos = [(dtype, par, n) for dtype in args.sweep_dtypes.split(",")
                  for par in args.sweep_parallel.split(",") for n in seeds_list]
    meter = CpuMeter()
    dataset, runs = None, []
    for dtype, par, n in combos:
        if time.perf_counter() - t_start > 0.6 * budget:
            print(f"[sweep] budget: skipping {dtype} {par} S={n} and later", file=sys.stderr, flush=True)
            break
        sub = argparse.Namespace(**{**vars(args), "seeds": n, "seed_parallel": par, "compute_dtype": dtype})
        config = build_config(sub)
        dataset = dataset or load_data(config.data.name)
        t0 = time.perf_counter()
        trainer = Trainer(config, dataset)
        states = sync(trainer.init(list(range(n))))
        states, _ = trainer.advance(states, 1)
        sync(states)
        runs.append({"dtype": dtype, "parallel": trainer.parallel, "seeds": n, "trainer": trainer,
                     "states": states, "first_step_s": time.perf_counter() - t0, "times": [],
                     "contention": []})
        print(f"[sweep] ready: {dtype} {trainer.parallel} S={n} ({runs[-1]['first_step_s']:.1f}s)",
              file=sys.stderr, flush=True)
    for r in range(args.rounds):
        if r and time.perf_counter() - t_start > 0.85 * budget:
            break
        wait_until_quiet(meter, args.wait_quiet)
        for run in runs:
            summary, run["states"] = time_advance(run["trainer"], run["states"], args.steps, 1, meter)
            run["times"].append(summary["median"])
            run["contention"].append(summary["contention"][0])
    batch = runs[0]["trainer"].config.train.batch_size if runs else args.batch
    rows = []
    runs.sort(key=lambda run: (run["dtype"], run["parallel"], run["seeds"]))
    for run in runs:
        summary = summarize(run["times"], run["contention"])
        ms = best(summary) * 1e3
        rows.append({"compute_dtype": run["dtype"], "seed_parallel": run["parallel"], "seeds": run["seeds"],
                     "ms_per_step": round(ms, 2), "ms_per_seed_step": round(ms / run["seeds"], 2),
                     "images_per_s": round(batch * run["seeds"] / ms * 1e3, 1),
                     "first_step_s": round(run["first_step_s"], 2), **timing_fields("step", summary)})
    for row in rows:
        base = min((o for o in rows if o["compute_dtype"] == row["compute_dtype"]
                    and o["seed_parallel"] == row["seed_parallel"]), key=lambda o: o["seeds"])
        row["per_seed_cost_vs_smallest_S"] = round(row["ms_per_seed_step"] / base["ms_per_seed_step"], 3)
        row["images_per_s_vs_smallest_S"] = round(row["images_per_s"] / base["images_per_s"], 3)
    from early_jax import runtime
    return {"model": runs[0]["trainer"].config.model.name if runs else args.model, "batch": batch,
            "steps_per_call": args.steps, "rounds": args.rounds, "rows": rows,
            "wall_s": round(time.perf_counter() - t_start, 1), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            **runtime.describe()}


def print_sweep(out: dict) -> None:
    print(f"{out['model']} batch {out['batch']} on {out['backend']} ({out['device']})")
    print(f"{'dtype':>9} {'parallel':>8} {'S':>3} {'ms/step':>9} {'ms/seed':>8} {'img/s':>9} "
          f"{'seed cost':>9} {'img/s x':>8} {'quiet':>6}")
    for r in out["rows"]:
        print(f"{r['compute_dtype']:>9} {r['seed_parallel']:>8} {r['seeds']:>3} {r['ms_per_step']:>9} "
              f"{r['ms_per_seed_step']:>8} {r['images_per_s']:>9} {r['per_seed_cost_vs_smallest_S']:>9} "
              f"{r['images_per_s_vs_smallest_S']:>8} {r['step_quiet_calls']:>6}")


def main(argv=None):
    args = parse_args(argv)
    if args.steps is None:
        small = args.model in SMALL_MODELS or (args.preset == "fashion_cpu" and args.model == "resnet20")
        args.steps = 50 if small else 20
    if args.variants:
        return compare_variants(args, argv)
    if args.sweep_seeds:
        out = sweep(args)
        print(json.dumps(out), flush=True) if args.json else print_sweep(out)
        return out
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
    meter = CpuMeter()
    t0 = time.perf_counter()
    trainer = Trainer(config, dataset)
    states = sync(trainer.init(list(range(args.seeds))))
    t_init = time.perf_counter()
    before = dict(events)
    meter.start()
    states, _ = trainer.advance(states, 1)  # traces, compiles (or loads from the cache), runs a step
    sync(states)
    t_first = time.perf_counter()
    first = {k: v - before.get(k, 0.0) for k, v in events.items()}
    first_contention = meter.others()
    if args.serve:
        from early_jax import runtime
        from early_jax.models import layers
        return serve(trainer, states, args.steps, meter, {
            "compile_s": round(first.get("compile", 0), 3), "first_step_s": round(t_first - t0, 3),
            "xla_flags": runtime.describe()["xla_flags"],
            "conv_barrier": layers.conv_barrier_enabled() and jax.default_backend() == "cpu"})

    step, states = time_advance(trainer, states, args.steps, args.repeats, meter, args.min_quiet)
    ms = best(step)
    batch = config.train.batch_size
    result = {
        "model": config.model.name, "dataset": config.data.name, "batch": batch, "seeds": args.seeds,
        "seed_parallel": trainer.parallel, "compute_dtype": config.model.compute_dtype,
        "augment": config.data.augment,
        "ms_per_step": round(ms * 1e3, 2),
        "ms_per_seed_step": round(ms * 1e3 / args.seeds, 2),
        "images_per_s": round(batch * args.seeds / ms, 1),
        **timing_fields("step", step),
        "init_s": round(t_init - t0, 3),
        "trace_s": round(first.get("trace", 0) + first.get("lower", 0), 3),
        "compile_s": round(first.get("compile", 0), 3),
        "cache_load_s": round(first.get("cache_load", 0), 3),
        "advance_first_call_s": round(t_first - t_init, 3),
        "first_step_s": round(t_first - t0, 3),
        "process_first_step_s": round(t_first - T_PROCESS, 3),
        "first_step_contention": round(first_contention, 3) if first_contention is not None else None,
        "import_s": round(import_s, 3),
    }
    if args.loop:
        bare, states = time_bare(trainer, states, args.repeats, args.steps, meter)
        data = time_data(trainer, states, args.repeats, args.steps, meter)
        loop_steps, eval_every, saves = loop_plan(config, dataset.image_shape, args.loop_steps,
                                                  args.loop_eval_every)
        loop, loop_contention = time_loop(trainer, config, loop_steps, eval_every, saves, meter)
        eval_s, save_s = time_eval_and_save(trainer, states)
        epoch = loop_plan(config, dataset.image_shape, None, None)[1]  # steps between evaluations
        steady = (epoch * ms + eval_s + save_s) / (epoch * ms)
        result.update({"bare_ms_per_step": round(best(bare) * 1e3, 2), **timing_fields("bare", bare),
                       "data_ms_per_step": round(best(data) * 1e3, 2), **timing_fields("data", data),
                       "data_share_of_step": round(best(data) / ms, 4),
                       "loop_ms_per_step": round(loop * 1e3, 2),
                       "loop_contention": None if loop_contention is None else round(loop_contention, 3),
                       "loop_over_step": round(loop / ms, 3), "loop_over_bare": round(loop / best(bare), 3),
                       "eval_s": round(eval_s, 3), "checkpoint_save_s": round(save_s, 3),
                       "epoch_loop_over_step": round(steady, 3),
                       "loop_steps": loop_steps, "loop_eval_every": eval_every, "loop_saves": saves,
                       "loop_test_images": len(dataset.x_test)})
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
