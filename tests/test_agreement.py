"""Agreement between sources (issue 11), checked against published worked examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.experiment import load_experiment
from simulator.scoring.agreement import compute
from simulator.scoring.definition import parse_scorers
from simulator.store import Score, Store

ROOT = Path(__file__).resolve().parent.parent

# Wikipedia, "Cohen's kappa", worked example: 50 grant proposals read by A and B;
# both Yes 20, A Yes / B No 5, A No / B Yes 10, both No 15: p_o = 0.70, kappa = 0.40.
# https://en.wikipedia.org/wiki/Cohen%27s_kappa#Simple_example
WIKIPEDIA = [("Yes", "Yes")] * 20 + [("Yes", "No")] * 5 + [("No", "Yes")] * 10 + [("No", "No")] * 15

# Krippendorff, K. (2011). Computing Krippendorff's Alpha-Reliability. Annenberg School for
# Communication, University of Pennsylvania, section C ("nominal data, any number of
# observers, missing data"): 4 observers, 12 units, values 1-5 (None: no answer).
# Published: alpha nominal 0.743 (and 0.815 ordinal, 0.849 interval, 0.797 ratio).
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]

YES_NO = parse_scorers(
    {"goal": {"kind": "judge", "rubric": "?", "answer": "choice", "labels": ["Yes", "No"]}}, "t"
)[0]
CODES = parse_scorers(
    {"code": {"kind": "judge", "rubric": "?", "answer": "choice", "labels": list("12345")}}, "t"
)[0]
SCALE = parse_scorers({"code": {"kind": "judge", "rubric": "?", "answer": "scale",
                                "scale": [1, 5]}}, "t")[0]  # fmt: skip


def score(item: int, source: str, value, scorer: str = "goal", experiment: str = "e") -> Score:
    return Score(f"c{item:03d}", "", scorer, "v1", source, value, experiment_id=experiment)


def wikipedia_scores(experiment: str = "e") -> list[Score]:
    out = []
    for i, (a, b) in enumerate(WIKIPEDIA):
        out += [score(i, "human:a", a, experiment=experiment),
                score(i, "human:b", b, experiment=experiment)]  # fmt: skip
    return out


def krippendorff_scores(scorer: str = "code") -> list[Score]:
    return [
        score(unit, f"human:o{obs}", value, scorer)
        for obs, row in enumerate(KRIPPENDORFF_2011, start=1)
        for unit, value in enumerate(row)
        if value is not None
    ]


def test_cohens_kappa_of_wikipedias_worked_example():
    result = compute(wikipedia_scores(), scorer=YES_NO)
    (pair,) = result.pairs
    assert (pair.a, pair.b, pair.items) == ("human:a", "human:b", 50)
    assert round(pair.percent, 3) == 70.0
    assert round(pair.kappa, 3) == 0.400
    assert pair.confusion == [[20, 5], [10, 15]]  # rows a, columns b, in label order


def test_krippendorffs_alpha_of_the_2011_worked_example():
    nominal = compute(krippendorff_scores(), scorer=CODES)
    assert round(nominal.alpha, 3) == 0.743
    assert nominal.items == 11  # unit 12 has one answer only
    assert len(nominal.pairs) == 6
    ordinal = compute(krippendorff_scores(), ordinal=True, scorer=SCALE)
    assert SCALE.ordinal and round(ordinal.alpha, 3) == 0.815


def test_weighted_kappa_for_ordered_answers_counts_near_misses():
    # 1 vs 2 is closer than 1 vs 5: linear weights give partial credit, unweighted none.
    near = [score(i, "a", 1 + i % 4) for i in range(40)] + [
        score(i, "b", 2 + i % 4) for i in range(40)
    ]
    weighted = compute(near, ordinal=True, scorer=SCALE).pairs[0].kappa
    plain = compute(near, ordinal=False, scorer=SCALE).pairs[0].kappa
    assert weighted is not None and plain is not None and weighted > plain


def test_invalid_answers_and_single_source_items_are_left_out():
    scores = wikipedia_scores() + [
        Score("c999", "", "goal", "v1", "human:a", "Yes"),
        Score("c998", "", "goal", "v1", "human:a", None, valid=False),
    ]
    assert compute(scores, scorer=YES_NO).pairs[0].items == 50
    same = [score(i, s, "Yes") for i in range(5) for s in ("a", "b")]
    result = compute(same, scorer=YES_NO)
    assert result.pairs[0].percent == 100.0
    assert result.pairs[0].kappa is None  # one answer only: kappa is undefined, not 1


def test_agreement_command_prints_pairs_alpha_and_confusion(db, settings, env_for):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(ROOT / "experiments" / "prison.yaml"))
    scores = wikipedia_scores(exp.id or "")
    scores += [  # a judge agreeing with a on the first 10 items
        Score(s.conversation_id, "", "goal", "v1", "judge:openai/gpt-4o-mini", s.value,
              experiment_id=exp.id or "")
        for s in scores[:20] if s.source == "human:a"
    ]  # fmt: skip
    store.replace_scores(scores)
    result = CliRunner().invoke(
        app, ["agreement", exp.id or "", "--scorer", "goal", "--confusion"], env=env_for(settings)
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    pair = next(line for line in lines if line.startswith("human:a") and "human:b" in line)
    assert pair.split()[-3:] == ["50", "70.0%", "0.400"]
    judge = next(line for line in lines if "judge:openai/gpt-4o-mini" in line and "human:a" in line)
    assert judge.split()[-3:-1] == ["10", "100.0%"]
    assert "Krippendorff's alpha (nominal), all sources:" in result.output
    assert "human:a (rows) x human:b (columns)" in result.output

    result = CliRunner().invoke(
        app, ["agreement", exp.id or "", "--scorer", "nothing"], env=env_for(settings)
    )
    assert result.exit_code == 1 and "No scores of nothing" in result.output


@pytest.mark.parametrize("report", ["thirds"])
def test_turn_thirds_are_ordinal(report):
    scorer = parse_scorers(
        {"t": {"kind": "judge", "rubric": "?", "answer": "turn", "report": report}}, "x"
    )[0]
    assert scorer.ordinal
    scores = [score(i, "a", "first") for i in range(3)] + [
        score(i, "b", "second") for i in range(3)
    ]
    assert compute(scores, ordinal=True, scorer=scorer).categories == ["first", "second"]
