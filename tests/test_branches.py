import jax
import numpy as np
import pytest

from early_jax import branches, masks, perturb, pipeline
from early_jax.errors import UserError
from early_jax.train import Trainer, current_step
from helpers import TINY_DATA, tiny_config, with_workdir

K = 3


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    trainer = Trainer(with_workdir(tiny_config(), tmp_path_factory.mktemp("branches")), TINY_DATA)
    pipeline.imp(trainer, [0, K], levels=2)  # the IMP study the branches come off
    return trainer


def test_branches_reuse_imp_and_train_all_rows_from_k_in_one_run(trainer, monkeypatch):
    starts, real = [], trainer.advance
    monkeypatch.setattr(trainer, "advance", lambda s, e, c=None: starts.append(
        (current_step(s), s.step.shape[0])) or real(s, e, c))
    treatments = [branches.Treatment("shuffle_layer_keep_signs"), branches.Treatment("noise", 2.0)]
    rows, out = branches.run_branches(trainer, K, [1, 2], treatments, "test")
    # one stacked run of 2 levels x 2 treatments x 2 seeds, starting at k; no IMP level retrained
    assert starts and all(rows_ == 8 for _, rows_ in starts) and starts[0][0] == K
    assert len(rows) == 8
    assert {(r["level"], r["treatment"]) for r in rows} == {(l, t) for l in (1, 2)
                                                            for t in ("shuffle_layer_keep_signs", "noise 2x")}
    for r in rows:
        assert r["density"] == pytest.approx(0.8 ** r["level"], abs=0.02)
    noise = [r["effective_std"] for r in rows if r["treatment"] == "noise 2x"]
    assert np.allclose(noise, 2.0, atol=0.35)
    starts.clear()
    assert branches.run_branches(trainer, K, [1, 2], treatments, "test") == (rows, out)  # finished: reused
    assert not starts
    # another set of rows gets its own folder beside the finished one (here: stopped before training)
    monkeypatch.setattr(trainer, "advance", lambda *a, **k: pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception):
        branches.run_branches(trainer, K, [1], treatments, "test")
    assert branches.branch_dir(trainer, K, "test", [1], treatments).path != out


def test_each_row_starts_from_the_perturbed_rewound_weights_of_its_level(trainer):
    dense = pipeline.dense_run_dir(trainer)
    mask = branches.level_masks(trainer, K, [2])[2]
    state_k, state_0 = pipeline.state_at(trainer, dense, K), pipeline.state_at(trainer, dense, 0)
    t = branches.Treatment("shuffle_layer")
    states, _ = branches.perturbed_states(trainer, state_k, state_0, mask, 2, t)
    rewound = pipeline.rewind(trainer, pipeline.state_at(trainer, dense, K), mask)
    for seed in range(2):
        one = lambda tree: jax.tree.map(lambda x: x[seed], tree)
        for (w, m), (r, _) in zip(masks.masked_kernels(one(states.params), one(mask)).values(),
                                  masks.masked_kernels(one(rewound.params), one(mask)).values()):
            w, r, m = map(np.asarray, (w, r, m))
            assert np.all(w[~m] == 0) and sorted(w[m]) == sorted(r[m]) and not np.array_equal(w, r)
    np.testing.assert_array_equal(np.asarray(states.step), [K, K])
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(states.opt_state))


def test_references_are_the_imp_rows(trainer):
    rows = branches.reference_rows(trainer, K, [1, 2])
    assert {r["treatment"] for r in rows} == {f"control (rewind to {K})", "rewind to 0"}


@pytest.mark.parametrize("treatment,match", [(branches.Treatment("shuffle_columns"), "unknown perturbation"),
                                             (branches.Treatment("noise"), "noise needs a finite scale"),
                                             (branches.Treatment("noise", float("nan")), "finite scale")])
def test_bad_treatments_fail_before_training(trainer, treatment, match, monkeypatch):
    monkeypatch.setattr(trainer, "advance", lambda *a, **k: pytest.fail("no training"))
    with pytest.raises(UserError, match=match):
        branches.run_experiment(trainer, K, [1], [treatment], "bad", "bad")


def test_an_empty_treatment_list_fails_before_training(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "advance", lambda *a, **k: pytest.fail("no training"))
    with pytest.raises(UserError, match="no perturbation"):
        branches.run_experiment(trainer, K, [1], [], "none", "none")


def test_rewind_outside_the_run_fails_before_training(trainer):
    with pytest.raises(UserError, match="outside the run"):
        branches.run_experiment(trainer, 500, [1], [branches.Treatment("reinit")], "x", "x")
