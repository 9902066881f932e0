"""Placeholder tags (SPEC §2), table-driven."""

from __future__ import annotations

import pytest

from simulator.placeholders import escape, explain, fill, find_invalid, valid_tags

ROLES = ["guard", "prisoner"]


@pytest.mark.parametrize(
    ("tag", "one", "several"),
    [
        ("<GUARD_NUM>", "1", "3"),
        ("<GUARD_NOUN>", "guard", "guards"),
        ("<GUARD_POSS>", "guard's", "guards'"),
        ("<GUARD_PRON>", "he/she", "they"),
        ("<GUARD_POSSPRON>", "his/her", "their"),
        ("<GUARD_VERB_MAKE>", "makes", "make"),
        ("<GUARD_VERB_BE>", "is", "are"),
        ("<GUARD_VERB_HAVE>", "has", "have"),
    ],
)
def test_spec_table(tag: str, one: str, several: str) -> None:
    assert fill(tag, {"guard": 1}) == one
    assert fill(tag, {"guard": 3}) == several


@pytest.mark.parametrize(
    ("role", "one_poss", "plural", "plural_poss"),
    [
        ("person", "person's", "people", "people's"),
        ("policeman", "policeman's", "policemen", "policemen's"),
        ("child", "child's", "children", "children's"),
        ("sheep", "sheep's", "sheep", "sheep's"),
        ("boss", "boss's", "bosses", "bosses'"),
    ],
)
def test_irregular_nouns(role: str, one_poss: str, plural: str, plural_poss: str) -> None:
    tags = f"<{role.upper()}_NOUN>|<{role.upper()}_POSS>"
    assert fill(tags, {role: 1}) == f"{role}|{one_poss}"
    assert fill(tags, {role: 2}) == f"{plural}|{plural_poss}"


@pytest.mark.parametrize(
    ("verb", "one", "several"),
    [
        ("BE", "is", "are"),
        ("HAVE", "has", "have"),
        ("DO", "does", "do"),
        ("GO", "goes", "go"),
        ("MAKE", "makes", "make"),
        ("TRY", "tries", "try"),
        ("WATCH", "watches", "watch"),
        ("SAY", "says", "say"),
        ("WISH", "wishes", "wish"),
        ("FIX", "fixes", "fix"),
        ("CAN", "can", "can"),
    ],
)
def test_verbs(verb: str, one: str, several: str) -> None:
    assert fill(f"<GUARD_VERB_{verb}>", {"guard": 1}) == one
    assert fill(f"<GUARD_VERB_{verb}>", {"guard": 3}) == several


def test_role_name_case_and_digits() -> None:
    counts = {"Guard": 2, "Agent7": 1}
    assert fill("<GUARD_NOUN> and <AGENT7_NOUN>", counts) == "guards and agent7"


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"guard": 1}, "1 agents, 1 roles"),
        ({"guard": 1, "prisoner": 1}, "2 agents, 2 roles"),
        ({"guard": 3, "prisoner": 2, "warden": 1}, "6 agents, 3 roles"),
    ],
)
def test_agents_and_roles(counts: dict[str, int], expected: str) -> None:
    assert fill("<AGENTS_NUM> agents, <ROLES_NUM> roles", counts) == expected


def test_fill_sentence_and_leaves_other_text_alone() -> None:
    text = "There <GUARD_VERB_BE> <GUARD_NUM> <GUARD_NOUN>; <GAURD_NUM> {x} a < b <3"
    assert fill(text, {"guard": 1}) == "There is 1 guard; <GAURD_NUM> {x} a < b <3"
    assert fill("<PRISONER_NUM>", {"guard": 1}) == "<PRISONER_NUM>"  # role not in counts


@pytest.mark.parametrize(
    ("text", "found", "hint"),
    [
        ("x <GAURD_NUM> y", ["<GAURD_NUM>"], "did you mean <GUARD_NUM>?"),
        ("<GUARD_NUMS>", ["<GUARD_NUMS>"], "did you mean <GUARD_NUM>?"),
        ("<guard_num>", ["<guard_num>"], "tags are upper-case; write <GUARD_NUM>"),
        ("<GUARD_NUM and more", ["<GUARD_NUM"], "not closed with '>'; write <GUARD_NUM>"),
        ("<GUARD_VERB_>", ["<GUARD_VERB_>"], "name the verb"),
        ("<GUARD_VERB>", ["<GUARD_VERB>"], "name the verb"),
        ("<WARDEN_NUM>", ["<WARDEN_NUM>"], "unknown placeholder"),
        ("<GUARD>", ["<GUARD>"], "after the role name: <GUARD_NUM>, <GUARD_NOUN>"),
        ("<AGENT_NUM>", ["<AGENT_NUM>"], "did you mean <AGENTS_NUM>?"),
        ("<GUARD_VERB_make>", ["<GUARD_VERB_make>"], "write <GUARD_VERB_MAKE>"),
        ("<GAURD_NUM> and <GAURD_NUM> again", ["<GAURD_NUM>"], "did you mean <GUARD_NUM>?"),
    ],
)
def test_invalid_tags_found(text: str, found: list[str], hint: str) -> None:
    assert find_invalid(text, ROLES) == found
    assert hint in explain(found[0], ROLES)


@pytest.mark.parametrize(
    "text",
    [
        "if a < b then",
        "I <3 yard time",
        "x<=y and y>z",
        "<b>bold</b> and <br> in prose",
        "<GUARD_NUM> <PRISONER_VERB_WATCH> <AGENTS_NUM> <ROLES_NUM>",
        "<GUARD_NUM>s and <GUARD_NOUN>>",
        "no tags at all",
    ],
)
def test_prose_not_flagged(text: str) -> None:
    assert find_invalid(text, ROLES) == []


def test_valid_tags() -> None:
    assert valid_tags(["guard"]) == [
        "<GUARD_NUM>",
        "<GUARD_NOUN>",
        "<GUARD_POSS>",
        "<GUARD_PRON>",
        "<GUARD_POSSPRON>",
        "<GUARD_VERB_...>",
        "<AGENTS_NUM>",
        "<ROLES_NUM>",
    ]


@pytest.mark.parametrize(
    ("written", "rendered"),
    [
        ("<<END>>", "<END>"),
        ("say <<answer_text>> here", "say <answer_text> here"),
        ("<<GUARD_NUM>> vs <GUARD_NUM>", "<GUARD_NUM> vs 2"),
        ("<<<END>>>", "<<END>>"),
        ("a << b >> c", "a << b >> c"),
    ],
)
def test_escaped_literal_text(written: str, rendered: str) -> None:
    assert fill(written, {"guard": 2}) == rendered
    assert find_invalid(written, ROLES) == []
    assert fill(escape(rendered), {"guard": 2}) == rendered  # escape is fill's inverse
