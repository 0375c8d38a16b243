"""`mmser compare`: paired tests with hand-checked numbers on fake run folders (a real difference and
one within the seed noise), per-class recall and confusion-matrix PNGs, and mmser.stats' pieces."""

from __future__ import annotations

import csv
import itertools
import math

import pytest

from mmser import stats
from mmser.io import atomic_write_json

SESSIONS, SEEDS = (1, 2), (0, 1, 2, 3, 4)
KEYS = [(s, n) for s in SESSIONS for n in SEEDS]  # k = 0..9 in this order


def base(session: int, seed: int) -> float:
    """Experiment A: 0.50..0.54 over the seeds of session 1, 0.60..0.64 of session 2."""
    return 0.50 + 0.10 * (session - 1) + 0.01 * seed


# B = A + 0.050, 0.051, ..., 0.059 (k = 0..9): a real difference, every pair of one sign
REAL = [0.050 + 0.001 * k for k in range(10)]
# C = A + (+1, -2, +3, -4, +5, -6, +7, -8, +9, +10) x 0.001: distinct magnitudes, mean +0.0015
NOISE = [0.001 * v for v in (1, -2, 3, -4, 5, -6, 7, -8, 9, 10)]


def write_experiment(folder, offsets, confusion=((3, 1), (2, 2))):
    for k, (s, n) in enumerate(KEYS):
        ua = base(s, n) + offsets[k]
        atomic_write_json(folder / f"s{s}-seed{n}" / "metrics.json", {
            "test_session": s, "seed": n,
            "test": {"ua": ua, "wa": ua, "macro_f1": ua, "confusion": [list(r) for r in confusion],
                     "classes": ["angry", "sad"]}})


def _seed_var(values):  # ddof 1, written out
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


def test_paired_tests_per_class_recall_and_confusion_pngs_through_the_cli(tmp_path, capsys):
    from mmser.cli import main

    write_experiment(tmp_path / "A", [0.0] * 10)
    write_experiment(tmp_path / "B", REAL, confusion=((4, 0), (1, 3)))
    write_experiment(tmp_path / "C", NOISE)
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), str(tmp_path / "C"), "--out", str(out),
                 "--pair", "A,B", "--pair", "A,C"]) == 0
    md = (out / "comparison.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"

    # Seed noise: A's per-session variance over the seeds is 2.5 x 0.01^2 = 2.5e-4 (0.50..0.54);
    # B's sessions step by 0.011, 2.5 x 0.011^2 = 3.025e-4; sigma = sqrt(mean of the four) = 0.016621.
    sigma_ab = math.sqrt((2 * 2.5e-4 + 2 * 3.025e-4) / 4)
    assert sigma_ab == pytest.approx(0.0166208, abs=1e-7)
    # C's session 1 = .501 .508 .523 .526 .545 (var 2.933e-4), session 2 = .594 .617 .612 .639 .650
    # (var 4.953e-4): sigma = sqrt((2.5e-4 + 2.5e-4 + 2.933e-4 + 4.953e-4) / 4) = 0.017949.
    c1 = [base(1, n) + NOISE[n] for n in SEEDS]
    c2 = [base(2, n) + NOISE[5 + n] for n in SEEDS]
    assert [round(v, 3) for v in c1 + c2] == [.501, .508, .523, .526, .545, .594, .617, .612, .639, .650]
    assert (_seed_var(c1), _seed_var(c2)) == (pytest.approx(2.933e-4), pytest.approx(4.953e-4))
    sigma_ac = math.sqrt((2 * 2.5e-4 + 2.933e-4 + 4.953e-4) / 4)
    assert sigma_ac == pytest.approx(0.017949, abs=1e-6)

    rows = {(r["a"], r["b"]): r for r in csv.DictReader((out / "comparison_paired.csv").open())}
    real, noise = rows[("A", "B")], rows[("A", "C")]
    # A vs B: 10 pairs, mean of 0.050..0.059 = 0.0545; Wilcoxon: all 10 differences positive and
    # distinct, so the exact two-sided p = 2 / 2^10 = 0.001953125; every resampled mean >= 0.050.
    assert int(real["pairs"]) == 10
    assert float(real["mean_diff"]) == pytest.approx(0.0545)
    assert float(real["wilcoxon_p"]) == pytest.approx(2 / 2**10)
    assert 0.050 <= float(real["ci_low"]) < 0.0545 < float(real["ci_high"]) <= 0.059
    assert float(real["seed_noise"]) == pytest.approx(sigma_ab)
    assert real["verdict"] == "B better" and real["within_seed_noise"] == "False"
    # A vs C: mean +0.0015 < sigma 0.017949: within the seed noise. Wilcoxon: W+ = 1+3+5+7+9+10 = 35,
    # W- = 20; 504 of the 1,024 sign patterns of ranks 1..10 have min(W+, W-) <= 20: p = 0.4921875.
    assert float(noise["mean_diff"]) == pytest.approx(0.0015)
    assert float(noise["wilcoxon_p"]) == pytest.approx(504 / 1024)
    assert float(noise["ci_low"]) < 0 < float(noise["ci_high"])
    assert float(noise["seed_noise"]) == pytest.approx(sigma_ac)
    assert noise["within_seed_noise"] == "True" and noise["verdict"] == "not significant"
    assert "| A | B | 10 | +5.45 | [+5." in md and "| 0.00195 | 1.66 | no | B better |" in md
    assert "| A | C | 10 | +0.15 | [-" in md and "| 0.492 | 1.79 | yes | not significant |" in md
    assert "| B | C |" not in md  # only the pairs asked for

    # Per-class recall from the confusion matrices summed over the 10 runs: A [[30, 10], [20, 20]]
    # -> angry 75.0, sad 50.0, UA 62.5 over 80 utterances; B [[40, 0], [10, 30]] -> 100.0, 75.0.
    assert "| A | 75.0 | 50.0 | 62.5 | 80 |" in md
    assert "| B | 100.0 | 75.0 | 87.5 | 80 |" in md
    for name in "ABC":
        assert (out / f"confusion_{name}.png").stat().st_size > 0


def test_exact_wilcoxon_matches_a_count_over_every_sign_pattern():
    ranks = range(1, 11)
    count = sum(1 for signs in itertools.product((0, 1), repeat=10)
                if min(w := sum(r for r, s in zip(ranks, signs, strict=True) if s), 55 - w) <= 20)
    assert count == 504
    assert stats.wilcoxon_p(NOISE) == pytest.approx(count / 1024)


def test_paired_test_edge_cases_and_reproducible_bootstrap():
    a = {(1, 0): 0.5, (1, 1): 0.6, (2, 0): 0.7}
    b = {(1, 0): 0.6, (2, 1): 0.9}
    t = stats.paired_test(a, b)
    assert t.n_pairs == 1 and t.verdict == "too few shared (session, seed) runs" and t.p_value is None
    same = stats.paired_test(a, dict(a))
    assert same.mean_diff == 0 and same.p_value == 1.0 and same.within_noise and same.verdict == "not significant"
    # one seed per session: the seed noise is undefined, so no "within noise" verdict
    one_seed = {(s, 0): 0.5 for s in (1, 2, 3)}
    t = stats.paired_test(one_seed, {k: v + 0.1 for k, v in one_seed.items()})
    assert t.seed_noise is None and t.within_noise is None
    assert t.verdict == "not significant"  # 3 pairs of one sign: exact p = 2/8 = 0.25
    assert t.p_value == pytest.approx(0.25)
    assert stats.bootstrap_ci(REAL, seed=3) == stats.bootstrap_ci(REAL, seed=3)
    assert stats.seed_noise({(1, 0): 0.5}) is None


def test_compare_refuses_an_unknown_pair_name(tmp_path, capsys):
    from mmser.cli import main

    write_experiment(tmp_path / "A", [0.0] * 10)
    write_experiment(tmp_path / "B", REAL)
    assert main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "o"),
                 "--pair", "A,X"]) == 2
    assert "no experiment named 'X'" in capsys.readouterr().err


