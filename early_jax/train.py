"""Training state, optimizer and schedule, and the compiled train/eval programs over a seed axis.

The single-model step is written once; `Trainer` runs it for S seeds in one compiled program
(`vmap`, or `lax.map` where vmap is slow), inside a `lax.scan` over steps, inside a `shard_map` that
splits the seeds over the devices of a 1-D mesh. BatchNorm never sees another seed's batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from early_jax import masks, models, sharding
from early_jax.models import cpu_conv, layers
from early_jax.config import Config, TrainConfig, ignored_layers, to_steps
from early_jax.data.device import (Preprocess, TrainArrays, epoch_permutation, normalize,
                                   padded_batches, steps_per_epoch, train_batch)
from early_jax.data.record import Dataset
from early_jax.errors import UserError
from early_jax.streams import seed_keys

STEPS_PER_CALL = 50  # steps per compiled call; shorter segments skip the rest at no cost
# What every step reports per seed: float32 metrics, and whether loss and weights are finite.
TRAIN_METRICS = ("loss", "accuracy", "grad_norm", "finite")


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32, the absolute iteration (drives the schedule and data order)
    params: Any
    batch_stats: Any
    opt_state: Any
    mask: Any                  # masks.prunable_mask layout; all True for a dense run
    keys: dict                 # purpose -> raw uint32 key data (checkpointable)

    def key(self, purpose: str) -> jax.Array:
        return jax.random.wrap_key_data(self.keys[purpose])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Coupled L2 (added to the gradient, as torch.optim.SGD) then heavy-ball momentum.

    The learning rate is applied by the step from the absolute step count, not from the optimizer's
    own counter, so a fresh optimizer after rewinding to step k continues the same schedule.
    """
    return optax.chain(optax.add_decayed_weights(tc.weight_decay), optax.trace(decay=tc.momentum))


