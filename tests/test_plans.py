"""Plans: what a command will train, priced before any work; finished pieces cost nothing."""
import pytest

from early_jax import branches, pipeline, plans
from early_jax.perturb import Treatment
from early_jax.pipeline import Experiment
from helpers import TINY_DATA, tiny_config, with_workdir


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    exp = Experiment(with_workdir(tiny_config(), tmp_path_factory.mktemp("plans")), TINY_DATA)
    pipeline.imp(exp, [0, 3], 1)  # dense and level 1 at both rewind steps; level 2 is still to train
    return exp


def test_the_perturbation_plan_lists_every_run_and_prices_only_what_is_left(exp, capsys, monkeypatch):
    monkeypatch.setattr(plans, "measure", lambda e: plans.Speed(step_s=0.5, eval_s=1.0))
    treatments = [Treatment("shuffle_layer"), Treatment("noise", 1.0)]
    total = plans.print_perturbation_plan(exp, 3, [1, 2], treatments, "shuffle and noise")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("shuffle and noise: convnet_tiny on synthetic, 2 seed(s), 24 steps")
    lines = {line.split("  ")[1].strip(): line for line in out[1:-1]}
    assert "done (reused)" in lines["dense"] and "done (reused)" in lines["IMP k=3 level 1"]
    for pending in ("IMP k=0 level 2", "IMP k=3 level 2"):
        assert "~" in lines[pending]
    branch = [l for l in out if "perturbed rows" in l][0]
    assert "8 rows x     21 steps" in branch  # 2 levels x 2 treatments x 2 seeds, from k = 3
    # the total is the pieces still to train: 2 IMP levels of 24 and 21 steps, and the branch at 4x
    # the rows of one run, each with its evaluations (every 12 steps) and a compile
    evals = lambda start: len([s for s in range(12, 24, 12) if s > start]) + 1
    expected = ((24 * 0.5 + evals(0)) + (21 * 0.5 + evals(3)) + 4 * (21 * 0.5 + evals(3))
                + plans.COMPILE_S)  # the branch's stacked rows compile a program of their own
    assert total == pytest.approx(expected)
    assert out[-1].strip() == f"estimated total ~{plans.format_seconds(total)}"


def test_a_finished_plan_costs_nothing(exp, capsys):
    branches.run_branches(exp, 3, [1], [Treatment("reinit")])
    pieces = plans.dense_and_imp(exp, [0, 3], 1) + [plans.Piece(
        "branch", branches.descriptor(exp, 3, [1], [Treatment("reinit")]), 2, 3, exp.total_steps)]
    assert plans.print_plan("done", pieces, exp, plans.Speed(1.0, 1.0)) == 0
    assert capsys.readouterr().out.count("done (reused)") == len(pieces)
