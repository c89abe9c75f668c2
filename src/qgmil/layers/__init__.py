"""Small reusable building blocks shared by the aggregators."""

from .attention import GatedSelfAttention
from .chunking import map_instances
from .embedding import InstanceEmbed
from .ffn import MLP, SwiGLU, make_ffn
from .head import ClassifierHead
from .norm import RMSNorm, make_norm
from .pooling import AttentionPool, masked_softmax, max_pool, mean_pool, weighted_sum
from .segments import Segments, segment_attention

__all__ = [
    "AttentionPool",
    "ClassifierHead",
    "GatedSelfAttention",
    "InstanceEmbed",
    "MLP",
    "RMSNorm",
    "Segments",
    "SwiGLU",
    "make_ffn",
    "make_norm",
    "map_instances",
    "masked_softmax",
    "max_pool",
    "mean_pool",
    "segment_attention",
    "weighted_sum",
]
