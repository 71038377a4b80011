"""Convert a megatron-lasp checkpoint (saved with any TP/PP/SP sizes) to a Hugging Face model.

The latest iteration of a training run, with the tokenizer recorded in the checkpoint::

    python tools/convert_checkpoint_to_hf.py --load runs/tiny/checkpoints --save runs/tiny/hf

A given iteration, the bundled tokenizer, 2GB safetensors shards, bf16 weights, replacing the target::

    python tools/convert_checkpoint_to_hf.py --load runs/tiny/checkpoints --ckpt-step 100 \
        --save runs/tiny/hf --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model examples/data/tokenizer --max-shard-size 2GB --dtype bfloat16 --force

Then, anywhere with torch + transformers (no megatron needed)::

    model = AutoModelForCausalLM.from_pretrained("runs/tiny/hf", trust_remote_code=True)

The directory holds the weights, config.json, the tokenizer (pad token, left padding), the model's
code and a model card (README.md). It is written beside --save and renamed into place at the end.

Exit status: 0 on success, 1 on a user error (one line on stderr, nothing written: missing
checkpoint directory or iteration, a damaged checkpoint file (named, with the other iterations),
a --save that is, contains or lies inside the checkpoint or the tokenizer, a non-empty --save
without --force, an unusable tokenizer), 2 on bad flags.
"""

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lasp.data.tokenizer import add_tokenizer_args, tokenizer_settings  # noqa: E402
from megatron_lasp.hf.convert import DTYPES, ConversionError, convert_checkpoint_to_hf  # noqa: E402

PROG = "convert_checkpoint_to_hf.py"


def get_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (the training run's --save)")
    parser.add_argument("--save", required=True, help="Hugging Face model directory to create")
    parser.add_argument("--ckpt-step", "--iteration", dest="iteration", type=int, default=None,
                        help="iteration to convert (default: the latest)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file; above it the weights are sharded with an index (default 5GB)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weight dtype (default: as saved)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --save directory (never one that holds, or lies inside, the input)")
    add_tokenizer_args(parser, default_type="")  # default: the tokenizer recorded in the checkpoint
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    # Our progress at INFO; megatron-core's import-time notices (no TE / apex) stay out of the way.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_lasp").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    settings = tokenizer_settings(args) if args.tokenizer_type else None
    try:
        convert_checkpoint_to_hf(
            args.load,
            args.save,
            iteration=args.iteration,
            tokenizer_settings=settings,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            force=args.force,
        )
    except ConversionError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
