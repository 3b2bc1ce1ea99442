"""Shared code for the "LoRA from Scratch" notebooks: one module per concept.

lora       LoRALayer, LinearWithLoRA, replace_linear_with_lora, counting, LoRA state dicts
attention  causal multi-head attention with separate Q/K/V/O projections
"""

__version__ = "0.1.0"
