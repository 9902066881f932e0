"""Outcomes of stored conversations: scorers (judge, moderation, python), running them,
human annotation sheets, and agreement between sources (issue 11).

Scoring reads what the store holds and never regenerates a conversation.
"""
