"""tools/preprocess_data.py and its library: round trips, order, bad lines, atomicity, CLI, GPTDataset."""

import filecmp
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

import megatron_lasp.data.preprocess as pp
from megatron_lasp.data.preprocess import PreprocessConfig, PreprocessError, preprocess_data
from megatron_lasp.data.tokenizer import ENDOFTEXT, build_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_tokenizer import random_text, train_tiny_bpe, write_gpt2_files  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")
BUNDLED_TOKENIZER = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": pp.BUNDLED_TOKENIZER}


def write_lines(path, lines):
    """Write raw lines (str are UTF-8 encoded, bytes written as is), one per line."""
    with open(path, "wb") as f:
        for line in lines:
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return str(path)


def jsonl(records):
    return [json.dumps(r, ensure_ascii=False) for r in records]


def read_dataset(prefix):
    """Documents of an indexed dataset as lists of ids (one sequence per document is asserted)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    return ds, [ds[i].tolist() for i in range(len(ds))]


def random_docs(rng, n, null=False):
    if null:
        return [" ".join(str(rng.randrange(1000)) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    docs = [random_text(rng, rng.randint(1, 60)) for _ in range(n)]
    return [d if d.strip() else d + "x" for d in docs]


@pytest.fixture(scope="module")
def gpt2_settings(tmp_path_factory):
    rng = random.Random(1)
    vocab, merges = train_tiny_bpe([random_text(rng, 150) for _ in range(6)], num_merges=120)
    vocab_file, merge_file = write_gpt2_files(str(tmp_path_factory.mktemp("gpt2")), vocab, merges)
    return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab_file, "merge_file": merge_file}


@pytest.fixture(scope="module")
def bundled_prefix(tmp_path_factory):
    """The bundled corpus preprocessed in-process with one worker."""
    return pp.preprocess_bundled_corpus(str(tmp_path_factory.mktemp("bundled") / "corpus"), workers=1)


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "GPT2BPETokenizer", "ByteLevelTokenizer", "NullTokenizer"])
def test_round_trip(kind, tmp_path, gpt2_settings):
    settings = {
        "HuggingFaceTokenizer": BUNDLED_TOKENIZER,
        "GPT2BPETokenizer": gpt2_settings,
        "ByteLevelTokenizer": {"tokenizer_type": "ByteLevelTokenizer"},
        "NullTokenizer": {"tokenizer_type": "NullTokenizer", "vocab_size": 1000},
    }[kind]
    rng = random.Random(2)
    texts = random_docs(rng, 60, null=kind == "NullTokenizer")
    src = write_lines(tmp_path / "in.jsonl", jsonl({"id": i, "text": t} for i, t in enumerate(texts)))
    result = preprocess_data(PreprocessConfig(src, str(tmp_path / "out" / "d"), settings, append_eod=True))
    tok = build_tokenizer(**settings)
    prefix = str(tmp_path / "out" / "d_text_document")
    assert result.output_prefixes == {"text": prefix}
    ds, docs = read_dataset(prefix)
    assert ds.index.dtype == np.uint16 and result.dtype == "uint16"
    assert len(docs) == len(texts) == result.documents
    for text, ids in zip(texts, docs):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.detokenize(ids[:-1]) == text
        assert ids[:-1] == tok.tokenize(text)
    assert result.tokens["text"] == sum(map(len, docs))
    assert result.num_bad_lines == 0


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "GPT2BPETokenizer", "ByteLevelTokenizer"])
def test_literal_eod_text_is_not_a_boundary(kind, tmp_path, gpt2_settings):
    """A document that quotes the EOD token's text stays one document: its only EOD is the appended one."""
    settings = {"HuggingFaceTokenizer": BUNDLED_TOKENIZER, "GPT2BPETokenizer": gpt2_settings,
                "ByteLevelTokenizer": {"tokenizer_type": "ByteLevelTokenizer"}}[kind]
    texts = [f"before {ENDOFTEXT} after", ENDOFTEXT, f"a{ENDOFTEXT}{ENDOFTEXT}b", "plain"]
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": t} for t in texts))
    result = preprocess_data(PreprocessConfig(src, str(tmp_path / "d"), settings, append_eod=True))
    tok = build_tokenizer(**settings)
    _, docs = read_dataset(result.output_prefixes["text"])
    assert len(docs) == len(texts) and result.num_bad_lines == 0
    for text, ids in zip(texts, docs):
        assert [i for i, t in enumerate(ids) if t == tok.eod] == [len(ids) - 1], (text, ids)
        assert tok.detokenize(ids[:-1]) == text
    if kind == "HuggingFaceTokenizer":  # the control: the library's default reads the EOD from the text
        from tokenizers import Tokenizer as LibraryTokenizer

        plain = LibraryTokenizer.from_file(os.path.join(pp.BUNDLED_TOKENIZER, "tokenizer.json"))
        assert tok.eod in plain.encode(texts[0], add_special_tokens=False).ids


