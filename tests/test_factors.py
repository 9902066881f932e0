"""Factors (issue 10, items 1-6): a study's design in one experiment, crossed by the grid,
stored with each conversation, shown, exported and filtered."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.errors import ValidationError
from simulator.experiment import (
    dump_experiment,
    experiment_from_yaml,
    experiment_to_dict,
    load_experiment,
)
from simulator.grid import make_grid
from simulator.store import Store

ROOT = Path(__file__).resolve().parent.parent

# 3 factors, 2 x 2 x 3 levels. Every text carries a marker, so a prompt shows which it holds.
FACTORIAL = """\
name: factorial
starting_message: Start
llms:
  - {model: scripted, provider: scripted}
roles:
  guard:
    sections:
      starting_prompt: You are a <GUARD_NOUN>.
  prisoner:
    sections:
      starting_prompt: You are a <PRISONER_NOUN>.
shared_sections:
  environment: A prison.
summarizer:
  sections:
    starting_prompt: You summarize.
factors:
  risks:
    "yes":
      shared.risks: RISKS-SPELLED-OUT
    "no":
      shared.risks: null
  goal:
    yard:
      prisoner.goal: GOAL-YARD
      summarizer.format: FORMAT-YARD
    escape:
      prisoner.goal: GOAL-ESCAPE
      summarizer.format: FORMAT-ESCAPE
  guard_personality:
    good:
      guard.personality: GUARD-GOOD there <GUARD_VERB_BE> <GUARD_NUM> <GUARD_NOUN>
    bad:
      guard.personality: GUARD-BAD
    blank:
      guard.personality: null
