"""Speed options must not change results: CPU XLA flags, the compilation cache, the CPU conv fusion
barrier, bf16 compute, and the automatic choice of seed parallelism."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import models, runtime, train
from early_jax.models import cpu_conv, layers
from early_jax.train import Trainer
from helpers import TINY_DATA, tiny_config

# Two real Trainer steps of convnet_small (16 and 32 features: convolutions YNNPACK would take
# without the flag; lax.map over seeds, the CPU default). Saves the parameters at steps 0, 1, 2
# (the step-1 update is -lr * (gradient + weight decay)); prints the flags and the cache hits.
TRAIN_RUN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    import early_jax, jax, numpy as np
    from early_jax import data, runtime
    from early_jax.train import Trainer
    from helpers import tiny_config
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even tiny programs
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
    dataset = data.synthetic(num_train=64, num_test=16, shape=(12, 12, 1), num_classes=10)
    trainer = Trainer(tiny_config(model="convnet_small", batch_size=32, num_seeds=1), dataset)
    states = trainer.init([0])
    saved = [np.asarray(a) for a in jax.tree.leaves(states.params)]
    for step in (1, 2):
        states, _ = trainer.advance(states, step)
        saved += [np.asarray(a) for a in jax.tree.leaves(states.params)]
    np.savez(sys.argv[1], *saved)
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS"), "cache_hits": len(hits),
                      "cache_dir": runtime.describe()["compilation_cache_dir"],
                      "num_leaves": len(jax.tree.leaves(states.params))}))
""")


