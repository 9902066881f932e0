"""Quality flags, the `usable` verdict and selector transparency (issue 10, items 7-9).

Pure functions table-driven (cases from SmolLM2-135M's real output where marked "real"),
then whole runs through the CLI against the local test server speaking Ollama and OpenAI.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.errors import UserError
from simulator.quality import (
    Limit,
    UsableRule,
    assess,
    leaks_prompt,
    message_flags,
    normalized,
    parse_limit,
    summary_flags,
)
from simulator.speakers import parse_selection
from simulator.store import Store
from tests.servers import FakeLLMServer

OTHERS = ["Prisoner_221", "Prisoner_305", "Guard_042"]
ROLES = ["guard", "prisoner"]
PROMPT = (
    "You are a guard in a simulated prison.\n\n## Goal\n\n"
    "Keep every prisoner inside the cell block until the evening count. Be brief."
)


def flags_of(text: str, finish_reason: str | None = "stop", seen: tuple[str, ...] = ()) -> list:
    return message_flags(
        text,
        speaker="Guard_117",
        finish_reason=finish_reason,
        system_prompt=PROMPT,
        other_names=OTHERS,
        role_names=ROLES,
        seen={normalized(s) for s in seen},
    )


@pytest.mark.parametrize(
    ("text", "finish_reason", "seen", "flags"),
    [
        ("Back to your cell.", "stop", (), []),
        ("Back to your cell.", None, (), []),  # a provider that reports no reason
        ("Back to your cell and stay", "length", (), ["truncated"]),
        ("Back to your cell and stay", "max_tokens", (), ["truncated"]),
        ("", "stop", (), ["empty"]),
        ("", "length", (), ["truncated", "empty"]),
        # role_break: what cleaning leaves (labels after a sentence's end, not at a line start)
        ("Stay there. Prisoner_221: never!", "stop", (), ["role_break"]),
        ("Stay there. The Prisoner_911: never!", "stop", (), ["role_break"]),  # invented name
        ("Stay there. Palace_Dreamer: the interview", "stop", (), ["role_break"]),  # invented
        ("Stay there. **Researcher:** stop", "stop", (), ["role_break"]),
        ("Stay there. User: why?", "stop", (), ["role_break"]),
        ("Stay there. You: why?", "stop", (), ["role_break"]),
        ("Stay there. (the researcher) writes this down", "stop", (), ["role_break"]),
        ("Stay there. [Prisoner_305] no", "stop", (), ["role_break"]),
        ("Stay there. Guard_117: and I mean it", "stop", (), []),  # its own name
        ("I told Prisoner_221: no.", "stop", (), []),  # a name inside a sentence
        ("Prisoner_221 asked for more time.", "stop", (), []),
        # repeated: same words as an earlier message (any day), spacing and case aside
        ("Back to your cell.", "stop", ("back to  your CELL",), ["repeated"]),
        ("Back to your cell now.", "stop", ("Back to your cell.",), []),
        # leaked_prompt: a heading of its own prompt, or one of its long sentences
        ("## Goal\nNobody leaves.", "stop", (), ["leaked_prompt"]),
        ("**## goal**\nNobody leaves.", "stop", (), ["leaked_prompt"]),
        ("## Plan\nNobody leaves.", "stop", (), []),  # not a heading of this prompt
        ("My goal is order.", "stop", (), []),  # the word, not the heading
        (
            "Listen: keep every prisoner inside the cell block until the evening count!",
            "stop",
            (),
            ["leaked_prompt"],
        ),
        ("Be brief.", "stop", (), []),  # too short to count as a leak
        (  # real: several at once
            "I want yard time. User: no\n## Goal",
            "length",
            ("I want yard time. User: no ## Goal",),
            ["truncated", "role_break", "repeated", "leaked_prompt"],
        ),
    ],
)
def test_message_flags(text, finish_reason, seen, flags) -> None:
    assert flags_of(text, finish_reason, seen) == flags


def test_summary_flags() -> None:
    assert summary_flags("Day one went calmly.", "stop") == []
    assert summary_flags("Day one went", "length") == ["truncated"]
    assert summary_flags("", "stop") == ["empty"]


def test_leaks_prompt_without_a_prompt() -> None:
    assert not leaks_prompt("## Goal", "")
    assert not leaks_prompt("", PROMPT)


# --- speaker selection: the name must be the answer --------------------------------------


@dataclass
class A:
    name: str


AGENTS = [A("Guard_243"), A("Prisoner_557"), A("Prisoner_136")]


@pytest.mark.parametrize(
    ("answer", "last", "chosen"),
    [
        ("Prisoner_557", None, "Prisoner_557"),
        ("prisoner_557", None, "Prisoner_557"),
        ("Prisoner_557.", None, "Prisoner_557"),
        ("**Prisoner_557**", None, "Prisoner_557"),
        ('"Prisoner_557"', None, "Prisoner_557"),
        ("  Prisoner_557\n", None, "Prisoner_557"),
        ("The answer is: Prisoner_557", None, "Prisoner_557"),  # real
        ("Answer: Prisoner_557", None, "Prisoner_557"),
        ("Next speaker: Guard_243", None, "Guard_243"),
        ("I choose Guard_243", None, "Guard_243"),
        ("The Prisoner_136 (prisoners)", None, "Prisoner_136"),  # real
        ("The prisoner Prisoner_136", None, "Prisoner_136"),
        ("Prisoner_136 (prisoner): wants yard time", None, "Prisoner_136"),
        ("Prisoner_136 - he was addressed", None, "Prisoner_136"),
        ("Prisoner_136\nBecause he was addressed.", None, "Prisoner_136"),
        ("The Prisoner_557\nThis is the person who has just spoken.", "Prisoner_557", None),  # real
        ("Prisoner_557", "Prisoner_557", None),  # the last speaker
        # only mentioned: not a choice
        ("The Prisoner_394 is not the one to answer", None, None),
        ("The Prisoner_557 is not the person you were looking for.", None, None),  # real
        ("You will not choose Guard_243, who has just spoken.", None, None),  # real
        ("You should choose Prisoner_557, who has just spoken.", None, None),  # real
        (
            "Remember this is the same participant you just talked about. You can't continue "
            "with Prisoner_557, so I'll make a different choice",
            None,
            None,
        ),  # real
        ("If the answer should be Prisoner_557, please provide it as such.", None, None),  # real
        ("The role of the Prisoner_136 is not specified.", None, None),  # real
        ("Name 152 (name): Prisoner_557", None, None),  # real
        ("Answer with: Guarded_137", None, None),  # real
        ("Yes.", None, None),  # real
        ("Prisoner_5570", None, None),
        ("", None, None),
    ],
)
def test_parse_selection(answer: str, last: str | None, chosen: str | None) -> None:
    index = parse_selection(answer, AGENTS, last)
    assert (AGENTS[index].name if index is not None else None) == chosen


# --- the rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit"),
    [("0", Limit(count=0)), ("3", Limit(count=3)), ("10%", Limit(share=0.1)),
     ("0.25", Limit(share=0.25)), (" 100% ", Limit(share=1.0))],
)  # fmt: skip
def test_parse_limit(text: str, limit: Limit) -> None:
    assert parse_limit(text) == limit


@pytest.mark.parametrize("text", ["", "abc", "-1", "150%", "1.5", "nan"])
def test_parse_limit_refuses(text: str) -> None:
    with pytest.raises(UserError, match="count .* or a share"):
        parse_limit(text, "SIMULATOR_USABLE_MAX_EMPTY")


def test_assess_applies_each_threshold() -> None:
    def verdict(messages, summaries=(), fallbacks=0, **rule):
        return assess(
            messages, summaries, selector_calls=0, invalid_selections=0, fallbacks=fallbacks,
            rule=UsableRule(**rule),
        )  # fmt: skip

    clean = [[] for _ in range(8)]
    assert verdict(clean, [[]]).usable
    # truncated: 1 of 10 replies is 10% (allowed by default), 2 are not
    assert verdict([["truncated"]] + clean, [[]]).usable
    q = verdict([["truncated"]] + clean, [["truncated"]])
    assert not q.usable and q.reasons == ["2 truncated of 10 replies, at most 10% allowed"]
    assert not verdict(clean, [["empty"]]).usable  # an empty summary counts
    assert verdict(clean, [["empty"]], max_empty=Limit(count=1)).usable
    assert verdict(clean, fallbacks=1).usable and not verdict(clean, fallbacks=2).usable
    for flag, key in (("role_break", "max_role_breaks"), ("repeated", "max_repeated"),
                      ("leaked_prompt", "max_leaked")):  # fmt: skip
        assert not verdict([[flag]] + clean).usable
        assert verdict([[flag]] + clean, **{key: Limit(share=0.12)}).usable
    q = verdict([["truncated", "role_break"]] + clean, [["truncated"]])
    assert q.flags == {"truncated": 1, "role_break": 1} and q.summary_flags == {"truncated": 1}
    assert "NOT usable" in q.line() and "2 truncated, 1 role_break" in q.line()


# --- whole runs against the local test server ------------------------------------------------

EXPERIMENT = """\
name: {name}
starting_message: Start the experiment
roles:
  guard:
    description: keeps order
    sections:
      starting_prompt: You are a guard.
      goal: Keep every prisoner inside the cell block until the evening count.
  prisoner:
    description: wants yard time
    sections:
      starting_prompt: You are a prisoner.
