"""Prompt composition (SPEC §1) and the summary / speaker-selection templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.errors import UserError
from simulator.experiment import Experiment, ModelSpec, Role, Summarizer, validate_experiment
from simulator.prompts import (
    Templates,
    agent_prompt,
    compose,
    format_transcript,
    section_title,
    selector_request,
    starting_message,
    summarizer_prompt,
    summary_request,
)

EXP = Experiment(
    name="mini",
    starting_message="Start, <AGENTS_NUM> of you",
    llms=[ModelSpec(model="scripted", provider="scripted")],
    roles=[
        Role(
            name="guard",
            description="keeps order",
            sections={
                "goal": "  Keep order.\n",
                "starting_prompt": "You are a guard.",
                "communication_rules": "Be brief; <GUARD_PRON> <GUARD_VERB_WATCH>.",
            },
        ),
        Role(name="prisoner", sections={"starting_prompt": "You are held."}),
    ],
    shared_sections={
        "environment": "There <GUARD_VERB_BE> <GUARD_NUM> <GUARD_NOUN> and <PRISONER_NUM> <PRISONER_NOUN>.",
        "LLM_notes": "Stay in character.",
    },
    summarizer=Summarizer(sections={"format": "Two lines.", "starting_prompt": "You summarize."}),
)


def test_small_experiment_is_valid() -> None:
    validate_experiment(EXP, "mini")


def test_agent_prompt_exact() -> None:
    assert agent_prompt(EXP, "guard", {"guard": 2, "prisoner": 1}) == (
        "You are a guard.\n\n"
        "## Goal\n\nKeep order.\n\n"
        "## Communication rules\n\nBe brief; they watch.\n\n"
        "## Environment\n\nThere are 2 guards and 1 prisoner.\n\n"
        "## LLM notes\n\nStay in character."
    )


def test_agent_prompt_one_agent_each_and_role_lookup_ignores_case() -> None:
    assert agent_prompt(EXP, "Prisoner", {"guard": 1, "prisoner": 1}) == (
        "You are held.\n\n"
        "## Environment\n\nThere is 1 guard and 1 prisoner.\n\n"
        "## LLM notes\n\nStay in character."
    )


def test_summarizer_prompt() -> None:
    assert summarizer_prompt(EXP, {"guard": 1}) == "You summarize.\n\n## Format\n\nTwo lines."


def test_starting_message_filled() -> None:
    assert starting_message(EXP, {"guard": 2, "prisoner": 1}) == "Start, 3 of you"


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ([], ""),
        ([("starting_prompt", " Hi ")], "Hi"),
        ([("goal", "G"), ("starting_prompt", "S")], "S\n\n## Goal\n\nG"),
        ([("a_b_c", "x"), ("empty", "  ")], "## A b c\n\nx"),
    ],
)
def test_compose(sections: list[tuple[str, str]], expected: str) -> None:
    assert compose(sections) == expected


@pytest.mark.parametrize(
    ("key", "title"),
    [("goal", "Goal"), ("communication_rules", "Communication rules"), ("LLM_notes", "LLM notes")],
)
def test_section_title(key: str, title: str) -> None:
    assert section_title(key) == title


def test_format_transcript() -> None:
    lines = [("Researcher", "Start"), ("Guard_117", " Quiet! \n")]
    assert format_transcript(lines) == "Researcher: Start\n\nGuard_117: Quiet!"


def test_shipped_templates() -> None:
    assert Templates.load(None).source.endswith(str(Path("simulator", "data", "prompts")))
    transcript = "Guard_117: {day} and {transcript} stay {as written}"
    request = summary_request(2, transcript)
    assert "day 2" in request
    assert transcript in request and "{" not in request.replace(transcript, "")

    agents = [("Guard_117", "guard", "keeps order"), ("Prisoner_221", "prisoner", "")]
    ask = selector_request(agents, "Researcher: Start", "Guard_117")
    assert "Guard_117 (guard): keeps order\nPrisoner_221 (prisoner)\n" in ask
    assert "Researcher: Start" in ask
    assert "Do not choose Guard_117" in ask
    assert "exactly one name" in ask
    first = selector_request(agents, "Researcher: Start", None)
    assert "Do not choose" not in first and "{" not in first


def test_custom_templates_dir(tmp_path: Path) -> None:
    (tmp_path / "summary.txt").write_text("Day {day}:\n{transcript}\n{unknown}\n")
    (tmp_path / "speaker_selection.txt").write_text(
        "{agents}\n--\n{transcript}\nNot {last_speaker}.\nOne name.\n"
    )
    mine = Templates.load(tmp_path)
    assert summary_request(1, "A: {x}", mine) == "Day 1:\nA: {x}\n{unknown}"
    agents = [("A_001", "a", "does a"), ("B_002", "b", "does b")]
    assert selector_request(agents, "A_001: hi", "A_001", mine) == (
        "A_001 (a): does a\nB_002 (b): does b\n--\nA_001: hi\nNot A_001.\nOne name."
    )
    assert (
        selector_request(agents, "", None, mine)
        == "A_001 (a): does a\nB_002 (b): does b\n--\n\nOne name."
    )


def test_missing_template(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="summary.txt: cannot read the prompt template"):
        Templates.load(tmp_path)


def test_prompts_dir_from_dotenv_is_used_and_read_once_per_batch(settings, env_for, tmp_path):
    """SIMULATOR_PROMPTS_DIR in `.env` picks the summary template; a batch reads it once (an
    edit during the batch changes nothing), counted at the server."""
    from typer.testing import CliRunner

    from simulator.cli import app
    from tests.servers import FakeLLMServer, echo_reply, write_experiment

    folder = tmp_path / "my-prompts"
    folder.mkdir()
    (folder / "summary.txt").write_text("CUSTOM summary of day {day}:\n{transcript}\n")
    shipped = Templates.load(None)
    (folder / "speaker_selection.txt").write_text(shipped.selector)
    dotenv = tmp_path / "my.env"
    dotenv.write_text(f"SIMULATOR_PROMPTS_DIR={folder}\n")

    def reply(body: dict) -> str:
        if body["messages"][-1]["content"].startswith("CUSTOM"):  # after the first summary
            (folder / "summary.txt").write_text("EDITED day {day}\n{transcript}")
        return echo_reply(body)

    with FakeLLMServer(models={"m1"}, reply=reply) as server:
        llm = f"{{model: m1, provider: openai, base_url: '{server.openai_url}'}}"
        path = write_experiment(tmp_path / "x.yaml", llm)
        grid = [
            "--messages",
            "4",
            "--days",
            "2",
            "--repetitions",
            "2",
            "--concurrency",
            "1",
            "--plain",
        ]
        env = {**env_for(settings), "SIMULATOR_ENV_FILE": str(dotenv)}
        result = CliRunner().invoke(app, ["run", path, *grid], env=env)
        assert result.exit_code == 0, result.output
        summaries = [b["messages"][-1]["content"] for b in server.bodies() if "stop" not in b]
    assert len(summaries) == 2 * 2
    assert all(s.startswith("CUSTOM summary of day ") for s in summaries), summaries
