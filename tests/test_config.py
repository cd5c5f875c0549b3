import pytest

from early_jax import config as cfg
from early_jax.errors import UserError


def test_durations_convert_to_steps():
    assert cfg.to_steps("500it", 391) == 500
    assert cfg.to_steps("2ep", 391) == 782
    assert cfg.to_steps(" 160ep ", 391) == 62_560
    assert cfg.to_steps(7, 391) == 7
    assert cfg.to_steps("500", 391) == 500  # a bare number means iterations (--rewind_iter=500)


@pytest.mark.parametrize("bad", ["500x", "2 epochs", "ep", "-3it", "1.5ep", True])
def test_bad_durations_are_one_clear_error(bad):
    with pytest.raises(UserError, match="duration"):
        cfg.to_steps(bad, 10)


def test_paper_preset_has_the_papers_recipe():
    c = cfg.PRESETS["cifar10_resnet20"]
    assert (c.model.name, c.data.name, c.train.batch_size, c.train.lr) == ("resnet20", "cifar10", 128, 0.1)
    assert c.train.duration == "160ep" and c.train.milestones == ("80ep", "120ep")
    assert (c.train.momentum, c.train.weight_decay, c.train.gamma) == (0.9, 1e-4, 0.1)
    assert c.prune.fraction == 0.2 and c.prune.scope == "global"


def test_flags_override_fields():
    c = cfg.override(cfg.PRESETS["fashion_cpu"], {"model": "resnet20", "lr": "0.05", "augment": "false",
                                                  "milestones": "3ep,6ep", "num_seeds": "4"})
    assert (c.model.name, c.train.lr, c.data.augment, c.num_seeds) == ("resnet20", 0.05, False, 4)
    assert c.train.milestones == ("3ep", "6ep")


@pytest.mark.parametrize("flags,match", [({"nope": "1"}, "unknown flag --nope"),
                                         ({"lr": "fast"}, "--lr takes a float"),
                                         ({"augment": "maybe"}, "true or false")])
def test_bad_flags_are_one_clear_error(flags, match):
    with pytest.raises(UserError, match=match):
        cfg.override(cfg.PRESETS["fashion_cpu"], flags)


@pytest.mark.parametrize("flags,match", [({"model": "resnet21"}, "unknown model"),
                                         ({"num_seeds": "0"}, "num_seeds"),
                                         ({"duration": "10 epochs"}, "duration"),
                                         ({"scope": "local"}, "scope"),
                                         ({"eval_batch_size": "0"}, "eval_batch_size"),
                                         ({"lr": "-0.1"}, "lr > 0"),
                                         ({"lr": "nan"}, "lr > 0"),
                                         ({"levels": "-1"}, "levels >= 0")])
def test_validation_catches_bad_settings_before_work(flags, match):
    with pytest.raises(UserError, match=match):
        cfg.validate(cfg.override(cfg.PRESETS["fashion_cpu"], flags))


def test_vgg_keeps_its_output_layer_unpruned_by_default_and_flags_override_it():
    vgg = cfg.override(cfg.PRESETS["cifar10_resnet20"], {"model": "vgg19"})
    assert cfg.ignored_layers(vgg) == ("head",)
    assert cfg.ignored_layers(cfg.PRESETS["cifar10_resnet20"]) == ()
    assert cfg.ignored_layers(cfg.override(vgg, {"ignore": ""})) == ()
    assert cfg.ignored_layers(cfg.override(vgg, {"ignore": "auto,stem*"})) == ("head", "stem*")


def test_an_ignore_pattern_that_matches_no_layer_is_refused():
    from early_jax.train import Trainer
    from helpers import TINY_DATA, tiny_config
    with pytest.raises(UserError, match="matches no layer"):
        Trainer(tiny_config(ignore="classifier"), TINY_DATA)
    assert Trainer(tiny_config(ignore="head"), TINY_DATA).ignore == ("head",)


def test_a_dataset_smaller_than_a_batch_is_refused():
    from early_jax.train import Trainer
    from helpers import TINY_DATA, tiny_config
    with pytest.raises(UserError, match="fewer than one batch"):
        Trainer(tiny_config(batch_size=200), TINY_DATA)
