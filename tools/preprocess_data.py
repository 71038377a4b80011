"""Tokenize a jsonl corpus into megatron-core indexed datasets (.bin/.idx).

One JSON object per line; each ``--json-keys`` key becomes ``<output-prefix>_<key>_document.bin``
and ``.idx`` (Megatron-LM's names and flags), readable by megatron-core's ``IndexedDataset`` and
``GPTDataset``. Progress (docs/s, MB/s) and the bad-line report go to stderr.

The bundled corpus with the bundled tokenizer (what the quickstart runs)::

    python tools/preprocess_data.py --input examples/data/corpus.jsonl \
        --output-prefix runs/data/corpus --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model examples/data/tokenizer --append-eod --workers 2
    # -> runs/data/corpus_text_document.bin, runs/data/corpus_text_document.idx

GPT-2 BPE files, two keys, abort on the first bad line::

    python tools/preprocess_data.py --input my.jsonl --output-prefix out/my \
        --json-keys text summary --tokenizer-type GPT2BPETokenizer \
        --vocab-file gpt2/vocab.json --merge-file gpt2/merges.txt --append-eod --strict

Existing outputs are never replaced silently: the run stops with an error before any work unless
``--force`` is given (then the new files replace them at the end, and a failed run leaves them as
they were). Re-tokenizing in place::

    python tools/preprocess_data.py --input my.jsonl --output-prefix out/my \
        --tokenizer-type ByteLevelTokenizer --append-eod --force

No tokenizer files (UTF-8 bytes, EOD = 256)::

    python tools/preprocess_data.py --input my.jsonl --output-prefix out/my \
        --tokenizer-type ByteLevelTokenizer --append-eod

Exit status: 0 on success (bad lines are skipped and reported), 1 on a user error (missing
input or tokenizer file, existing outputs without --force, an output prefix inside a file, a bad
line under --strict, no valid document), 2 on bad flags,
130/143 when interrupted; nothing half-written is left in any failure.
"""

import argparse
import logging
import os
import signal
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lasp.data.preprocess import PreprocessConfig, PreprocessError, preprocess_data  # noqa: E402
from megatron_lasp.data.tokenizer import add_tokenizer_args, tokenizer_settings  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="jsonl file, one JSON document per line")
    # extend: a repeated --json-keys adds keys (a plain nargs="+" would keep the last one silently)
    group.add_argument("--json-keys", nargs="+", action="extend", default=None,
                       help="keys to tokenize; one dataset per key (default: text)")
    group.add_argument("--strict", action="store_true",
                       help="fail on the first bad line instead of skipping and counting it")
    add_tokenizer_args(parser)
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes <prefix>_<key>_document.bin/.idx; directories are created")
    group.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    group.add_argument("--force", action="store_true",
                       help="replace existing <prefix>_<key>_document.bin/.idx (at the end of a successful run only)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    group.add_argument("--chunk-size", type=int, default=64, help="documents per worker task (default 64)")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="log progress every N lines, 0 for never (default 10000)")
    args = parser.parse_args(argv)
    args.json_keys = args.json_keys or ["text"]
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("megatron_lasp").setLevel(logging.INFO)
    # Turn SIGTERM into an exception so that the temporary outputs are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # megatron-core warns on import that TE/apex are missing: irrelevant to preprocessing.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    prog = os.path.basename(sys.argv[0])
    try:
        config = PreprocessConfig(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer=tokenizer_settings(args),
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            chunk_size=args.chunk_size,
            log_interval=args.log_interval,
            strict=args.strict,
            force=args.force,
        )
        result = preprocess_data(config)
    except (OSError, ValueError, PreprocessError) as e:  # OSError: e.g. no permission, disk full
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted, no output written", file=sys.stderr)
        return 130
    for key, prefix in result.output_prefixes.items():
        print(f"{prefix}.bin {prefix}.idx: {result.documents} documents, {result.tokens[key]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
