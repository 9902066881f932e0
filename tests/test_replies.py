"""Reply cleaning (SPEC §5), table-driven."""

from __future__ import annotations

import pytest

from simulator.replies import clean_reply

OTHERS = ["Prisoner_221", "Prisoner_305", "Guard_042"]
ROLES = ["guard", "prisoner"]


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("Back to your cell.", "Back to your cell."),
        ("   Back to your cell.  \n", "Back to your cell."),
        ("Guard_117: Back to your cell.", "Back to your cell."),
        ("Guard: Back to your cell.", "Back to your cell."),
        ("guard: back.", "back."),
        ("**Guard_117:** Back to your cell.", "Back to your cell."),
        ("**Guard_117**: Back to your cell.", "Back to your cell."),
        ("[Guard_117]: Back.", "Back."),
        ("Guard_117: Guard_117: Back.", "Back."),
        ("Back.\nPrisoner_221: No!", "Back."),
        ("Back.\n\n**Prisoner_305:** No!", "Back."),
        ("Back.\nPrisoner: No!", "Back."),
        ("Back.\nGuard: and another thing", "Back."),  # any role label, own included
        ("Back.\nResearcher: stop", "Back."),
        ("Back.\nSummarizer: day one", "Back."),
        ("Back.\nGuard_042: me too", "Back."),
        ("Back.\nGuard_117: still me", "Back.\nGuard_117: still me"),  # own name: kept
        ("I told Prisoner_221: no.", "I told Prisoner_221: no."),  # not at a line start
        ("Prisoner_221 said no.\nFine.", "Prisoner_221 said no.\nFine."),  # no colon
        ("Line one.\nLine two.", "Line one.\nLine two."),
        # labels after a leading article, in bold or brackets, with an aside
        ("The Guard_117: Back to your cell.", "Back to your cell."),
        ("[Guard_117] Back to your cell.", "Back to your cell."),
        ("(Guard_117) Back.", "Back."),
        ("Guard_117 (to the prisoners): Back.", "Back."),
        ("Back.\nThe Prisoner_221: No!", "Back."),
        ("Back.\n**The Prisoner_305:** No!", "Back."),
        ("Back.\n[Prisoner_221] No!", "Back."),
        ("Back.\n(the researcher) Thank you all.", "Back."),
        ("Back.\nPrisoner_221 (whispering): run", "Back."),
        # generic chat labels: the model's own is stripped, the other side's cut
        ("Assistant: Back.", "Back."),
        ("Back.\nUser: why?", "Back."),
        ("Back.\nHuman: why?", "Back."),
        ("Back.\nAssistant: and more", "Back."),
        ("You: why?", ""),
        # names nobody in the conversation has, and the researcher's summary lines
        ("Back.\nPrisoner_2014: who am I?", "Back."),
        # real (SmolLM2 in `make demo`): an invented participant named like a handle
        ("I agree.\nPalace_Dreamer: The interview was very interesting indeed", "I agree."),
        ("Palace_Dreamer: The conversation is part of a research study", ""),
        ("I agree.\nsnake_case is a naming style.", "I agree.\nsnake_case is a naming style."),
        ("Back.\nDay 1 summary:\nthe day went", "Back."),
        # real (SmolLM2-135M, max_tokens 48, repeat_penalty 1.3)
        (
            "The researchers read the conversation afterwards and decided to start a new "
            "experiment.\nYou: How can I find out how much",
            "The researchers read the conversation afterwards and decided to start a new "
            "experiment.",
        ),
        (
            "You are a prisoner in the prison, one of your fellow prisoners.\nI:",
            "You are a prisoner in the prison, one of your fellow prisoners.\nI:",
        ),  # "I:" is not anyone else
        ("I: I'm glad to hear that.", "I'm glad to hear that."),
        (
            "Gun_1: The conversation began with the prisoners, who were a team of researchers",
            "",
        ),
        (
            "Day 2 summary:\nThe experiment will be conducted in a laboratory, with two groups",
            "",
        ),
        (
            "Dialogue\nDay 1 summary:\n\n20th day, you were present to the interview",
            "Dialogue",
        ),
        (
            "Yes.\nToday's scenario is part of a research study",
            "Yes.\nToday's scenario is part of a research study",
        ),
        ("Prisoner_221: only them", ""),
        ("Guard_117:", ""),
        ("", ""),
    ],
)
def test_clean_reply(raw: str, cleaned: str) -> None:
    assert clean_reply(raw, "Guard_117", "guard", OTHERS, ROLES) == cleaned
