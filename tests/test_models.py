import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import models
from early_jax.errors import UserError
from early_jax.models import layers

ALL = ["resnet20", "resnet32", "resnet56", "resnet20_w32", "vgg11", "vgg13", "vgg16", "vgg19",
       "resnet18", "lenet300_100", "convnet_small", "convnet_tiny"]


def shapes(name, input_shape, num_classes=10):
    model = models.create(name, num_classes)
    variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), input_shape))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *input_shape))), variables)
    return variables, logits


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("input_shape", [(32, 32, 3), (28, 28, 1)])
def test_every_model_builds_for_gray_and_color_inputs(name, input_shape):
    variables, logits = shapes(name, input_shape, num_classes=7)
    assert logits.shape == (2, 7)
    assert models.prunable_paths(variables["params"])


@pytest.mark.parametrize("name,count", [("resnet20", 272_474), ("resnet56", 855_770),
                                        ("vgg13", 9_416_010), ("vgg19", 20_040_522),
                                        ("resnet18", 11_181_642)])
def test_parameter_counts_match_the_papers_networks(name, count):
    variables, _ = shapes(name, (32, 32, 3))
    assert models.count_params(variables["params"]) == count


def test_resnet20_prunable_set_is_every_conv_and_the_fc_kernel():
    variables, _ = shapes("resnet20", (32, 32, 3))
    paths = models.prunable_paths(variables["params"])
    flat = {"/".join(k): v for k, v in traverse.flatten_dict(variables["params"]).items()}
    assert sum(flat[p].size for p in paths) == 270_896
    assert "head/kernel" in paths and "stage2_block0/shortcut_conv/kernel" in paths
    assert not any("bn" in p or p.endswith("bias") for p in paths)
    assert "head/kernel" not in models.prunable_paths(variables["params"], ignore=("head",))


def test_kernels_are_untruncated_he_normal_and_bn_scale_uniform():
    model = models.create("resnet20")
    params = models.init_variables(model, jax.random.key(1), (32, 32, 3))["params"]
    kernel = np.asarray(params["stage3_block1"]["conv1"]["kernel"])  # fan_in = 3*3*64
    sigma = np.sqrt(2 / (9 * 64))
    assert abs(kernel.std() / sigma - 1) < 0.02
    assert np.abs(kernel).max() > 2.5 * sigma  # a truncated normal stops at 2 sigma
    scale = np.asarray(params["stage3_block1"]["bn1"]["scale"])
    assert 0 <= scale.min() and scale.max() <= 1 and scale.std() > 0.2
    ones = models.create("resnet20", bn_scale_init="ones")
    params = models.init_variables(ones, jax.random.key(1), (32, 32, 3))["params"]
    assert np.all(np.asarray(params["stem_bn"]["scale"]) == 1)


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (7, 7, 3, 64), (64, 10)])
def test_flat_he_draw_equals_flax_variance_scaling_exactly(shape):
    """Drawn flat for compile speed; the numbers are those of the library initialiser."""
    reference = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    key = jax.random.key(5)
    np.testing.assert_array_equal(layers.he_normal_untruncated(key, shape), reference(key, shape))


def test_fc_and_vgg_conv_biases_use_pytorch_uniform_bound():
    params = models.init_variables(models.create("vgg11"), jax.random.key(0), (32, 32, 3))["params"]
    bound = 1 / np.sqrt(9 * 3)
    bias = np.asarray(params["conv0"]["bias"])
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > bound / 4
    head_bias = np.asarray(params["head"]["bias"])
    assert np.abs(head_bias).max() <= 1 / np.sqrt(512)


@pytest.mark.parametrize("bad", ["resnet21", "vgg12", "alexnet", ""])
def test_unknown_model_is_one_clear_error(bad):
    with pytest.raises(UserError, match="unknown model"):
        models.create(bad)


def test_cpu_conv_gradients_equal_xla_autodiff():
    """The canonical-form gradients used on CPU are the same convolution's exact gradients."""
    from early_jax.models import cpu_conv
    from early_jax.models.cpu_conv import flax_conv_fn
    key_x, key_w = jax.random.split(jax.random.key(0))
    for size, kernel, stride, padding in [(9, 3, 2, "SAME"), (8, 1, 2, "SAME"), (12, 7, 2, "SAME"),
                                          (8, 3, 2, [(1, 1), (1, 1)]), (12, 7, 2, [(3, 3), (3, 3)]),
                                          (7, 3, 1, "VALID"), (9, 4, 3, [(2, 1), (0, 3)]),
                                          # kernel gradient summed over chunks of 16 examples:
                                          (16, 3, 1, "SAME"), (17, 3, 2, "SAME"), (16, 1, 2, "SAME")]:
        batch = 2 if size < 16 else 2 * cpu_conv.KERNEL_GRAD_CHUNK
        x = jax.random.normal(key_x, (batch, size, size, 3))
        w = jax.random.normal(key_w, (kernel, kernel, 3, 5))
        ref = lambda x, w: (jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2).sum()
        ours = lambda x, w: (flax_conv_fn(x, w, (stride, stride), padding) ** 2).sum()
        for a, b in zip(jax.grad(ref, (0, 1))(x, w), jax.grad(ours, (0, 1))(x, w)):
            # float32 sums in another order: errors scale with the largest entry (1e4 at batch 32)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_cpu_conv_is_used_by_models_on_cpu():
    assert layers.conv_impl() is not None  # the tests run on the CPU backend
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: layers.conv_impl()(
        jnp.ones((1, 4, 4, 2)), w, (1, 1), "SAME").sum()))(jnp.ones((3, 3, 2, 2))))
    assert "custom_vjp_call" in jaxpr or "transpose[" in jaxpr


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_stride_two_convs_centre_on_even_pixels_like_pytorch(kernel):
    """A centre-tap kernel copies the pixel each output is centred on: (2i, 2j) for every kernel
    size, so a 3x3/2 conv and its 1x1/2 shortcut see the same pixels (padding=k//2)."""
    size = 8
    x = jnp.arange(size * size, dtype=jnp.float32).reshape(1, size, size, 1)
    layer = layers.conv(1, kernel, 2, name="c")
    centre = jnp.zeros((kernel, kernel, 1, 1)).at[kernel // 2, kernel // 2].set(1.0)
    out = layer.apply({"params": {"kernel": centre}}, x)
    assert out.shape == (1, size // 2, size // 2, 1)
    np.testing.assert_array_equal(out[0, :, :, 0], x[0, ::2, ::2, 0])
