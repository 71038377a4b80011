"""Data: tokenizers and the jsonl -> megatron-core indexed dataset preprocessing."""

from megatron_lasp.data.preprocess import (
    BUNDLED_CORPUS,
    BUNDLED_TOKENIZER,
    PreprocessConfig,
    PreprocessError,
    PreprocessResult,
    bundled_tokenizer_settings,
    preprocess_data,
    preprocess_bundled_corpus,
)
from megatron_lasp.data.tokenizer import (
    TOKENIZER_SETTING_KEYS,
    TOKENIZER_TYPES,
    ByteLevelTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    MegatronTokenizerAdapter,
    NullTokenizer,
    Tokenizer,
    TokenizerSettings,
    add_tokenizer_args,
    build_tokenizer,
    build_tokenizer_from_args,
)

__all__ = [
    "BUNDLED_CORPUS",
    "BUNDLED_TOKENIZER",
    "PreprocessConfig",
    "PreprocessError",
    "PreprocessResult",
    "bundled_tokenizer_settings",
    "preprocess_data",
    "preprocess_bundled_corpus",
    "TOKENIZER_SETTING_KEYS",
    "TOKENIZER_TYPES",
    "ByteLevelTokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "MegatronTokenizerAdapter",
    "NullTokenizer",
    "Tokenizer",
    "TokenizerSettings",
    "add_tokenizer_args",
    "build_tokenizer",
    "build_tokenizer_from_args",
]