"""
TEXTS = {
    "risks": {"yes": {"RISKS-SPELLED-OUT"}, "no": set()},
    "goal": {"yard": {"GOAL-YARD", "FORMAT-YARD"}, "escape": {"GOAL-ESCAPE", "FORMAT-ESCAPE"}},
    "guard_personality": {"good": {"GUARD-GOOD"}, "bad": {"GUARD-BAD"}, "blank": set()},
}
WHERE_CASES = [
    {"risks": "no"},
    {"goal": "escape", "guard_personality": "blank"},
    {"factor_guard_personality": "good", "risks": "yes"},  # the column name works too
]


@pytest.fixture
def cli(settings, env_for):
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args), env={**env_for(settings)})
        if ok:
            assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    return invoke


@pytest.fixture
def factorial(tmp_path) -> Path:
    path = tmp_path / "factorial.yaml"
    path.write_text(FACTORIAL)
    return path


def conversations_count(output: str) -> int:
    m = re.search(r"(\d+) conversations, at least (\d+) LLM calls", output)
    assert m, output
    return int(m.group(1))


def test_dry_run_counts_every_level_of_every_factor(cli, factorial, tmp_path):
    grid = ("--llm", "scripted", "--messages", "4", "--days", "2", "--every-day",
            "--agents", "guard=2,prisoner=1", "--speaker", "round_robin", "--speaker", "random",
            "--repetitions", "3")  # fmt: skip
    plain = tmp_path / "plain.yaml"
    plain.write_text(FACTORIAL.split("factors:")[0])
    rest = conversations_count(cli("run", str(plain), *grid, "--dry-run").output)
    assert rest == 2 * 2 * 3
    dry = cli("run", str(factorial), *grid, "--dry-run").output
    assert conversations_count(dry) == 12 * rest
    assert "factor guard_personality" in dry and "good, bad, blank" in dry
    restricted = cli(
        "run", str(factorial), *grid, "--factor", "guard_personality=blank,good",
        "--factor", "risks=no", "--dry-run",
    ).output  # fmt: skip
    assert conversations_count(restricted) == 1 * 2 * 2 * rest
    assert "good, blank" in restricted  # the experiment's order, whatever the flag's


def test_each_conversation_holds_exactly_its_levels_texts(cli, factorial, db, tmp_path):
    cli("run", str(factorial), "--llm", "scripted", "--messages", "2", "--days", "1",
        "--agents", "guard=2,prisoner=1", "--plain")  # fmt: skip
    store = Store.open(db, "alice")
    (row,) = store.list_experiments()
    records = store.list_conversations(experiment_id=row.experiment.id, prompts=True)
    assert len(records) == 12
    combos = {tuple(sorted(r.spec.factors.items())) for r in records}
    assert len(combos) == 12  # every combination once
    every_text = {t for levels in TEXTS.values() for texts in levels.values() for t in texts}
    for rec in records:
        assert set(rec.spec.factors) == set(TEXTS)
        wanted = set().union(*(TEXTS[f][level] for f, level in rec.spec.factors.items()))
        prompts = {a.role: a.system_prompt for a in rec.agents}
        held = {
            t for t in every_text if any(t in p for p in [*prompts.values(), rec.summarizer_prompt])
        }
        assert held == wanted, rec.spec.factors
        guard = prompts["guard"]
        if rec.spec.factors["guard_personality"] == "blank":
            assert "## Personality" not in guard  # the section is left out, header and all
        else:
            assert "## Personality" in guard
        if rec.spec.factors["guard_personality"] == "good":
            assert "there are 2 guards" in guard  # placeholders work inside level texts
        assert ("## Risks" in prompts["prisoner"]) == (rec.spec.factors["risks"] == "yes")
        assert "GOAL-" not in guard  # the prisoner's goal stays the prisoner's
        assert rec.message_count == 2

    # csv: one factor_<name> column per factor, matching what each conversation stored
    cli("export", row.experiment.id[:8], "--format", "csv", "--out", str(tmp_path / "out"))
    (path,) = (tmp_path / "out").rglob("*.csv")
    rows = list(csv.DictReader(path.open()))
    assert {"factor_risks", "factor_goal", "factor_guard_personality"} <= set(rows[0])
    stored = {r.id: r.spec.factors for r in records}
    assert len(rows) == 12 * 3  # two messages and a summary each
    for r in rows:
        levels = stored[r["conversation_id"]]
        assert {f: r[f"factor_{f}"] for f in TEXTS} == levels

    # --where: `conversations` and `export` return exactly the matching subsets
    for where in WHERE_CASES:
        flags = [arg for k, v in where.items() for arg in ("--where", f"{k}={v}")]
        named = {k.removeprefix("factor_"): v for k, v in where.items()}
        expected = {r.id for r in records if named.items() <= r.spec.factors.items()}
        listed = cli("conversations", row.experiment.id[:8], "--limit", "0", *flags).output
        shown = set(re.findall(r"^│ ([0-9a-f]{8}) ", listed, re.M))
        assert shown == {i[:8] for i in expected}, listed
        out = tmp_path / f"where-{len(flags)}-{'-'.join(where.values())}"
        cli("export", row.experiment.id[:8], "--format", "jsonl", "--out", str(out), *flags)
        (jsonl,) = out.rglob("*.jsonl")
        exported = {json.loads(line)["conversation_id"] for line in jsonl.open()}
        assert exported == expected


def test_where_names_an_unknown_factor_or_level(cli, factorial):
    cli("run", str(factorial), "--llm", "scripted", "--messages", "2", "--days", "1",
        "--factor", "risks=no", "--factor", "goal=yard", "--factor", "guard_personality=bad")  # fmt: skip
    bad_level = cli("conversations", "factorial", "--where", "risks=maybe", ok=False)
    assert bad_level.exit_code == 1
    assert "factor 'risks' has no level 'maybe'; its levels: yes, no" in bad_level.output
    bad_key = cli("conversations", "factorial", "--where", "risk=yes", ok=False)
    assert "unknown key 'risk'" in bad_key.output and "guard_personality" in bad_key.output


def test_repetition_r_has_the_same_seed_and_names_under_every_level(db, factorial):
    """Paired seeds: `goal` only touches the prisoner's section (and the summarizer's)."""
    from simulator.runner import RunOptions, start_batch

    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(factorial))
    grid = make_grid(exp, llms=["scripted"], messages=4, days=1, agents="guard=1,prisoner=2",
                     speakers=["random"], repetitions=3, seed=7,
                     factors=["risks=yes", "guard_personality=bad"])  # fmt: skip
    assert grid.size() == 2 * 3
    start_batch(store, exp, grid, RunOptions())
    records = store.list_conversations(experiment_id=exp.id, prompts=True)
    by_rep: dict[int, dict[str, tuple]] = {}
    for rec in records:
        names = tuple(a.name for a in rec.agents)
        speakers = tuple(m.speaker for m in store.load_transcript(rec.id).messages)
        guard = next(a.system_prompt for a in rec.agents if a.role == "guard")
        by_rep.setdefault(rec.spec.repetition, {})[rec.spec.factors["goal"]] = (
            rec.spec.seed,
            names,
            speakers,
            guard,
        )
    assert sorted(by_rep) == [0, 1, 2]
    for rep, levels in by_rep.items():
        assert set(levels) == {"yard", "escape"}
        assert levels["yard"] == levels["escape"]  # seed, names, random speaker order, guard
        assert levels["yard"][0] == 7 + rep
    assert len({levels["yard"][1] for levels in by_rep.values()}) > 1  # repetitions differ


def test_batch_keeps_its_levels_for_resume(db, factorial):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(factorial))
    grid = make_grid(exp, llms=["scripted"], messages=2, days=1, agents=None,
                     speakers=["round_robin"], factors=["goal=escape"])  # fmt: skip
    batch = store.create_batch(exp, grid)
    again = store.get_batch(batch.id).grid
    assert again.factors == {"risks": ["yes", "no"], "goal": ["escape"],
                             "guard_personality": ["good", "bad", "blank"]}  # fmt: skip
    assert [s.factors for _, s in again.expand()] == [s.factors for _, s in grid.expand()]


def test_yaml_round_trip_export_and_duplicate_keep_factors(cli, factorial, db, tmp_path):
    exp = load_experiment(factorial)
    again = experiment_from_yaml(dump_experiment(exp), "dumped")
    assert experiment_to_dict(again) == experiment_to_dict(exp)
    assert again.factor("risks").levels["no"] == {"shared.risks": None}
    cli("experiment", "import", str(factorial))
    store = Store.open(db, "alice")
    (row,) = store.list_experiments()
    out = tmp_path / "exported.yaml"
    cli("experiment", "export", row.experiment.id[:8], "--out", str(out))
    assert experiment_to_dict(load_experiment(out)) == experiment_to_dict(exp)
    cli("experiment", "duplicate", row.experiment.id[:8], "--name", "copy")
    copy = next(r.experiment for r in store.list_experiments() if r.experiment.name == "copy")
    assert copy.factor_levels() == exp.factor_levels()
    assert [f.levels for f in copy.factors] == [f.levels for f in exp.factors]


def test_show_and_html_show_the_levels(cli, factorial, db, tmp_path):
    cli("run", str(factorial), "--llm", "scripted", "--messages", "2", "--days", "1",
        "--factor", "risks=yes", "--factor", "goal=escape", "--factor", "guard_personality=blank")  # fmt: skip
    store = Store.open(db, "alice")
    (rec,) = store.list_conversations()
    shown = cli("show", rec.id[:8]).output
    assert "factors: risks=yes, goal=escape, guard_personality=blank" in shown
    cli("export", rec.id[:8], "--format", "html", "--out", str(tmp_path))
    page = next(tmp_path.rglob(f"{rec.id}.html")).read_text()
    assert "<dt>factor_goal</dt><dd>escape</dd>" in page
    index = next(tmp_path.rglob("index.html")).read_text()
    assert 'data-key="factor_guard_personality"' in index and ">blank</td>" in index


def test_a_factor_can_set_the_starting_message(cli, db):
    """negotiation.yaml varies the researcher's opening (with a placeholder) by a factor."""
    path = ROOT / "experiments" / "negotiation.yaml"
    cli("run", str(path), "--llm", "scripted", "--messages", "2", "--days", "1",
        "--agents", "buyer=2,seller=1", "--factor", "zone=overlap",
        "--factor", "buyer_style=blank", "--factor", "time_pressure=deadline")  # fmt: skip
    store = Store.open(db, "alice")
    (rec,) = store.list_conversations()
    shown = cli("show", rec.id[:8]).output
    assert "the buyers have another" in " ".join(shown.split())


