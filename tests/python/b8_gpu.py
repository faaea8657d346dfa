"""B8's GPU baselines, for a session that is lent an H100/H200: a
Llama-3-8B-shaped model with random weights in BF16, decoded at batch 1
by PyTorch eager (a loop over the model with a KV cache) and by
transformers' `generate`, against the memory-bandwidth roofline (weight
bytes / the GPU's bandwidth), and prefill TFLOP/s against the datasheet.

The native executor's CUDA backend is not built yet; this script measures
what it is to be compared with, so that the comparison can be made in the
same run once it is.

    python b8_gpu.py [--prompt 2048] [--decode 128] [--out b8_gpu.json]
"""

import argparse
import json
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

# bandwidth bytes/s and dense BF16 FLOP/s, from the datasheets
DATASHEET = {
    "H200": (4.8e12, 989e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.039e12, 312e12),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--out", default="b8_gpu.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("b8_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name(0)
    bandwidth, peak = next((v for k, v in DATASHEET.items() if k in name), (None, None))
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    params = sum(t.numel() for t in model.parameters())
    weight_bytes = params * 2
    ids = torch.randint(0, cfg.vocab_size, (1, a.prompt), device="cuda")
    out = {"gpu": name, "torch": torch.__version__, "parameters": params, "prompt": a.prompt, "decode": a.decode}
    with torch.inference_mode():
        model(ids[:, :128])  # warm-up
        torch.cuda.synchronize()
        cache = DynamicCache()
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        nxt = logits.argmax(-1, keepdim=True)
        for _ in range(a.decode):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        gen_ids = ids[:, :128]
        t3 = time.perf_counter()
        model.generate(gen_ids, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
    out["prefill_tflops"] = 2 * params * a.prompt / (t1 - t0) / 1e12
    out["eager_decode_tok_s"] = a.decode / (t2 - t1)
    out["generate_decode_tok_s"] = a.decode / (t4 - t3)
    if bandwidth:
        out["roofline_tok_s"] = bandwidth / weight_bytes
        out["eager_of_roofline"] = out["eager_decode_tok_s"] / out["roofline_tok_s"]
        out["prefill_of_peak"] = out["prefill_tflops"] * 1e12 / peak
    print(json.dumps(out, indent=1))
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