def test_eod_not_marked_special_is_reported(tmp_path):
    """A tokenizer.json whose EOD is an ordinary added token cannot keep its text as text: the line
    is reported (skipped, or the run stops under --strict), never split."""
    with open(os.path.join(pp.BUNDLED_TOKENIZER, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    for added in spec["added_tokens"]:
        added["special"] = False
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    settings = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tok_dir)}
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": t} for t in ["plain", f"x {ENDOFTEXT} y", "more"]))
    result = preprocess_data(PreprocessConfig(src, str(tmp_path / "d"), settings, append_eod=True))
    assert result.documents == 2 and result.bad_lines == {"tokenizer error": 1}
    assert result.bad_examples[0][0] == 2 and "mark that token" in result.bad_examples[0][1]
    with pytest.raises(PreprocessError, match=r"in\.jsonl:2: tokenizer error.*EOD"):
        preprocess_data(PreprocessConfig(src, str(tmp_path / "s"), settings, strict=True))


def test_no_eod_and_int32_for_large_vocab(tmp_path):
    rng = random.Random(3)
    texts = [" ".join(str(rng.randrange(70000)) for _ in range(rng.randint(1, 20))) for _ in range(30)]
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": t} for t in texts))
    settings = {"tokenizer_type": "NullTokenizer", "vocab_size": 70000}
    result = preprocess_data(PreprocessConfig(src, str(tmp_path / "d"), settings, append_eod=False))
    ds, docs = read_dataset(result.output_prefixes["text"])
    assert ds.index.dtype == np.int32
    assert docs == [[int(x) for x in t.split()] for t in texts]


def test_multi_key_aligned(tmp_path):
    rng = random.Random(4)
    records = [{"text": random_text(rng, 20) + "t", "title": random_text(rng, 4) + "h"} for _ in range(40)]
    lines = jsonl(records)
    lines.insert(7, json.dumps({"text": "no title here"}))  # skipped in both datasets
    src = write_lines(tmp_path / "in.jsonl", lines)
    settings = {"tokenizer_type": "ByteLevelTokenizer"}
    result = preprocess_data(PreprocessConfig(src, str(tmp_path / "d"), settings, json_keys=["text", "title"],
                                         append_eod=True))
    assert result.bad_lines == {"missing key 'title'": 1} and result.bad_examples == [(8, "missing key 'title'")]
    tok = build_tokenizer(**settings)
    for key in ("text", "title"):
        prefix = str(tmp_path / f"d_{key}_document")
        assert result.output_prefixes[key] == prefix
        _, docs = read_dataset(prefix)
        assert [tok.detokenize(d[:-1]) for d in docs] == [r[key] for r in records]


