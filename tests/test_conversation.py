"""The conversation engine on the scripted model (SPEC §3-5)."""

from __future__ import annotations

import re

import pytest

from simulator.conversation import (
    Conversation,
    ConversationSpec,
    Fallback,
    Message,
    Models,
    SelectorCall,
    Summary,
    Transcript,
    agent_names,
    agent_view,
    day_opening,
    messages_per_day,
)
from simulator.errors import UserError
from simulator.experiment import Experiment, ModelSpec, Role, Summarizer
from simulator.llm.scripted import ScriptedModel


def make_experiment() -> Experiment:
    return Experiment(
        name="mini",
        starting_message="Start the experiment",
        llms=[ModelSpec("scripted", "scripted")],
        roles=[
            Role("guard", "keeps order", {"starting_prompt": "You are a <GUARD_NOUN>."}),
            Role("prisoner", "wants yard time", {"starting_prompt": "You are a <PRISONER_NOUN>."}),
        ],
        shared_sections={"environment": "There <GUARD_VERB_BE> <GUARD_NUM> <GUARD_NOUN>."},
        summarizer=Summarizer({"starting_prompt": "Summarize the day."}),
    )


def scripted(**extra) -> ScriptedModel:
    return ScriptedModel(ModelSpec("scripted", "scripted", seed=extra.pop("seed", 0), extra=extra))


def run(
    agents: dict[str, int],
    speaker: str = "round_robin",
    *,
    messages: int = 6,
    days: int = 2,
    seed: int = 1,
    agent_model=None,
    selector=None,
    summarizer=None,
    manual=None,
):
    exp = make_experiment()
    spec = ConversationSpec(exp.llms[0], messages, days, agents, speaker, seed)
    events: list = []
    models = Models(
        agent=agent_model or scripted(),
        summarizer=summarizer or scripted(),
        selector=selector or scripted(),
    )
    conv = Conversation(exp, spec, models, on_event=events.append, manual=manual)
    return conv, conv.run(), events


@pytest.mark.parametrize(
    ("total", "days", "split"),
    [(10, 2, [5, 5]), (11, 3, [4, 4, 3]), (7, 3, [3, 2, 2]), (2, 1, [2]), (20, 10, [2] * 10)],
)
def test_messages_split_over_days_with_remainder(total, days, split):
    assert messages_per_day(total, days) == split
    _, t, _ = run({"guard": 1, "prisoner": 1}, messages=total, days=days)
    per_day = [sum(1 for m in t.messages if m.day == d) for d in range(1, days + 1)]
    assert per_day == split
    assert [s.day for s in t.summaries] == list(range(1, days + 1))


@pytest.mark.parametrize(("total", "days"), [(1, 1), (0, 1), (5, 3), (4, 0)])
def test_bad_counts_are_user_errors(total, days):
    with pytest.raises(UserError):
        messages_per_day(total, days)


def test_agent_names_are_seeded_unique_and_formatted():
    a = agent_names(["guard", "prisoner"], {"guard": 3, "prisoner": 4}, seed=7)
    assert a == agent_names(["guard", "prisoner"], {"guard": 3, "prisoner": 4}, seed=7)
    assert a != agent_names(["guard", "prisoner"], {"guard": 3, "prisoner": 4}, seed=8)
    names = [n for n, _ in a]
    assert len(set(names)) == 7
    assert all(re.fullmatch(r"(Guard|Prisoner)_\d{3}", n) for n in names)
    assert [r for _, r in a] == ["guard"] * 3 + ["prisoner"] * 4


def test_day_opening_appends_summaries_exactly():
    sums = [Summary(1, "Day one went badly."), Summary(2, "Day two was calm.")]
    assert day_opening("Start the experiment", sums, 1) == "Start the experiment"
    assert day_opening("Start the experiment", sums, 3) == (
        "Start the experiment\nDay 1 summary:\nDay one went badly.\nDay 2 summary:\nDay two was calm."
    )


def test_each_day_starts_fresh_with_previous_summaries():
    summarizer = scripted(replies=["S-one", "S-two", "S-three"])
    agent = scripted()
    run({"guard": 1, "prisoner": 1}, messages=6, days=3, agent_model=agent, summarizer=summarizer)
    # the first speaker of each day sees the system prompt and the day's opening only
    firsts = [r for r in agent.history if len(r) == 2 and "\n\n" not in r[1]["content"]]
    assert [r[1]["content"] for r in firsts] == [
        "Researcher: Start the experiment",
        "Researcher: Start the experiment\nDay 1 summary:\nS-one",
        "Researcher: Start the experiment\nDay 1 summary:\nS-one\nDay 2 summary:\nS-two",
    ]
    # the summarizer sees the day's transcript, never the starting message
    for req in summarizer.history:
        assert "Start the experiment" not in req[1]["content"]
        assert req[0]["content"] == "Summarize the day."


