"""rankops: what cross-entropy is made of.

The exact decomposition of corpus cross-entropy into Error-Entropy, Self-Alignment and
Confidence (Zhan et al., "What Scales in Cross-Entropy Scaling Law?", arXiv 2510.04067),
with fused kernels for the per-token rank statistics it rests on.
"""
from rankops import fit
from rankops.accumulate import RankAccumulator
from rankops.decompose import Decomposition, decompose, decompose_counts
from rankops.integrations.transformers import CompensatedCausalLMLinearLoss, CompensatedCausalLMLoss
from rankops.loss import (CompensatedCrossEntropy, RunningRankStats, compensated_cross_entropy,
                          compensated_linear_cross_entropy)
from rankops.ops.common import available_backends
from rankops.ops.linear_token_stats import linear_token_stats
from rankops.ops.token_stats import TokenStats, token_stats
from rankops.ops.vocab_parallel import token_stats_vocab_parallel

__version__ = "0.1.0"

__all__ = [
    "CompensatedCausalLMLinearLoss",
    "CompensatedCausalLMLoss",
    "CompensatedCrossEntropy",
    "Decomposition",
    "RankAccumulator",
    "RunningRankStats",
    "TokenStats",
    "available_backends",
    "compensated_cross_entropy",
    "compensated_linear_cross_entropy",
    "decompose",
    "decompose_counts",
    "fit",
    "linear_token_stats",
    "token_stats",
    "token_stats_vocab_parallel",
]
