"""Evaluations of a trained run: kNN, classifier top-1, robustness, token-label pictures."""


class EvalError(ValueError):
    """Bad input to an evaluation (unlabelled shards, a run without a classifier, an unknown
    corruption): the CLI reports it as one line, exit 2."""