def test_agent_view_alternates_and_names_speakers():
    exp = make_experiment()
    spec = ConversationSpec(exp.llms[0], 6, 1, {"guard": 1, "prisoner": 2}, "round_robin", 3)
    conv = Conversation(exp, spec, Models(scripted(), scripted(), scripted()))
    g, p1, p2 = conv.agents
    day = [
        Message(1, 1, g.name, "guard", "Quiet."),
        Message(1, 2, p1.name, "prisoner", "We want air."),
        Message(1, 3, p2.name, "prisoner", "Please."),
    ]
    view = agent_view(g, "Start the experiment", day)
    assert [m["role"] for m in view] == ["system", "user", "assistant", "user"]
    assert view[0]["content"] == g.system_prompt
    assert view[1]["content"] == "Researcher: Start the experiment"
    assert view[2]["content"] == "Quiet."
    assert view[3]["content"] == f"{p1.name}: We want air.\n\n{p2.name}: Please."
    view2 = agent_view(p2, "Start the experiment", day[:2])
    assert [m["role"] for m in view2] == ["system", "user"]
    assert view2[1]["content"].startswith("Researcher: Start the experiment\n\n")


@pytest.mark.parametrize("method", ["round_robin", "random", "auto", "manual"])
def test_two_agents_alternate_under_every_method(method):
    selector = scripted()
    _, t, _ = run(
        {"guard": 1, "prisoner": 1},
        method,
        messages=8,
        days=2,
        selector=selector,
        manual=lambda *a: pytest.fail("manual chooser must not be asked with two agents"),
    )
    for day in (1, 2):
        speakers = [m.speaker for m in t.messages if m.day == day]
        assert all(a != b for a, b in zip(speakers, speakers[1:]))
        assert speakers[0].startswith("Guard_")
    assert selector.history == [] and t.selector_calls == []


def test_round_robin_cycles_in_role_then_creation_order():
    conv, t, _ = run({"guard": 2, "prisoner": 2}, "round_robin", messages=10, days=2)
    names = [a.name for a in conv.agents]
    assert [m.speaker for m in t.messages if m.day == 1] == names + names[:1]
    assert [m.speaker for m in t.messages if m.day == 2] == names + names[:1]


def test_random_never_repeats_and_is_reproducible():
    _, t1, _ = run({"guard": 2, "prisoner": 3}, "random", messages=40, days=2, seed=5)
    _, t2, _ = run({"guard": 2, "prisoner": 3}, "random", messages=40, days=2, seed=5)
    _, t3, _ = run({"guard": 2, "prisoner": 3}, "random", messages=40, days=2, seed=6)
    s1 = [m.speaker for m in t1.messages]
    assert s1 == [m.speaker for m in t2.messages]
    assert s1 != [m.speaker for m in t3.messages]
    for day in (1, 2):
        d = [m.speaker for m in t1.messages if m.day == day]
        assert all(a != b for a, b in zip(d, d[1:]))
    assert len(set(s1)) == 5


def test_auto_calls_the_selector_and_takes_the_first_valid_name():
    exp = make_experiment()
    from simulator.conversation import agent_names as names_of

    names = [n for n, _ in names_of(["guard", "prisoner"], {"guard": 1, "prisoner": 2}, 4)]
    selector = scripted(replies=[f"I pick {names[2]}, then {names[1]}", f"{names[1]}"])
    _, t, events = run(
        {"guard": 1, "prisoner": 2}, "auto", messages=2, days=1, seed=4, selector=selector
    )
    assert exp.roles[0].description in selector.history[0][1]["content"]
    assert [m.speaker for m in t.messages] == [names[2], names[1]]
    assert [c.chosen for c in t.selector_calls] == [names[2], names[1]]
    assert t.fallbacks == 0
    assert sum(isinstance(e, SelectorCall) for e in events) == 2
    usage = t.usage()
    assert usage["selector"].calls == 2 and usage["agents"].calls == 2


def test_auto_reasks_invalid_and_repeated_names_then_falls_back():
    names = [n for n, _ in agent_names(["guard", "prisoner"], {"guard": 1, "prisoner": 2}, 4)]
    selector = scripted(
        replies=[
            "nobody",  # turn 1: invalid
            names[1],  # turn 1: valid on the second ask
            names[1],  # turn 2: repeats the last speaker
            "Warden",  # turn 2: invalid
            "???",  # turn 2: third failure -> round robin after names[1] -> names[2]
        ]
    )
    _, t, events = run(
        {"guard": 1, "prisoner": 2}, "auto", messages=2, days=1, seed=4, selector=selector
    )
    assert [m.speaker for m in t.messages] == [names[1], names[2]]
    assert len(t.selector_calls) == 5
    assert [c.chosen for c in t.selector_calls] == [None, names[1], None, None, None]
    assert t.fallbacks == 1
    assert any(isinstance(e, Fallback) and e.chosen == names[2] for e in events)
    # the re-ask tells the model what went wrong
    assert "not a valid choice" in selector.history[1][-1]["content"]


