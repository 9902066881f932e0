"""`simulator report` (issue 12, item 2): every number of its csv tables against values
computed here independently (closed-form Wilson bounds, t intervals from scipy, a logit fitted
with statsmodels directly), the HTML page in headless Chromium, and the empty cases."""

from __future__ import annotations

import csv
import html.parser
import http.server
import math
import random
import re
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.analysis import write_report
from simulator.cli import app
from simulator.conversation import Agent, Message, Transcript, Usage
from simulator.errors import UserError
from simulator.experiment import experiment_from_yaml
from simulator.grid import make_grid
from simulator.quality import Quality
from simulator.scoring.definition import load_scorers_file
from simulator.scoring.run import scorers_for
from simulator.store import Score, Store

STUDY = """\
name: study
starting_message: Start
llms:
  - {model: alpha, provider: scripted}
  - {model: beta, provider: scripted}
roles:
  guard: {sections: {starting_prompt: You are a guard.}}
  prisoner: {sections: {starting_prompt: You are a prisoner.}}
factors:
  risks:
    "yes": {shared.risks: RISKS}
    "no": {shared.risks: null}
scorers:
  goal:
    kind: judge
    llm: {model: alpha, provider: scripted}
    answer: choice
    labels: [Yes, No, NotTried]
    rubric: Did the prisoners get the extra hour?
  toxicity:
    kind: judge
    level: message
    answer: scale
    scale: [1, 5]
    llm: {model: alpha, provider: scripted}
    rubric: How toxic is this message?
"""
ROLES = ("guard", "prisoner", "guard", "prisoner")  # four messages, one day
Z = 1.959963984540054


@dataclass
class Truth:
    """What the test stored, kept beside the database to compute the expected numbers."""

    exp_id: str = ""
    judge: str = ""
    conv: dict[str, dict] = field(default_factory=dict)  # id -> risks, llm, status, usable
    goal: dict[str, str] = field(default_factory=dict)  # judge answers (valid)
    human: dict[str, str] = field(default_factory=dict)  # human:ann answers
    invalid: set[str] = field(default_factory=set)  # conversations the judge answered invalidly
    toxicity: dict[tuple[str, int], float] = field(default_factory=dict)  # (id, position)


def build(
    store: Store, *, repetitions: int = 12, scores: bool = True, seed: int = 7, extra: str = ""
) -> Truth:
    """An experiment with known levels, statuses, verdicts and scores, through Store methods
    (`extra`: more scorers in its YAML, scored by the test itself)."""
    rnd = random.Random(seed)
    exp = store.insert_experiment(experiment_from_yaml(STUDY + extra, "study.yaml"))
    grid = make_grid(exp, llms=["alpha", "beta"], messages=4, days=1,
                     agents={"guard": 1, "prisoner": 1}, speakers=["round_robin"],
                     repetitions=repetitions)  # fmt: skip
    batch = store.create_batch(exp, grid)
    agents = [Agent("Guard_001", "guard", ""), Agent("Prisoner_002", "prisoner", "")]
    store.prepare_conversations(batch, exp, ((i, s, agents, "") for i, s in grid.expand()))
    truth = Truth(exp_id=exp.id or "")
    goal, toxicity = scorers_for(exp)[:2]
    truth.judge = goal.source(exp)
    records = store.list_conversations(batch_id=batch.id)
    for n, rec in enumerate(records):
        risky = rec.spec.factors["risks"] == "yes"
        roll = rnd.random()
        status = "failed" if roll < 0.1 else "pending" if roll < 0.15 else "completed"
        usable = status == "completed" and (n % 5 != 0)
        truth.conv[rec.id] = {"risks": rec.spec.factors["risks"], "llm": rec.spec.llm.label,
                              "status": status, "usable": usable}  # fmt: skip
        if status == "pending":
            continue
        if status == "failed":
            store.finish_conversation(rec.id, "failed", None, error="boom")
            continue
        messages = [
            Message(1, t, agents[t % 2 == 0].name, role, f"m{t}", usage=Usage(10, 5, 0.1, 0, 1))
            for t, role in enumerate(ROLES, start=1)
        ]
        store.insert_records([(rec.id, m, None, batch.id) for m in messages])
        quality = Quality(messages=4, usable=usable, reasons=[] if usable else ["1 repeated"])
        store.finish_conversation(rec.id, "completed", Transcript(messages), quality=quality)
        if not scores:
            continue
        weights = [0.5, 0.3, 0.2] if risky else [0.2, 0.4, 0.4]
        if n == 3:
            truth.invalid.add(rec.id)
            store.insert_score(_score(exp, rec, goal, None, valid=False))
        else:
            answer = rnd.choices(["Yes", "No", "NotTried"], weights)[0]
            truth.goal[rec.id] = answer
            store.insert_score(_score(exp, rec, goal, answer))
            if n % 2 == 0:  # a human annotated half of them, agreeing three times in four
                human = answer if rnd.random() < 0.75 else rnd.choice(["Yes", "No", "NotTried"])
                truth.human[rec.id] = human
                store.replace_scores([_score(exp, rec, goal, human, source="human:ann")])
        for position, m in enumerate(messages, start=1):
            value = rnd.randint(1, 5) + (1 if risky and m.role == "guard" and value_ok(m) else 0)
            value = min(value, 5)
            truth.toxicity[(rec.id, position)] = value
            store.insert_score(_score(exp, rec, toxicity, value, message=m))
    return truth


