"""Tokenizers: GPT-2 BPE against a plain-Python reference, round trips, saved files, errors."""

import argparse
import collections
import json
import os
import random
import sys
import unicodedata

import pytest

from megatron_lasp.data import tokenizer as tk
from megatron_lasp.data.tokenizer import (
    ENDOFTEXT,
    ByteLevelTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    add_tokenizer_args,
    build_tokenizer,
    build_tokenizer_from_args,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(REPO, "examples", "data", "tokenizer")

FIXED_TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "tabs\tand\t\tnewlines\n\n\nand\r\nCRLF",
    "I'm sure you'll see they've done it; don't we'd? IT'S LOUD'S",
    "numbers 12345 3.14159 1,000,000 and 007",
    "café naïve Zoë São Colm — “quotes” 20 °C 3 × 4",
    "日本語のテキスト and 中文 mixed",
    "emoji 🙂👍🏽 and combining e\u0301 and \u200b zero width",
    "symbols !!! ??? ... --- ### @@ $$ %% ^^ && ** (( ))",
    "     ",
    "\n",
    "a",
    "<|endoftext|> is literal text here",
]


def random_text(rng: random.Random, n: int) -> str:
    """Random text mixing words, whitespace runs, digits, punctuation and non-ASCII code points."""
    pieces = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            pieces.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))))
        elif kind == 1:
            pieces.append("".join(rng.choice(" \t\n\r\u00a0") for _ in range(rng.randint(1, 5))))
        elif kind == 2:
            pieces.append(str(rng.randint(0, 10**6)))
        elif kind == 3:
            pieces.append(rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", ".", ",", "!?", "--"]))
        elif kind == 4:
            pieces.append(rng.choice(["é", "ß", "Ω", "ж", "中", "🙂", "ॐ", "Å"]))
        else:
            # Any code point assigned in Python's (older) Unicode database: the `regex` module and
            # the Oniguruma engine inside `tokenizers` know different Unicode versions and disagree
            # on the class (letter or not) of code points assigned in between. No surrogates.
            while True:
                ch = chr(rng.randint(1, 0x2FFFF))
                if unicodedata.category(ch) not in ("Cn", "Cs", "Co"):
                    break
            pieces.append(ch)
    return "".join(pieces)


# The GPT-2 pre-tokenization pattern: English contractions, letter runs, digit runs, other
# symbol runs (each with at most one leading space), and whitespace runs, where a whitespace run
# followed by a non-space leaves its last space to the next piece.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def reference_gpt2_encode(text, vocab, merges):
    """GPT-2 byte-level BPE in plain Python (the ground truth for ``GPT2BPETokenizer``).

    Split with the GPT-2 pattern, map each piece's UTF-8 bytes through the byte table, then merge
    the adjacent pair of lowest merge rank (every occurrence of it) until no ranked pair remains.
    """
    import regex

    ranks = {pair: rank for rank, pair in enumerate(merges)}
    byte_chars = tk.bytes_to_unicode()
    ids = []
    for piece in regex.findall(GPT2_SPLIT_PATTERN, text):
        symbols = [byte_chars[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            ranked = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
            if not ranked:
                break
            left, right = min(ranked)[1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (left, right):
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids.extend(vocab[symbol] for symbol in symbols)
    return ids


def train_tiny_bpe(texts, num_merges: int):
    """A naive byte-level BPE trainer (independent of the code under test and of HF's trainer).

    Returns:
        (vocab dict token -> id, merges list of pairs): 256 byte symbols, the merge results in
        merge order, then <|endoftext|>.
    """
    import regex

    byte_chars = tk.bytes_to_unicode()
    words = collections.Counter()
    for text in texts:
        for piece in regex.findall(GPT2_SPLIT_PATTERN, text):
            words[tuple(byte_chars[b] for b in piece.encode("utf-8"))] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        new_words = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    vocab = {byte_chars[b]: i for i, b in enumerate(sorted(byte_chars))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[ENDOFTEXT] = len(vocab)
    return vocab, merges


def write_gpt2_files(directory, vocab, merges):
    vocab_file = os.path.join(directory, "vocab.json")
    merge_file = os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merge_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return vocab_file, merge_file


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    rng = random.Random(1)
    training = [random_text(rng, 150) for _ in range(8)] + FIXED_TEXTS * 3
    vocab, merges = train_tiny_bpe(training, num_merges=200)
    assert len(merges) >= 100
    return write_gpt2_files(str(tmp_path_factory.mktemp("gpt2")), vocab, merges) + (vocab, merges)


def test_bytes_to_unicode_matches_hf_alphabet():
    from tokenizers import pre_tokenizers

    table = tk.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert all(not c.isspace() and c.isprintable() for c in table.values())


def test_gpt2_bpe_equals_reference(gpt2_files):
    vocab_file, merge_file, vocab, merges = gpt2_files
    ours = GPT2BPETokenizer(vocab_file, merge_file)
    rng = random.Random(2)
    texts = FIXED_TEXTS + [random_text(rng, rng.randint(1, 300)) for _ in range(200)]
    merged_somewhere = False
    for text in texts:
        ids = ours.tokenize(text)
        assert ids == reference_gpt2_encode(text, vocab, merges), repr(text)
        assert ours.detokenize(ids) == text, repr(text)
        merged_somewhere |= len(ids) < len(text.encode("utf-8"))
    assert merged_somewhere, "the merges were never applied: the test would not check BPE"
    assert ours.eod == vocab[ENDOFTEXT]
    assert ours.vocab_size == len(vocab)


def test_gpt2_bad_files(gpt2_files, tmp_path):
    vocab_file, merge_file, vocab, merges = gpt2_files
    no_bytes = tmp_path / "vocab.json"
    no_bytes.write_text(json.dumps({k: v for k, v in vocab.items() if k != "a"}))
    with pytest.raises(ValueError, match="lacks 1 of the 256 byte symbols"):
        GPT2BPETokenizer(str(no_bytes), merge_file)
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nno_such_symbol another\n")
    with pytest.raises(ValueError, match="--merge-file .*: not a GPT-2 BPE pair"):
        GPT2BPETokenizer(vocab_file, str(bad_merges))


def test_gpt2_save_pretrained_loads_in_transformers(gpt2_files, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = GPT2BPETokenizer(*gpt2_files[:2])
    written = ours.save_pretrained(str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert auto.eos_token_id == ours.eod
    rng = random.Random(3)
    for text in FIXED_TEXTS[:9] + [random_text(rng, 50) for _ in range(20)]:
        assert auto(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text), repr(text)


def test_bytelevel_round_trip_and_saved_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = ByteLevelTokenizer()
    assert (tok.vocab_size, tok.eod) == (257, 256)
    rng = random.Random(4)
    texts = FIXED_TEXTS[:-1] + [random_text(rng, 100) for _ in range(30)]
    for text in texts:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.detokenize(ids + [tok.eod]) == text + ENDOFTEXT
    with pytest.raises(ValueError, match="outside"):
        tok.detokenize([257])
    written = tok.save_pretrained(str(tmp_path / "bl"))
    assert sorted(os.path.basename(p) for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    hf = HuggingFaceTokenizer(str(tmp_path / "bl"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bl"))
    assert (hf.vocab_size, hf.eod, auto.eos_token_id) == (257, 256, 256)
    for text in texts:
        assert hf.tokenize(text) == tok.tokenize(text), repr(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.tokenize(text), repr(text)
        assert hf.detokenize(tok.tokenize(text)) == text


def test_bundled_tokenizer(tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=BUNDLED)
    assert tok.eod == 0 and tok.vocab[ENDOFTEXT] == 0
    assert 2000 <= tok.vocab_size <= 4096
    rng = random.Random(5)
    for text in FIXED_TEXTS + [random_text(rng, 80) for _ in range(30)]:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids, repr(text)  # a literal <|endoftext|> stays text
        assert tok.detokenize(ids) == text, repr(text)
    # The bundled tokenizer compresses its own corpus' words.
    assert len(tok.tokenize("Weather for Northwick")) <= 5
    # Given as the file itself: same tokenizer, side files ignored only if absent.
    same = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=os.path.join(BUNDLED, "tokenizer.json"))
    assert same.unique_identifiers == tok.unique_identifiers
    written = tok.save_pretrained(str(tmp_path / "copy"))
    assert sorted(os.path.basename(p) for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    again = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "copy"))
    assert again.unique_identifiers == tok.unique_identifiers
    # What the HF converter writes next to the model loads in transformers with the same ids.
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert auto.eos_token_id == tok.eod
    with open(os.path.join(REPO, "examples", "data", "corpus.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:50]
    for text in texts + FIXED_TEXTS[:9]:
        ids = tok.tokenize(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert auto.decode(ids) == text


def test_hf_eod_resolution(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    def make(directory, vocab, config=None):
        os.makedirs(directory)
        hf = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
        hf.pre_tokenizer = Whitespace()
        hf.save(os.path.join(directory, "tokenizer.json"))
        if config is not None:
            with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
                json.dump(config, f)
        return directory

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "</s>": 3, "<mine>": 4}
    assert HuggingFaceTokenizer(make(str(tmp_path / "a"), vocab)).eod == 3  # a known candidate
    d = make(str(tmp_path / "b"), vocab, {"eos_token": {"content": "<mine>"}})
    assert HuggingFaceTokenizer(d).eod == 4  # tokenizer_config.json wins
    assert HuggingFaceTokenizer(d, eod_token="b").eod == 2  # the explicit argument wins
    no_eod = make(str(tmp_path / "c"), {"[UNK]": 0, "a": 1})
    with pytest.raises(ValueError, match="end-of-document"):
        HuggingFaceTokenizer(no_eod)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HuggingFaceTokenizer(make(str(tmp_path / "d"), vocab, {"eos_token": "<gone>"}))
    assert HuggingFaceTokenizer(d).save_pretrained(str(tmp_path / "out"))  # copies the config
    assert json.load(open(tmp_path / "out" / "tokenizer_config.json")) == {"eos_token": {"content": "<mine>"}}


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod) == (101, 100)
    ids = [random.randrange(100) for _ in range(50)]
    assert tok.tokenize(" ".join(map(str, ids))) == ids
    assert tok.detokenize(ids) == " ".join(map(str, ids))
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("5 100")


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(tokenizer_type="HuggingFaceTokenizer"), ValueError,
         "--tokenizer-model is required for --tokenizer-type HuggingFaceTokenizer"),
        (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/no/such/dir"), FileNotFoundError,
         "--tokenizer-model /no/such/dir: no such file or directory"),
        (dict(tokenizer_type="GPT2BPETokenizer"), ValueError,
         "--vocab-file and --merge-file are required for --tokenizer-type GPT2BPETokenizer"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="v.json"), ValueError,
         "--merge-file is required"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/no/v.json", merge_file="/no/m.txt"),
         FileNotFoundError, "--vocab-file /no/v.json: no such file"),
        (dict(tokenizer_type="NullTokenizer"), ValueError, "--vocab-size is required"),
        (dict(tokenizer_type="SentencePieceTokenizer"), ValueError, "unknown --tokenizer-type"),
    ],
    ids=["hf-no-model", "hf-missing", "gpt2-no-files", "gpt2-no-merges", "gpt2-missing", "null-no-size", "unknown"],
)
def test_build_errors_name_the_flag(kwargs, exc, message):
    with pytest.raises(exc, match=message.replace("/", "\\/").replace(".", "\\.")):
        build_tokenizer(**kwargs)


def test_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


def test_add_tokenizer_args():
    parser = argparse.ArgumentParser()
    add_tokenizer_args(parser)
    args = parser.parse_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", BUNDLED])
    assert isinstance(build_tokenizer_from_args(args), HuggingFaceTokenizer)
    settings = tk.tokenizer_settings(args)  # the one record of the settings, as a dict
    assert tuple(settings) == tk.TOKENIZER_SETTING_KEYS
    assert settings["tokenizer_model"] == BUNDLED and settings["vocab_file"] is None
    assert tk.TokenizerSettings.from_mapping(settings).build().vocab_size == 2031
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --tokenizer-type is required without a default
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab-size", type=int)
    add_tokenizer_args(parser, default_type="NullTokenizer", add_vocab_size=False)
    tok = build_tokenizer_from_args(parser.parse_args(["--vocab-size", "7"]))
    assert isinstance(tok, NullTokenizer) and tok.eod == 7


def test_megatron_adapter(gpt2_files):
    from megatron.core.tokenizers import MegatronTokenizerBase

    toks = [
        ByteLevelTokenizer(),
        NullTokenizer(50),
        GPT2BPETokenizer(*gpt2_files[:2]),
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=BUNDLED),
    ]
    descriptions = set()
    for tok in toks:
        m = tok.as_megatron_tokenizer()
        assert isinstance(m, MegatronTokenizerBase)
        assert (m.vocab_size, m.eod) == (tok.vocab_size, tok.eod)
        assert m.tokenize("12 3") == tok.tokenize("12 3")
        assert not hasattr(m, "pad")  # GPTDataset then uses its own pad id (-1)
        descriptions.add(json.dumps(m.unique_identifiers))
    assert len(descriptions) == len(toks)


def test_hf_vocab_from_json_and_without_tokenizers_package(tmp_path, monkeypatch):
    from tokenizers import Tokenizer
    from tokenizers.models import Unigram

    unigram_dir = tmp_path / "unigram"
    unigram_dir.mkdir()
    uni = Tokenizer(Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -1.5)], unk_id=0))
    uni.add_special_tokens(["</s>"])
    uni.save(str(unigram_dir / "tokenizer.json"))
    for path in (BUNDLED, str(unigram_dir)):
        ours = HuggingFaceTokenizer(path)
        reference = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        assert ours.vocab == reference.get_vocab(with_added_tokens=True)
        assert ours.vocab_size == max(reference.get_vocab(with_added_tokens=True).values()) + 1
    assert HuggingFaceTokenizer(str(unigram_dir)).eod == 4

    # Training only needs vocab_size and eod: they work without the `tokenizers` package.
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    tok = HuggingFaceTokenizer(BUNDLED)
    assert (tok.eod, tok.vocab_size) == (0, 2031)
    with pytest.raises(ImportError, match="needs the `tokenizers` package"):
        tok.tokenize("hello")


def test_hf_invalid_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense", "vocab": {"a": 0, "</s>": 1}}}')
    tok = HuggingFaceTokenizer(str(tmp_path))  # the JSON has a vocabulary ...
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tok.tokenize("a")  # ... but the `tokenizers` library cannot load it


def test_settings_refuse_flags_the_type_does_not_read():
    from megatron_lasp.data.tokenizer import TOKENIZER_FLAGS_READ, TokenizerSettings

    values = {"tokenizer_model": "tok", "vocab_file": "v.json", "merge_file": "m.txt", "vocab_size": 10}
    for kind, reads in TOKENIZER_FLAGS_READ.items():
        ok = TokenizerSettings(tokenizer_type=kind, **{k: values[k] for k in reads})
        assert ok.check_flags() is ok
        for extra in set(values) - set(reads):
            flag = "--" + extra.replace("_", "-")
            with pytest.raises(ValueError, match=f"^{flag} is not used by --tokenizer-type {kind} "):
                settings = dict({k: values[k] for k in reads}, **{extra: values[extra]})
                TokenizerSettings(tokenizer_type=kind, **settings).check_flags()
