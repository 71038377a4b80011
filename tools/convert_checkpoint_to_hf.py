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
without --force, an unusable tokenizer, tokenizer flags naming another tokenizer than the one the
checkpoint recorded (without --allow-other-tokenizer), a Hugging Face directory as --load), 2 on
bad flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lasp.hf.cli import run_tool, tool_parser  # noqa: E402
from megatron_lasp.hf.files import DTYPES  # noqa: E402

PROG = "convert_checkpoint_to_hf.py"


def get_args(argv=None):
    # default tokenizer: the one recorded in the checkpoint
    parser = tool_parser(PROG, __doc__, "checkpoint directory (the training run's --save)",
                         "Hugging Face model directory to create")
    parser.add_argument("--ckpt-step", "--iteration", dest="iteration", type=int, default=None,
                        help="iteration to convert (default: the latest)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file; above it the weights are sharded with an index (default 5GB)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weight dtype (default: as saved)")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="export with tokenizer flags that name another tokenizer than the checkpoint recorded "
                             "(refused without it: right only when both give the same token ids)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)

    def work(settings):
        # imported once the flags are read: torch and megatron-core take seconds to load
        from megatron_lasp.hf.to_hf import convert_checkpoint_to_hf

        convert_checkpoint_to_hf(args.load, args.save, iteration=args.iteration, tokenizer_settings=settings,
                                 max_shard_size=args.max_shard_size, dtype=args.dtype, force=args.force,
                                 allow_other_tokenizer=args.allow_other_tokenizer)
        return f"wrote {args.save}"

    return run_tool(PROG, args, work)


if __name__ == "__main__":
    sys.exit(main())
