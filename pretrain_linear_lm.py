"""Pretrain the linear-attention LM with LASP sequence parallelism on megatron-core.

Tiny CPU run, 2 ranks, LASP over SP=2, on the bundled corpus (tokenize it first, see
examples/data/README.md; or run examples/run_tiny_cpu.sh, which does both)::

    torchrun --nproc-per-node 2 pretrain_linear_lm.py --model-preset tiny \\
        --sequence-parallel-size 2 --sequence-parallel-mode lasp \\
        --data-path runs/data/corpus_text_document --split 98,2,0 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model examples/data/tokenizer \\
        --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --train-iters 100 \\
        --lr 1e-3 --lr-warmup-iters 10 --log-interval 10 --eval-interval 50 --eval-iters 2 \\
        --save runs/tiny --save-interval 50 --load runs/tiny

GPU, TNL-1B with LASP, TP2 x SP2 on 4 GPUs: examples/run_tnl1b_4gpu.sh; multi-node under SLURM:
examples/multinode.sbatch (docs/LAUNCH.md). ``--help`` lists every flag.

Exit status: 0 done (or stopped on request, checkpoint saved: ``--exit-signal-handler``,
``--exit-duration-in-mins``), 1 training stopped (non-finite loss), 2 a bad flag or input, 130 Ctrl-C.
"""

import sys

from megatron_lasp.training import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
