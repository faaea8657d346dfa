"""Writes a small Hugging Face model with random weights, and what
`transformers` computes on it, for the native executor's tests and B8.

Nothing can download weights here, so the tests make their own: a real
architecture (Llama or Qwen2) built by `transformers` with random weights,
saved as safetensors in the dtype asked for, with a byte-level BPE
tokenizer trained on a small English text (`tokenizer.json`) and a chat
template (`tokenizer_config.json`). The reference is computed by
`transformers` on PyTorch CPU in float32, from the saved weights (so a
BF16 or FP16 file is compared after the same upcast the executor does):

- `reference.json`: the prompt, its token ids, the last position's logits,
  the logits of every prompt position, 64 greedy tokens (a full forward
  per step, no cache), the chat template's rendering of a conversation and
  its ids.

    python make_tiny_hf.py OUT_DIR [--arch llama|qwen2] [--dtype bf16|f16|f32]
        [--seed N] [--size tiny|bench] [--rope-scaling none|linear|llama3|dynamic]
"""

import argparse
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = """
Talon schedules inference on fleets of GPUs. A coordinator keeps the state of
the fleet in a replicated log, and a node agent on every host reports the
memory and the utilization of its GPUs. The scheduler places replicas of
models where they fit, scales them with the demand it forecasts, and routes
each request to the replica that will answer it first. The quick brown fox
jumps over the lazy dog. Hello, world! How are you today? I am well, thank
you. What is the capital of France? Paris is the capital of France. Numbers:
0 1 2 3 4 5 6 7 8 9 10 100 1000. The weather is cold in December and warm in
July. Machine learning models are trained on data and served to users.
"""

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

PROMPT = "The quick brown fox asks the scheduler where the GPUs are"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. "},
    {"role": "user", "content": "What is the capital of France?"},
]

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (128, 352, 4, 4, 2, 512),
    "bench": (512, 1408, 8, 8, 2, 2048),
}


def tokenizer(vocab):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return tok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--rope-scaling", default="none", choices=["none", "linear", "llama3", "dynamic"])
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    hidden, inter, layers, heads, kv_heads, vocab = SIZES[a.size]

    tok = tokenizer(vocab)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 2048,
            },
            f,
            indent=1,
        )

    rope_scaling = {
        "none": None,
        "linear": {"rope_type": "linear", "factor": 2.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "llama3": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    }[a.rope_scaling]
    theta = 10000.0 if a.arch == "llama" else 1000000.0
    common = dict(
        rope_parameters=dict(rope_scaling or {"rope_type": "default"}, rope_theta=theta),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.08,
        bos_token_id=tok.token_to_id("<|begin_of_text|>"),
        eos_token_id=tok.token_to_id("<|eot_id|>"),
    )
    if a.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**common, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(**common, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
        # Qwen2's q/k/v biases start at zero; make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    with torch.no_grad():
        # random norms, so that a missing or misplaced norm weight shows
        for name, t in model.named_parameters():
            if "norm" in name:
                t.uniform_(0.5, 1.5)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    model = model.to(dtype)
    model.save_pretrained(a.out, safe_serialization=True)
    # the reference: transformers loading the saved files in float32 (not
    # the model in memory, whose rotary buffers the casts above rounded)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.out, dtype=torch.float32).eval()

    ids = tok.encode(PROMPT).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        tokens, margins = list(ids), []
        for _ in range(64):
            last = model(torch.tensor([tokens])).logits[0, -1]
            top = torch.topk(last, 2).values
            margins.append(float(top[0] - top[1]))
            tokens.append(int(torch.argmax(last)))

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(a.out)
    chat_text = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = hf(chat_text, add_special_tokens=False)["input_ids"]
    with open(os.path.join(a.out, "reference.json"), "w") as f:
        json.dump(
            {
                "arch": a.arch,
                "dtype": a.dtype,
                "rope_scaling": a.rope_scaling,
                "prompt": PROMPT,
                "prompt_ids": ids,
                "logits_last": logits[-1].tolist(),
                "logits_all": logits.tolist() if a.size == "tiny" else [],
                "greedy": tokens[len(ids):],
                "greedy_text": tok.decode(tokens[len(ids):]),
                "min_margin": min(margins),
                "messages": MESSAGES,
                "chat_text": chat_text,
                "chat_ids": chat_ids,
                "torch": torch.__version__,
            },
            f,
        )
    print(f"{a.out}: {a.arch} {a.dtype} vocab {vocab}, min greedy margin {min(margins):.4f}")


if __name__ == "__main__":
    main()
