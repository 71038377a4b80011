"""jsonl -> megatron-core indexed datasets (``.bin``/``.idx``), streamed, ordered, atomic.

The library behind ``tools/preprocess_data.py``. Each input line is one JSON document; for every
key of ``json_keys`` the tokenized text becomes one document of the dataset
``<output_prefix>_<key>_document`` (Megatron-LM's naming), written with megatron-core's
``IndexedDatasetBuilder`` in the dtype megatron-core picks for the vocabulary size (uint16 below
65500 ids, else int32).

Guarantees:

* Streaming: the input is read line by line and at most ``4 * workers`` chunks of
  ``chunk_size`` documents are in flight, so inputs larger than memory work.
* Order: documents are written in input order whatever ``workers`` is; the output with
  N workers is byte-identical to the output with one.
* No silent replacement: outputs that already exist are an error unless ``force`` (``--force``),
  checked before any work; an output prefix inside a file is an error.
* Atomic: everything is written to temporary files next to the outputs and renamed at the end;
  on any error or interrupt the temporary files are removed and earlier outputs stay untouched.
  (The final renames, two per key, are separate steps: only a crash between them, e.g. SIGKILL,
  could pair a new ``.bin`` with an old ``.idx``; SIGKILL anywhere else can leave hidden
  ``.<name>.bin.*.tmp`` files behind.)
* Bad lines (invalid JSON or UTF-8, not an object, a key missing or not a string, empty text, a
  tokenizer failure) are skipped in every dataset (so datasets of several keys stay aligned),
  counted and reported; with ``strict`` the first one aborts the run. Blank lines are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from typing import Any, Deque, Dict, List, Sequence, Tuple, Union

import numpy as np

from megatron_lasp.atomic import check_directory_path
from megatron_lasp.data.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

MAX_BAD_EXAMPLES = 10
"""How many bad lines are kept (line number + reason) for the final report."""


class PreprocessError(Exception):
    """A user-facing failure of the preprocessing run (bad input, strict mode, no documents)."""


@dataclasses.dataclass
class PreprocessConfig:
    """Settings of one preprocessing run (one field per ``tools/preprocess_data.py`` flag)."""

    input: str
    """Path of the jsonl input (one JSON object per line)."""
    output_prefix: str
    """Outputs are ``<output_prefix>_<key>_document.bin/.idx``; missing directories are created."""
    tokenizer: Dict[str, Any]
    """Keyword arguments of :func:`build_tokenizer` (``tokenizer_type``, ``tokenizer_model``, ...)."""
    json_keys: Sequence[str] = ("text",)
    """JSON keys to tokenize; one dataset per key."""
    append_eod: bool = False
    """Append the tokenizer's EOD id to every document."""
    workers: int = 1
    """Tokenizer processes; 1 tokenizes in this process."""
    chunk_size: int = 64
    """Documents per worker task."""
    log_interval: int = 10000
    """Log progress every this many input lines (0: never)."""
    strict: bool = False
    """Abort on the first bad line instead of skipping it."""
    force: bool = False
    """Replace outputs that already exist (otherwise they are an error)."""

    def __post_init__(self) -> None:
        self.json_keys = tuple(self.json_keys)
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys has duplicates: {' '.join(self.json_keys)}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.log_interval < 0:
            raise ValueError(f"--log-interval must be >= 0, got {self.log_interval}")
        if not self.output_prefix or os.path.basename(self.output_prefix) == "":
            raise ValueError(f"--output-prefix must end with a file name prefix, got {self.output_prefix!r}")