def test_manual_uses_the_callback():
    asked = []

    def choose(agents, last, day, turn, today):
        asked.append((last, day, turn))
        candidates = [a.name for a in agents if a.name != last]
        return candidates[-1]

    conv, t, _ = run({"guard": 1, "prisoner": 2}, "manual", messages=4, days=2, manual=choose)
    assert len(asked) == 4
    assert asked[0][0] is None and asked[1][0] == t.messages[0].speaker


def test_run_on_replies_are_cut_and_raw_kept():
    exp_agents = agent_names(["guard", "prisoner"], {"guard": 1, "prisoner": 1}, 1)
    guard, prisoner = exp_agents[0][0], exp_agents[1][0]
    agent = scripted(
        replies=[
            f"**{guard}:** Back to your cell.\n{prisoner}: No way!\nGuard: fine",
            "  Prisoner: I want air.  ",
        ]
    )
    _, t, _ = run({"guard": 1, "prisoner": 1}, messages=2, days=1, agent_model=agent)
    assert t.messages[0].content == "Back to your cell."
    assert t.messages[0].raw.startswith(f"**{guard}:**")
    assert t.messages[1].content == "I want air."
    assert t.messages[1].raw == "  Prisoner: I want air.  "


def test_empty_replies_are_reasked_then_flagged():
    agent = scripted(replies=["", "Guard:", "Hello.", "", "", "   "])
    _, t, _ = run({"guard": 1, "prisoner": 1}, messages=2, days=1, agent_model=agent)
    first, second = t.messages
    assert first.content == "Hello." and not first.empty and first.usage.calls == 3
    assert second.content == "" and second.empty and second.usage.calls == 3


def test_same_seed_same_transcript_and_events_in_order():
    _, t1, ev1 = run({"guard": 2, "prisoner": 2}, "auto", messages=12, days=3, seed=9)
    _, t2, _ = run({"guard": 2, "prisoner": 2}, "auto", messages=12, days=3, seed=9)
    strip = lambda t: [(m.day, m.turn, m.speaker, m.content) for m in t.messages]  # noqa: E731
    assert strip(t1) == strip(t2)
    assert [s.content for s in t1.summaries] == [s.content for s in t2.summaries]
    kinds = [type(e).__name__ for e in ev1 if isinstance(e, (Message, Summary))]
    assert kinds == (["Message"] * 4 + ["Summary"]) * 3


def test_resume_continues_after_the_last_stored_message():
    _, full, _ = run({"guard": 2, "prisoner": 2}, "random", messages=12, days=3, seed=9)
    stored = Transcript(messages=full.messages[:6], summaries=full.summaries[:1])
    exp = make_experiment()
    spec = ConversationSpec(exp.llms[0], 12, 3, {"guard": 2, "prisoner": 2}, "random", 9)
    agent = scripted()
    events: list = []
    conv = Conversation(exp, spec, Models(agent, scripted(), scripted()), on_event=events.append)
    done = conv.run(stored)
    assert [(m.day, m.turn, m.speaker, m.content) for m in done.messages] == [
        (m.day, m.turn, m.speaker, m.content) for m in full.messages
    ]
    assert len(agent.history) == 6  # only the missing messages were generated
    assert [e.turn for e in events if isinstance(e, Message)] == [3, 4, 1, 2, 3, 4]


def test_manual_answer_naming_the_last_speaker_is_refused():
    asked = []

    def choose(agents, last, day, turn, today):
        asked.append(last)
        if last is None:
            return agents[1].name
        return last  # the agent who just spoke: must not be accepted

    agent = scripted()
    events: list = []
    exp = make_experiment()
    spec = ConversationSpec(exp.llms[0], 4, 1, {"guard": 1, "prisoner": 2}, "manual", 1)
    conv = Conversation(
        exp, spec, Models(agent, scripted(), scripted()), on_event=events.append, manual=choose
    )
    with pytest.raises(UserError, match="cannot speak now"):
        conv.run()
    assert asked == [None, conv.agents[1].name]
    # only the first turn was spoken: the refused answer made no call and no message
    assert [e.speaker for e in events if isinstance(e, Message)] == [conv.agents[1].name]
    assert len(agent.history) == 1
