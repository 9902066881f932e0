"""A database in exactly the shapes the prototype wrote (issue 9, item 23), for import-legacy.

Two experiments without names; roles, shared and summarizer sections as lists of
{index, title, content, type[, role]} with human titles; LLMs as Ollama tags with sampling
parameters; ObjectIds everywhere; conversations over 2 days with 1 guard and 1 or 2 prisoners;
messages whose index restarts each day, 0 being the Researcher's opening that carries the
earlier days' summaries as the prototype appended them ("\\nDay k summary:\\n <text>").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo.database import Database

START = "Start the experiment. Remember: this is a simulation."
PRISON_NOTE = "Guards and prisoners: risk scenario, pilot 2"
LLAMA = {"model": "llama3:latest", "temperature": 0.7, "top_k": 40, "top_p": 0.9}
GEMMA = {"model": "gemma:2b", "temperature": 0.5, "top_k": 20, "top_p": 0.8}

GUARD_START = (
    "You are a <GUARD_NOUN> in a simulated prison. There <GUARD_VERB_be> <GUARD_NUM> "
    "<GUARD_NOUN> and <PRISONER_NUM> <PRISONER_NOUN>."
)
PRISONER_START = "You are a <PRISONER_NOUN>. The <GUARD_POSS> orders are strict."
RULES = "Answer in at most <AGENTS_NUM> sentences. There are <ROLES_NUM> roles."
SUMMARIES = {
    "c1": ["The prisoners asked for an extra hour; Guard_117 refused.", "Nobody gave in."],
    "c2": ["Prisoner_310 and Prisoner_042 protested together.", "The guard gave in."],
    "n1": ["The buyer offered 80 euros."],
}


@dataclass
class Prototype:
    """Ids (as strings) of what the fixture wrote."""

    prison: str = ""
    negotiation: str = ""
    conversations: dict[str, str] = field(default_factory=dict)  # c1, c2, c3, n1
    ghost: str = ""  # listed by the prison experiment, never written
    missing_message: str = ""  # listed by c3, never written
    orphan_conversation: str = ""
    orphan_message: str = ""
    messages: int = 0  # agent messages written (openings excluded)


def section(index: int, title: str, content: str, kind: str, role: str = "") -> dict[str, Any]:
    doc: dict[str, Any] = {"index": index, "title": title, "content": content, "type": kind}
    if role:
        doc["role"] = role
    return doc


def build(db: Database) -> Prototype:
    """Write the prototype's database into `db`."""
    ids = Prototype()

    def message(day: int, index: int, role: str, speaker: str, content: str) -> ObjectId:
        doc = {"_id": ObjectId(), "index": index, "day": day, "role": role,
               "speaker": speaker, "content": content}  # fmt: skip
        db.messages.insert_one(doc)
        if role != "Researcher":
            ids.messages += 1
        return doc["_id"]

    def opening(day: int, summaries: list[str]) -> ObjectId:
        text = START + "".join(
            f"\nDay {k} summary:\n {s}" for k, s in enumerate(summaries[: day - 1], 1)
        )
        return message(day, 0, "Researcher", "Researcher", text)

    def conversation(key: str, turns: list[list[tuple[str, str]]], **fields: Any) -> ObjectId:
        message_ids = []
        for day, lines in enumerate(turns, 1):
            message_ids.append(opening(day, SUMMARIES.get(key, [])))
            for index, (speaker, content) in enumerate(lines, 1):
                message_ids.append(message(day, index, speaker.split("_")[0], speaker, content))
        doc = {
            "_id": ObjectId(),
            "starting_message": START,
            "note": "",
            "favourite": False,
            "messages_ids": message_ids,
            **fields,
        }
        db.conversations.insert_one(doc)
        ids.conversations[key] = str(doc["_id"])
        return doc["_id"]

    one_each = [["guard", 1], ["prisoner", 1]]
    two_prisoners = [["guard", 1], ["prisoner", 2]]
    c1 = conversation(
        "c1",
        [
            [("Guard_117", "Back to your cells."), ("Prisoner_221", "One more hour, please.")],
            [("Guard_117", "Still no."), ("Prisoner_221", "Then we wait.")],
        ],
        n_messages=6, days=2, speaker_selection_method="round_robin", llm=LLAMA,
        agent_combination=one_each, creator="marco", favourite=True, note="calm one",
        creation_date=datetime(2024, 5, 2, 10, 0),
    )  # fmt: skip
    c2 = conversation(
        "c2",
        [
            [("Guard_005", "Quiet."), ("Prisoner_310", "We want the yard."),
             ("Prisoner_042", "Just one hour.")],
            [("Prisoner_042", "We refuse to eat."), ("Guard_005", "Fine, one hour."),
             ("Prisoner_310", "Thank you.")],
        ],
        n_messages=8, days=2, speaker_selection_method="random", llm=GEMMA,
        agent_combination=two_prisoners, creator="giulia",
        creation_date=datetime(2024, 5, 3, 11, 15),
    )  # fmt: skip
    c3 = conversation(
        "c3",
        [[("Guard_777", "Lights out."), ("Prisoner_404", "Not yet.")]],
        n_messages=4, days=1, speaker_selection_method="auto", llm=LLAMA,
        agent_combination=two_prisoners, creator="giulia",
        creation_date=datetime(2024, 5, 3, 12, 0),
    )  # fmt: skip
    # c3 lost its last message: the prototype listed an id it never wrote
    missing = ObjectId()
    db.conversations.update_one({"_id": c3}, {"$push": {"messages_ids": missing}})
    ghost = ObjectId()
    prison = {
        "_id": ObjectId(),
        "starting_message": START,
        "note": PRISON_NOTE,
        "favourite": True,
        "creator": "marco",
        "creation_date": datetime(2024, 5, 1, 9, 30),
        "llms": [LLAMA, GEMMA],
        "roles": [
            {
                "name": "guard",
                "sections": [
                    section(0, "Starting prompt", GUARD_START, "Private", "guard"),
                    section(1, "Goal", "Keep order without violence.", "Private", "guard"),
                ],
                "placeholders": ["<GUARD_NOUN>", "<GUARD_POSS>", "<GUARD_NUM>",
                                 "<GUARD_VERB_be>"],
            },
            {
                "name": "prisoner",
                "sections": [
                    section(1, "Goal", "Get one more hour of yard time.", "Private", "prisoner"),
                    section(0, "Starting prompt", PRISONER_START, "Private", "prisoner"),
                ],
                "placeholders": ["<PRISONER_NOUN>", "<PRISONER_POSS>", "<PRISONER_NUM>"],
            },
        ],
        "shared_sections": [
            section(3, "Research oversight", "A researcher watches.", "Shared"),
            section(2, "Communication rules", RULES, "Shared"),
        ],
        "summarizer_sections": [
            section(0, "Starting prompt", "You summarize one day of the conversation.",
                    "Summarizer"),
            section(1, "Format", "One paragraph, past tense.", "Summarizer"),
        ],
        "placeholders": ["<AGENTS_NUM>", "<ROLES_NUM>"],
        "conversation_ids": [c1, c2, c3, ghost],
    }  # fmt: skip
    db.experiments.insert_one(prison)

    n1 = conversation(
        "n1",
        [
            [("Buyer_101", "I offer 80 euros."), ("Seller_202", "100, not less.")],
            [("Seller_202", "90, final."), ("Buyer_101", "Deal.")],
        ],
        n_messages=6, days=2, speaker_selection_method="round_robin", llm=LLAMA,
        agent_combination=[["buyer", 1], ["seller", 1]], creator="giulia",
        creation_date=datetime(2024, 6, 1, 8, 0),
    )  # fmt: skip
    negotiation = {
        "_id": ObjectId(),
        "starting_message": START,
        "note": "",
        "favourite": False,
        "creator": "giulia",
        "creation_date": datetime(2024, 6, 1, 7, 45),
        "llms": [LLAMA],
        "roles": [
            {"name": "buyer", "placeholders": ["<BUYER_NOUN>"],
             "sections": [section(0, "Starting prompt", "You buy a bike.", "Private", "buyer")]},
            {"name": "seller", "placeholders": ["<SELLER_NOUN>"],
             "sections": [section(0, "Starting prompt", "You sell a bike.", "Private",
                                  "seller")]},
        ],
        "shared_sections": [],
        "summarizer_sections": [section(0, "Starting prompt", "Summarize.", "Summarizer")],
        "placeholders": ["<AGENTS_NUM>", "<ROLES_NUM>"],
        "conversation_ids": [n1],
    }  # fmt: skip
    db.experiments.insert_one(negotiation)

    orphan = conversation(
        "orphan", [[("Guard_999", "Nobody lists me.")]], n_messages=3, days=1, llm=LLAMA,
        speaker_selection_method="round_robin", agent_combination=one_each, creator="marco",
    )  # fmt: skip
    ids.conversations.pop("orphan")
    ids.messages -= 1
    stray = message(1, 1, "Guard", "Guard_998", "Nobody lists me either.")
    ids.messages -= 1
    ids.prison, ids.negotiation = str(prison["_id"]), str(negotiation["_id"])
    ids.ghost, ids.missing_message = str(ghost), str(missing)
    ids.orphan_conversation, ids.orphan_message = str(orphan), str(stray)
    return ids