def make_schedule(tc: TrainConfig, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
    """step -> learning rate: x gamma at each milestone, optional linear warmup min(1, step/warmup)."""
    milestones = jnp.array(sorted(to_steps(m, steps_per_epoch) for m in tc.milestones), jnp.int32)
    warmup = to_steps(tc.warmup, steps_per_epoch)

    def schedule(step):
        step = jnp.asarray(step)
        lr = tc.lr * jnp.power(tc.gamma, jnp.sum(step >= milestones))
        return lr * jnp.minimum(1.0, step / warmup) if warmup else lr

    return schedule


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The single-model functions, closed over everything static."""

    model: Any
    tx: optax.GradientTransformation
    schedule: Callable
    prep: Preprocess
    batch_size: int
    steps_per_epoch: int

    def loss_and_updates(self, params, batch_stats, x, y):
        logits, updates = self.model.apply({"params": params, "batch_stats": batch_stats}, x,
                                           train=True, mutable=["batch_stats"])
        loss = cross_entropy(logits, y).mean()
        return loss, (logits, updates.get("batch_stats", {}))

    def train_step(self, state: TrainState, permutation, arrays: TrainArrays, t):
        """Forward, loss, gradient, mask the gradient, update, mask the parameters."""
        x, y = train_batch(arrays, self.prep, permutation, t % self.steps_per_epoch, self.batch_size,
                           jax.random.fold_in(state.key("augment"), t))
        grad_fn = jax.value_and_grad(self.loss_and_updates, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, x, y)
        grads = masks.apply_mask(grads, state.mask)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        lr = self.schedule(t)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        params = masks.apply_mask(params, state.mask)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
        metrics = dict(zip(TRAIN_METRICS, (loss, jnp.mean(jnp.argmax(logits, -1) == y),
                                           optax.tree.norm(grads), finite.astype(jnp.float32))))
        new_state = state.replace(step=t + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics



def evaluation_sums(model, variables, data: dict) -> jax.Array:
    """[weighted loss sum, weighted correct count] over padded batches
    {x uint8 [nb, B, ...], y, w, mean, std} (see data.device.padded_batches), in one scan."""
    def body(total, batch):
        x, y, w = batch
        logits = model.apply(variables, normalize(x, data["mean"], data["std"]), train=False)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return total + jnp.stack([jnp.sum(w * cross_entropy(logits, y)), jnp.sum(w * correct)]), None

    total, _ = jax.lax.scan(body, jnp.zeros(2), (data["x"], data["y"], data["w"]))
    return total


def resolve_seed_parallel(choice: str, platform: str) -> str:
    """CPU convolutions under vmap become slow grouped convolutions, so seeds run one after another
    there; accelerators batch them."""
    if choice != "auto":
        return choice
    return "map" if platform == "cpu" else "vmap"


def over_seeds(fn: Callable, parallel: str, num_mapped: int) -> Callable:
    """Run `fn(*mapped, *shared)` for every seed: the first `num_mapped` args carry the seed axis."""
    if parallel == "vmap":
        return lambda *args: jax.vmap(fn, in_axes=(0,) * num_mapped + (None,) * (len(args) - num_mapped))(*args)

    def sequential(*args):
        mapped, shared = args[:num_mapped], args[num_mapped:]
        return jax.lax.map(lambda m: fn(*m, *shared), mapped)
    return sequential


class Trainer:
    """Compiled training and evaluation of S seeds of one model on one dataset.

    `arrays`/`prep`/`num_classes` default to the dataset's supervised task; pre-training tasks pass
    their own (random labels, rotation classes, blur). With `abstract`, nothing is placed on a
    device (the data are shapes with shardings): the programs can only be lowered and compiled,
    e.g. ahead of time for a TPU topology this machine does not have (benchmarks/tpu_aot.py).
    """

    def __init__(self, config: Config, dataset: Dataset, *, arrays: TrainArrays | None = None,
                 prep: Preprocess | None = None, num_classes: int | None = None, mesh=None,
                 abstract: bool = False):
        self.config = config
        self.dataset = dataset
        tc = config.train
        self.mesh = mesh if mesh is not None else sharding.seed_mesh()
        self.platform = self.mesh.devices.flat[0].platform  # what the programs are compiled for
        self.model = models.create(config.model.name, num_classes or dataset.num_classes,
                                   bn_scale_init=config.model.bn_scale_init,
                                   dtype=config.model.compute_dtype)
        if len(dataset.x_train) < tc.batch_size:
            raise UserError(f"{dataset.name} has {len(dataset.x_train)} training examples, fewer than "
                            f"one batch of {tc.batch_size}; lower --batch_size")
        variables = check_image_shape(self.model, config.model.name, dataset.image_shape)
        self.ignore = ignored_layers(config)
        self.steps_per_epoch = steps_per_epoch(len(dataset.x_train), tc.batch_size)
        self.total_steps = to_steps(tc.duration, self.steps_per_epoch)
        self.tx = make_optimizer(tc)
        self.parallel = resolve_seed_parallel(tc.seed_parallel, self.platform)
        self.fns = StepFns(self.model, self.tx, make_schedule(tc, self.steps_per_epoch),
                           prep or Preprocess(augment=config.data.augment), tc.batch_size,
                           self.steps_per_epoch)
        arrays = arrays or TrainArrays(dataset.x_train, dataset.y_train, dataset.mean, dataset.std)
        place = sharding.abstract_replicated if abstract else sharding.put_replicated
        self.arrays = place(arrays, self.mesh)
        test = padded_batches(dataset.x_test, dataset.y_test, tc.eval_batch_size)
        self.test = place(test | {"mean": dataset.mean, "std": dataset.std}, self.mesh)
        # Built once: each jit object caches its trace (tracing the model costs ~0.5 s).
        self._init = jax.jit(self.traced(jax.vmap(self.init_one)), out_shardings=sharding.seed_sharding(self.mesh))
        self._zero_momentum = jax.jit(jax.vmap(self.tx.init))
        self._advance = {None: self._compile_advance()}
        self._evaluate = self._compile_evaluate()
        if self.ignore:
            self._check_ignore_patterns(variables["params"])

    @property
    def execution(self) -> dict:
        """How this trainer computes: what must match for a replay to reproduce a run's steps."""
        out = {"backend": self.platform, "seed_parallel": self.parallel, "devices": self.mesh.size,
               "matmul_precision": self.config.model.matmul_precision}
        with layers.compiling_for(self.platform):
            if layers.conv_impl() is not None:  # CPU: kernel gradients summed in chunks (another order)
                out["cpu_kernel_grad_chunk"] = cpu_conv.KERNEL_GRAD_CHUNK
        return out

    # ----- state -----
    def init_one(self, seed) -> TrainState:
        keys = seed_keys(seed)
        variables = models.init_variables(self.model, jax.random.wrap_key_data(keys["init"]),
                                          self.dataset.image_shape)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables["batch_stats"], opt_state=self.tx.init(params),
                          mask=masks.prunable_mask(params, self.ignore), keys=keys)

    def init(self, seeds) -> TrainState:
        """States for the given seeds, stacked on a leading axis sharded over the devices."""
        seeds = np.asarray(seeds, np.int32)
        sharding.check_seed_count(len(seeds), self.mesh)
        return self._init(seeds)

    def abstract_state(self, num_seeds: int) -> TrainState:
        """Shapes, dtypes and shardings of an S-seed state, for restoring checkpoints."""
        sharding.check_seed_count(num_seeds, self.mesh)
        return self._init.eval_shape(jax.ShapeDtypeStruct((num_seeds,), jnp.int32))

    def _check_ignore_patterns(self, params) -> None:
        """An ignore pattern that matches no kernel is a typo (e.g. PyTorch's 'fc' for 'head')."""
        kernels = models.prunable_paths(params)
        unmatched = [p for p in self.ignore if not any(models.is_ignored(k, [p]) for k in kernels)]
        if unmatched:
            raise UserError(f"--ignore {unmatched} matches no layer of {self.config.model.name}; its "
                            f"kernels are {', '.join(kernels)}")

    def fresh_optimizer(self, states: TrainState) -> TrainState:
        """Momentum buffers back to zero (rewinding starts a new optimizer)."""
        return states.replace(opt_state=self._zero_momentum(states.params))

    # ----- compiled programs -----
    def traced(self, fn: Callable) -> Callable:
        """`fn` traced for this trainer's platform (see layers.compiling_for) under the configured
        float32 matmul/convolution precision."""
        def wrapped(*args):
            with layers.compiling_for(self.platform), \
                    jax.default_matmul_precision(self.config.model.matmul_precision):
                return fn(*args)
        return wrapped

    def _compile_advance(self, observe: Callable | None = None):
        """The compiled chunk of STEPS_PER_CALL steps; `observe(state, refs) -> dict` (optional)
        adds per-step statistics of each seed's state after the step, given per-seed `refs`."""
        fns, spe, n = self.fns, self.steps_per_epoch, len(self.dataset.x_train)

        def step(state, perm, refs, arrays, t):
            new, metrics = fns.train_step(state, perm, arrays, t)
            return new, (metrics | observe(new, refs)) if observe else metrics

        seeds_step = over_seeds(step, self.parallel, 3)
        seeds_observe = over_seeds(observe, self.parallel, 2) if observe else lambda s, r: {}

        def no_metrics(states, refs):
            """Zeros shaped like one step's metrics, for the steps a chunk skips. Built from the
            known names and the observer alone: tracing the step twice costs ~0.4 s a program."""
            num_seeds = jax.tree.leaves(states)[0].shape[0]
            observed = jax.eval_shape(seeds_observe, states, refs)
            return ({name: jnp.full(num_seeds, name == "finite", jnp.float32) for name in TRAIN_METRICS}
                    | jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), observed))

        def advance(states, refs, arrays, start, end):
            order_keys = jax.vmap(lambda k: jax.random.wrap_key_data(k))(states.keys["order"])
            permute = lambda epoch: jax.vmap(lambda k: epoch_permutation(k, epoch, n))(order_keys)

            def body(carry, i):
                states, perms = carry
                t = start + i
                active = t < end
                perms = jax.lax.cond(active & (t % spe == 0) & (i > 0), lambda: permute(t // spe),
                                     lambda: perms)
                skip = lambda s: (s, no_metrics(s, refs))
                states, metrics = jax.lax.cond(active, lambda s: seeds_step(s, perms, refs, arrays, t),
                                               skip, states)
                return (states, perms), metrics

            (states, _), metrics = jax.lax.scan(body, (states, permute(start // spe)),
                                                jnp.arange(STEPS_PER_CALL))
            return states, metrics

        seeds, rep = P(sharding.SEED_AXIS), P()
        sharded = jax.shard_map(self.traced(advance), mesh=self.mesh, in_specs=(seeds, seeds, rep, rep, rep),
                                out_specs=(seeds, P(None, sharding.SEED_AXIS)), check_vma=False)
        return jax.jit(sharded, donate_argnums=0)

    def _compile_evaluate(self):
        model = self.model

        def one_seed(state, test):
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            return evaluation_sums(model, variables, test) / test["count"]

        over = over_seeds(one_seed, self.parallel, 1)
        seeds, rep = P(sharding.SEED_AXIS), P()
        return jax.jit(jax.shard_map(self.traced(over), mesh=self.mesh, in_specs=(seeds, rep), out_specs=seeds,
                                     check_vma=False))

    # ----- host-facing -----
    def advance(self, states: TrainState, end: int, on_chunk: Callable | None = None,
                observe: Callable | None = None, refs=(), stop: Callable[[], bool] | None = None
                ) -> tuple[TrainState, dict]:
        """Train from the states' step to `end`; returns states and per-step metrics {name: [T, S]}.

        The input states are consumed (their buffers are donated to the result).
        `on_chunk(step, metrics)` is called after each compiled call (for progress lines and
        divergence checks); `stop()` is asked after each call, and True ends training early (the
        states then stand at an earlier step); `observe`/`refs` add per-step statistics (see
        `_compile_advance`); one program per observer.
        """
        start = current_step(states)
        if end > self.total_steps:
            raise UserError(f"cannot train to step {end}: the run ends at step {self.total_steps}")
        if observe not in self._advance:
            self._advance[observe] = self._compile_advance(observe)
        compiled = self._advance[observe]
        collected = []
        while start < end:
            states, metrics = compiled(states, refs, self.arrays, jnp.int32(start), jnp.int32(end))
            count = min(STEPS_PER_CALL, end - start)
            collected.append(jax.tree.map(lambda m: sharding.to_host(m)[:count], metrics))
            start += count
            if on_chunk:
                on_chunk(start, collected[-1])
            if stop and start < end and stop():
                break
        if not collected:
            return states, {}
        return states, jax.tree.map(lambda *ms: np.concatenate(ms), *collected)

    def evaluate(self, states: TrainState) -> dict[str, np.ndarray]:
        """Test loss and accuracy per seed, with the running BatchNorm statistics."""
        out = sharding.to_host(self._evaluate(states, self.test))
        return {"test_loss": out[:, 0], "test_accuracy": out[:, 1]}


def check_image_shape(model, name: str, image_shape) -> dict:
    """Refuse images the model cannot take: an error from its forward pass, or a layer whose
    output would be empty (e.g. VGG's five poolings on 8x8 images), as one sentence. Returns the
    shapes of the model's variables (traced once here, for the other checks)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    try:
        program, variables = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x, train=False),
                                            return_shape=True)(x)
    except Exception as err:  # shape errors of any layer
        raise UserError(f"{name} cannot take {'x'.join(map(str, image_shape))} images "
                        f"({str(err).splitlines()[0][:200]}); use larger images or another --model") from None
    if _has_empty_value(program.jaxpr):
        raise UserError(f"{name} cannot take {'x'.join(map(str, image_shape))} images: a layer's output "
                        "would be empty (too small for its poolings or strides); use larger images or "
                        "another --model")
    return variables


def _has_empty_value(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if any(0 in getattr(v.aval, "shape", (1,)) for v in eqn.outvars):
            return True
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns") and _has_empty_value(inner):
                return True
    return False


def current_step(states: TrainState) -> int:
    """The step all seeds are at (they always advance together), read from this process's rows."""
    return int(np.asarray(states.step.addressable_shards[0].data).reshape(-1)[0])
