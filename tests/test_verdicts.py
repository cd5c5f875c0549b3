"""The report's verdicts, on hand-made tables whose answer is known."""
import pytest

from early_jax import verdicts as v


def imp_rows(acc_0, acc_k, k=50, level=3):
    rows = []
    for rewind, accs in ((0, acc_0), (k, acc_k)):
        for seed, acc in enumerate(accs):
            rows += [{"seed": seed, "rewind": rewind, "level": level, "density": 0.064, "accuracy": acc},
                     {"seed": seed, "rewind": rewind, "level": 0, "density": 1.0, "accuracy": 0.90}]
    return rows


DENSE = [{"seed": s, "level": 0, "accuracy": a} for s, a in enumerate((0.900, 0.902, 0.898))]


def test_rewinding_verdicts_reproduced_not_and_mixed():
    clear = v.rewinding(imp_rows([0.85, 0.86, 0.855], [0.90, 0.905, 0.895]), DENSE)
    assert [x.verdict for x in clear] == [v.REPRODUCED, v.REPRODUCED]
    assert "k=50" in clear[0].numbers and "6.4% left" in clear[0].numbers
    same = v.rewinding(imp_rows([0.91, 0.915, 0.905], [0.91, 0.915, 0.905]), DENSE)
    assert same[0].verdict == v.NOT  # no difference at all
    assert same[1].verdict == v.NOT  # and k = 0 beats the dense network
    noisy = v.rewinding(imp_rows([0.85, 0.90, 0.80], [0.86, 0.91, 0.81]), DENSE)
    assert noisy[0].verdict == v.MIXED  # the right direction, within the noise
    worse = v.rewinding(imp_rows([0.90, 0.905, 0.895], [0.85, 0.86, 0.855]), DENSE)
    assert worse[0].verdict == v.NOT


def perturbation_rows(control, zero, treatments: dict, level=2, k=50):
    rows = []
    for name, accs in ({f"control (rewind to {k})": control, "rewind to 0": zero} | treatments).items():
        eff = 0.0 if name.startswith("control") else float(name.split()[1][:-1]) if name.startswith("noise") else 1.5
        rows += [{"seed": s, "level": level, "treatment": name, "accuracy": a, "effective_std": eff}
                 for s, a in enumerate(accs)]
    return rows


def by_finding(result, text):
    [match] = [x for x in result if text in x.finding]
    return match


def test_perturbation_verdicts():
    control, zero = [0.90, 0.902, 0.898], [0.85, 0.852, 0.848]
    rows = perturbation_rows(control, zero, {
        "reinit_keep_signs": [0.851, 0.853, 0.849],   # all of the benefit lost
        "shuffle_layer": [0.89, 0.892, 0.888],         # most of it kept: only mixed
        "noise 1x": [0.89, 0.891, 0.889], "noise 3x": [0.86, 0.862, 0.858]})
    result = v.perturbations(rows, 50)
    assert by_finding(result, "Signs are not enough").verdict == v.REPRODUCED
    assert by_finding(result, "within layers").verdict == v.MIXED
    assert by_finding(result, "More Gaussian noise").verdict == v.REPRODUCED
    # reinit (eff. std 1.5) sits near the curve between 1x and 3x only if its accuracy is ~0.88
    assert by_finding(result, "matching effective std").verdict == v.NOT
    no_benefit = v.perturbations(perturbation_rows(zero, control, {"reinit_keep_signs": zero}), 50)
    assert by_finding(no_benefit, "Signs are not enough").verdict == v.NOT
    assert "no benefit" in by_finding(no_benefit, "Signs are not enough").numbers


def test_effective_std_lines_up_when_the_damage_matches_the_noise_curve():
    rows = perturbation_rows([0.90] * 3, [0.85] * 3, {
        "shuffle_layer": [0.874, 0.875, 0.876],  # at effective std 1.5
        "noise 1x": [0.89, 0.891, 0.889], "noise 3x": [0.83, 0.832, 0.828]})
    # the noise curve at 1.5: 0.89 + (0.83 - 0.89) * 0.25 = 0.875
    assert by_finding(v.perturbations(rows, 50), "matching effective std").verdict == v.REPRODUCED


def barrier_rows(values: dict, level=0):
    return [{"seed": s, "rewind": k, "level": level, "split": "test", "barrier": b}
            for k, bs in values.items() for s, b in enumerate(bs)]


def test_instability_verdicts_per_level():
    rows = barrier_rows({0: [0.05, 0.06, 0.04], 50: [0.002, 0.001, 0.003]}) \
        + barrier_rows({0: [0.01, 0.002, 0.02], 50: [0.005, 0.004, 0.006]}, level=3)
    dense, sparse = v.instability(rows)
    assert dense.verdict == v.REPRODUCED and "dense" in dense.finding
    assert sparse.verdict == v.MIXED and "level 3" in sparse.finding
    flat = v.instability(barrier_rows({0: [0.001] * 3, 50: [0.001] * 3}))
    assert flat[0].verdict == v.NOT


def test_diverged_seeds_are_left_out_of_every_verdict():
    rows = imp_rows([0.85, 0.86, 0.855], [0.90, 0.905, 0.895])
    rows.append({"seed": 9, "rewind": 50, "level": 3, "density": 0.064, "accuracy": 0.1, "diverged": True})
    assert v.rewinding(rows, DENSE)[0].verdict == v.REPRODUCED


def test_the_markdown_table_has_a_row_per_verdict():
    result = v.rewinding(imp_rows([0.85] * 3, [0.9] * 3), DENSE)
    table = v.markdown(result)
    assert table.count("\n") == 1 + len(result) and "**reproduced**" in table


@pytest.mark.parametrize("parts,expected", [([v.REPRODUCED] * 2, v.REPRODUCED), ([v.NOT] * 2, v.NOT),
                                            ([v.REPRODUCED, v.NOT], v.MIXED), ([v.MISSING, v.NOT], v.MISSING)])
def test_combining_parts(parts, expected):
    assert v.combine(parts) == expected
