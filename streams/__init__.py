"""The scoring stage: GenerationResult -> LearningEvent, as a Faust agent.

``streams.scoring`` holds the rule and the record-level function (no I/O),
``streams.routing`` what each record becomes on the output topics (no I/O),
``streams.delivery`` the writer that awaits, retries and dead-letters each
send, ``streams.app`` the Faust app, ``streams.rouge`` the exact fast ROUGE-L.
The stage takes its configuration as arguments and never reads the
environment, so it can be used as a library.
"""

from streams.app import ScoringConfig, create_app
from streams.exceptions import StreamsError
from streams.scoring import Outcome, Score, Thresholds, classify, process, score

__all__ = [
    "Outcome",
    "Score",
    "ScoringConfig",
    "StreamsError",
    "Thresholds",
    "classify",
    "create_app",
    "process",
    "score",
]
