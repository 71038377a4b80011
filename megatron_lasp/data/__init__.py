"""Data: tokenizers and the jsonl -> megatron-core indexed dataset preprocessing."""

from megatron_lasp.data.tokenizer import (
    TOKENIZER_TYPES,
    ByteLevelTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    MegatronTokenizerAdapter,
    NullTokenizer,
    Tokenizer,
    add_tokenizer_args,
    build_tokenizer,
    build_tokenizer_from_args,
)

__all__ = [
    "TOKENIZER_TYPES",
    "ByteLevelTokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "MegatronTokenizerAdapter",
    "NullTokenizer",
    "Tokenizer",
    "add_tokenizer_args",
    "build_tokenizer",
    "build_tokenizer_from_args",
]