def _run_training(tmp_path, name, **env):
    out = tmp_path / f"{name}.npz"
    full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EARLY_JAX_CACHE")}
    full_env.update(JAX_PLATFORMS="cpu", **env)
    proc = subprocess.run([sys.executable, "-c", TRAIN_RUN, str(out), os.path.dirname(__file__)],
                          env=full_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as f:
        arrays = [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]
    n = info["num_leaves"]
    return [arrays[:n], arrays[n:2 * n], arrays[2 * n:]], info


def _assert_close_relative(reference, other, rtol):
    for a, b in zip(reference, other):
        scale = max(float(np.abs(a).max()), 1e-12)
        assert float(np.abs(a - b).max()) <= rtol * scale, (float(np.abs(a - b).max()), scale)


def test_xla_flags_and_compilation_cache_do_not_change_results(tmp_path):
    """Plain XLA vs the package's flags with a cold cache vs the same with a warm cache."""
    cache = str(tmp_path / "cache")
    plain, plain_info = _run_training(tmp_path, "plain", XLA_FLAGS="", EARLY_JAX_CACHE="0")
    cold, cold_info = _run_training(tmp_path, "cold", EARLY_JAX_CACHE=cache)
    warm, warm_info = _run_training(tmp_path, "warm", EARLY_JAX_CACHE=cache)
    assert plain_info["xla_flags"] == "" and plain_info["cache_dir"] is None
    assert cold_info["xla_flags"] == " ".join(runtime.selected_flags())
    assert cold_info["cache_dir"] == cache and cold_info["cache_hits"] == 0
    assert warm_info["cache_hits"] > 0 and os.listdir(cache)
    for a, b in zip(plain[0], cold[0]):
        np.testing.assert_array_equal(a, b)  # same initialisation
    # First update = -lr * (gradient + weight decay): compare it relative to its size.
    update = lambda run: [p1 - p0 for p0, p1 in zip(run[0], run[1])]
    _assert_close_relative(update(plain), update(cold), 1e-5)
    _assert_close_relative(plain[2], cold[2], 1e-5)
    for a, b in zip(cold[2], warm[2]):
        np.testing.assert_array_equal(a, b)  # a cached executable is the same program


# ----- runtime: which flags, when -----
@pytest.fixture
def fresh_runtime(monkeypatch):
    monkeypatch.setattr(runtime, "_state", {"xla_flags_applied": [], "xla_flags_reason": "",
                                            "cache_dir": None})
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("EARLY_JAX_XLA_FLAGS", raising=False)
    monkeypatch.setattr(runtime, "backends_initialized", lambda: False)
    monkeypatch.setattr(runtime, "_libtpu_installed", lambda: False)
    return monkeypatch


def test_flags_apply_only_to_known_jaxlib_versions(fresh_runtime):
    fresh_runtime.setattr(runtime, "_installed_versions", lambda: ["0.10.2"])
    runtime.apply_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    fresh_runtime.delenv("XLA_FLAGS")
    fresh_runtime.setattr(runtime, "_installed_versions", lambda: ["0.10.3"])
    runtime.apply_xla_flags()
    assert "XLA_FLAGS" not in os.environ  # an unknown flag would abort an unknown jaxlib
    fresh_runtime.setattr(runtime, "_installed_versions", lambda: ["0.10.2", "0.10.1"])  # old plugin
    runtime.apply_xla_flags()
    assert "XLA_FLAGS" not in os.environ


def test_user_xla_flags_and_opt_out_are_respected(fresh_runtime):
    fresh_runtime.setattr(runtime, "_installed_versions", lambda: ["0.10.2"])
    fresh_runtime.setenv("XLA_FLAGS", "")
    runtime.apply_xla_flags()
    assert os.environ["XLA_FLAGS"] == "" and runtime.describe()["xla_flags_applied_by_early_jax"] == []
    fresh_runtime.delenv("XLA_FLAGS")
    fresh_runtime.setenv("EARLY_JAX_XLA_FLAGS", "0")
    runtime.apply_xla_flags()
    assert "XLA_FLAGS" not in os.environ


def test_flags_after_backend_start_only_warn(fresh_runtime):
    fresh_runtime.setattr(runtime, "_installed_versions", lambda: ["0.10.2"])
    fresh_runtime.setattr(runtime, "backends_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="not applied"):
        runtime.apply_xla_flags()
    assert "XLA_FLAGS" not in os.environ


def test_cache_location_and_opt_out(fresh_runtime, tmp_path):
    calls = {}
    fresh_runtime.setattr(jax.config, "update", lambda name, value: calls.__setitem__(name, value))
    fresh_runtime.setattr(runtime, "_jax_cache_dir", lambda: None)
    fresh_runtime.setenv("EARLY_JAX_CACHE", "0")
    runtime.enable_cache()
    assert calls == {}
    fresh_runtime.setenv("EARLY_JAX_CACHE", str(tmp_path / "c"))
    runtime.enable_cache()
    assert calls["jax_compilation_cache_dir"] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    fresh_runtime.delenv("EARLY_JAX_CACHE")
    fresh_runtime.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    runtime.enable_cache()
    assert calls["jax_compilation_cache_dir"] == str(tmp_path / "xdg" / "early_jax" / "jax")


# ----- the CPU conv fusion barrier -----
def _model_and_batch(name="convnet_small"):
    model = models.create(name)
    variables = models.init_variables(model, jax.random.key(0), (12, 12, 1))
    x = jax.random.normal(jax.random.key(1), (16, 12, 12, 1))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 10)
    return model, variables, x, y


def _loss(model, v, x, y):
    logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()


def _seed_grads_fn(model, parallel):
    """Gradients of two seeds' losses on a shared batch, as the Trainer runs seeds on CPU (lax.map)
    or on accelerators (vmap)."""
    grad = jax.grad(lambda v, x, y: _loss(model, v, x, y))
    if parallel == "vmap":
        return jax.jit(jax.vmap(grad, (0, None, None)))
    return jax.jit(lambda v, x, y: jax.lax.map(lambda u: grad(u, x, y), v))


def test_conv_barrier_changes_no_number_under_map_and_vmap(monkeypatch):
    assert layers.conv_impl() is cpu_conv.flax_conv_fn_with_barrier  # the CPU default
    with_barrier, variables, x, y = _model_and_batch("convnet_tiny")
    monkeypatch.setenv("EARLY_JAX_CONV_BARRIER", "0")
    without = models.create("convnet_tiny")
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), variables)
    for parallel in ("map", "vmap"):
        a = _seed_grads_fn(with_barrier, parallel)(stacked, x, y)
        b = _seed_grads_fn(without, parallel)(stacked, x, y)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def _computation_bodies(hlo: str) -> dict[str, str]:
    """HLO computation name -> its text."""
    bodies, name, lines = {}, None, []
    for line in hlo.splitlines():
        match = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if match and not line.startswith(" "):
            name, lines = match.group(1), []
        elif line.startswith("}") and name:
            bodies[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return bodies


def test_compiled_step_has_one_barrier_per_conv_and_no_conv_in_ynn():
    model, variables, x, y = _model_and_batch()
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
    hlo = _seed_grads_fn(model, "map").lower(stacked, x, y).compile().as_text()
    num_convs = sum(1 for k in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
                    if "conv" in jax.tree_util.keystr(k[0]))
    assert num_convs == 2
    assert hlo.count(" conditional(") == num_convs  # the barriers survived optimisation
    if not runtime.describe()["xla_flags_applied_by_early_jax"]:
        pytest.skip("the package's XLA flags are not applied in this process (XLA_FLAGS is set)")
    bodies = _computation_bodies(hlo)
    ynn = re.findall(r"calls=%([\w.\-]+).*__ynn_fusion", hlo)
    assert bodies and all(name in bodies for name in ynn)
    assert not [name for name in ynn if "convolution(" in bodies[name]]
    assert hlo.count("convolution(") >= 2 * num_convs  # forward and kernel-gradient convolutions


# ----- bf16 and seed parallelism -----
def test_bfloat16_compute_trains_with_float32_state():
    config = tiny_config(compute_dtype="bfloat16", num_seeds=1, lr=0.1, augment=False)
    trainer = Trainer(config, TINY_DATA)
    assert trainer.model.dtype == jnp.bfloat16
    states, metrics = trainer.advance(trainer.init([0]), 24)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(states.params))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(states.opt_state)
               if jnp.issubdtype(a.dtype, jnp.floating))
    loss = metrics["loss"][:, 0]
    assert np.isfinite(loss).all() and loss[-6:].mean() < 0.5 * loss[:6].mean()


