"""Adapters from rankops to the engines people already use: torchmetrics, transformers,
lm-evaluation-harness.

Each adapter is its own module and imports its engine only when that module is imported, so
`import rankops` never needs them: `from rankops.integrations.torchmetrics import
CrossEntropyDecomposition`.
"""