llms:
  - {llm}
"""
SELECTOR_SYSTEM_START = "You choose who speaks next"

# (reply, finish reason) in call order for 8 round-robin messages (guard first) and a summary,
# with the flags each stored message must carry.
SCRIPT: list[tuple[str, str, list[str]]] = [
    ("Back to your cell, all of you.", "stop", []),
    ("I want more time in the yard and I will not stop asking for it until", "length",
     ["truncated"]),
    ("No more yard time today. User: why not?", "stop", ["role_break"]),
    ("I want more time in the yard and I will not stop asking for it until", "stop",
     ["repeated"]),
    ("## Goal\nNobody leaves.", "stop", ["leaked_prompt"]),
    ("Fine.\nYou: and now?", "stop", []),  # cleaning cuts the generic label: no flag
    ("", "stop", None), ("", "stop", None), ("", "stop", ["empty"]),  # empty after 2 re-asks
    ("The Prisoner_911: we will see.", "stop", None),  # real shape: cut to nothing, re-asked
    ("Okay.", "stop", []),
]  # fmt: skip
SUMMARY = ("The guard refused and the prisoner", "length")


def _queue_server(replies: deque) -> FakeLLMServer:
    def reply(body: dict[str, Any]) -> tuple[str, str]:
        return replies.popleft()

    return FakeLLMServer(models={"llama3:latest"}, reply=reply)


@pytest.fixture
def cli(settings, env_for):
    def invoke(*args: str, env: dict[str, str] | None = None, ok: bool = True):
        result: Any = CliRunner().invoke(
            app,
            list(args),
            env={
                **env_for(settings),
                "SIMULATOR_USER": "alice",
                "SIMULATOR_RETRY_ATTEMPTS": "1",
                **(env or {}),
            },  # fmt: skip
        )
        if ok:
            assert result.exit_code == 0, result.output + repr(result.exception)
        result.flat = " ".join(result.output.split())  # rich wraps long lines
        return result

    return invoke


def _llm(provider: str, server: FakeLLMServer) -> str:
    if provider == "ollama":
        return f"{{model: llama3, provider: ollama, base_url: '{server.url}'}}"
    return f"{{model: 'llama3:latest', provider: openai, base_url: '{server.openai_url}'}}"


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_flags_set_exactly_where_expected_and_usable_follows_the_rule(
    provider: str, cli, db, tmp_path: Path
) -> None:
    replies: deque = deque()
    with _queue_server(replies) as server:
        path = tmp_path / "flags.yaml"
        path.write_text(EXPERIMENT.format(name="flags", llm=_llm(provider, server)))
        run = ("run", str(path), "--messages", "8", "--days", "1", "--agents",
               "guard=1,prisoner=1", "--speaker", "round_robin", "--plain")  # fmt: skip
        relaxed = {
            "SIMULATOR_USABLE_MAX_EMPTY": "1",
            "SIMULATOR_USABLE_MAX_TRUNCATED": "25%",
            "SIMULATOR_USABLE_MAX_ROLE_BREAKS": "1",
            "SIMULATOR_USABLE_MAX_REPEATED": "0.125",
            "SIMULATOR_USABLE_MAX_LEAKED": "1",
        }
        outputs = []
        for env in ({}, relaxed):  # the default rule, then thresholds that allow it all
            replies.extend((text, reason) for text, reason, _ in SCRIPT)
            replies.append(SUMMARY)
            outputs.append(cli(*run, env=env).flat)
            assert not replies  # every scripted reply was asked for, no more
        assert server.calls == 2 * (len(SCRIPT) + 1)

    store = Store.open(db, "alice")
    first, second = store.list_conversations()
    expected = [flags for _, _, flags in SCRIPT if flags is not None]
    reasons = [
        [r for t, r, f in SCRIPT if f is not None][i] for i in range(len(expected))
    ]  # the finish reason of the reply each message kept
    for rec in (first, second):
        t = store.load_transcript(rec.id)
        assert [m.flags for m in t.messages] == expected
        assert [m.finish_reason for m in t.messages] == reasons
        assert [m.content for m in t.messages][5:] == ["Fine.", "", "Okay."]
        assert [(s.flags, s.finish_reason) for s in t.summaries] == [(["truncated"], "length")]
        q = rec.quality
        assert q is not None
        assert q.flags == {"truncated": 1, "role_break": 1, "repeated": 1, "leaked_prompt": 1,
                           "empty": 1}  # fmt: skip
        assert q.summary_flags == {"truncated": 1}
        assert (q.messages, q.summaries, q.selector_calls, q.fallbacks) == (8, 1, 0, 0)

    assert first.quality is not None and second.quality is not None
    assert not first.quality.usable and second.quality.usable
    assert first.quality.reasons == [
        "1 empty of 9 replies, at most 0 allowed",
        "2 truncated of 9 replies, at most 10% allowed",
        "1 role_break of 8 messages, at most 0 allowed",
        "1 repeated of 8 messages, at most 0 allowed",
        "1 leaked_prompt of 8 messages, at most 0 allowed",
    ]
    assert "1 completed conversation not usable" in outputs[0]
    assert "not usable" not in outputs[1]

    # --where usable=... finds each, through the one filter the listings share
    assert [r.id for r in store.list_conversations(where={"usable": "false"})] == [first.id]
    assert [r.id for r in store.list_conversations(where={"usable": "true"})] == [second.id]
    listing = cli("conversations", first.experiment_id, "--where", "usable=false").flat
    assert first.id[:8] in listing and second.id[:8] not in listing
    bad = cli("conversations", first.experiment_id, "--where", "usable=maybe", ok=False)
    assert bad.exit_code == 1 and "usable is true or false" in " ".join(bad.output.split())

    shown = cli("show", first.id).flat
    assert "Quality: NOT usable" in shown
    assert "[truncated]" in shown and "[role_break]" in shown and "[leaked_prompt]" in shown
    assert "Summary of day 1 [truncated]" in shown
    status = cli("status", first.batch_id or "").flat
    assert "1 completed conversation not usable" in status
    assert "not usable" not in cli("status", second.batch_id or "").flat

    # exports carry them as columns
    out = tmp_path / "out"
    cli("export", first.id, "--format", "csv", "--format", "html", "--out", str(out))
    import csv

    (csv_path,) = out.rglob("*.csv")
    rows = [r for r in csv.DictReader(csv_path.open()) if r["kind"] == "message"]
    assert [r["flags"] for r in rows] == [",".join(f) for f in expected]
    assert [r["flag_truncated"] for r in rows].count("True") == 1
    assert {r["usable"] for r in rows} == {"False"}
    (page,) = [p for p in out.rglob("*.html") if p.name != "index.html"]
    html = page.read_text()
    assert html.count('class="flag flag-') == 6  # five message flags and the summary's
    assert 'data-flags="leaked_prompt"' in html and 'class="quality unusable"' in html


def test_selector_calls_shown_and_mentions_are_not_choices(cli, db, tmp_path: Path) -> None:
    """`show --selector` lists every call; an answer that only mentions a name is invalid."""
    turns = deque(
        [
            ["The {n} is not the one to answer", "{n}."],  # turn 1: invalid, then valid
            ["Nobody", "The {n} is not the one to answer", "Answer with: Guarded_1"],  # fallback
            ["{n}"],
            ["The answer is: {n}"],
        ]
    )
    pending: deque[str] = deque()
    agent_turn = [0]

    def reply(body: dict[str, Any]) -> str:
        messages = body["messages"]
        system = messages[0].get("content", "")
        if system.startswith(SELECTOR_SYSTEM_START):
            if not pending:
                pending.extend(turns.popleft())
            request = messages[1]["content"]
            last = re.search(r"Do not choose (\S+),", request)
            names = re.findall(r"^([A-Z][a-z]+_\d{3}) \(", request, re.MULTILINE)
            name = [n for n in names if not last or n != last.group(1)][0]
            return pending.popleft().format(n=name)
        if not system.startswith(("You are a guard", "You are a prisoner")):
            return "A calm day."  # the summarizer
        agent_turn[0] += 1
        return f"Reply number {agent_turn[0]}."

    with FakeLLMServer(models={"llama3:latest"}, reply=reply) as server:
        path = tmp_path / "auto.yaml"
        path.write_text(EXPERIMENT.format(name="auto", llm=_llm("ollama", server)))
        cli("run", str(path), "--messages", "4", "--days", "1", "--agents",
            "guard=1,prisoner=2", "--speaker", "auto", "--plain")  # fmt: skip
    store = Store.open(db, "alice")
    (rec,) = store.list_conversations()
    t = store.load_transcript(rec.id)
    assert [c.chosen is not None for c in t.selector_calls] == [
        False, True, False, False, False, True, True,
    ]  # fmt: skip
    assert t.fallbacks == 1
    q = rec.quality
    assert q is not None and (q.selector_calls, q.invalid_selections, q.fallbacks) == (7, 4, 1)
    assert q.usable  # one fallback is allowed by default

    plain = cli("show", rec.id).flat
    assert "→" not in plain and "fell back" not in plain
    assert "selector: 7 calls, 4 invalid, 1 fallbacks" in plain  # the quality line
    shown = cli("show", rec.id, "--selector").flat
    assert len(re.findall(r"selector \d: ", shown)) == 7
    assert shown.count("→ invalid") == 4 and shown.count("→ chose") == 3
    assert "is not the one to answer' → invalid" in shown
    assert "selector fell back to round robin" in shown

    out = tmp_path / "html"
    cli("export", rec.id, "--format", "html", "--out", str(out))
    (page,) = [p for p in out.rglob("*.html") if p.name != "index.html"]
    html = page.read_text()
    assert html.count('<details class="selector') == 4  # one per turn, folded until clicked
    assert html.count('<details class="selector fallback"') == 1
    assert html.count('class="invalid"') == 4


def test_usable_settings_are_checked(cli, settings, env_for) -> None:
    path = Path(env_for(settings)["SIMULATOR_DATA_DIR"]).parent / "x.yaml"
    path.write_text(EXPERIMENT.format(name="x", llm="{model: scripted, provider: scripted}"))
    result = cli("run", str(path), "--messages", "2", "--days", "1", "--plain",
                 env={"SIMULATOR_USABLE_MAX_TRUNCATED": "lots"}, ok=False)  # fmt: skip
    assert result.exit_code == 1
    assert "SIMULATOR_USABLE_MAX_TRUNCATED" in result.flat and "'lots'" in result.flat
    assert "Traceback" not in result.output
