"""Many workers, one batch (issue 13): the live view of a batch from the database alone.

The claiming itself lives where the documents are (simulator/store/claims.py) and
the conversation threads that claim in runner.py.
"""
