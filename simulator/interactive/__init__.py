"""The interactive menus (`simulator` with no command): the only package that imports questionary.

questions.py  the questionary wrappers (Questions, Cancelled, manual_chooser)
menus.py      main menu, experiment list, one experiment, its conversations
run.py        perform new conversations: ask for the grid, run the batch
wizard.py     create / duplicate-and-update an experiment
sections.py   the wizard's prompt sections: titles, shared or private, text and placeholders

Every entry point takes `input` / `output` (prompt_toolkit) and a rich `console`, so tests
drive the real questionary with a pipe input and keystrokes.
"""

from simulator.interactive.menus import main_menu
from simulator.interactive.questions import manual_chooser

__all__ = ["main_menu", "manual_chooser"]
