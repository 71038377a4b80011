"""Tokenizers shared by preprocessing, training and the HF converter.

Over ~600 lines on purpose: the four tokenizers share one interface, one EOD rule and one
``save_pretrained`` contract, and their flags (:func:`add_tokenizer_args`, :class:`TokenizerSettings`)
name exactly what each kind reads; splitting them would spread one contract over several files.

One small interface (:class:`Tokenizer`) over four kinds, named as in Megatron-LM
(``--tokenizer-type``):

- ``HuggingFaceTokenizer``: ``--tokenizer-model``, a local directory with ``tokenizer.json`` (or
  the file); EOD = ``eos_token`` of tokenizer_config.json, else ``<|endoftext|>``, ``</s>``, ...
  Tokenizing needs the ``tokenizers`` package; ``vocab_size``/``eod`` are read from the JSON.
- ``GPT2BPETokenizer``: ``--vocab-file`` vocab.json + ``--merge-file`` merges.txt, GPT-2
  byte-level BPE (the ``tokenizers`` library's BPE model); EOD = ``<|endoftext|>``.
- ``ByteLevelTokenizer``: no files; ids 0-255 are UTF-8 bytes, 256 is EOD (vocab_size 257).
- ``NullTokenizer``: no files; text is space-separated ids below ``--vocab-size`` V, EOD = V.

Every tokenizer has ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``, ``vocab_size``
(one past the largest id), ``eod`` (the end-of-document id appended by ``--append-eod``),
``save_pretrained(directory)`` (writes files that ``transformers.AutoTokenizer`` loads, for the
HF converter) and ``as_megatron_tokenizer()`` (what megatron-core's ``GPTDatasetConfig.tokenizer``
wants). Special tokens are never added by ``tokenize``, nor read from the text (a literal
``<|endoftext|>`` in a document is encoded as text): documents are separated by EOD only.

Typical use::

    parser = argparse.ArgumentParser()
    add_tokenizer_args(parser)
    args = parser.parse_args()
    tokenizer = build_tokenizer_from_args(args)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer", "ByteLevelTokenizer", "NullTokenizer")
"""Values accepted by ``--tokenizer-type``."""

ENDOFTEXT = "<|endoftext|>"
"""The EOD token text used by GPT-2, the bundled tokenizer and the byte-level tokenizer."""

# Tokens tried, in order, as EOD of a HuggingFace tokenizer whose tokenizer_config.json names no
# eos_token (or that was given as a bare tokenizer.json).
_EOD_CANDIDATES = (ENDOFTEXT, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


def _sha256_of_files(paths: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


class Tokenizer(ABC):
    """Common interface of the project's tokenizers.

    Subclasses set ``tokenizer_type`` and implement ``tokenize``, ``detokenize``, ``vocab_size``,
    ``eod``, ``save_pretrained`` and ``_identity`` (what makes two tokenizers equal).
    """

    tokenizer_type: str = ""

    @abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Encode ``text`` to token ids, without adding any special token."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode token ids to text; special tokens are rendered as their text (``<|endoftext|>``)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """One past the largest token id (the embedding table needs at least this many rows)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document token id."""

    @abstractmethod
    def save_pretrained(self, directory: str) -> List[str]:
        """Write files that reproduce this tokenizer into ``directory`` (created if missing).

        Returns:
            The paths written. ``transformers.AutoTokenizer.from_pretrained(directory)`` loads
            them (tokenizer_config.json names the EOS token = ``eod``).
        """

    def load(self) -> None:
        """Load what is loaded lazily now (raises ImportError/ValueError if it cannot be)."""

    @abstractmethod
    def _identity(self) -> Dict[str, Any]:
        """JSON-serializable fields that identify the tokenizer (content, not location)."""

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        """Identity used by megatron-core to name its dataset index caches."""
        ids: "OrderedDict[str, Any]" = OrderedDict()
        ids["class"] = type(self).__name__
        ids["tokenizer_type"] = self.tokenizer_type
        ids["vocab_size"] = self.vocab_size
        ids["eod"] = self.eod
        ids.update(self._identity())
        return ids

    def as_megatron_tokenizer(self) -> "MegatronTokenizerAdapter":
        """Wrap for megatron-core: pass the result as ``GPTDatasetConfig(tokenizer=...)``."""
        return MegatronTokenizerAdapter(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


# ----------------------------------------------------------------------------------------------
# HuggingFace tokenizer.json


def _read_tokenizer_json_vocab(json_path: str) -> Dict[str, int]:
    """Token text -> id of a tokenizer.json: the model's vocabulary plus the added tokens."""
    try:
        with open(json_path, encoding="utf-8") as f:
            spec = json.load(f)
        model_vocab = spec["model"]["vocab"]
        if isinstance(model_vocab, dict):  # BPE, WordLevel, WordPiece
            vocab = {str(t): int(i) for t, i in model_vocab.items()}
        else:  # Unigram: [[piece, score], ...], id = position
            vocab = {str(entry[0]): i for i, entry in enumerate(model_vocab)}
        for added in spec.get("added_tokens", []):
            vocab[str(added["content"])] = int(added["id"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"--tokenizer-model {json_path}: not a valid tokenizer.json ({type(e).__name__}: {e})") from e
    if not vocab:
        raise ValueError(f"--tokenizer-model {json_path}: empty vocabulary")
    return vocab


class _LibraryTokenizer(Tokenizer):
    """A tokenizer run by the ``tokenizers`` library; vocabulary, size and EOD read from its files.

    Subclasses set ``_vocab`` (token text -> id), ``_vocab_size``, ``_eod`` and implement
    ``_model()`` (the ``tokenizers.Tokenizer``).
    """

    _vocab: Dict[str, int]
    _vocab_size: int
    _eod: int

    @staticmethod
    def _encode_specials_as_text(model: Any) -> Any:
        """Make ``model.encode`` treat special tokens in the input as text (returns ``model``).

        Document text is data: a literal ``<|endoftext|>`` in it must not become the EOD id, or
        preprocessing would cut the document there (packed-document training then restarts the
        attention state in the middle of it). EOD is appended by id only.
        """
        if not hasattr(model, "encode_special_tokens"):
            raise ImportError("the `tokenizers` package is too old to encode special tokens as text "
                              "(Tokenizer.encode_special_tokens); upgrade it: pip install -U tokenizers")
        model.encode_special_tokens = True
        return model

    def _model(self) -> Any:
        raise NotImplementedError

    def tokenize(self, text: str) -> List[int]:
        """Encode ``text`` as text: special tokens written in it (``<|endoftext|>``) stay text.

        Raises:
            ValueError: the text still encodes to the EOD id (an EOD token that the tokenizer.json
                does not mark special); it would end the document in the middle.
        """
        ids = self._model().encode(text, add_special_tokens=False).ids
        if self._eod in ids:
            raise ValueError(f"the text holds the EOD token's text, which this tokenizer encodes as the EOD id "
                             f"{self._eod}: it would split the document; mark that token \"special\": true in the "
                             "tokenizer.json's added_tokens")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model().decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab(self) -> Dict[str, int]:
        """Token text -> id (added tokens included)."""
        return dict(self._vocab)


class HuggingFaceTokenizer(_LibraryTokenizer):
    """A local ``tokenizer.json`` loaded with the ``tokenizers`` library (never from a hub).

    Args:
        tokenizer_model: a directory holding ``tokenizer.json`` (and optionally
            ``tokenizer_config.json`` / ``special_tokens_map.json``), or the ``tokenizer.json``
            file itself.
        eod_token: text of the EOD token. Default: the ``eos_token`` of tokenizer_config.json if
            present, else the first of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``,
            ``<|eot_id|>``, ``<|im_end|>`` found in the vocabulary.
    """

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model: str, eod_token: Optional[str] = None) -> None:
        if os.path.isdir(tokenizer_model):
            directory = tokenizer_model
            json_path = os.path.join(tokenizer_model, "tokenizer.json")
            if not os.path.isfile(json_path):
                raise FileNotFoundError(
                    f"--tokenizer-model {tokenizer_model}: directory has no tokenizer.json "
                    "(HuggingFaceTokenizer loads a local tokenizer.json only)"
                )
        elif os.path.isfile(tokenizer_model):
            directory = os.path.dirname(os.path.abspath(tokenizer_model))
            json_path = tokenizer_model
        else:
            raise FileNotFoundError(
                f"--tokenizer-model {tokenizer_model}: no such file or directory "
                "(HuggingFaceTokenizer loads a local directory with tokenizer.json, or the "
                "tokenizer.json file; hub names are not downloaded)"
            )
        # The vocabulary, EOD and size come from the JSON itself, so that training (which only
        # needs vocab_size and eod) works where the `tokenizers` package is not installed; the
        # `tokenizers` model is loaded on the first tokenize/detokenize.
        vocab = _read_tokenizer_json_vocab(json_path)
        self._tok_cache = None
        self.path = os.path.abspath(json_path)
        self._json_path = json_path
        # tokenizer_config.json / special_tokens_map.json next to tokenizer.json (as transformers
        # reads them) name the EOS token and are copied by save_pretrained.
        self._side_files = [
            os.path.join(directory, name)
            for name in ("tokenizer_config.json", "special_tokens_map.json")
            if os.path.isfile(os.path.join(directory, name))
        ]
        self._vocab = vocab
        self._vocab_size = max(vocab.values()) + 1
        self._eod_token = eod_token or self._config_eos_token() or next(
            (t for t in _EOD_CANDIDATES if t in vocab), None
        )
        if self._eod_token is None:
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: cannot tell the end-of-document token: "
                "tokenizer_config.json has no eos_token and none of "
                f"{', '.join(_EOD_CANDIDATES)} is in the vocabulary"
            )
        if self._eod_token not in vocab:
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: EOD token {self._eod_token!r} is not in the "
                "vocabulary"
            )
        self._eod = vocab[self._eod_token]
        self._fingerprint = _sha256_of_files([json_path])
        logger.debug("%s: vocab_size %d, EOD %r = %d", json_path, self._vocab_size, self._eod_token, self._eod)

    def _config_eos_token(self) -> Optional[str]:
        for path in self._side_files:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
        return None

    def _model(self) -> Any:
        """The `tokenizers.Tokenizer`, loaded on first use."""
        if self._tok_cache is None:
            try:
                from tokenizers import Tokenizer as _HFTokenizer
            except ImportError as e:
                raise ImportError(
                    "HuggingFaceTokenizer needs the `tokenizers` package to tokenize or detokenize "
                    "(vocab_size and eod work without it)"
                ) from e
            try:
                model = _HFTokenizer.from_file(self._json_path)
            except Exception as e:
                raise ValueError(f"--tokenizer-model {self._json_path}: not a valid tokenizer.json ({e})") from e
            self._tok_cache = self._encode_specials_as_text(model)
        return self._tok_cache

    def load(self) -> None:
        self._model()

    def save_pretrained(self, directory: str) -> List[str]:
        """Copy tokenizer.json (+ the config files that came with it, else a minimal config)."""
        os.makedirs(directory, exist_ok=True)
        written = [os.path.join(directory, "tokenizer.json")]
        shutil.copyfile(self._json_path, written[0])
        names = [os.path.basename(p) for p in self._side_files]
        for src in self._side_files:
            written.append(os.path.join(directory, os.path.basename(src)))
            shutil.copyfile(src, written[-1])
        if "tokenizer_config.json" not in names:
            written.append(os.path.join(directory, "tokenizer_config.json"))
            _write_json(
                written[-1],
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": self._eod_token,
                    "eos_token": self._eod_token,
                    "clean_up_tokenization_spaces": False,
                },
            )
        return written

    def _identity(self) -> Dict[str, Any]:
        return {"eod_token": self._eod_token, "tokenizer_json_sha256": self._fingerprint}


