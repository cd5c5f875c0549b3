"""Process-wide JAX settings the package applies on import: CPU XLA flags and a persistent cache.

Imported for its effect by `early_jax/__init__.py`, so it runs before any JAX backend exists (XLA
reads `XLA_FLAGS` once, when the first backend is created). What it does:

1. XLA flags (`XLA_FLAGS`), only when the variable is not set at all. Setting it yourself, even to
   an empty string (`XLA_FLAGS= python ...`), or setting `EARLY_JAX_XLA_FLAGS=0`, turns this off.
   Each flag is applied only with the jaxlib versions it was tested on, because an XLA flag that
   a jaxlib does not know aborts the process at backend start. The flags:

   `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` (jaxlib 0.10.2): this jaxlib
   hands every convolution with more than 16 input or output features to the YNNPACK library.
   The kernel-gradient convolution of a training step treats the batch as its feature axis, so it
   always lands there and runs 2.5-12x slower than XLA's own Eigen convolution. The flag keeps
   YNNPACK for dots and reductions and takes convolutions away from it. It only affects the CPU
   compiler. Gradients match the default flags to float32 rounding (tests/test_speed_options.py;
   the notes measured 1e-7 relative on ResNet-20); turning YNNPACK off completely instead
   changed some kernel gradients by up to 4% and is not used.

   Re-check these when upgrading jaxlib: flags named "experimental" change between releases.
   To add a version, measure it with benchmarks/train_speed.py and run tests/test_speed_options.py.

2. JAX's persistent compilation cache, on by default in `$EARLY_JAX_CACHE` or
   `~/.cache/early_jax/jax` (`$XDG_CACHE_HOME` is honoured). `EARLY_JAX_CACHE=0` turns it off; a
   cache directory configured through JAX itself (`JAX_COMPILATION_CACHE_DIR`) is left alone.
   Programs that compile in under 0.1 s are not stored.

If a JAX backend was already initialised when this module is imported (jax was used before
`import early_jax`), the flags can no longer take effect: a warning says so and nothing is changed.
"""
from __future__ import annotations

import importlib.metadata
import os
import warnings

import jax

# flag -> jaxlib versions it was measured and verified on (exact versions: flags marked
# "experimental" may be renamed or removed in any release).
CPU_XLA_FLAGS: dict[str, tuple[str, ...]] = {
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution": ("0.10.2",),
}
CACHE_MIN_COMPILE_S = 0.1
_ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin",
                        "jax-rocm7-plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")

_state: dict = {"xla_flags_applied": [], "xla_flags_reason": "not run", "cache_dir": None}


def _installed_versions() -> list[str]:
    """jaxlib's version and that of any accelerator plugin (a plugin parses XLA_FLAGS too)."""
    versions = [importlib.metadata.version("jaxlib")]
    for name in _ACCELERATOR_PLUGINS:
        try:
            versions.append(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _libtpu_installed() -> bool:
    for name in ("libtpu", "libtpu-nightly"):
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # a future JAX without this helper: assume the best case
        return False


def selected_flags() -> list[str]:
    """The flags this jaxlib (and any accelerator plugin) is known to accept."""
    versions = _installed_versions()
    if _libtpu_installed() and os.environ.get("JAX_PLATFORMS", "") != "cpu":
        return []  # libtpu has its own version line; none of these flags is verified there
    return [flag for flag, known in CPU_XLA_FLAGS.items() if all(v in known for v in versions)]


def apply_xla_flags() -> None:
    if os.environ.get("EARLY_JAX_XLA_FLAGS", "1").lower() in ("0", "false", "no", "off"):
        _state["xla_flags_reason"] = "EARLY_JAX_XLA_FLAGS=0"
        return
    if "XLA_FLAGS" in os.environ:
        _state["xla_flags_reason"] = "XLA_FLAGS set by the user"
        return
    flags = selected_flags()
    if not flags:
        _state["xla_flags_reason"] = f"no flag verified for jaxlib {_installed_versions()}"
        return
    if backends_initialized():
        _state["xla_flags_reason"] = "a JAX backend was already initialised"
        warnings.warn("early_jax was imported after JAX initialised its backend, so its CPU XLA "
                      f"flags ({' '.join(flags)}) are not applied; import early_jax first or set "
                      "XLA_FLAGS yourself", RuntimeWarning, stacklevel=3)
        return
    os.environ["XLA_FLAGS"] = " ".join(flags)
    _state["xla_flags_applied"] = flags
    _state["xla_flags_reason"] = "applied"


def user_cache_dir() -> str:
    """`$XDG_CACHE_HOME/early_jax` (default `~/.cache/early_jax`): the package's caches."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "early_jax")


def default_cache_dir() -> str:
    return os.path.join(user_cache_dir(), "jax")


def _jax_cache_dir():
    return jax.config.jax_compilation_cache_dir


def enable_cache() -> None:
    setting = os.environ.get("EARLY_JAX_CACHE", "")
    if setting.lower() in ("0", "false", "no", "off"):
        return
    if _jax_cache_dir():  # configured through JAX itself: keep it
        _state["cache_dir"] = _jax_cache_dir()
        return
    path = os.path.expanduser(setting) if setting and setting not in ("1", "true", "on") else default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        warnings.warn(f"persistent compilation cache disabled: cannot create {path} ({e})", RuntimeWarning)
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    _state["cache_dir"] = path


def describe() -> dict:
    """What this module did, for benchmark output and logs."""
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_flags_applied_by_early_jax": list(_state["xla_flags_applied"]),
            "xla_flags_reason": _state["xla_flags_reason"],
            "compilation_cache_dir": _state["cache_dir"],
            "jaxlib": importlib.metadata.version("jaxlib")}


def configure() -> None:
    apply_xla_flags()
    enable_cache()


configure()
