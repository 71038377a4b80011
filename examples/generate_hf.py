"""Greedy generation from a converted Hugging Face directory (the recurrent, O(1)-per-token path).

    python examples/generate_hf.py --model runs/quickstart/hf --prompt "Once upon a time"
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory (convert_checkpoint_to_hf.py output)")
    parser.add_argument("--prompt", default="Once upon a time", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    print(f"[{new_tokens} new tokens in {elapsed:.2f} s, {new_tokens / max(elapsed, 1e-9):.1f} tokens/s]")


if __name__ == "__main__":
    main()