def test_the_shipped_experiments_hold_their_designs():
    prison = load_experiment(ROOT / "experiments" / "prison.yaml")
    sizes = [len(levels) for levels in prison.factor_levels().values()]
    assert sizes == [2, 2, 2, 3, 3]
    grid = make_grid(prison, llms=["scripted"], messages=4, days=1, agents=None,
                     speakers=["round_robin"])  # fmt: skip
    assert grid.size() == 72
    negotiation = load_experiment(ROOT / "experiments" / "negotiation.yaml")
    assert negotiation.factor_levels()["zone"] == ["overlap", "no_overlap"]


def _with_factors(factors: str, base: str = FACTORIAL.split("factors:")[0]) -> str:
    return base + "factors:\n" + factors


VALIDATION_CASES = [
    (  # an unknown role
        "  mood:\n    calm:\n      warden.mood: Calm.\n",
        [
            "factors.mood: `warden` is not a role of this experiment (its roles: guard, prisoner)",
            "ROLE.TITLE",
        ],
    ),
    (  # not a section address
        "  mood:\n    calm:\n      personality: Calm.\n",
        ["factors.mood: `personality` is not a section; write starting_message, shared.TITLE"],
    ),
    (  # a level that changes nothing
        "  mood:\n    calm:\n      guard.mood: Calm.\n    none: {}\n",
        [
            "factors.mood.none: the level changes nothing",
            "`SECTION: null` to leave that section out",
        ],
    ),
    (  # two factors setting the same section
        "  a:\n    x:\n      guard.mood: X.\n  b:\n    y:\n      guard.mood: Y.\n",
        [
            "factors.b: sets `guard.mood`, which factor `a` sets too",
            "merge the two factors or set another section",
        ],
    ),
    (  # a section also written outside the factor: its text would never be used
        "  env:\n    a:\n      shared.environment: A.\n",
        [
            "factors.env: sets `shared.environment`, so `shared_sections.environment` would never "
            "be used; remove it there"
        ],
    ),
    (  # a level silent about a section another level sets
        "  mood:\n    calm:\n      guard.mood: Calm.\n    angry:\n      guard.tone: Loud.\n",
        [
            "factors.mood.angry: does not say what `guard.mood` is (level `calm` sets it); give its "
            "text, or `guard.mood: null` to leave it out"
        ],
    ),
    (  # yes/no unquoted: YAML reads them as true/false
        "  risks:\n    yes:\n      shared.risks: R.\n",
        [
            "factors.risks: a level is named true, which YAML reads as true/false",
            "put the level name in quotes, e.g. 'yes':",
        ],
    ),
    (  # a factor named like a built-in condition
        "  status:\n    a:\n      guard.mood: A.\n",
        [
            "factors.status: `status` is a built-in condition (--where status=...); rename the factor"
        ],
    ),
    (  # a misspelt placeholder inside a level
        "  mood:\n    calm:\n      guard.mood: The <GAURD_NOUN> is calm.\n",
        [
            "factors.mood.calm.guard.mood: <GAURD_NOUN>: unknown placeholder; did you mean "
            "<GUARD_NOUN>?",
            "Placeholders valid in this experiment",
        ],
    ),
    (  # a level name that cannot be typed in --factor NAME=LEVEL,LEVEL
        "  mood:\n    'very calm':\n      guard.mood: Calm.\n",
        ["factors.mood.very calm: a level name is letters, digits", "rename it"],
    ),
]


