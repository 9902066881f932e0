"""Placeholder tags (SPEC §2): their grammar, inflection and filling. Pure functions.

A role tag is `<ROLE_KIND>`: the role name in capitals, an underscore, then one of
NUM, NOUN, POSS, PRON, POSSPRON or VERB_X for any verb X in its base form
(`<GUARD_VERB_MAKE>` gives "makes" for one guard, "make" for several).
`<AGENTS_NUM>` and `<ROLES_NUM>` count the agents and the roles of a conversation.
Text that should reach the model as `<END>` is written doubled, `<<END>>`: never filled,
never flagged, rendered as `<END>` (`escape` does the reverse).
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any

KINDS = ("NUM", "NOUN", "POSS", "PRON", "POSSPRON")
GLOBAL_TAGS = ("AGENTS_NUM", "ROLES_NUM")
RESERVED_ROLE_NAMES = (
    "AGENTS",
    "ROLES",
)  # a role with one of these names would clash with GLOBAL_TAGS

# A well-formed tag (which roles exist is checked separately).
_TAG_RE = re.compile(r"<([A-Z][A-Z0-9]*)_(NUM|NOUN|POSS|PRON|POSSPRON|VERB_[A-Z]+)>")
# Where a tag could start: `<` directly followed by a word, with or without the closing `>`.
# `a < b`, `<3` and `x<=y` never match; whether a match is meant as a tag is `_looks_like_tag`.
_CANDIDATE_RE = re.compile(r"<([A-Za-z][A-Za-z0-9_]*)(>?)")
_VERB_RE = re.compile(r"VERB_[A-Z]+")
# Literal text: `<<END>>` renders as `<END>`. Matched before tags, so `<<GUARD_NUM>>` is
# the text `<GUARD_NUM>`, not a doubled bracket around a number.
_ESCAPED_RE = re.compile(r"<<([A-Za-z][A-Za-z0-9_]*)>>")
_FILL_RE = re.compile(f"{_ESCAPED_RE.pattern}|{_TAG_RE.pattern}")
_CLOSED_RE = re.compile(r"<([A-Za-z][A-Za-z0-9_]*)>")
ESCAPE_HINT = "to write a literal <WORD> for the model, double the brackets: <<WORD>>"

_MODALS = frozenset({"can", "could", "may", "might", "must", "shall", "should", "will", "would"})
_ES_ENDINGS = ("s", "sh", "ch", "x", "z", "o")
_VOWELS = "aeiou"


@functools.cache
def _engine() -> Any:
    """The one inflect engine, made on first use: importing inflect (with pydantic) costs
    a command that fills no placeholders a quarter of a second (issue 14)."""
    import inflect

    return inflect.engine()


@functools.lru_cache(maxsize=1024)
def plural_noun(noun: str) -> str:
    """The plural of a noun (inflect: person -> people, sheep -> sheep)."""
    return str(_engine().plural_noun(noun))


def possessive(noun: str, plural: bool) -> str:
    """guard's / guards'; irregular plurals not ending in s take 's (people's)."""
    if plural and noun.endswith("s"):
        return noun + "'"
    return noun + "'s"


def verb_form(verb: str, count: int) -> str:
    """Present tense agreeing with `count` subjects: be -> is/are, make -> makes/make."""
    verb = verb.lower()
    if count != 1:
        return "are" if verb == "be" else verb
    if verb == "be":
        return "is"
    if verb == "have":
        return "has"
    if verb in _MODALS:
        return verb
    if verb.endswith(_ES_ENDINGS):
        return verb + "es"
    if len(verb) > 1 and verb.endswith("y") and verb[-2] not in _VOWELS:
        return verb[:-1] + "ies"
    return verb + "s"


def role_tag_value(role_name: str, kind: str, count: int) -> str:
    """What `<ROLE_KIND>` becomes for `count` agents of the role (kind may be VERB_X)."""
    noun = role_name.lower()
    one = count == 1
    if kind == "NUM":
        return str(count)
    if kind == "NOUN":
        return noun if one else plural_noun(noun)
    if kind == "POSS":
        return possessive(noun if one else plural_noun(noun), plural=not one)
    if kind == "PRON":
        return "he/she" if one else "they"
    if kind == "POSSPRON":
        return "his/her" if one else "their"
    if kind.startswith("VERB_") and len(kind) > len("VERB_"):
        return verb_form(kind[len("VERB_") :], count)
    raise ValueError(f"unknown tag kind {kind!r}")


def fill(text: str, counts: dict[str, int]) -> str:
    """Replace every valid tag for the roles in `counts` (role name -> agents); leave others."""
    roles = {name.upper(): (name, n) for name, n in counts.items()}
    totals = {"AGENTS_NUM": str(sum(counts.values())), "ROLES_NUM": str(len(counts))}

    def replace(m: re.Match[str]) -> str:
        literal, prefix, kind = m.groups()
        if literal is not None:
            return f"<{literal}>"
        whole = f"{prefix}_{kind}"
        if whole in totals:
            return totals[whole]
        if prefix not in roles:
            return m.group(0)
        name, n = roles[prefix]
        return role_tag_value(name, kind, n)

    return _FILL_RE.sub(replace, text)


def escape(text: str) -> str:
    """`text` written so that `fill` gives it back unchanged: `<END>` -> `<<END>>`."""
    return _CLOSED_RE.sub(r"<<\1>>", text)


def valid_tags(role_names: list[str]) -> list[str]:
    """Every tag valid for these roles; verbs as the pattern `<ROLE_VERB_...>`."""
    tags = [f"<{r.upper()}_{kind}>" for r in role_names for kind in (*KINDS, "VERB_...")]
    return tags + [f"<{t}>" for t in GLOBAL_TAGS]


def find_invalid(text: str, role_names: list[str]) -> list[str]:
    """Unknown or malformed tags, as written in `text`, each once, in order of appearance."""
    prefixes = {r.upper() for r in role_names}
    found: list[str] = []
    for m in _CANDIDATE_RE.finditer(_ESCAPED_RE.sub("", text)):
        body, closed = m.groups()
        if closed and _is_valid(body, prefixes):
            continue
        if _looks_like_tag(body, prefixes) and m.group(0) not in found:
            found.append(m.group(0))
    return found


def explain(tag: str, role_names: list[str]) -> str:
    """Why `tag` (as returned by find_invalid) is wrong and how to fix it."""
    prefixes = {r.upper() for r in role_names}
    closed = tag.endswith(">")
    body = tag[1:-1] if closed else tag[1:]
    upper = body.upper()
    if _is_valid(upper, prefixes):
        fixes = []
        if upper != body:
            fixes.append("tags are upper-case")
        if not closed:
            fixes.append("it is not closed with '>'")
        return f"{tag}: {' and '.join(fixes)}; write <{upper}>"
    prefix, _, rest = upper.partition("_")
    if prefix in prefixes and not rest:
        kinds = ", ".join(f"<{prefix}_{kind}>" for kind in KINDS)
        return f"{tag}: say what to insert after the role name: {kinds} or <{prefix}_VERB_...>"
    if prefix in prefixes and rest in ("VERB", "VERB_"):
        return f"{tag}: name the verb in its base form, e.g. <{prefix}_VERB_BE> or <{prefix}_VERB_MAKE>"
    verb = rest if _VERB_RE.fullmatch(rest) else "VERB_BE"
    choices = [f"{r}_{kind}" for r in sorted(prefixes) for kind in (*KINDS, verb)]
    close = difflib.get_close_matches(upper, [*choices, *GLOBAL_TAGS], n=1, cutoff=0.6)
    # Literal text (`<END>` in a format the model should follow) has an escape: say it.
    text = f" (if it is text for the model, write <{tag}>)" if closed else ""
    if close:
        return f"{tag}: unknown placeholder; did you mean <{close[0]}>?{text}"
    return f"{tag}: unknown placeholder{text}"


def _is_valid(body: str, prefixes: set[str]) -> bool:
    if body in GLOBAL_TAGS:
        return True
    prefix, _, kind = body.partition("_")
    return prefix in prefixes and (kind in KINDS or bool(_VERB_RE.fullmatch(kind)))


def _looks_like_tag(body: str, prefixes: set[str]) -> bool:
    """Is `<body` meant as a tag? (`<b>`, `<html>` in prose are not; `<GUARD>`, `<a_b>` are.)"""
    first = body.split("_", 1)[0].upper()
    known = first in prefixes or first in RESERVED_ROLE_NAMES
    return "_" in body or known or (body.isupper() and len(body) > 1)
