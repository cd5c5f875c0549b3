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
                                         ({"lr": "fast"}, "--lr takes a number"),
                                         ({"augment": "maybe"}, "true or false")])
def test_bad_flags_are_one_clear_error(flags, match):
    with pytest.raises(UserError, match=match):
        cfg.override(cfg.PRESETS["fashion_cpu"], flags)


@pytest.mark.parametrize("flags,match", [({"model": "resnet21"}, "unknown model"),
                                         ({"num_seeds": "0"}, "num_seeds"),
                                         ({"duration": "10 epochs"}, "duration"),
                                         ({"scope": "local"}, "scope"),
                                         ({"eval_batch_size": "0"}, "eval_batch_size"),
                                         ({"lr": "-0.1"}, "lr must be finite and > 0"),
                                         ({"lr": "nan"}, "lr must be finite"),
                                         ({"lr": "inf"}, "lr must be finite"),
                                         ({"momentum": "nan"}, "momentum must be finite"),
                                         ({"momentum": "1"}, r"momentum must be finite and in \[0, 1\)"),
                                         ({"weight_decay": "-1e-4"}, "weight_decay must be finite and >= 0"),
                                         ({"gamma": "0"}, "gamma"),
                                         ({"fraction": "1"}, "fraction"),
                                         ({"duration": "0ep"}, "trains nothing"),
                                         ({"eval_every": "0it"}, "eval_every"),
                                         ({"seed": "-1"}, "seed must be >= 0"),
                                         ({"seed_parallel": "pmap"}, "seed_parallel must be one of"),
                                         ({"on_divergence": "ignore"}, "on_divergence must be one of"),
                                         ({"matmul_precision": "low"}, "matmul_precision must be one of"),
                                         ({"levels": "-1"}, "levels must be >= 0")])
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


def test_flags_are_typed_by_the_fields_annotation_not_the_presets_value():
    # the CPU preset holds weight decay 1e-4 but a float field takes an int literal, and vice versa
    zero = cfg.override(cfg.PRESETS["fashion_cpu"], {"weight_decay": "0"})
    assert zero.train.weight_decay == 0.0 and isinstance(zero.train.weight_decay, float)
    again = cfg.override(zero, {"weight_decay": "1e-4"})
    assert again.train.weight_decay == 1e-4
    assert cfg.override(zero, {"num_seeds": "3"}).num_seeds == 3
    with pytest.raises(UserError, match="--num_seeds takes an integer"):
        cfg.override(zero, {"num_seeds": "2.5"})
    # optional fields: 'none' is None; a str field keeps the text 'none' as a name
    assert cfg.override(cfg.PRESETS["fashion_cpu"], {"data_dir": "none"}).data.data_dir is None
    assert cfg.override(cfg.PRESETS["fashion_cpu"], {"data_dir": "/x"}).data.data_dir == "/x"
    assert cfg.override(cfg.PRESETS["fashion_cpu"], {"save_steps": "0it,5it"}).train.save_steps == ("0it", "5it")


def test_schedule_checks_need_the_steps_per_epoch():
    config = cfg.override(cfg.PRESETS["fashion_cpu"], {"duration": "2ep", "milestones": "1ep"})
    cfg.check_schedule(config, 100)
    with pytest.raises(UserError, match="warmup=300it .* longer than the run"):
        cfg.check_schedule(cfg.override(config, {"warmup": "300it"}), 100)
    with pytest.raises(UserError, match="milestones 5ep lie after the end"):
        cfg.check_schedule(cfg.override(config, {"milestones": "1ep,5ep"}), 100)


def test_flag_prefixes_are_not_accepted_and_errors_are_one_line(capsys):
    from early_jax import cli
    p = cli.parser("test")
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--num_seed=2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unrecognized arguments: --num_seed=2") and "--num_seeds" in err
    assert len(err.splitlines()) == 1
