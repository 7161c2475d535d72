"""Keep a folder of many studies in the memory of one: drop each study's volumes once it is written.

Ignite keeps ``engine.state.output`` (here the denoised native volume) until the *next* study has been
loaded, so without this handler two whole-body studies would be held at once at every study change.
"""

from __future__ import annotations

from ignite.engine import Engine, Events

__all__ = ["ReleaseStudyData"]


class ReleaseStudyData:
    """At the end of each iteration, after the writer and the report handlers, forget the batch and output.

    Attach it as the *last* handler of the evaluator (handlers run in the order they were attached).
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.batch = None
        engine.state.output = None
