"""A GPT-2 config small enough that model tests build and train it in milliseconds."""

from lora_helpers.gpt2 import GPT2Source

TINY = {
    "vocab_size": 64,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}
SOURCE = GPT2Source("tiny-test", False, "a tiny random GPT for tests")
