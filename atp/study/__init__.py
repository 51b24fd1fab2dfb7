"""An end-to-end study on a CPU: a small LLaVA trained from scratch on generated shape questions,
then ATP and the baselines at one Token metric (docs/study.md)."""