def test_workers_identical_to_one_worker(tmp_path):
    rng = random.Random(5)
    texts = random_docs(rng, 300)
    lines = jsonl({"text": t} for t in texts)
    lines[17] = "{broken"
    src = write_lines(tmp_path / "in.jsonl", lines)
    results = []
    for workers in (1, 2, 3):
        cfg = PreprocessConfig(src, str(tmp_path / f"w{workers}" / "d"), BUNDLED_TOKENIZER, append_eod=True,
                               workers=workers, chunk_size=3)
        results.append(preprocess_data(cfg))
    for r in results[1:]:
        assert r.documents == 299 and r.bad_lines == results[0].bad_lines == {"invalid JSON": 1}
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(results[0].output_prefixes["text"] + ext, r.output_prefixes["text"] + ext, shallow=False)
    _, docs = read_dataset(results[0].output_prefixes["text"])
    tok = build_tokenizer(**BUNDLED_TOKENIZER)
    assert [tok.detokenize(d[:-1]) for d in docs] == texts[:17] + texts[18:]


def test_streaming_reads_ahead_a_bounded_window(tmp_path, monkeypatch):
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": f"doc {i}"} for i in range(400)))
    counts = {"read": 0, "max_lag": 0, "written": 0}
    read_chunks, write_results = pp._read_chunks, pp._write_results

    def counting_reader(path, chunk_size):
        for chunk in read_chunks(path, chunk_size):
            counts["read"] += 1
            yield chunk

    def counting_writer(results, *args):
        counts["max_lag"] = max(counts["max_lag"], counts["read"] - counts["written"])
        counts["written"] += 1
        write_results(results, *args)

    monkeypatch.setattr(pp, "_read_chunks", counting_reader)
    monkeypatch.setattr(pp, "_write_results", counting_writer)
    cfg = PreprocessConfig(src, str(tmp_path / "d"), {"tokenizer_type": "ByteLevelTokenizer"}, workers=2, chunk_size=2)
    assert preprocess_data(cfg).documents == 400
    assert counts["written"] == 200
    assert 1 <= counts["max_lag"] <= 4 * 2, counts


def bad_lines_input(tmp_path):
    rng = random.Random(6)
    good = random_docs(rng, 6)
    lines = [
        json.dumps({"text": good[0]}),
        "not json at all",  # 2
        b'{"text": "bad utf-8 \xff\xfe"}',  # 3
        "[1, 2, 3]",  # 4
        json.dumps({"body": "no text key"}),  # 5
        json.dumps({"text": good[1]}),
        json.dumps({"text": 42}),  # 7
        json.dumps({"text": ""}),  # 8
        "",  # 9: blank, ignored
        "   ",  # 10: blank, ignored
        '{"text": "lone surrogate \\ud800"}',  # 11: UTF-8 cannot encode it
        json.dumps({"text": good[2]}),
        json.dumps({"text": good[3]}) + "   ",
    ]
    return write_lines(tmp_path / "in.jsonl", lines), good[:4]


def test_bad_lines_counted_and_skipped(tmp_path):
    src, good = bad_lines_input(tmp_path)
    cfg = PreprocessConfig(src, str(tmp_path / "d"), {"tokenizer_type": "ByteLevelTokenizer"}, append_eod=True)
    result = preprocess_data(cfg)
    assert result.bad_lines == {
        "invalid JSON": 2,
        "not a JSON object": 1,
        "missing key 'text'": 1,
        "key 'text' is not a string": 1,
        "empty text in key 'text'": 1,
        "tokenizer error": 1,
    }
    assert [lineno for lineno, _ in result.bad_examples] == [2, 3, 4, 5, 7, 8, 11]
    assert (result.lines, result.blank_lines, result.documents) == (13, 2, 4)
    _, docs = read_dataset(result.output_prefixes["text"])
    assert [bytes(d[:-1]).decode("utf-8") for d in docs] == good


def test_strict_fails_and_writes_nothing(tmp_path):
    src, _ = bad_lines_input(tmp_path)
    cfg = PreprocessConfig(src, str(tmp_path / "out" / "d"), {"tokenizer_type": "ByteLevelTokenizer"}, strict=True)
    with pytest.raises(PreprocessError, match=r"in\.jsonl:2: invalid JSON.*--strict"):
        preprocess_data(cfg)
    assert os.listdir(tmp_path / "out") == []