@dataclasses.dataclass
class PreprocessResult:
    """What a run wrote and skipped."""

    output_prefixes: Dict[str, str]
    """key -> dataset prefix (``IndexedDataset(prefix)`` reads it)."""
    documents: int
    """Documents written to each dataset."""
    tokens: Dict[str, int]
    """key -> tokens written (EOD included)."""
    lines: int
    """Input lines read (blank lines included)."""
    blank_lines: int
    """Blank lines ignored."""
    bad_lines: Dict[str, int]
    """Reason -> number of skipped lines."""
    bad_examples: List[Tuple[int, str]]
    """First :data:`MAX_BAD_EXAMPLES` skipped lines as (line number, reason with detail)."""
    input_bytes: int
    """Bytes read from the input."""
    seconds: float
    """Wall time of the run."""
    dtype: str
    """Token dtype of the ``.bin`` files."""

    @property
    def num_bad_lines(self) -> int:
        """Total skipped lines."""
        return sum(self.bad_lines.values())


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """Megatron-LM's dataset name for one JSON key: ``<output_prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


# A document result: (line number, bytes, payload) where payload is one array per key, None for a
# blank line, or (reason, detail) for a bad line.
_DocResult = Tuple[int, int, Union[List[np.ndarray], None, Tuple[str, str]]]

# Per-process state of the encoder (set by _init_encoder in each worker, or in this process).
_ENCODER: Dict[str, Any] = {}


def _init_encoder(tokenizer_settings: Dict[str, Any], json_keys: Sequence[str], append_eod: bool,
                  dtype: Any, in_worker: bool) -> None:
    if in_worker:
        # Interrupts and termination are handled by the parent, which then terminates the pool.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _ENCODER["tokenizer"] = build_tokenizer(**tokenizer_settings)
    _ENCODER["keys"] = tuple(json_keys)
    _ENCODER["append_eod"] = append_eod
    _ENCODER["dtype"] = dtype


def _encode_line(line: bytes) -> Union[List[np.ndarray], None, Tuple[str, str]]:
    if not line.strip():
        return None
    try:
        doc = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return ("invalid JSON", str(e))
    if not isinstance(doc, dict):
        return ("not a JSON object", type(doc).__name__)
    tokenizer: Tokenizer = _ENCODER["tokenizer"]
    out = []
    for key in _ENCODER["keys"]:
        if key not in doc:
            return (f"missing key {key!r}", "")
        text = doc[key]
        if not isinstance(text, str):
            return (f"key {key!r} is not a string", type(text).__name__)
        if not text:
            return (f"empty text in key {key!r}", "")
        try:
            ids = tokenizer.tokenize(text)
        except Exception as e:  # data-dependent failures (e.g. lone surrogates) skip the line
            return ("tokenizer error", f"{key!r}: {type(e).__name__}: {e}")
        if not ids:
            return (f"empty text in key {key!r}", "no tokens")
        if _ENCODER["append_eod"]:
            ids.append(tokenizer.eod)
        out.append(np.asarray(ids, dtype=_ENCODER["dtype"]))
    return out


def _encode_chunk(chunk: List[Tuple[int, bytes]]) -> List[_DocResult]:
    return [(lineno, len(line), _encode_line(line)) for lineno, line in chunk]


def _read_chunks(path: str, chunk_size: int):
    with open(path, "rb") as f:
        chunk: List[Tuple[int, bytes]] = []
        for lineno, line in enumerate(f, 1):
            chunk.append((lineno, line))
            if len(chunk) == chunk_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _check_outputs(config: PreprocessConfig, final_prefixes: Dict[str, str]) -> None:
    """Refuse outputs that cannot be written or, without ``force``, that already exist."""
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    check_directory_path(out_dir, f"--output-prefix {config.output_prefix}")
    paths = [prefix + ext for prefix in final_prefixes.values() for ext in (".bin", ".idx")]
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"--output-prefix {config.output_prefix}: {path} is a directory; choose another prefix")
    existing = [path for path in paths if os.path.lexists(path)]
    if existing and not config.force:
        verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        raise PreprocessError(f"--output-prefix {config.output_prefix}: {', '.join(existing)} {verb} "
                              f"(use --force to replace {them})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _AtomicOutputs:
    """Temporary ``.bin``/``.idx`` files next to the final ones, renamed only on :meth:`commit`."""

    def __init__(self, final_prefixes: Dict[str, str], dtype: Any) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.final_prefixes = final_prefixes
        self.tmp_paths: List[str] = []
        self.builders: Dict[str, Any] = {}
        self.tmp: Dict[str, Tuple[str, str]] = {}
        for key, prefix in final_prefixes.items():
            directory, base = os.path.split(os.path.abspath(prefix))
            tmp_bin = self._reserve(directory, base, ".bin")
            tmp_idx = self._reserve(directory, base, ".idx")
            self.tmp[key] = (tmp_bin, tmp_idx)
            self.builders[key] = IndexedDatasetBuilder(tmp_bin, dtype=dtype)

    def _reserve(self, directory: str, base: str, suffix: str) -> str:
        fd, path = tempfile.mkstemp(prefix=f".{base}{suffix}.", suffix=".tmp", dir=directory)
        os.close(fd)
        # mkstemp creates 0600 files; give the outputs the usual permissions.
        os.chmod(path, 0o666 & ~_umask())
        self.tmp_paths.append(path)
        return path

    def commit(self) -> None:
        """Finalize every builder, then move all files to their final names."""
        for key, builder in self.builders.items():
            builder.finalize(self.tmp[key][1])
        for key, prefix in self.final_prefixes.items():
            tmp_bin, tmp_idx = self.tmp[key]
            os.replace(tmp_bin, prefix + ".bin")
            os.replace(tmp_idx, prefix + ".idx")
        self.tmp_paths = []

    def discard(self) -> None:
        """Close and delete every temporary file."""
        for builder in self.builders.values():
            try:
                builder.data_file.close()
            except Exception:  # already closed or never opened: nothing to release
                pass
        for path in self.tmp_paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self.tmp_paths = []


def preprocess_data(config: PreprocessConfig) -> PreprocessResult:
    """Tokenize ``config.input`` into one megatron-core indexed dataset per JSON key.

    Args:
        config: the run settings.

    Returns:
        a :class:`PreprocessResult` (counts, output prefixes, bad lines).

    Raises:
        FileNotFoundError: the input or a tokenizer file does not exist.
        ValueError: bad settings (tokenizer flags, keys, an output prefix inside a file, ...).
        PreprocessError: existing outputs without ``force``, a bad line under ``strict``, or no
            valid document at all.
    """
    if os.path.isdir(config.input):
        raise ValueError(f"--input {config.input} is a directory; give the jsonl file")
    if not os.path.isfile(config.input):
        raise FileNotFoundError(f"--input {config.input}: no such file")
    final_prefixes = {k: output_prefix_for_key(config.output_prefix, k) for k in config.json_keys}
    _check_outputs(config, final_prefixes)
    tokenizer = build_tokenizer(**config.tokenizer)
    tokenizer.load()  # a missing package or an unloadable file fails here, not on every line
    # Imported after the checks above: importing megatron.core takes seconds.
    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    logger.info(
        "preprocessing %s with %r (dtype %s), keys %s, %d worker(s) -> %s",
        config.input, tokenizer, np.dtype(dtype).name, ",".join(config.json_keys), config.workers,
        ", ".join(p + ".{bin,idx}" for p in final_prefixes.values()),
    )

    if not config.append_eod:
        logger.warning("no --append-eod: the documents are stored without an EOD between them, so training "
                       "reads them as one running text (and --reset-attention-mask finds no document starts)")
    stats = _Stats(config.json_keys, config.log_interval, config.input)
    outputs = _AtomicOutputs(final_prefixes, dtype)
    pool = None
    try:
        init_args = (config.tokenizer, config.json_keys, config.append_eod, dtype)
        chunks = _read_chunks(config.input, config.chunk_size)
        if config.workers == 1:
            _init_encoder(*init_args, in_worker=False)
            for chunk in chunks:
                _write_results(_encode_chunk(chunk), outputs, stats, config)
        else:
            pool = multiprocessing.Pool(config.workers, _init_encoder, init_args + (True,))
            pending: Deque[Any] = collections.deque()
            max_pending = 4 * config.workers
            for chunk in chunks:
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                if len(pending) >= max_pending:
                    _write_results(pending.popleft().get(), outputs, stats, config)
            while pending:
                _write_results(pending.popleft().get(), outputs, stats, config)
            pool.close()
            pool.join()
            pool = None
        if stats.documents == 0:
            raise PreprocessError(
                f"--input {config.input}: no valid document among {stats.lines} line(s) "
                f"({stats.describe_bad()})"
            )
        outputs.commit()
    except BaseException as err:
        if pool is not None:
            if isinstance(err, Exception):
                # Let the (at most 4 x workers) queued chunks finish: Pool.terminate() kills workers
                # that may hold the result queue's lock, and its task handler then waits on that
                # lock forever (a CPython Pool limitation seen here as a rare hang).
                pool.close()
            else:  # interrupt / termination: stop at once
                pool.terminate()
            pool.join()
        outputs.discard()
        raise
    finally:
        _ENCODER.clear()

    result = stats.result(final_prefixes, np.dtype(dtype).name)
    logger.info(
        "wrote %d documents, %s tokens in %.1fs (%.0f docs/s, %.2f MB/s)",
        result.documents, ", ".join(f"{k}: {n}" for k, n in result.tokens.items()), result.seconds,
        result.documents / max(result.seconds, 1e-9), result.input_bytes / 1e6 / max(result.seconds, 1e-9),
    )
    if result.num_bad_lines:
        logger.warning("skipped %d bad line(s): %s", result.num_bad_lines, stats.describe_bad())
        for lineno, reason in result.bad_examples:
            logger.warning("  line %d: %s", lineno, reason)
    if result.blank_lines:
        logger.info("ignored %d blank line(s)", result.blank_lines)
    return result


class _Stats:
    def __init__(self, keys: Sequence[str], log_interval: int, input_path: str) -> None:
        self.start = time.monotonic()
        self.last_log = self.start
        self.log_interval = log_interval
        self.input_path = input_path
        self.lines = 0
        self.blank_lines = 0
        self.documents = 0
        self.input_bytes = 0
        self.tokens = {k: 0 for k in keys}
        self.bad: "collections.Counter[str]" = collections.Counter()
        self.bad_examples: List[Tuple[int, str]] = []

    def describe_bad(self) -> str:
        if not self.bad:
            return "no bad lines"
        return ", ".join(f"{n} {reason}" for reason, n in self.bad.most_common())

    def progress(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        logger.info(
            "processed %d lines, %d documents (%.0f docs/s, %.2f MB/s)",
            self.lines, self.documents, self.documents / elapsed, self.input_bytes / 1e6 / elapsed,
        )

    def result(self, prefixes: Dict[str, str], dtype: str) -> PreprocessResult:
        return PreprocessResult(
            output_prefixes=dict(prefixes),
            documents=self.documents,
            tokens=dict(self.tokens),
            lines=self.lines,
            blank_lines=self.blank_lines,
            bad_lines=dict(self.bad),
            bad_examples=list(self.bad_examples),
            input_bytes=self.input_bytes,
            seconds=time.monotonic() - self.start,
            dtype=dtype,
        )


def _write_results(results: List[_DocResult], outputs: _AtomicOutputs, stats: _Stats,
                   config: PreprocessConfig) -> None:
    for lineno, nbytes, payload in results:
        stats.lines += 1
        stats.input_bytes += nbytes
        if payload is None:
            stats.blank_lines += 1
        elif isinstance(payload, tuple):
            reason, detail = payload
            message = f"{reason}: {detail}" if detail else reason
            if config.strict:
                raise PreprocessError(f"--input {config.input}:{lineno}: {message} (--strict)")
            stats.bad[reason] += 1
            if len(stats.bad_examples) < MAX_BAD_EXAMPLES:
                stats.bad_examples.append((lineno, message))
        else:
            for key, ids in zip(config.json_keys, payload):
                outputs.builders[key].add_document(ids, [ids.size])
                stats.tokens[key] += int(ids.size)
            stats.documents += 1
        if stats.log_interval and stats.lines % stats.log_interval == 0:
            stats.progress()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED_CORPUS = os.path.join(REPO_ROOT, "examples", "data", "corpus.jsonl")
"""The bundled tiny corpus (generated by ``tools/make_default_data.py``)."""
BUNDLED_TOKENIZER = os.path.join(REPO_ROOT, "examples", "data", "tokenizer")
"""The bundled byte-level BPE tokenizer directory (``--tokenizer-model``)."""


def bundled_tokenizer_settings() -> Dict[str, Any]:
    """:func:`build_tokenizer` keyword arguments of the bundled tokenizer."""
    return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": BUNDLED_TOKENIZER}


def preprocess_bundled_corpus(output_prefix: str, workers: int = 1, force: bool = False) -> str:
    """Tokenize the bundled corpus with the bundled tokenizer (EOD appended).

    Same as ``tools/preprocess_data.py --input examples/data/corpus.jsonl --output-prefix
    <output_prefix> --tokenizer-type HuggingFaceTokenizer --tokenizer-model examples/data/tokenizer
    --append-eod``.

    Args:
        output_prefix: where to write (``<output_prefix>_text_document.bin/.idx``).
        workers: tokenizer processes.
        force: replace existing outputs (``--force``).

    Returns:
        the dataset prefix to pass as ``--data-path`` / in a ``GPTDatasetConfig`` blend.
    """
    if not os.path.isfile(BUNDLED_CORPUS):
        raise FileNotFoundError(
            f"bundled corpus {BUNDLED_CORPUS} not found (a source checkout is needed; or run "
            "tools/make_default_data.py)"
        )
    config = PreprocessConfig(
        input=BUNDLED_CORPUS,
        output_prefix=output_prefix,
        tokenizer=bundled_tokenizer_settings(),
        append_eod=True,
        workers=workers,
        force=force,
    )
    return preprocess_data(config).output_prefixes["text"]
