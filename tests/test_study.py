import os

import pytest

from early_jax import checkpoint, plans, report, study
from early_jax.pipeline import Experiment
from helpers import TINY_DATA, tiny_config, with_workdir

TINY_PLAN = study.Plan(rewind="3it", levels=1, perturb_levels=(1,), treatments=("shuffle_layer",),
                       noise_scales=(1.0,), instability_rewinds=("0it", "3it"), telemetry_steps="6it",
                       pretrain_task="blur", pretrain_epochs=(1,), instability_alphas=(0.0, 0.5, 1.0),
                       instability_train_examples=32, instability_levels=(0, 1))


def count_calls(exp, monkeypatch) -> int:
    real, calls = exp.trainer.advance, []
    monkeypatch.setattr(exp.trainer, "advance", lambda s, e, c=None, **kw: calls.append(e) or real(s, e, c, **kw))
    study.run_study(exp, TINY_PLAN)
    monkeypatch.setattr(exp.trainer, "advance", real)
    return len(calls)


def test_study_runs_end_to_end_resumes_after_an_interrupt_and_reports_everything(tmp_path, monkeypatch):
    exp = Experiment(with_workdir(tiny_config(augment=False), tmp_path), TINY_DATA)
    out = exp.path(study.descriptor(exp, TINY_PLAN))
    total_calls = count_calls(Experiment(with_workdir(tiny_config(augment=False), tmp_path / "fresh"),
                                         TINY_DATA), monkeypatch)
    assert total_calls > 8
    speed = plans.Speed(0.01, 0.02)
    assert plans.print_plan("tiny", study.pieces(TINY_PLAN, exp, speed), exp, speed) > 0
    real, calls = exp.trainer.advance, []

    def interrupted(states, end, on_chunk=None, **kw):
        calls.append(end)
        if len(calls) == 8:  # somewhere in the middle of the study
            raise KeyboardInterrupt
        return real(states, end, on_chunk, **kw)

    monkeypatch.setattr(exp.trainer, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(exp, TINY_PLAN)
    dense = exp.path(exp.dense)
    finished = {d: os.path.getmtime(os.path.join(d, "result.json"))
                for d, _, files in os.walk(dense) if "result.json" in files}
    assert dense in finished and len(finished) >= 2

    calls.clear()
    monkeypatch.setattr(exp.trainer, "advance", lambda s, e, c=None, **kw: calls.append(e) or real(s, e, c, **kw))
    study.run_study(exp, TINY_PLAN)
    for d, stamp in finished.items():  # nothing finished before the interrupt was redone
        assert os.path.getmtime(os.path.join(d, "result.json")) == stamp
    assert 0 < len(calls) < total_calls

    path = report.write_report(out, "tiny study")
    text = open(path).read()
    for figure in ("fig1_imp.png", "fig3_telemetry.png", "fig4-6_perturbations.png", "instability.png",
                   "fig7_pretraining.png"):
        assert f"({figure})" in text and os.path.getsize(os.path.join(out, figure)) > 10_000
    for heading in ("| level | % weights left", "| step | test acc.", "| level | % left | treatment",
                    "| level | rewind k | test barrier", "| task | pre-training epochs"):
        assert heading in text
    assert "shuffle_layer" in text and "noise 1x" in text
    assert "## What reproduced at this scale" in text and "| finding (paper) |" in text
    assert text.count("**reproduced**") + text.count("**mixed**") + text.count("**not at this scale**") >= 5

    # a finished study trains nothing and restores no checkpoint: every piece is found from JSON
    monkeypatch.setattr(exp.trainer, "advance", lambda *a, **k: pytest.fail("no training"))
    restores = []
    real_restore = checkpoint.Checkpoints.restore
    monkeypatch.setattr(checkpoint.Checkpoints, "restore", lambda *a, **k: restores.append(a[1]) or real_restore(*a, **k))
    os.remove(os.path.join(out, "fig1_imp.png"))
    study.run_study(exp, TINY_PLAN)
    assert restores == []
    assert all(plans.seconds(p, exp, speed) == 0 for p in study.pieces(TINY_PLAN, exp, speed))  # all found done
    report.write_report(out)
    assert os.path.exists(os.path.join(out, "fig1_imp.png"))
    assert open(path).read().startswith("# early-phase study: convnet_tiny on ")  # title from study.json


def test_the_cpu_study_plan_fits_its_preset():
    config, plan = study.study_config("fashion_cpu", {})
    assert config.num_seeds >= 2 and config.prune.fraction > 0
    assert set(plan.perturb_levels) <= set(range(1, plan.levels + 1))
    assert {"shuffle_layer", "reinit_keep_signs"} <= set(plan.treatments)


def test_study_flags_set_the_plans_depth_and_rewind_step():
    _, plan = study.study_config("fashion_cpu", {"levels": "2", "rewind_iters": "20it"})
    assert plan.levels == 2 and plan.perturb_levels == (2,) and plan.rewind == "20it"
    with pytest.raises(study.UserError, match="one rewind step"):
        study.study_config("fashion_cpu", {"rewind_iters": "0it,20it"})


def test_study_folders_differ_by_prune_setting_and_plan_and_are_not_created(tmp_path):
    exp = Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    other = Experiment(with_workdir(tiny_config(fraction=0.5), tmp_path), TINY_DATA)
    dirs = {exp.path(study.descriptor(exp, TINY_PLAN)), other.path(study.descriptor(other, TINY_PLAN)),
            exp.path(study.descriptor(exp, study.Plan()))}
    assert len(dirs) == 3 and not any(os.path.exists(d) for d in dirs)


def test_a_fresh_work_dir_with_an_empty_dense_folder_passes_the_checks(tmp_path):
    """An interrupted first start leaves the dense folder without checkpoints: not 'trained'."""
    exp = Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    os.makedirs(exp.path(exp.dense))
    study.check(TINY_PLAN, exp)
