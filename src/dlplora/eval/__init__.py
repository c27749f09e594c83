"""The evaluation: metrics, scoring, runners, settings and streams, the prediction cache, the harness and the report.

The entry point is :func:`dlplora.eval.harness.run_evaluation` with an :class:`dlplora.eval.settings.EvalConfig`.
"""
