"""From stored conversations to a study's tables and figures (issue 12).

    from simulator.analysis import conversations_df, messages_df, scores_df, write_report

pandas, statsmodels and matplotlib (the `analysis` extra) are imported only when a function
needs them, so importing this package costs nothing and `simulator` starts fast without them.
"""

from simulator.analysis.frames import conversations_df, messages_df, scores_df
from simulator.analysis.report import write_report

__all__ = ["conversations_df", "messages_df", "scores_df", "write_report"]