def test_seed_parallel_auto_is_map_on_cpu_and_vmap_on_accelerators():
    assert train.resolve_seed_parallel("auto", "cpu") == "map"
    for platform in ("gpu", "tpu", "cuda", "rocm"):
        assert train.resolve_seed_parallel("auto", platform) == "vmap"
        assert train.resolve_seed_parallel("map", platform) == "map"
    assert train.resolve_seed_parallel("vmap", "cpu") == "vmap"


def test_the_convolution_code_path_follows_the_platform_compiled_for():
    """Traced for a TPU on this CPU host, the model has XLA's own convolutions, as a TPU runs it."""
    from early_jax.models import layers
    def grad_of(conv):
        loss = lambda w: conv(jnp.ones((1, 4, 4, 2)), w, (1, 1), "SAME",
                              dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
        return str(jax.make_jaxpr(jax.grad(loss))(jnp.ones((3, 3, 2, 2))))

    plain = grad_of(jax.lax.conv_general_dilated)
    assert grad_of(layers.conv_impl()) != plain  # on the CPU backend: the CPU rewrite
    with layers.compiling_for("tpu"):
        assert layers.conv_impl() is None
    with layers.compiling_for("cpu"):
        assert grad_of(layers.conv_impl()) != plain


# ----- the tiled max-pool gradient -----
def test_tiled_max_pool_equals_flax_max_pool_with_ties_inside_jit():
    """Same values and gradients as nn.max_pool (first maximum of a window), also where XLA
    recomputes the pooled input in the backward pass, for odd sizes, and under vmap."""
    import flax.linen as nn
    key_x, key_s = jax.random.split(jax.random.key(0))
    for shape in [(4, 12, 12, 3), (2, 7, 9, 2)]:
        # integer-valued inputs, batch normalisation and a ReLU: many exact ties (also at zero),
        # and a pooled input that XLA recomputes (rounded differently) in the backward pass
        x = jax.random.randint(key_x, shape, -2, 3).astype(jnp.float32)
        scale = jax.random.uniform(key_s, (shape[-1],), minval=0.5, maxval=1.5)

        def loss(pool, x, scale):
            mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
            y = pool(jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + 0.1))
            return (y * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)).sum()
        ref = jax.jit(jax.grad(lambda x, s: loss(lambda v: nn.max_pool(v, (2, 2), (2, 2)), x, s), (0, 1)))
        ours = jax.jit(jax.grad(lambda x, s: loss(lambda v: layers.max_pool(v, (2, 2)), x, s), (0, 1)))
        for a, b in zip(ref(x, scale), ours(x, scale)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(layers.max_pool(x, (2, 2)), nn.max_pool(x, (2, 2), (2, 2)))
        batched = lambda pool: jax.jit(jax.vmap(jax.grad(lambda u: loss(pool, u, scale))))(x[None])
        np.testing.assert_array_equal(batched(lambda w: layers.max_pool(w, (2, 2))),
                                      batched(lambda w: nn.max_pool(w, (2, 2), (2, 2))))
    overlapping = layers.max_pool(x, (3, 3), (2, 2), padding="SAME")  # falls back to nn.max_pool
    np.testing.assert_array_equal(overlapping, nn.max_pool(x, (3, 3), (2, 2), padding="SAME"))


def test_tiled_max_pool_gives_the_same_model_gradient(monkeypatch):
    """In a real model (conv-BN-ReLU-pool, images with flat background: many ties), where XLA
    recomputes the pooled input in the backward pass."""
    import types

    import flax.linen as nn
    from early_jax.models import small
    images = jax.random.randint(jax.random.key(0), (16, 12, 12, 1), 0, 4).astype(jnp.float32)
    images = images * (jnp.arange(12) < 6)[None, :, None, None]  # half of each image is flat zero
    labels = jnp.arange(16) % 10

    def model_grads(pool):
        proxy = types.ModuleType("linen_with_pool")
        proxy.__getattr__ = lambda name: pool if name == "max_pool" else getattr(nn, name)
        monkeypatch.setattr(small, "nn", proxy)
        model = models.create("convnet_small")
        variables = models.init_variables(model, jax.random.key(1), (12, 12, 1))
        return jax.jit(jax.grad(lambda v: _loss(model, v, images, labels)))(variables)
    ref = model_grads(nn.max_pool)
    ours = model_grads(lambda x, window, strides=None, **kw: layers.max_pool(x, window, strides, **kw))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ours)):
        np.testing.assert_array_equal(a, b)
