"""The pretraining data pipeline: tokenizers -> indexed token files -> packed, blended, resumable batches."""

from .blend import BlendedDataset, blend_assignment, parse_blend
from .errors import DataError
from .indexed import IndexedDataset, IndexedWriter
from .ingest import ingest
from .packing import PackedDataset, split_documents
from .sampler import RankBatchSampler, build_loader, collate
from .tokenizer import Tokenizer, train_sentencepiece

__all__ = [
    "BlendedDataset", "DataError", "IndexedDataset", "IndexedWriter", "PackedDataset", "RankBatchSampler",
    "Tokenizer", "blend_assignment", "build_loader", "collate", "ingest", "parse_blend", "split_documents",
    "train_sentencepiece",
]