def test_demo_pairs_each_fusion_experiment_with_the_best_single_modality(tmp_path):
    from mmser.demo import fusion_vs_best_single
    from mmser.report import collect, write_summary

    write_experiment(tmp_path / "vft", [0.0] * 10)  # UA avg 0.57
    write_experiment(tmp_path / "text-gold", REAL)  # avg 0.6245: the best single modality
    write_experiment(tmp_path / "fusion-concat-gold", [r + 0.01 for r in REAL])
    write_experiment(tmp_path / "fusion-xattn-gold", NOISE)
    write_experiment(tmp_path / "whisper-concat-asr", NOISE)  # a fusion row whose name is not fusion-*
    names = ("vft", "text-gold", "fusion-concat-gold", "fusion-xattn-gold", "whisper-concat-asr")
    results = [collect(tmp_path / n) for n in names]
    pairs = fusion_vs_best_single(results)
    assert pairs == [("text-gold", "fusion-concat-gold"), ("text-gold", "fusion-xattn-gold"),
                     ("text-gold", "whisper-concat-asr")]
    results, pairs = results[:4], pairs[:2]
    md = write_summary(results, tmp_path, stem="comparison", pairs=pairs)
    # fusion-concat = text-gold + 0.01 on every pair: +1.00 point, all 10 of one sign (p = 2/1024), a
    # consistent gain, yet smaller than the seed noise: both experiments step by 0.011 over the seeds
    # of each session, sigma = 0.011 x sqrt(2.5) = 1.74 points. Both marks are shown.
    assert "| text-gold | fusion-concat-gold | 10 | +1.00 | [+1.00, +1.00] | 0.00195 | 1.74 | yes | " \
           "fusion-concat-gold better |" in md
    assert "| vft | text-gold |" not in md
