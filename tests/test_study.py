import os

import pytest

from early_jax import pipeline, report, study
from early_jax.train import Trainer
from helpers import TINY_DATA, tiny_config, with_workdir

TINY_PLAN = study.Plan(rewind="3it", levels=1, perturb_levels=(1,), treatments=("shuffle_layer",),
                       noise_scales=(1.0,), instability_rewinds=("0it", "3it"), telemetry_steps="6it",
                       pretrain_task="blur", pretrain_epochs=(1,), instability_alphas=(0.0, 0.5, 1.0),
                       instability_train_examples=32)


def count_calls(trainer, out, monkeypatch) -> int:
    real, calls = trainer.advance, []
    monkeypatch.setattr(trainer, "advance", lambda s, e, c=None, **kw: calls.append(e) or real(s, e, c, **kw))
    study.run_study(trainer, TINY_PLAN, out)
    monkeypatch.setattr(trainer, "advance", real)
    return len(calls)


def test_study_runs_end_to_end_resumes_after_an_interrupt_and_reports_everything(tmp_path, monkeypatch):
    trainer = Trainer(with_workdir(tiny_config(augment=False), tmp_path), TINY_DATA)
    out = str(tmp_path / "study")
    total_calls = count_calls(Trainer(with_workdir(tiny_config(augment=False), tmp_path / "fresh"),
                                      TINY_DATA), str(tmp_path / "fresh_study"), monkeypatch)
    assert total_calls > 8
    assert study.print_plan(TINY_PLAN, trainer, 0.01) > 0
    real, calls = trainer.advance, []

    def interrupted(states, end, on_chunk=None, **kw):
        calls.append(end)
        if len(calls) == 8:  # somewhere in the middle of the study
            raise KeyboardInterrupt
        return real(states, end, on_chunk, **kw)

    monkeypatch.setattr(trainer, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(trainer, TINY_PLAN, out)
    dense = pipeline.dense_run_dir(trainer)
    finished = {d: os.path.getmtime(os.path.join(d, "result.json"))
                for d, _, files in os.walk(dense.path) if "result.json" in files}
    assert dense.path in finished and len(finished) >= 2

    calls.clear()
    monkeypatch.setattr(trainer, "advance", lambda s, e, c=None, **kw: calls.append(e) or real(s, e, c, **kw))
    study.run_study(trainer, TINY_PLAN, out)
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

    # the report is regenerated from the tables alone, and a finished study trains nothing
    monkeypatch.setattr(trainer, "advance", lambda *a, **k: pytest.fail("no training"))
    os.remove(os.path.join(out, "fig1_imp.png"))
    study.run_study(trainer, TINY_PLAN, out)
    report.write_report(out)
    assert os.path.exists(os.path.join(out, "fig1_imp.png"))
    assert open(path).read().startswith("# early-phase study: convnet_tiny on ")  # title from study.json


def test_the_cpu_study_plan_fits_its_preset():
    config, plan = study.study_config("fashion_cpu", {})
    assert config.num_seeds == 2 and config.train.duration == "2ep" and config.prune.fraction == 0.6
    assert set(plan.perturb_levels) <= set(range(1, plan.levels + 1))
    assert {"shuffle_layer", "shuffle_layer_keep_signs", "reinit_keep_signs"} <= set(plan.treatments)


def test_study_flags_set_the_plans_depth_and_rewind_step():
    _, plan = study.study_config("fashion_cpu", {"levels": "2", "rewind_iters": "20it"})
    assert plan.levels == 2 and plan.perturb_levels == (2,) and plan.rewind == "20it"
    with pytest.raises(study.UserError, match="one rewind step"):
        study.study_config("fashion_cpu", {"rewind_iters": "0it,20it"})


def test_study_folders_differ_by_prune_setting_and_plan_and_are_not_created(tmp_path):
    trainer = Trainer(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    other = Trainer(with_workdir(tiny_config(fraction=0.5), tmp_path), TINY_DATA)
    dirs = {study.study_dir(trainer, TINY_PLAN), study.study_dir(other, TINY_PLAN),
            study.study_dir(trainer, study.Plan())}
    assert len(dirs) == 3 and not any(os.path.exists(d) for d in dirs)


def test_a_fresh_work_dir_with_an_empty_dense_folder_passes_the_checks(tmp_path):
    """An interrupted first start leaves the dense folder without checkpoints: not 'trained'."""
    trainer = Trainer(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    pipeline.dense_run_dir(trainer)  # creates the folder, as any earlier call would
    study.check(TINY_PLAN, trainer)
