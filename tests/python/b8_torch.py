"""B8's PyTorch side: prefill and decode tokens/s of a Hugging Face model
with transformers on PyTorch CPU (eager, float32, a KV cache), at each
batch size, on the same random prompts the native executor is timed on.

    python b8_torch.py MODEL_DIR --batches 1,8,32 --prompt 128 --decode 32
        --threads 2 --repeats 3

Prints one JSON object: per batch, the median prefill and decode tokens/s
over the repeats.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batches": {}}
    gen = torch.Generator().manual_seed(0)
    for b in [int(x) for x in a.batches.split(",")]:
        prefill, decode = [], []
        for _ in range(a.repeats):
            ids = torch.randint(0, vocab, (b, a.prompt), generator=gen)
            with torch.inference_mode():
                cache = DynamicCache()
                t0 = time.perf_counter()
                logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
                t1 = time.perf_counter()
                nxt = logits.argmax(-1, keepdim=True)
                for _ in range(a.decode):
                    logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
                    nxt = logits.argmax(-1, keepdim=True)
                t2 = time.perf_counter()
            prefill.append(b * a.prompt / (t1 - t0))
            decode.append(b * a.decode / (t2 - t1))
        out["batches"][str(b)] = {
            "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