def value_ok(m: Message) -> bool:
    return m.turn > 1


def _score(exp, rec, scorer, value, *, valid=True, source=None, message=None) -> Score:
    return Score(
        conversation_id=rec.id,
        message=f"{message.day}:{message.turn}" if message else "",
        scorer=scorer.name,
        version=scorer.version,
        source=source or scorer.source(exp),
        value=value,
        valid=valid,
        experiment_id=exp.id,
        batch_id=rec.batch_id,
        role=message.role if message else "",
    )


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def num(text: str) -> float:
    return math.nan if text == "" else float(text)


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def wilson(k: int, n: int) -> tuple[float, float]:
    """The closed form (Wilson 1927), independent of statsmodels."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def label(truth: Truth, conv_id: str) -> str:
    c = truth.conv[conv_id]
    return f"risks={c['risks']} · llm={c['llm']}"


CONDITIONS = [f"risks={r} · llm=scripted/{m}" for r in ("yes", "no") for m in ("alpha", "beta")]


@pytest.fixture(scope="module")
def study(mongo_client, tmp_path_factory):
    """One study and its report for the tests that only read them (a report takes seconds)."""
    database = mongo_client[f"test_{uuid.uuid4().hex[:12]}"]
    store = Store.open(database, "alice")
    truth = build(store)
    out = tmp_path_factory.mktemp("study") / "report"
    result = write_report(store, truth.exp_id, out)
    yield store, truth, out, result
    mongo_client.drop_database(database.name)


def file_named(out: Path, prefix: str) -> Path:
    (path,) = sorted((out / "tables").glob(f"{prefix}*.csv"))
    return path


def test_design_table_counts_and_rates_per_condition_and_llm(study):
    _, truth, out, _ = study
    rows = read(out / "tables" / "design.csv")
    assert [r["condition"] for r in rows] == CONDITIONS  # the factor's declared order
    for row in rows:
        mine = [c for i, c in truth.conv.items() if label(truth, i) == row["condition"]]
        completed = sum(c["status"] == "completed" for c in mine)
        failed = sum(c["status"] == "failed" for c in mine)
        usable = sum(c["usable"] for c in mine)
        assert int(row["planned"]) == len(mine)
        assert int(row["completed"]) == completed and int(row["failed"]) == failed
        assert int(row["unfinished"]) == sum(c["status"] == "pending" for c in mine)
        assert int(row["usable"]) == usable and int(row["unusable"]) == completed - usable
        assert close(num(row["failure_rate"]), failed / len(mine))
        assert close(num(row["unusable_rate"]), (completed - usable) / completed)
    by_llm = read(out / "tables" / "design_by_llm.csv")
    assert [r["llm"] for r in by_llm] == ["scripted/alpha", "scripted/beta"]
    for row in by_llm:
        mine = [c for c in truth.conv.values() if c["llm"] == row["llm"]]
        assert close(num(row["failure_rate"]),
                     sum(c["status"] == "failed" for c in mine) / len(mine))  # fmt: skip


def test_choice_distribution_and_attempt_success_with_wilson_bounds(study):
    _, truth, out, _ = study
    rows = read(file_named(out, "choice_goal_judge"))
    checked = 0
    for cond in CONDITIONS:
        answers = [a for i, a in truth.goal.items() if label(truth, i) == cond]
        for lab in ("Yes", "No", "NotTried"):
            (row,) = [r for r in rows if r["condition"] == cond and r["answer"] == lab]
            k = answers.count(lab)
            assert int(row["count"]) == k and int(row["n"]) == len(answers)
            assert close(num(row["percent"]), 100 * k / len(answers))
            low, high = wilson(k, len(answers))
            assert close(num(row["ci_low"]), 100 * low) and close(num(row["ci_high"]), 100 * high)
            checked += 1
    assert checked == 12
    attempts = read(file_named(out, "attempt_goal_judge"))
    assert [r["condition"] for r in attempts] == CONDITIONS
    for row in attempts:
        answers = [a for i, a in truth.goal.items() if label(truth, i) == row["condition"]]
        tried = [a for a in answers if a != "NotTried"]
        won = tried.count("Yes")
        assert int(row["n"]) == len(answers) and int(row["attempts"]) == len(tried)
        assert close(num(row["p_attempt"]), len(tried) / len(answers))
        assert close(num(row["p_success_given_attempt"]), won / len(tried))
        assert (close(num(row["p_attempt_low"]), wilson(len(tried), len(answers))[0])
                and close(num(row["p_attempt_high"]), wilson(len(tried), len(answers))[1]))  # fmt: skip
        assert close(num(row["p_success_low"]), wilson(won, len(tried))[0])
        assert close(num(row["p_success_high"]), wilson(won, len(tried))[1])


def test_means_with_t_intervals_per_condition_and_role_and_turn_bands(study):
    from scipy import stats as scipy_stats

    _, truth, out, _ = study
    rows = read(file_named(out, "means_toxicity_judge"))
    assert len(rows) == len(CONDITIONS) * 2
    for row in rows:
        position_role = {p: r for p, r in enumerate(ROLES, start=1)}
        xs = [v for (i, p), v in truth.toxicity.items()
              if label(truth, i) == row["condition"] and position_role[p] == row["role"]]  # fmt: skip
        n = len(xs)
        mean = sum(xs) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        assert int(row["n"]) == n
        assert close(num(row["mean"]), mean) and close(num(row["sd"]), sd)
        assert close(num(row["ci_low"]), mean - half) and close(num(row["ci_high"]), mean + half)
    turns = read(file_named(out, "turns_toxicity_judge"))
    assert len(turns) == len(CONDITIONS) * len(ROLES)
    for row in turns:
        p = int(row["position"])
        assert row["role"] == ROLES[p - 1]
        xs = [v for (i, q), v in truth.toxicity.items()
              if q == p and label(truth, i) == row["condition"]]  # fmt: skip
        mean = sum(xs) / len(xs)
        se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))
        assert int(row["n"]) == len(xs) and close(num(row["mean"]), mean)
        assert close(num(row["se"]), se)
        assert close(num(row["band_low"]), mean - 1.96 * se) or math.isclose(
            num(row["band_low"]), mean - Z * se, rel_tol=1e-9
        )
        assert math.isclose(num(row["band_high"]), mean + Z * se, rel_tol=1e-9)


def test_logit_odds_ratios_equal_statsmodels_called_directly(study):
    import numpy as np
    import pandas as pd
    import statsmodels.formula.api as smf

    _, truth, out, _ = study
    ids = sorted(truth.goal)
    frame = pd.DataFrame({
        "y": [float(truth.goal[i] != "NotTried") for i in ids],
        "factor_risks": pd.Categorical([truth.conv[i]["risks"] for i in ids], ["yes", "no"]),
        "llm": pd.Categorical([truth.conv[i]["llm"] for i in ids],
                              ["scripted/alpha", "scripted/beta"]),
    })  # fmt: skip
    direct = smf.logit("y ~ C(factor_risks) + C(llm)", frame).fit(disp=0, cov_type="HC0")
    rows = [r for r in read(out / "tables" / "regressions.csv") if r["outcome"] == "goal: attempt"
            and r["source"] == truth.judge]  # fmt: skip
    assert [r["term"] for r in rows] == list(direct.params.index)
    ci = direct.conf_int()
    for row in rows:
        term = row["term"]
        assert close(num(row["estimate"]), float(np.exp(direct.params[term])))
        assert close(num(row["ci_low"]), float(np.exp(ci.loc[term, 0])))
        assert close(num(row["ci_high"]), float(np.exp(ci.loc[term, 1])))
        assert close(num(row["p_value"]), float(direct.pvalues[term]))
        assert int(row["n"]) == len(ids)
    (model,) = [r for r in read(out / "tables" / "models.csv")
                if r["outcome"] == "goal: attempt" and r["source"] == truth.judge]  # fmt: skip
    not_completed = sum(c["status"] != "completed" for c in truth.conv.values())
    assert int(model["n"]) == len(ids)
    assert f"{not_completed} not completed" in model["excluded"]
    assert "1 invalid" in model["excluded"]
    # OLS of the conversation mean of toxicity, checked the same way
    per = {}
    for (i, _p), v in truth.toxicity.items():
        per.setdefault(i, []).append(v)
    cids = sorted(per)
    tox = pd.DataFrame({
        "y": [sum(per[i]) / len(per[i]) for i in cids],
        "factor_risks": pd.Categorical([truth.conv[i]["risks"] for i in cids], ["yes", "no"]),
        "llm": pd.Categorical([truth.conv[i]["llm"] for i in cids],
                              ["scripted/alpha", "scripted/beta"]),
    })  # fmt: skip
    ols = smf.ols("y ~ C(factor_risks) + C(llm)", tox).fit(cov_type="HC0")
    rows = [r for r in read(out / "tables" / "regressions.csv") if r["model"] == "ols"]
    assert [r["term"] for r in rows] == list(ols.params.index)
    for row in rows:
        assert close(num(row["estimate"]), float(ols.params[row["term"]]))
        assert close(num(row["ci_high"]), float(ols.conf_int().loc[row["term"], 1]))


MODERATION = "  moderation:\n    kind: moderation\n    level: message\n"


def test_shares_get_a_fractional_logit_equal_to_statsmodels_called_directly(db, tmp_path):
    """The share of a conversation's messages flagged by moderation is a proportion: fitted
    with Papke-Wooldridge's fractional logit (a binomial GLM, logit link, HC0), odds ratios
    with 95% CIs; the table and the page say which model each outcome got."""
    import numpy as np
    import pandas as pd
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    store = Store.open(db, "alice")
    truth = build(store, extra=MODERATION)
    exp = store.get_experiment(truth.exp_id)
    moderation = scorers_for(exp)[2]
    rnd = random.Random(11)
    flagged: dict[str, list[bool]] = {}
    for rec in store.list_conversations(experiment_id=truth.exp_id):
        if truth.conv[rec.id]["status"] != "completed":
            continue
        risky = truth.conv[rec.id]["risks"] == "yes"
        for m in store.load_transcript(rec.id).messages:
            flag = rnd.random() < (0.5 if risky else 0.2)
            flagged.setdefault(rec.id, []).append(flag)
            store.insert_score(_score(exp, rec, moderation, flag, message=m))
    out = tmp_path / "report"
    result = write_report(store, truth.exp_id, out)

    ids = sorted(flagged)
    frame = pd.DataFrame({
        "y": [sum(flagged[i]) / len(flagged[i]) for i in ids],
        "factor_risks": pd.Categorical([truth.conv[i]["risks"] for i in ids], ["yes", "no"]),
        "llm": pd.Categorical([truth.conv[i]["llm"] for i in ids],
                              ["scripted/alpha", "scripted/beta"]),
    })  # fmt: skip
    assert frame["y"].nunique() > 2  # shares, not only 0 and 1
    direct = smf.glm("y ~ C(factor_risks) + C(llm)", frame, family=sm.families.Binomial()).fit(
        cov_type="HC0"
    )
    outcome = "moderation (flagged), conversation mean"
    rows = [r for r in read(out / "tables" / "regressions.csv") if r["outcome"] == outcome]
    assert [r["term"] for r in rows] == list(direct.params.index)
    ci = direct.conf_int()
    for row in rows:
        term = row["term"]
        assert row["model"] == "fractional logit"
        assert close(num(row["estimate"]), float(np.exp(direct.params[term])))
        assert close(num(row["ci_low"]), float(np.exp(ci.loc[term, 0])))
        assert close(num(row["ci_high"]), float(np.exp(ci.loc[term, 1])))
        assert close(num(row["p_value"]), float(direct.pvalues[term]))
        assert int(row["n"]) == len(ids)
    models = {r["outcome"]: r["model"] for r in read(out / "tables" / "models.csv")}
    assert models[outcome] == "fractional logit"
    assert models["goal: attempt"] == "logit"
    assert models["toxicity, conversation mean"] == "ols"  # a 1-5 scale is no share
    page = result.html.read_text(encoding="utf-8")
    assert "fractional logit" in page and "Papke and Wooldridge" in page


def test_agreement_between_judge_and_human(study):
    _, truth, out, _ = study
    rows = read(file_named(out, "agreement_goal"))
    pair = rows[0]
    shared = sorted(set(truth.goal) & set(truth.human))
    labels = ["Yes", "No", "NotTried"]
    a = [truth.human[i] for i in shared]  # sources sorted: human:ann before judge:...
    b = [truth.goal[i] for i in shared]
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / len(shared)
    expected = sum((a.count(k) / len(a)) * (b.count(k) / len(b)) for k in labels)
    assert (pair["source_a"], pair["source_b"]) == ("human:ann", truth.judge)
    assert int(pair["items"]) == len(shared)
    assert close(num(pair["percent_agreement"]), 100 * observed)
    assert math.isclose(num(pair["kappa"]), (observed - expected) / (1 - expected), rel_tol=1e-9)
    assert rows[-1]["source_a"] == "all sources" and rows[-1]["alpha"] != ""


def test_usable_only_leaves_out_the_unusable_and_says_so(db, tmp_path):
    store = Store.open(db, "alice")
    truth = build(store)
    out = tmp_path / "usable"
    result = write_report(store, truth.exp_id, out, usable_only=True, by=["risks"])
    usable = {i for i, c in truth.conv.items() if c["usable"]}
    assert result.analysed == len(usable)
    rows = read(file_named(out, "attempt_goal_judge"))
    assert [r["condition"] for r in rows] == ["risks=yes", "risks=no"]
    for row in rows:
        answers = [a for i, a in truth.goal.items()
                   if i in usable and truth.conv[i]["risks"] == row["condition"][6:]]  # fmt: skip
        assert int(row["n"]) == len(answers)
    (model,) = [r for r in read(out / "tables" / "models.csv")
                if r["outcome"] == "goal: attempt" and r["source"] == truth.judge]  # fmt: skip
    unusable = sum(c["status"] == "completed" and not c["usable"] for c in truth.conv.values())
    assert f"{unusable} not usable" in model["excluded"]
    assert model["formula"] == "y ~ C(factor_risks) + C(llm)"  # the LLM varies: it is in


def test_report_without_scores_says_so(db, tmp_path):
    store = Store.open(db, "alice")
    truth = build(store, repetitions=2, scores=False)
    result = write_report(store, truth.exp_id, tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    assert "No scores are stored for these conversations" in page
    assert any("No scores" in n for n in result.notices)
    assert (tmp_path / "r" / "tables" / "design.csv").is_file()
    assert not list((tmp_path / "r" / "figures").iterdir())


def test_report_with_no_usable_conversation_says_so(db, tmp_path):
    store = Store.open(db, "alice")
    truth = build(store, repetitions=2)
    for conv_id in list(truth.conv):  # every completed one unusable
        if truth.conv[conv_id]["status"] == "completed":
            store.finish_conversation(conv_id, "completed", None,
                                      quality=Quality(usable=False, reasons=["1 empty"]))  # fmt: skip
    result = write_report(store, truth.exp_id, tmp_path / "r", usable_only=True)
    page = (tmp_path / "r" / "report.html").read_text()
    assert "is usable" in page and "None of the" in page
    assert "No usable conversations to analyse" in page
    assert result.analysed == 0


def test_report_of_an_experiment_without_conversations(db, tmp_path):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(experiment_from_yaml(STUDY, "study.yaml"))
    with pytest.raises(UserError, match="has no conversations: nothing to report"):
        write_report(store, exp.id or "", tmp_path / "r")  # outside review F6: not an empty page
    assert not (tmp_path / "r").exists()


def test_report_command_and_its_errors(db, settings, env_for, tmp_path):
    store = Store.open(db, "alice")
    truth = build(store, repetitions=2)
    runner = CliRunner()
    env = env_for(settings)
    ok = runner.invoke(app, ["report", truth.exp_id[:8], "--by", "llm", "--scorer", "goal",
                             "--out", str(tmp_path / "cli")], env=env)  # fmt: skip
    assert ok.exit_code == 0, ok.output
    tables = {p.stem for p in (tmp_path / "cli" / "tables").glob("*.csv")}
    assert not any("toxicity" in t for t in tables) and any("goal" in t for t in tables)
    assert [r["condition"] for r in read(tmp_path / "cli" / "tables" / "design.csv")] == [
        "llm=scripted/alpha", "llm=scripted/beta"]  # fmt: skip
    bad = runner.invoke(app, ["report", truth.exp_id[:8], "--by", "colour", "--out",
                              str(tmp_path / "x")], env=env)  # fmt: skip
    assert bad.exit_code == 1 and "--by colour" in bad.output and "risks" in bad.output
    assert "Traceback" not in bad.output
    bad = runner.invoke(app, ["report", truth.exp_id[:8], "--scorer", "nope", "--out",
                              str(tmp_path / "x")], env=env)  # fmt: skip
    assert bad.exit_code == 1 and "--scorer nope" in bad.output and "goal" in bad.output


def test_report_and_agreement_take_a_scorers_file_and_point_at_other_versions(
    db, settings, env_for, tmp_path
):
    """The judge of `goal` re-run with another LLM is a new version with one source; the
    human's answers belong to the version they annotated. `report` and `agreement` say that
    the other version has two sources, and `--scorers FILE` with its definition reports it."""
    store = Store.open(db, "alice")
    truth = build(store, repetitions=2)
    exp = store.get_experiment(truth.exp_id)
    (goal,) = [s for s in scorers_for(exp) if s.name == "goal"]
    new_file = tmp_path / "new-judge.yaml"  # the same question, another judge LLM
    new_file.write_text(STUDY[STUDY.index("scorers:") :].replace("model: alpha", "model: gamma"))
    (new,) = [s for s in load_scorers_file(new_file) if s.name == "goal"]
    assert new.version != goal.version
    judged = [r for r in store.list_conversations(experiment_id=exp.id) if r.id in truth.goal]
    store.replace_scores([_score(exp, rec, new, "Yes") for rec in judged])
    old_file = tmp_path / "old-judge.yaml"
    old_file.write_text(STUDY[STUDY.index("scorers:") :])
    env, runner = env_for(settings), CliRunner()

    def report(name: str, scorers: Path) -> str:
        args = ["report", truth.exp_id[:8], "--scorer", "goal", "--out", str(tmp_path / name)]
        result = runner.invoke(app, [*args, "--scorers", str(scorers)], env=env)
        assert result.exit_code == 0, result.output
        return (tmp_path / name / "report.html").read_text(encoding="utf-8")

    page = report("new", new_file)
    assert not list((tmp_path / "new" / "tables").glob("agreement_*"))  # one source
    assert f"goal (version {new.version}) has one source" in page
    assert f"version {goal.version}: human:ann, {truth.judge}" in page
    report("old", old_file)
    rows = read(file_named(tmp_path / "old", "agreement_goal"))
    assert (rows[0]["source_a"], rows[0]["source_b"]) == ("human:ann", truth.judge)

    args = ["agreement", truth.exp_id[:8], "--scorer", "goal"]
    single = runner.invoke(app, [*args, "--scorers", str(new_file)], env=env)
    assert single.exit_code == 1 and f"version {goal.version}: human:ann" in single.output
    both = runner.invoke(app, [*args, "--scorers", str(old_file)], env=env)
    assert both.exit_code == 0 and "human:ann" in both.output, both.output


# --- the page ---------------------------------------------------------------------------------


class _Dom(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.headings: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag in ("h1", "h2", "h3"):
            self._in = tag
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.headings[-1] += data


def check_dom(text: str) -> _Dom:
    dom = _Dom()
    dom.feed(text)
    h2 = [h.strip() for h in dom.headings]
    for heading in ("Design: planned, completed and usable conversations", "Outcomes",
                    "Regressions", "Agreement between sources"):  # fmt: skip
        assert heading in h2
    tables = [a for t, a in dom.tags if t == "table"]
    imgs = [a for t, a in dom.tags if t == "img"]
    assert len(tables) >= 8 and len(imgs) >= 4
    assert all(a["src"].startswith("data:image/svg+xml;base64,") for a in imgs)
    assert all(a.get("alt") for a in imgs)
    for _tag, attrs in dom.tags:  # nothing that could load from elsewhere
        for key in ("src", "href", "action", "data"):
            value = attrs.get(key, "")
            assert not re.match(r"\s*(https?:|//|file:|ftp:)", value, re.IGNORECASE), value
    metas = [a for t, a in dom.tags if t == "meta" and a.get("http-equiv")]
    assert metas and "default-src 'none'" in metas[0]["content"]
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", text)
    assert "<script" not in text
    return dom


def test_the_page_is_self_contained_with_headings_tables_and_figures(study):
    _, _, out, result = study
    check_dom(result.html.read_text(encoding="utf-8"))
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "means_toxicity_judge_scripted_alpha.svg" in figures
    assert {p.suffix for p in (out / "figures").iterdir()} == {".png", ".svg"}
    for png in (out / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Counting(http.server.SimpleHTTPRequestHandler):
    seen: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append(self.path)
        super().do_GET()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed on this machine")
def test_the_page_in_headless_chromium(study, tmp_path):
    _, _, out, _ = study
    _Counting.seen = []
    handler = lambda *a, **k: _Counting(*a, directory=str(out), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/report.html"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run",
             # nothing but the page's own server is reachable
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # fmt: skip
    # a profile per run: with a shared one, the second run may read the page from its cache
    try:
        dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=90, check=True).stdout  # fmt: skip
        shot = tmp_path / "report.png"
        subprocess.run([*flags, f"--user-data-dir={tmp_path / 'shot'}",
                        "--window-size=1200,3000", f"--screenshot={shot}", url],
                       capture_output=True, timeout=90, check=True)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    parsed = check_dom(dom)
    assert any(t == "figure" for t, _ in parsed.tags)
    # the page, and at most the favicon the browser asks for itself: no image, style or script
    assert [p for p in _Counting.seen if p != "/favicon.ico"] == ["/report.html"] * 2
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_report_menu_compares_the_chosen_condition(db, tmp_path):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from simulator.interactive.menus import Menus
    from simulator.interactive.questions import Questions

    store = Store.open(db, "alice")
    truth = build(store, repetitions=2)
    up, down, enter, space, clear = "\x1b[A", "\x1b[B", "\r", " ", "\x15"
    keys = down + enter + enter  # Select an experiment, the first one
    keys += up + up + enter  # Report (just above Back)
    # ticked: what varies among the stored conversations (the factor risks and the LLM)
    keys += space + enter  # untick the factor risks
    keys += enter  # not only the usable ones
    keys += clear + str(tmp_path / "menu-report") + enter
    keys += up + enter + "\x1b" + down + down + enter  # Back, leave the list, Exit
    console = Console(file=__import__("io").StringIO(), width=200, color_system=None)
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()
        Menus(store, Questions(input=pipe, output=DummyOutput(), console=console),
              tmp_path).main()  # fmt: skip
    rows = read(tmp_path / "menu-report" / "tables" / "design.csv")
    assert [r["condition"] for r in rows] == ["llm=scripted/alpha", "llm=scripted/beta"]
    assert sum(int(r["planned"]) for r in rows) == len(truth.conv)
    assert "Open" in console.file.getvalue()


def test_the_walkthrough_runs_offline_with_the_scripted_judge(db, settings, env_for, tmp_path):
    """README "From runs to results": run -> score -> annotate -> agreement -> report, with the
    scripted model as agents and judge (docs/scripted-scorers.yaml)."""
    root = Path(__file__).resolve().parent.parent
    scorers = str(root / "docs" / "scripted-scorers.yaml")
    runner, env = CliRunner(), env_for(settings)

    def cli(*args: str) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    cli("run", str(root / "experiments" / "prison.yaml"), "--llm", "scripted", "--messages", "4",
        "--days", "1", "--agents", "guard=1,prisoner=1", "--repetitions", "2", "--plain",
        "--factor", "risks=yes,no", "--factor", "guard_personality=good,bad",
        "--factor", "oversight=yes", "--factor", "goal=yard_time",
        "--factor", "prisoner_personality=bad")  # fmt: skip
    scored = cli("score", "prison", "--scorers", scorers, "--scorer", "goal_achieved",
                 "--scorer", "toxicity")  # fmt: skip
    store = Store.open(db, "alice")
    goal = store.list_scores(scorer="goal_achieved")
    assert len(goal) == 8 and all(s.valid for s in goal)  # the scripted judge answers validly
    assert {s.value for s in goal} <= {"Yes", "No", "NotTried"}
    toxicity = store.list_scores(scorer="toxicity")
    assert len(toxicity) == 8 * 4 and {s.value for s in toxicity} <= {1, 2, 3, 4, 5}
    assert "0 invalid answers" in scored
    sheet = tmp_path / "sheet.csv"
    cli("annotate", "export", "prison", "--scorer", "goal_achieved", "--annotator", "ann",
        "--scorers", scorers, "--out", str(sheet))  # fmt: skip
    rows = read(sheet)
    for row in rows:
        row["goal_achieved"] = "Yes"
    with sheet.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cli("annotate", "import", str(sheet), "--annotator", "ann")
    assert "human:ann" in cli("agreement", "prison", "--scorer", "goal_achieved", "--scorers",
                              scorers)  # fmt: skip
    cli("report", "prison", "--by", "risks", "--by", "guard_personality", "--out",
        str(tmp_path / "report"))  # fmt: skip
    agreement = read(file_named(tmp_path / "report", "agreement_goal_achieved"))
    assert int(agreement[0]["items"]) == 8
    assert [r["condition"] for r in read(tmp_path / "report" / "tables" / "design.csv")] == [
        f"risks={r} · guard_personality={g}" for r in ("yes", "no") for g in ("good", "bad")
    ]
