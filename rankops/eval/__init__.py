"""Evaluation of language models on corpora: what `rankops eval` is built on."""