def test_no_valid_document_is_an_error(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", ["nope", json.dumps({"other": "x"}), ""])
    with pytest.raises(PreprocessError, match="no valid document among 3 line"):
        preprocess_data(PreprocessConfig(src, str(tmp_path / "out" / "d"), {"tokenizer_type": "ByteLevelTokenizer"}))
    assert os.listdir(tmp_path / "out") == []


def make_previous_output(directory):
    os.makedirs(directory, exist_ok=True)
    previous = {}
    for ext in (".bin", ".idx"):
        path = os.path.join(directory, "d_text_document" + ext)
        data = os.urandom(64)
        with open(path, "wb") as f:
            f.write(data)
        previous[path] = data
    return previous


def assert_untouched(directory, previous):
    assert sorted(os.path.join(directory, n) for n in os.listdir(directory)) == sorted(previous)
    for path, data in previous.items():
        with open(path, "rb") as f:
            assert f.read() == data


@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_failure_mid_write_leaves_previous_output(tmp_path, monkeypatch, workers):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = str(tmp_path / "out")
    previous = make_previous_output(out)
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": f"document {i}"} for i in range(100)))
    add_document = IndexedDatasetBuilder.add_document
    calls = []

    def failing_add_document(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 50:
            raise OSError("disk full (simulated)")
        return add_document(self, *args, **kwargs)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", failing_add_document)
    cfg = PreprocessConfig(src, os.path.join(out, "d"), {"tokenizer_type": "ByteLevelTokenizer"}, workers=workers,
                           chunk_size=4, force=True)
    with pytest.raises(OSError, match="simulated"):
        preprocess_data(cfg)
    assert len(calls) == 50
    assert_untouched(out, previous)


def test_worker_failure_and_interrupt_leave_previous_output(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    previous = make_previous_output(out)
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": f"document {i}"} for i in range(200)))
    cfg = PreprocessConfig(src, os.path.join(out, "d"), {"tokenizer_type": "ByteLevelTokenizer"}, workers=2,
                           chunk_size=4, force=True)
    encode_line = pp._encode_line

    def failing_encode_line(line):  # runs in the forked workers
        if b"document 150" in line:
            raise RuntimeError("worker crashed (simulated)")
        return encode_line(line)

    monkeypatch.setattr(pp, "_encode_line", failing_encode_line)
    with pytest.raises(RuntimeError, match="simulated"):
        preprocess_data(cfg)
    assert_untouched(out, previous)
    monkeypatch.setattr(pp, "_encode_line", encode_line)

    read_chunks = pp._read_chunks

    def interrupted_reader(path, chunk_size):
        for i, chunk in enumerate(read_chunks(path, chunk_size)):
            if i == 20:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(pp, "_read_chunks", interrupted_reader)
    with pytest.raises(KeyboardInterrupt):
        preprocess_data(cfg)
    assert_untouched(out, previous)

    monkeypatch.setattr(pp, "_read_chunks", read_chunks)
    result = preprocess_data(cfg)  # and a good run replaces the previous output
    _, docs = read_dataset(result.output_prefixes["text"])
    assert len(docs) == 200 and bytes(docs[199]).decode() == "document 199"


def test_existing_output_needs_force(tmp_path):
    out = str(tmp_path / "out")
    previous = make_previous_output(out)
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": f"document {i}"} for i in range(10)))
    cfg = PreprocessConfig(src, os.path.join(out, "d"), {"tokenizer_type": "ByteLevelTokenizer"})
    with pytest.raises(PreprocessError, match=r"d_text_document\.bin, .*d_text_document\.idx exist "
                                              r"\(use --force to replace them\)"):
        preprocess_data(cfg)
    assert_untouched(out, previous)
    os.remove(os.path.join(out, "d_text_document.bin"))  # one half of a pair is refused too
    with pytest.raises(PreprocessError, match=r"d_text_document\.idx exists \(use --force to replace it\)"):
        preprocess_data(cfg)
    cfg.force = True
    result = preprocess_data(cfg)
    _, docs = read_dataset(result.output_prefixes["text"])
    assert [bytes(d).decode() for d in docs] == [f"document {i}" for i in range(10)]


def test_output_prefix_that_cannot_be_written(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": "x"} for _ in range(3)))
    (tmp_path / "file").write_text("not a directory")
    for prefix in (tmp_path / "file" / "d", tmp_path / "file" / "sub" / "d"):
        with pytest.raises(ValueError, match=f"--output-prefix {prefix}: {tmp_path / 'file'} is a file, not a "
                                             "directory"):
            preprocess_data(PreprocessConfig(src, str(prefix), {"tokenizer_type": "ByteLevelTokenizer"}, force=True))
    (tmp_path / "d_text_document.idx").mkdir()
    with pytest.raises(ValueError, match="d_text_document.idx is a directory; choose another prefix"):
        preprocess_data(PreprocessConfig(src, str(tmp_path / "d"), {"tokenizer_type": "ByteLevelTokenizer"},
                                         force=True))
    assert sorted(os.listdir(tmp_path)) == ["d_text_document.idx", "file", "in.jsonl"]


def run_tool(*args, wait=True):
    proc = subprocess.Popen([sys.executable, TOOL, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc.communicate(timeout=120) + (proc.returncode,) if wait else proc


@pytest.mark.parametrize(
    "args, rc, message",
    [
        (["--input", "/no/such.jsonl", "--tokenizer-type", "ByteLevelTokenizer"], 1,
         "error: --input /no/such.jsonl: no such file"),
        (["--input", REPO, "--tokenizer-type", "ByteLevelTokenizer"], 1, f"error: --input {REPO} is a directory"),
        (["--tokenizer-type", "NoSuchTokenizer"], 2, "invalid choice: 'NoSuchTokenizer'"),
        (["--tokenizer-type", "HuggingFaceTokenizer"], 1,
         "error: --tokenizer-model is required for --tokenizer-type HuggingFaceTokenizer"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "/no/tok"], 1,
         "error: --tokenizer-model /no/tok: no such file or directory"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "/no/vocab.json", "--merge-file", "/no/m.txt"], 1,
         "error: --vocab-file /no/vocab.json: no such file"),
        (["--tokenizer-type", "NullTokenizer"], 1,
         "error: --vocab-size is required for --tokenizer-type NullTokenizer"),
        # a flag the chosen tokenizer does not read is refused, not ignored
        (["--tokenizer-type", "ByteLevelTokenizer", "--vocab-size", "100"], 1,
         "error: --vocab-size is not used by --tokenizer-type ByteLevelTokenizer (it reads no files)"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", pp.BUNDLED_TOKENIZER, "--merge-file", "m"],
         1, "error: --merge-file is not used by --tokenizer-type HuggingFaceTokenizer (it reads --tokenizer-model)"),
    ],
    ids=["missing-input", "input-is-dir", "unknown-type", "hf-no-model", "hf-missing-model", "gpt2-missing-vocab",
         "null-no-size", "unused-vocab-size", "unused-merge-file"],
)
def test_cli_errors(tmp_path, args, rc, message):
    base = ["--input", pp.BUNDLED_CORPUS, "--output-prefix", str(tmp_path / "d")]
    stdout, stderr, code = run_tool(*(base + args))
    assert code == rc, stderr
    assert message in stderr
    if rc == 1:
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert os.listdir(tmp_path) == []


def test_cli_existing_output_and_file_parent(tmp_path):
    out = str(tmp_path / "out")
    previous = make_previous_output(out)
    src = write_lines(tmp_path / "in.jsonl", jsonl({"text": f"document {i}"} for i in range(5)))
    (tmp_path / "file").write_text("")
    base = ["--input", src, "--tokenizer-type", "ByteLevelTokenizer"]
    refused = run_tool(*base, "--output-prefix", os.path.join(out, "d"), wait=False)
    below_file = run_tool(*base, "--output-prefix", str(tmp_path / "file" / "d"), "--force", wait=False)
    for proc, message in ((refused, "exist (use --force to replace them)"),
                          (below_file, f"{tmp_path / 'file'} is a file, not a directory")):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, stderr
        assert len(stderr.strip().splitlines()) == 1 and "preprocess_data.py: error: --output-prefix" in stderr, stderr
        assert message in stderr, stderr
    assert_untouched(out, previous)
    stdout, stderr, code = run_tool(*base, "--output-prefix", os.path.join(out, "d"), "--force")
    assert code == 0, stderr
    _, docs = read_dataset(os.path.join(out, "d_text_document"))
    assert [bytes(d).decode() for d in docs] == [f"document {i}" for i in range(5)]


def test_cli_repeated_json_keys_add_up():
    spec = importlib.util.spec_from_file_location("preprocess_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = ["--input", "x", "--output-prefix", "y", "--tokenizer-type", "ByteLevelTokenizer"]
    assert tool.get_args(base).json_keys == ["text"]
    assert tool.get_args(base + ["--json-keys", "text", "--json-keys", "title"]).json_keys == ["text", "title"]
    assert tool.get_args(base + ["--json-keys", "a", "b"]).json_keys == ["a", "b"]


def test_cli_run_strict_and_sigterm(tmp_path, bundled_prefix):
    # The runs import megatron-core (seconds each): start them together.
    with open(pp.BUNDLED_CORPUS, "rb") as f:
        corpus = f.read()
    big = tmp_path / "big.jsonl"
    big.write_bytes(corpus * 4)
    killed = run_tool("--input", str(big), "--output-prefix", str(tmp_path / "killed" / "d"),
                      "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", pp.BUNDLED_TOKENIZER,
                      "--workers", "2", "--log-interval", "500", wait=False)
    ok = run_tool("--input", pp.BUNDLED_CORPUS, "--output-prefix", str(tmp_path / "cli" / "corpus"),
                  "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", pp.BUNDLED_TOKENIZER,
                  "--append-eod", "--workers", "2", "--log-interval", "1000", wait=False)
    src, _ = bad_lines_input(tmp_path)
    strict = run_tool("--input", src, "--output-prefix", str(tmp_path / "strict" / "d"),
                      "--tokenizer-type", "ByteLevelTokenizer", "--strict", wait=False)
    # SIGTERM in the middle of a run: exit 143, nothing left behind (not even temporary files).
    for line in killed.stderr:
        if "processed 500 lines" in line:
            break
    else:
        pytest.fail("the run ended before its first progress line")
    killed.send_signal(signal.SIGTERM)
    killed.communicate(timeout=60)
    assert killed.returncode == 143
    assert os.listdir(tmp_path / "killed") == []

    stdout, stderr = ok.communicate(timeout=300)
    assert ok.returncode == 0, stderr
    assert "processed 1000 lines" in stderr and "docs/s" in stderr and "MB/s" in stderr
    prefix = str(tmp_path / "cli" / "corpus_text_document")
    assert f"{prefix}.bin {prefix}.idx: 2600 documents" in stdout
    for ext in (".bin", ".idx"):  # the CLI with 2 workers equals the library with 1
        assert filecmp.cmp(prefix + ext, bundled_prefix + ext, shallow=False)
    _, stderr = strict.communicate(timeout=300)
    assert strict.returncode == 1
    assert "in.jsonl:2: invalid JSON" in stderr and "--strict" in stderr
    assert os.listdir(tmp_path / "strict") == []



def test_indexed_and_gpt_dataset(bundled_prefix):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tok = build_tokenizer(**BUNDLED_TOKENIZER)
    ds, docs = read_dataset(bundled_prefix)
    assert len(docs) == 2600
    with open(pp.BUNDLED_CORPUS, encoding="utf-8") as f:
        first = json.loads(f.readline())["text"]
    assert tok.detokenize(docs[0][:-1]) == first
    i = random.randrange(len(docs))
    assert ds.get(i, offset=1, length=3).tolist() == docs[i][1:4]
    assert int(ds.sequence_lengths[i]) == len(docs[i])

    seq = 256
    # path_to_cache=None: megatron-core 0.16.1 needs a process group to write the blend cache.
    config = GPTDatasetConfig(
        random_seed=random.randrange(1 << 30), sequence_length=seq, blend=([bundled_prefix], None),
        split="90,5,5", tokenizer=tok.as_megatron_tokenizer(), path_to_cache=None,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [50, 5, 5], lambda: True, config).build()
    assert len(train) >= 50 and len(valid) >= 5 and len(test) >= 5
    whole_docs = {tuple(d[:-1]) for d in docs}
    interior = 0
    for i in random.sample(range(len(train)), 20):
        sample = train[i]
        tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
        assert len(tokens) == len(labels) == seq
        assert tokens[1:] == labels[:-1]
        assert all(0 <= t < tok.vocab_size for t in tokens + labels)
        assert bool((sample["loss_mask"] == 1).all())
        # Every document between two EODs of a sample is a whole document of the corpus.
        eods = [j for j, t in enumerate(tokens) if t == tok.eod]
        for a, b in zip(eods, eods[1:]):
            assert tuple(tokens[a + 1:b]) in whole_docs
            interior += 1
    assert interior > 0


def test_bundled_data_is_reproducible(tmp_path):
    path = os.path.join(REPO, "tools", "make_default_data.py")
    spec = importlib.util.spec_from_file_location("make_default_data", path)
    mdd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mdd)
    corpus = str(tmp_path / "corpus.jsonl")
    mdd.write_corpus(corpus, mdd.DEFAULT_NUM_DOCS, mdd.DEFAULT_SEED)
    assert filecmp.cmp(corpus, pp.BUNDLED_CORPUS, shallow=False)
    mdd.train_tokenizer(corpus, str(tmp_path / "tok"), mdd.DEFAULT_VOCAB_SIZE)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(str(tmp_path / "tok" / name), os.path.join(pp.BUNDLED_TOKENIZER, name), shallow=False)
    size = os.path.getsize(pp.BUNDLED_CORPUS) + os.path.getsize(os.path.join(pp.BUNDLED_TOKENIZER, "tokenizer.json"))
    assert size < 2_000_000


def test_gpt_dataset_cache_and_blend(bundled_prefix, tmp_path):
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tok = build_tokenizer(**BUNDLED_TOKENIZER)

    def build(blend, cache):
        config = GPTDatasetConfig(
            random_seed=7, sequence_length=64, blend=blend, split="98,1,1", tokenizer=tok.as_megatron_tokenizer(),
            path_to_cache=str(cache), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        )
        return BlendedMegatronDatasetBuilder(GPTDataset, [20, 2, 2], lambda: True, config).build()[0]

    # One dataset with a cache works without a process group; the cache names the tokenizer.
    first = build(([bundled_prefix], None), tmp_path / "cache1")
    descriptions = [n for n in os.listdir(tmp_path / "cache1") if n.endswith("train-description.txt")]
    assert len(descriptions) == 1
    with open(tmp_path / "cache1" / descriptions[0]) as f:
        assert json.load(f)["tokenizer"] == json.loads(json.dumps(tok.unique_identifiers))
    again = build(([bundled_prefix], None), tmp_path / "cache1")  # loads the cached indices
    assert again[3]["tokens"].tolist() == first[3]["tokens"].tolist()

    # A weighted blend with a cache needs a process group in megatron-core 0.16.1: a 1-rank one.
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        blended = build(([bundled_prefix, bundled_prefix], [0.25, 0.75]), tmp_path / "cache2")
        assert len(blended) >= 20
        assert all(len(blended[i]["tokens"]) == 64 for i in range(5))
    finally:
        if created:
            dist.destroy_process_group()