@pytest.mark.parametrize(("factors", "messages"), VALIDATION_CASES)
def test_validation_says_what_is_wrong_and_how_to_fix_it(factors, messages):
    with pytest.raises(ValidationError) as error:
        experiment_from_yaml(_with_factors(factors), "study.yaml")
    text = str(error.value)
    assert text.startswith("study.yaml: ")
    for message in messages:
        assert message in text, text


def test_factor_flag_errors_name_the_factors_and_levels(cli, factorial):
    unknown = cli("run", str(factorial), "--factor", "mood=calm", "--dry-run", ok=False)
    assert unknown.exit_code == 1 and "Traceback" not in unknown.output
    assert "has no factor 'mood'" in unknown.output
    assert "risks=yes,no; goal=yard,escape; guard_personality=good,bad,blank" in unknown.output
    level = cli("run", str(factorial), "--factor", "goal=home", "--dry-run", ok=False)
    assert "factor 'goal' has no level 'home'; its levels: yard, escape" in level.output


def test_the_listing_of_a_three_factor_batch_fits_with_its_levels_and_status(cli, factorial):
    """Three factors as separate columns squeezed `status` and `usable` out of an 80-column
    listing: they share one `levels` column, named in the caption."""
    cli("run", str(factorial), "--llm", "scripted", "--messages", "2", "--days", "1",
        "--agents", "guard=1,prisoner=1", "--plain", "--factor", "guard_personality=bad")  # fmt: skip
    out = cli("conversations", "factorial", "--limit", "0").output
    rows = [line for line in out.splitlines() if "scripted" in line]
    assert len(rows) == 4
    assert all("completed" in row for row in rows), out
    assert "levels: risks/goal/guard_personality" in out
    assert {"yes/yard/bad", "no/escape/bad"} <= {
        cell.strip() for row in rows for cell in row.split("│")
    }, out


