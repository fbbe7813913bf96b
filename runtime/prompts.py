"""Fixed chat prompts for side-by-side comparisons (greedy agreement with peers, decode benchmarks)."""

from __future__ import annotations

# Measured against llama.cpp 0.3.36 on SmolLM2-135M Q4_1 (32 greedy tokens): these five are identical.
PEER_AGREE = [
    "What is the boiling point of water at sea level?",
    "Give me a recipe for pancakes.",
    "What does a CPU do?",
    "Translate 'good morning' into Spanish.",
    "What are the three states of matter?",
]
# ... and these split from llama.cpp where the top two tokens are nearly tied (logit gap < 0.25).
PEER_NEAR_TIE = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a compiler does in one paragraph.",
    "List three uses of a hash table.",
    "Why is the sky blue?",
    "Describe the water cycle.",
    "Who wrote Romeo and Juliet?",
]
PEER_ALL = PEER_AGREE + PEER_NEAR_TIE
