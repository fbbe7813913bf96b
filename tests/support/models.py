"""Small models and the profile -> predictor -> plan chain, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xpuc.compiler.spec import LazyWeights, ModelSpec
from xpuc.runtime.formats.arch import ArchConfig

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_config(architecture: str = "llama", ffn_kind: str = "swiglu", tie: bool = True, bias: bool = False,
                vocab: int | None = None) -> ArchConfig:
    return ArchConfig(architecture=architecture, vocab_size=vocab or len(tiny_tokenizer()["tokens"]),
                      hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, ffn_kind=ffn_kind,
                      tie_embeddings=tie, qkv_bias=bias, context_length=256)


def random_weights(config: ArchConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in config.weight_shapes().items():
        if name.endswith("norm"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    return out


def spec_from(config: ArchConfig, weights: dict[str, np.ndarray]) -> ModelSpec:
    return ModelSpec(config, LazyWeights({k: (lambda v=v: v) for k, v in weights.items()},
                                         {k: (v.shape, "F32") for k, v in weights.items()}),
                     None, "random", "test")


def tiny_tokenizer() -> dict:
    """A byte-level BPE vocabulary: 256 byte symbols, a few merges, three control tokens."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    n = len(tokens)
    return {"tokens": tokens, "merges": merges, "token_types": types, "pre": "default",
            "bos": n - 2, "eos": n - 1, "chat_template": CHAT_TEMPLATE}


CALIBRATION_TEXT = "/usr/share/common-licenses/Apache-2.0"


def profile_predict_plan(d: Path, tokens: int, device: str, budget: int, dtype: str, cluster: int):
    """Profile the generated model in ``d/model`` on license text, train its predictor and plan it for ``device``:
    writes ``stats.json``, ``pred.safetensors`` and ``plan.json`` into ``d``; returns (spec, stats, plan)."""
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.planner import plan_neurons
    from xpuc.compiler.predictor import collect_pairs, train_predictor
    from xpuc.compiler.profiler import profile_model
    from xpuc.runtime.tokenizer import XpucTokenizer
    from xpuc.targets.profile import load_profile

    spec = load_model(str(d / "model"))
    ids = XpucTokenizer.from_source(spec.tokenizer).encode(open(CALIBRATION_TEXT).read())[:tokens]
    stats = profile_model(spec, ids)
    stats.save(d / "stats.json")
    train_predictor(spec, collect_pairs(spec, ids, stats.thresholds), 0.97).save(d / "pred.safetensors")
    plan = plan_neurons(spec.config, stats, load_profile(device), budget, dtype, cluster,
                        fingerprint=spec.fingerprint())
    plan.save(d / "plan.json")
    return spec, stats, plan


def reference_chunk_nll(ref, ids: list[int], ctx: int, chunks: int, bos: int | None) -> list[float]:
    """llama-perplexity's scored NLLs from the numpy reference: per chunk of ``ctx`` (first token BOS when given),
    the logits at positions ctx/2 .. ctx-2 against the next tokens, all positions in one forward."""
    import numpy as np

    nll = []
    for c in range(chunks):
        chunk = ids[c * ctx:(c + 1) * ctx]
        if bos is not None:
            chunk[0] = bos
        ref.reset()
        z = ref.forward(chunk).astype(np.float64)
        lse = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
        nll += [lse[j - 1] - z[j - 1, chunk[j]] for j in range(ctx // 2 + 1, ctx)]
    return nll