def test_a_misspelt_key_in_every_level_is_named_when_the_experiment_lacks_it():
    """Every level of negotiation.yaml's time_pressure sets `startng_message`: the missing
    `starting_message` is reported with the factors' near miss, not alone."""
    text = Path(__file__).resolve().parent.parent / "experiments" / "negotiation.yaml"
    typo = text.read_text(encoding="utf-8").replace(
        "      starting_message:", "      startng_message:"
    )
    assert typo.count("startng_message:") == 2
    with pytest.raises(ValidationError) as info:
        experiment_from_yaml(typo, "typo.yaml")
    message = str(info.value)
    assert "starting_message: missing" in message
    assert "the factors set `startng_message`: did you mean `starting_message`?" in message


def test_score_takes_a_factor_filter_like_the_other_commands(cli, factorial, db, tmp_path):
    """`score --where risks=yes` scores that arm only (it was refused as an unknown key)."""
    cli("run", str(factorial), "--llm", "scripted", "--messages", "2", "--days", "1",
        "--factor", "goal=yard", "--factor", "guard_personality=bad")  # fmt: skip
    scorers = tmp_path / "lab.yaml"
    scorers.write_text(
        "scorers:\n  length: {kind: python, function: 'tests.scoring_plugin:turns'}\n"
    )
    result = cli("score", "factorial", "--scorers", str(scorers), "--where", "risks=yes")
    assert "Scored 1 item with length" in result.output, result.output
    (scored,) = db["scores"].find({"scorer": "length"})
    conversation = db["conversations"].find_one({"_id": scored["conversation_id"]})
    assert conversation["factors"] == {"risks": "yes", "goal": "yard", "guard_personality": "bad"}
    bad = cli("score", "factorial", "--scorers", str(scorers), "--where", "risk=yes", ok=False)
    assert bad.exit_code == 1 and "unknown key 'risk'" in bad.output
