"""Convert a Hugging Face model directory (made by convert_checkpoint_to_hf.py) back into a
megatron-lasp training checkpoint, to continue training it.

    python tools/convert_hf_to_checkpoint.py --load runs/tiny/hf --save runs/tiny/from_hf

One process writes the weights through megatron-core dist_checkpointing (``iter_XXXXXXX/`` +
``config.json`` + ``args.json`` + ``latest_checkpointed_iteration.txt``); dist_checkpointing
reshards on load, so train it at any TP/PP/SP sizes, weights only::

    torchrun --nproc-per-node 4 pretrain_linear_lm.py --load runs/tiny/from_hf --finetune \
        --tensor-model-parallel-size 2 --sequence-parallel-size 2 ...   # same architecture flags

``--tensor-model-parallel-size`` / ``--pipeline-model-parallel-size`` only check that the model
can be split that way (heads, vocabulary and layers divisible); the checkpoint is the same.

The iteration recorded is the source checkpoint's (from config.json; --iteration overrides it).

Exit status: 0 on success, 1 on a user error (one line on stderr, nothing written: a missing,
corrupt or truncated config.json / safetensors file (named), weights that do not fit config.json,
a --save that is, contains or lies inside the HF directory, a non-empty --save without --force,
a tokenizer with more ids than the model's vocabulary rows, a megatron-lasp checkpoint as --load),
2 on bad flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lasp.hf.cli import run_tool, tool_parser  # noqa: E402
from megatron_lasp.hf.files import ConversionError, read_hf_config  # noqa: E402

PROG = "convert_hf_to_checkpoint.py"


def get_args(argv=None):
    # default tokenizer: the tokenizer files in --load
    parser = tool_parser(PROG, __doc__, "Hugging Face model directory", "checkpoint directory to create")
    parser.add_argument("--iteration", type=int, default=None,
                        help="iteration number to record (default: the source checkpoint's, else 0)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="check that the model splits over this many TP ranks (the checkpoint loads at any size)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="check that the layers split over this many pipeline stages")
    return parser.parse_args(argv)


def check_layout(config: dict, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ConversionError("parallel sizes must be positive")
    for what, n in (("num_attention_heads", config["num_attention_heads"]), ("vocab_size", config["vocab_size"])):
        if n % tp:
            raise ConversionError(f"{what} ({n}) is not divisible by --tensor-model-parallel-size ({tp})")
    if config["num_hidden_layers"] % pp:
        layers = config["num_hidden_layers"]
        raise ConversionError(f"num_hidden_layers ({layers}) is not divisible by --pipeline-model-parallel-size ({pp})")


def main(argv=None) -> int:
    args = get_args(argv)

    def work(settings):
        check_layout(read_hf_config(args.load), args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
        # imported once the flags and the directory are checked: torch and megatron-core take seconds to load
        from megatron_lasp.hf.from_hf import convert_hf_to_checkpoint

        convert_hf_to_checkpoint(args.load, args.save, iteration=args.iteration, tokenizer_settings=settings,
                                 force=args.force)
        return f"wrote {args.save} (weights only: load it with --finetune, or --no-load-optim --no-load-rng)"

    return run_tool(PROG, args, work)


if __name__ == "__main__":
    sys.exit(main())