# ----------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE from vocab.json + merges.txt

def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Bytes that are printable Latin-1 characters map to themselves; the other 68 bytes map, in
    increasing byte order, to the characters U+0100, U+0101, ... so that no byte becomes
    whitespace or a control character.

    Returns:
        dict of 256 entries, byte value -> one-character string.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1))
    printable |= set(range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1))
    table: Dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class GPT2BPETokenizer(_LibraryTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` and ``merges.txt``, run by the ``tokenizers`` library.

    The library's ``BPE`` model with the ``ByteLevel`` pre-tokenizer (GPT-2's split pattern, no
    prefix space) and decoder: text is split into pieces, each piece's UTF-8 bytes are mapped
    through :func:`bytes_to_unicode`, and adjacent symbols are merged lowest merge rank first.
    The EOD id is ``vocab["<|endoftext|>"]``.

    Args:
        vocab_file: path of vocab.json (token text -> id).
        merge_file: path of merges.txt (one ``left right`` pair per line, rank = line order).
    """

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path}: no such file")
        from tokenizers import Tokenizer as _HFTokenizer
        from tokenizers import decoders, pre_tokenizers
        from tokenizers.models import BPE

        with open(vocab_file, encoding="utf-8") as f:
            self._vocab = json.load(f)
        if not isinstance(self._vocab, dict) or not self._vocab:
            raise ValueError(f"--vocab-file {vocab_file}: expected a JSON object token -> id")
        if ENDOFTEXT not in self._vocab:
            raise ValueError(f"--vocab-file {vocab_file}: has no {ENDOFTEXT} token (the EOD)")
        # Without all 256 byte symbols the library would silently drop the bytes it cannot encode.
        missing = [c for c in bytes_to_unicode().values() if c not in self._vocab]
        if missing:
            raise ValueError(f"--vocab-file {vocab_file}: lacks {len(missing)} of the 256 byte symbols "
                             f"(e.g. {missing[0]!r}); a GPT-2 vocab.json holds all of them")
        try:
            model = BPE.from_file(vocab_file, merge_file)
        except Exception as e:
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a GPT-2 BPE pair ({e})") from e
        self._tok = self._encode_specials_as_text(_HFTokenizer(model))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._tok.decoder = decoders.ByteLevel()
        self._vocab_file, self._merge_file = vocab_file, merge_file
        self.path = os.path.abspath(vocab_file)
        self._eod = self._vocab[ENDOFTEXT]
        self._vocab_size = max(self._vocab.values()) + 1
        self._fingerprint = _sha256_of_files([vocab_file, merge_file])

    def _model(self) -> Any:
        return self._tok

    def save_pretrained(self, directory: str) -> List[str]:
        """Copy vocab.json and merges.txt and write a GPT2Tokenizer tokenizer_config.json."""
        os.makedirs(directory, exist_ok=True)
        written = [os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")]
        shutil.copyfile(self._vocab_file, written[0])
        shutil.copyfile(self._merge_file, written[1])
        written.append(os.path.join(directory, "tokenizer_config.json"))
        _write_json(
            written[-1],
            {
                "tokenizer_class": "GPT2Tokenizer",
                "add_prefix_space": False,
                "bos_token": ENDOFTEXT,
                "eos_token": ENDOFTEXT,
                "unk_token": ENDOFTEXT,
                "clean_up_tokenization_spaces": False,
            },
        )
        return written

    def _identity(self) -> Dict[str, Any]:
        return {"vocab_merges_sha256": self._fingerprint}


# ----------------------------------------------------------------------------------------------
# File-free tokenizers


class ByteLevelTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, plus ``<|endoftext|>`` = 256 as EOD (vocab_size 257).

    ``save_pretrained`` writes a ``tokenizer.json`` (a merge-free byte-level BPE over GPT-2's byte
    characters, with ``<|endoftext|>`` as added token 256) and a ``tokenizer_config.json``, so that
    ``transformers.AutoTokenizer`` gives the same ids. One difference: ``AutoTokenizer`` on the
    HF files turns a literal ``<|endoftext|>`` inside text into id 256, ``tokenize`` here (and
    :class:`HuggingFaceTokenizer` on the same files) keeps it as 13 bytes.
    """

    tokenizer_type = "ByteLevelTokenizer"
    NUM_BYTES = 256

    def __init__(self) -> None:
        self.path = None

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.NUM_BYTES:
                out.append(i)
            elif i == self.eod:
                out.extend(ENDOFTEXT.encode("utf-8"))
            else:
                raise ValueError(f"token id {i} is outside the byte-level vocabulary [0, {self.vocab_size})")
        return out.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + 1

    @property
    def eod(self) -> int:
        return self.NUM_BYTES

    def save_pretrained(self, directory: str) -> List[str]:
        from tokenizers import Tokenizer as _HFTokenizer
        from tokenizers import decoders, pre_tokenizers
        from tokenizers.models import BPE

        os.makedirs(directory, exist_ok=True)
        byte_chars = bytes_to_unicode()
        hf = _HFTokenizer(BPE(vocab={byte_chars[b]: b for b in range(self.NUM_BYTES)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([ENDOFTEXT])
        assert hf.token_to_id(ENDOFTEXT) == self.eod
        written = [os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer_config.json")]
        hf.save(written[0])
        _write_json(
            written[1],
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": ENDOFTEXT,
                "eos_token": ENDOFTEXT,
                "clean_up_tokenization_spaces": False,
            },
        )
        return written

    def _identity(self) -> Dict[str, Any]:
        return {}


class NullTokenizer(Tokenizer):
    """Text is space-separated integer ids below ``vocab_size_without_eod``; EOD is that number.

    Megatron-LM's NullTokenizer, for synthetic data and benchmarks: ``--vocab-size V`` gives
    ``vocab_size = V + 1`` and ``eod = V``. ``save_pretrained`` writes only ``null_tokenizer.json``
    (``{"tokenizer_type": "NullTokenizer", "vocab_size": V}``): there is no HF equivalent.

    Args:
        vocab_size_without_eod: number of ordinary ids (V).
    """

    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size_without_eod: int) -> None:
        if vocab_size_without_eod is None or int(vocab_size_without_eod) < 1:
            raise ValueError("--vocab-size must be a positive integer for --tokenizer-type NullTokenizer")
        self._n = int(vocab_size_without_eod)
        self.path = None

    def tokenize(self, text: str) -> List[int]:
        ids = [int(x) for x in text.split()]
        for i in ids:
            if not 0 <= i < self._n:
                raise ValueError(f"NullTokenizer: id {i} outside [0, {self._n}) (--vocab-size {self._n})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n

    def save_pretrained(self, directory: str) -> List[str]:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "null_tokenizer.json")
        _write_json(path, {"tokenizer_type": self.tokenizer_type, "vocab_size": self._n})
        return [path]

    def _identity(self) -> Dict[str, Any]:
        return {}


# ----------------------------------------------------------------------------------------------
# megatron-core adapter

def _register_with_megatron() -> None:
    if getattr(_register_with_megatron, "done", False):
        return
    try:
        from megatron.core.tokenizers import MegatronTokenizerBase
    except ImportError:  # pragma: no cover - older megatron-core without the tokenizers package
        pass
    else:
        MegatronTokenizerBase.register(MegatronTokenizerAdapter)
    _register_with_megatron.done = True  # type: ignore[attr-defined]


class MegatronTokenizerAdapter:
    """A :class:`Tokenizer` seen as megatron-core's ``MegatronTokenizerBase``.

    It is registered as a virtual subclass of ``MegatronTokenizerBase`` when first built (so
    ``isinstance`` checks pass) without importing megatron-core at module import.

    megatron-core's ``GPTDatasetConfig``/``GPTDataset`` read ``tokenizer.vocab_size`` (token dtype
    code), ``tokenizer.eod`` (masks / position ids) and ``tokenizer.unique_identifiers`` (cache
    names); ``pad`` is absent so GPTDataset uses its own pad id (-1), which never collides with a
    real token.

    Args:
        tokenizer: the project tokenizer to wrap.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        _register_with_megatron()
        self.path = getattr(tokenizer, "path", None) or ""
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> List[int]:
        """Encode text to ids (see :meth:`Tokenizer.tokenize`)."""
        return self.tokenizer.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text (see :meth:`Tokenizer.detokenize`)."""
        return self.tokenizer.detokenize(ids)

    @property
    def vocab(self) -> Dict[str, int]:
        """Token text -> id, where the tokenizer has a vocabulary file."""
        vocab = getattr(self.tokenizer, "vocab", None)
        if vocab is None:
            raise NotImplementedError(f"{self.tokenizer.tokenizer_type} has no vocabulary mapping")
        return vocab

    @property
    def vocab_size(self) -> int:
        """One past the largest id."""
        return self.tokenizer.vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id."""
        return self.tokenizer.eod

    @property
    def unique_identifiers(self) -> "OrderedDict[str, Any]":
        """Identity for megatron-core's dataset cache names."""
        return self.tokenizer.unique_identifiers

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: pretraining tokenizers have no chat template."""
        raise NotImplementedError("megatron-lasp tokenizers have no chat template")

    def __repr__(self) -> str:
        return f"MegatronTokenizerAdapter({self.tokenizer!r})"


# ----------------------------------------------------------------------------------------------
# Construction and flags


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
    eod_token: Optional[str] = None,
) -> Tokenizer:
    """Build a tokenizer from Megatron-LM style settings.

    Args:
        tokenizer_type: one of :data:`TOKENIZER_TYPES`.
        tokenizer_model: HuggingFaceTokenizer: directory with tokenizer.json, or the file.
        vocab_file: GPT2BPETokenizer: vocab.json.
        merge_file: GPT2BPETokenizer: merges.txt.
        vocab_size: NullTokenizer: number of ordinary ids (EOD is this value).
        eod_token: HuggingFaceTokenizer: EOD token text overriding tokenizer_config.json.

    Returns:
        a :class:`Tokenizer`.

    Raises:
        ValueError: unknown type, a missing setting, or an unusable file (messages name the flag).
        FileNotFoundError: a given file does not exist.
    """
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-model is required for --tokenizer-type HuggingFaceTokenizer")
        return HuggingFaceTokenizer(tokenizer_model, eod_token=eod_token)
    if tokenizer_type == "GPT2BPETokenizer":
        missing = [f for f, v in (("--vocab-file", vocab_file), ("--merge-file", merge_file)) if not v]
        if missing:
            verb = "are" if len(missing) > 1 else "is"
            raise ValueError(f"{' and '.join(missing)} {verb} required for --tokenizer-type GPT2BPETokenizer")
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "ByteLevelTokenizer":
        return ByteLevelTokenizer()
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--vocab-size is required for --tokenizer-type NullTokenizer")
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def add_tokenizer_args(
    parser: argparse.ArgumentParser,
    default_type: Optional[str] = None,
    add_vocab_size: bool = True,
) -> argparse._ArgumentGroup:
    """Add Megatron-LM's tokenizer flags to ``parser`` (in a "tokenizer" group).

    Flags: ``--tokenizer-type`` (required unless ``default_type`` is given), ``--tokenizer-model``,
    ``--vocab-file``, ``--merge-file`` and, if ``add_vocab_size``, ``--vocab-size`` (NullTokenizer
    only; pass ``add_vocab_size=False`` when the parser already has its own ``--vocab-size``,
    :func:`build_tokenizer_from_args` reads ``args.vocab_size`` either way).

    Returns:
        the argument group.
    """
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        default=default_type,
        required=default_type is None,
        help="HuggingFaceTokenizer (--tokenizer-model), GPT2BPETokenizer (--vocab-file, "
        "--merge-file), ByteLevelTokenizer (no files: 256 bytes + EOD), NullTokenizer (--vocab-size)",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="HuggingFaceTokenizer: local directory with tokenizer.json, or the tokenizer.json file",
    )
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    if add_vocab_size:
        group.add_argument(
            "--vocab-size", type=int, default=None, help="NullTokenizer: number of ids; EOD = this value"
        )
    return group


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """What builds a tokenizer: the keyword arguments of :func:`build_tokenizer` that have flags.

    The one list of the tokenizer settings that checkpoints, preprocessing workers and the HF
    converter carry (as :meth:`as_dict`, which is picklable and JSON-serializable).
    """

    tokenizer_type: Optional[str] = None
    """``--tokenizer-type``, one of :data:`TOKENIZER_TYPES`."""
    tokenizer_model: Optional[str] = None
    """``--tokenizer-model`` (HuggingFaceTokenizer)."""
    vocab_file: Optional[str] = None
    """``--vocab-file`` (GPT2BPETokenizer)."""
    merge_file: Optional[str] = None
    """``--merge-file`` (GPT2BPETokenizer)."""
    vocab_size: Optional[int] = None
    """``--vocab-size`` (NullTokenizer)."""

    @classmethod
    def from_mapping(cls, values: Any) -> "TokenizerSettings":
        """The settings held by ``values``: an ``argparse.Namespace`` or a dict (missing: None)."""
        get = values.get if isinstance(values, dict) else lambda key: getattr(values, key, None)
        return cls(**{key: get(key) for key in TOKENIZER_SETTING_KEYS})

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def check_flags(self) -> "TokenizerSettings":
        """Refuse a setting that ``tokenizer_type`` does not read (it would be ignored silently).

        Returns:
            ``self``.

        Raises:
            ValueError: naming the flag to drop and the flags this type reads.
        """
        reads = TOKENIZER_FLAGS_READ.get(self.tokenizer_type)
        if reads is None:  # unknown or unset type: build_tokenizer says what is missing
            return self
        for key in TOKENIZER_SETTING_KEYS[1:]:
            if getattr(self, key) is not None and key not in reads:
                flag = "--" + key.replace("_", "-")
                wanted = " and ".join("--" + k.replace("_", "-") for k in reads) or "no files"
                raise ValueError(f"{flag} is not used by --tokenizer-type {self.tokenizer_type} (it reads {wanted}); "
                                 f"drop {flag} or choose the tokenizer type that reads it")
        return self

    def build(self) -> Tokenizer:
        return build_tokenizer(**self.as_dict())


TOKENIZER_SETTING_KEYS = tuple(f.name for f in dataclasses.fields(TokenizerSettings))
"""The field names of :class:`TokenizerSettings`, in order."""

TOKENIZER_FLAGS_READ = {
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "ByteLevelTokenizer": (),
    "NullTokenizer": ("vocab_size",),
}
"""The :class:`TokenizerSettings` fields each ``--tokenizer-type`` reads (the others must be unset)."""

TOKENIZER_PATH_KEYS = ("tokenizer_model", "vocab_file", "merge_file")
"""The fields of :class:`TokenizerSettings` that name files (what a tokenizer is read from)."""


def build_tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    """:func:`build_tokenizer` from the flags added by :func:`add_tokenizer_args`."""
    return TokenizerSettings.from_mapping(args).build()


def tokenizer_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of :func:`build_tokenizer` held by ``args`` (picklable, for workers).

    Raises:
        ValueError: a tokenizer flag that ``--tokenizer-type`` does not read
            (:meth:`TokenizerSettings.check_flags`).
    """
    return TokenizerSettings.from_mapping(args).check_flags().as_dict()
