"""Embedded default models: data, evaluators, training and shipped weights."""
