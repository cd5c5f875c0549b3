import os

import jax
import numpy as np
import pytest

from early_jax import branches, checkpoint, files, masks, pipeline, tables
from early_jax.errors import UserError
from early_jax.perturb import Treatment
from early_jax.pipeline import Experiment
from early_jax.train import current_step
from helpers import TINY_DATA, tiny_config, with_workdir

K = 3


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    exp = Experiment(with_workdir(tiny_config(), tmp_path_factory.mktemp("branches")), TINY_DATA)
    pipeline.imp(exp, [0, K], levels=2)  # the IMP study the branches come off
    return exp


def counting_advance(exp, monkeypatch):
    starts, real = [], exp.trainer.advance
    monkeypatch.setattr(exp.trainer, "advance", lambda s, e, c=None, stop=None: starts.append(
        (current_step(s), s.step.shape[0])) or real(s, e, c, stop=stop))
    return starts


def test_branches_reuse_imp_and_train_all_rows_from_k_in_one_run(exp, monkeypatch):
    starts = counting_advance(exp, monkeypatch)
    treatments = [Treatment("shuffle_layer_keep_signs"), Treatment("noise", 2.0)]
    rows = branches.run_branches(exp, K, [1, 2], treatments)
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
    assert branches.run_branches(exp, K, [1, 2], treatments) == rows  # finished: reused
    assert not starts
    # another set of rows gets its own folder beside the finished one
    assert exp.path(branches.descriptor(exp, K, [1], treatments)) != exp.path(branches.descriptor(exp, K, [1, 2], treatments))


def test_each_row_starts_from_the_perturbed_rewound_weights_of_its_level(exp):
    mask = pipeline.mask_of(exp, K, 2)
    state_k, state_0 = pipeline.state_at(exp, K), pipeline.state_at(exp, 0)
    states, _ = branches.perturbed_states(exp, state_k, state_0, mask, 2, Treatment("shuffle_layer"))
    rewound = pipeline.rewind(exp, pipeline.state_at(exp, K), mask)
    for seed in range(2):
        one = lambda tree: jax.tree.map(lambda x: x[seed], tree)
        for (w, m), (r, _) in zip(masks.masked_kernels(one(states.params), one(mask)).values(),
                                  masks.masked_kernels(one(rewound.params), one(mask)).values()):
            w, r, m = map(np.asarray, (w, r, m))
            assert np.all(w[~m] == 0) and sorted(w[m]) == sorted(r[m]) and not np.array_equal(w, r)
    np.testing.assert_array_equal(np.asarray(states.step), [K, K])
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(states.opt_state))


def test_renaming_a_treatments_display_label_changes_no_number(exp, monkeypatch):
    mask = pipeline.mask_of(exp, K, 1)
    state_k, state_0 = pipeline.state_at(exp, K), pipeline.state_at(exp, 0)
    before = branches.perturbed_states(exp, state_k, state_0, mask, 1, Treatment("noise", 1.0))[0]
    monkeypatch.setattr(Treatment, "label", property(lambda self: f"Gaussian {self.scale} sigma"))
    after = branches.perturbed_states(exp, state_k, state_0, mask, 1, Treatment("noise", 1.0))[0]
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(a, b)
    # while the stable name does change the draw
    other = branches.perturbed_states(exp, state_k, state_0, mask, 1, Treatment("noise", 1.5))[0]
    assert not np.array_equal(np.asarray(other.params["fc"]["kernel"]), np.asarray(before.params["fc"]["kernel"]))


def test_tables_gather_every_perturbation_finished_at_k(exp, monkeypatch):
    rows, path = branches.run_experiment(exp, K, [1], [Treatment("reinit")], "first")
    rows2, path2 = branches.run_experiment(exp, K, [1], [Treatment("shuffle_layer")], "second")
    assert path == path2
    shown = {r["treatment"] for r in tables.read_csv(path)}
    assert {"reinit", "shuffle_layer", f"control (rewind to {K})", "rewind to 0"} <= shown
    assert os.path.exists(os.path.join(os.path.dirname(path), "perturbations.png"))
    restores = []
    real = checkpoint.Checkpoints.restore
    monkeypatch.setattr(checkpoint.Checkpoints, "restore", lambda *a, **k: restores.append(a[1]) or real(*a, **k))
    assert branches.run_experiment(exp, K, [1], [Treatment("reinit")], "again")[0] == rows
    assert restores == []  # a finished branch is found from its JSON files


def test_references_are_the_imp_rows(exp):
    rows = branches.reference_rows(exp, K, [1, 2])
    assert {r["treatment"] for r in rows} == {f"control (rewind to {K})", "rewind to 0"}


@pytest.mark.parametrize("treatment,match", [(Treatment("shuffle_columns"), "unknown perturbation"),
                                             (Treatment("noise"), "noise needs a finite scale"),
                                             (Treatment("noise", float("nan")), "finite scale")])
def test_bad_treatments_fail_before_training(exp, treatment, match, monkeypatch):
    monkeypatch.setattr(exp.trainer, "advance", lambda *a, **k: pytest.fail("no training"))
    with pytest.raises(UserError, match=match):
        branches.run_experiment(exp, K, [1], [treatment], "bad")


def test_an_empty_treatment_list_fails_before_training(exp, monkeypatch):
    monkeypatch.setattr(exp.trainer, "advance", lambda *a, **k: pytest.fail("no training"))
    with pytest.raises(UserError, match="no perturbation"):
        branches.run_experiment(exp, K, [1], [], "none")


def test_rewind_outside_the_run_fails_before_training(exp):
    with pytest.raises(UserError, match="outside the run"):
        branches.run_experiment(exp, 500, [1], [Treatment("reinit")], "x")
