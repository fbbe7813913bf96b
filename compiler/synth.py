"""Generate sparse-activation (dReLU) decoder models in Hugging Face format, deterministically.

No ReLU-family model (TurboSparse, ProSparse, Bamboo) can be downloaded here, so xpuc makes its own with the
shapes of the paper's models and a controlled activation structure:

* **Bias channel.** Hidden dimension 0 of every embedding holds a constant ``B = BIAS_SCALE sqrt(d)``; no attention or
  FFN output writes to it (row 0 of ``o_proj`` and ``down_proj`` is zero), so after every RMSNorm it is a
  nearly constant input. Its weight in a gate row acts as that neuron's bias.
* **Power-law hot set.** Neuron ``i`` (in a random order per layer) gets a target firing probability
  ``p_i ∝ rank^-alpha``, scaled so that the layer's mean is ``1 - sparsity``: a few hot neurons fire for
  most tokens, most fire rarely.
* **Calibration.** Layer by layer, the FFN input of calibration tokens is computed with the numpy reference
  (earlier layers already final); the gate bias of neuron ``i`` is set to the ``1 - p_i`` quantile of its
  pre-activation, and the up rows get a positive bias so that ``relu(up x)`` is rarely what silences a neuron.
* **Token correlation.** Embeddings share a low-rank component, so consecutive tokens' hidden states, and
  hence their active sets, overlap.
* **Trained-like structure** (:mod:`synth_weights`): anisotropic embeddings, gates with a decaying spectrum
  and content-based attention, tuned so that the activation statistics of :mod:`activation_stats` match
  those measured on a real model (:class:`synth_weights.WeightStructure`).

Measured sparsity (on tokens not used for calibration) and the overlap of consecutive tokens' active sets are
reported. The reference runs in float32 numpy, so shapes up to a few hundred million parameters are measured;
larger shapes are calibrated on fewer tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpuc.compiler.model_writer import write_hf_dir
from xpuc.compiler.reference import ReferenceModel, route_tokens
from xpuc.compiler.spec import LazyWeights, ModelSpec
from xpuc.compiler.synth_weights import TRAINED_LIKE, WeightStructure, decaying_matrix
from xpuc.runtime.artifact import staged_directory
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.runtime.tokenizer import tokenizer_json_from_gguf_vocab

SHAPES: dict[str, ArchConfig] = {
    "tiny": ArchConfig("mistral", 512, 128, 512, 2, 4, 2, 32, 1e4, 1e-5, "drelu", False, False, 1024),
    "small": ArchConfig("mistral", 2048, 512, 2048, 4, 8, 4, 64, 1e4, 1e-5, "drelu", False, False, 2048),
    "turbosparse-mistral-7b": ArchConfig("mistral", 32000, 4096, 14336, 32, 32, 8, 128, 1e6, 1e-5, "drelu",
                                         False, False, 4096),
}


ALPHA = 0.9  # power-law exponent of the firing probabilities (rank ** -ALPHA), with WeightStructure's defaults


def embeddings(c: ArchConfig, rng: np.random.Generator, st: WeightStructure) -> np.ndarray:
    """Token embeddings: an anisotropic Gaussian part, a shared rank-16 part, and the constant bias channel."""
    d = c.hidden_size
    base = rng.standard_normal((16, d)).astype(np.float32)
    emb = decaying_matrix(c.vocab_size, d, 0.6, st.embed_decay, rng)
    emb += (rng.standard_normal((c.vocab_size, 16)).astype(np.float32) @ base) * 0.2
    emb[:, 0] = np.sqrt(d) * st.bias_scale
    return emb


def gate_matrix(f: int, d: int, rng: np.random.Generator, st: WeightStructure,
                basis: np.ndarray | None = None) -> np.ndarray:
    """A (f, d) gate matrix with a decaying spectrum over ``basis`` (random if not given; the experts of a
    layer share one, as experts upcycled from one dense FFN do); biases are calibrated into column 0 later."""
    return decaying_matrix(f, d, 1.0 / np.sqrt(d), st.gate_decay, rng, basis)


@dataclass
class SynthReport:
    shape: str
    seed: int
    target_sparsity: float
    measured_sparsity: list[float]  # per layer, on held-out tokens
    consecutive_overlap: list[float]  # per layer: |A_t ∩ A_t+1| / |A_t ∪ A_t+1|
    hot_share: list[float]  # per layer: share of activations taken by the 10 % most active neurons
    parameters: int
    structure: dict = dataclasses.field(default_factory=dict)  # WeightStructure.to_dict()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def attention_weights(w: dict, p: str, c: ArchConfig, rng: np.random.Generator,
                       st: WeightStructure) -> None:
    """Norms and q/k/v/o of one layer (row 0 of o_proj zero: nothing writes the bias channel)."""
    d, hd = c.hidden_size, c.head_dim
    w[p + "attn_norm"] = np.ones(d, np.float32)
    w[p + "ffn_norm"] = np.ones(d, np.float32)
    qk = st.qk_gain / np.sqrt(d)
    w[p + "q_proj"] = (rng.standard_normal((c.num_heads * hd, d)) * qk).astype(np.float32)
    w[p + "k_proj"] = (rng.standard_normal((c.num_kv_heads * hd, d)) * qk).astype(np.float32)
    w[p + "v_proj"] = (rng.standard_normal((c.num_kv_heads * hd, d)) / np.sqrt(d)).astype(np.float32)
    o = (rng.standard_normal((d, c.num_heads * hd)) * (st.attn_out_gain / np.sqrt(c.num_heads * hd))).astype(np.float32)
    o[0] = 0.0
    w[p + "o_proj"] = o


def _power_law(n: int, mean: float, alpha: float, rng: np.random.Generator) -> np.ndarray:
    rank = rng.permutation(n) + 1.0
    p = rank ** -alpha
    for _ in range(60):  # scale so the clipped mean hits the target
        scale = mean / np.clip(p, 0, 1).mean()
        p = np.clip(p * scale, 0, 1)
        if abs(p.mean() - mean) < 1e-4:
            break
    return np.clip(p, 1e-4, 0.999)


def calibrate_ffn(gate: np.ndarray, up: np.ndarray, x: np.ndarray, sparsity: float, alpha: float,
                  rng: np.random.Generator) -> None:
    """Set the gate biases (column 0, the bias channel's weight) so that on the FFN inputs ``x`` neuron ``i``
    fires with the power-law probability ``p_i`` (mean ``1 - sparsity``), and the up biases so that
    ``relu(up x)`` rarely silences a neuron (its 3 % quantile is lifted to 0). In place."""
    n, f = x.shape[0], gate.shape[0]
    bias_in = float(x[:, 0].mean())
    prob = _power_law(f, 1.0 - sparsity, alpha, rng)
    order = np.sort(x @ gate.T, axis=0)
    rows = np.clip(((1.0 - prob) * (n - 1)).round().astype(int), 0, n - 1)
    gate[:, 0] -= (order[rows, np.arange(f)] / bias_in).astype(np.float32)
    u_lo = np.quantile(x @ up.T, 0.03, axis=0)
    up[:, 0] -= (np.minimum(u_lo, 0) / bias_in).astype(np.float32)


def synthesize(shape: str, sparsity: float, seed: int, out: str | os.PathLike, alpha: float = ALPHA,
               calib_tokens: int | None = None, quiet: bool = True, layers: int | None = None,
               structure: WeightStructure = TRAINED_LIKE) -> SynthReport:
    """Write a dReLU model of ``shape`` to ``out`` (HF directory) and return its measured statistics.
    ``layers`` overrides the shape's layer count (e.g. a few layers of the 7B shape for a benchmark)."""

    if shape not in SHAPES:
        raise XpucError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")
    if not 0.0 < sparsity < 1.0:
        raise XpucError("--sparsity must be between 0 and 1 (exclusive)")
    c = SHAPES[shape]
    if layers is not None:
        if not 1 <= layers <= 256:
            raise XpucError("--layers must be between 1 and 256")
        c = dataclasses.replace(c, num_layers=layers)
    if c.num_parameters() > 2e9:
        raise XpucError(f"shape '{shape}' has {c.num_parameters() / 1e9:.1f} B parameters: generating it needs the "
                        "streaming writer: write a GGUF file (-o NAME.gguf), or fewer --layers")
    rng = np.random.default_rng(seed)
    d, f = c.hidden_size, c.intermediate_size
    calib = calib_tokens or (256 if c.num_parameters() < 5e7 else 64)
    w: dict[str, np.ndarray] = {}
    w["embed_tokens"] = embeddings(c, rng, structure)
    w["lm_head"] = (rng.standard_normal((c.vocab_size, d)) / np.sqrt(d)).astype(np.float32)
    w["final_norm"] = np.ones(d, np.float32)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        attention_weights(w, p, c, rng, structure)
        w[p + "gate_proj"] = gate_matrix(f, d, rng, structure)
        w[p + "up_proj"] = (rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32)
        down = (rng.standard_normal((d, f)) * 0.3 / np.sqrt(f * (1 - sparsity))).astype(np.float32)
        down[0] = 0.0
        w[p + "down_proj"] = down

    def spec_now() -> ModelSpec:
        return ModelSpec(c, LazyWeights({k: (lambda v=v: v) for k, v in w.items()}), None, "synth", "synth")

    # calibration and held-out token streams (random text stand-in: uniform token ids)
    streams = rng.integers(0, c.vocab_size, (2, calib))
    for i in range(c.num_layers):
        p = f"layers.{i}."
        ref = ReferenceModel(spec_now())
        h = ref.w["embed_tokens"][streams[0]]
        for j in range(i):
            h = ref.layer(j, h, np.arange(calib))
        x = _ffn_input(ref, i, h, calib)  # FFN input of layer i (its attention half run here)
        calibrate_ffn(w[p + "gate_proj"], w[p + "up_proj"], x, sparsity, alpha, rng)
        if not quiet:
            print(f"  layer {i}: calibrated on {calib} tokens", flush=True)
    report = _measure(shape, seed, sparsity, c, spec_now(), streams[1])
    report.structure = structure.to_dict()

    with staged_directory(Path(out), force=False) as tmp:
        write_hf_dir(tmp, c, w, shards=2 if c.num_parameters() > 2e7 else 1, dtype="float16",
                     tokenizer_json=_byte_tokenizer(c.vocab_size),
                     tokenizer_config={"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
        (tmp / "xpuc_synth.json").write_text(report.to_json())
    return report


def byte_vocab(vocab: int) -> tuple[list[str], list[int], int]:
    """A generated model's vocabulary: the 256 byte symbols, then special filler tokens; (tokens, GGUF token
    types, id of ``<|endoftext|>``)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    extra = ["<|endoftext|>"] + [f"<|extra_{i}|>" for i in range(vocab - len(alphabet) - 1)]
    return alphabet + extra, [1] * len(alphabet) + [3] * len(extra), len(alphabet)


def _byte_tokenizer(vocab: int) -> str:
    """Byte-level tokenizer (tokenizer.json) for a generated model (:func:`byte_vocab`)."""
    tokens, types, _ = byte_vocab(vocab)
    return tokenizer_json_from_gguf_vocab(tokens, [], types)


def firing_statistics(act: np.ndarray) -> tuple[float, float, float]:
    """(sparsity, mean Jaccard overlap of consecutive rows, share of firings by the 10 % most frequent neurons)
    of a (tokens, neurons) firing mask."""
    inter = (act[1:] & act[:-1]).sum(1)
    union = np.maximum((act[1:] | act[:-1]).sum(1), 1)
    freq = np.sort(act.mean(0))[::-1]
    return (float(1.0 - act.mean()), float((inter / union).mean()) if len(act) > 1 else 1.0,
            float(freq[: max(1, len(freq) // 10)].sum() / max(freq.sum(), 1e-9)))


def _ffn_input(ref, i: int, h: np.ndarray, n: int) -> np.ndarray:
    """RMSNorm'd FFN input of layer ``i`` for hidden states ``h`` entering it (the reference's attention half)."""
    return ref.attention_block(i, h, np.arange(n), keep_cache=False)[1]


def _measure(shape, seed, sparsity, c, spec, tokens) -> SynthReport:

    ref = ReferenceModel(spec)
    n = len(tokens)
    h = ref.w["embed_tokens"][tokens]
    meas, overlap, hot = [], [], []
    for i in range(c.num_layers):
        x = _ffn_input(ref, i, h, n)
        p = f"layers.{i}."
        act = (x @ ref.w[p + "gate_proj"].T > 0) & (x @ ref.w[p + "up_proj"].T > 0)
        for lst, v in zip((meas, overlap, hot), firing_statistics(act), strict=True):
            lst.append(v)
        h = ref.layer(i, h, np.arange(n))
    return SynthReport(shape, seed, sparsity, meas, overlap, hot, c.num_parameters())


# --- mixture of experts ------------------------------------------------------------------------------------


def balance_router(router: np.ndarray, x: np.ndarray, top_k: int, bias_in: float, rounds: int = 200) -> None:
    """Give each expert a bias (its router weight on the bias channel) so that each is chosen for about
    ``top_k / experts`` of the rows of ``x``, as load-balanced training leaves a router (DeepSeek-V3's
    auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones). On
    anisotropic hidden states a random router alone sends most tokens to a few experts."""
    n_exp = router.shape[0]
    target = top_k / n_exp
    step = 2.0 * float((x @ router.T).std())
    for r in range(rounds):
        top, _ = route_tokens(x, router, top_k)
        load = np.bincount(top.ravel(), minlength=n_exp) / len(x)
        if np.abs(load - target).max() < 0.25 * target:
            return
        router[:, 0] += (step * (target - load) / (1.0 + r / 20.0) / bias_in).astype(np.float32)

MOE_SHAPES: dict[str, tuple[ArchConfig, int, int]] = {  # base config (attention, FFN per expert), experts, top-k
    "tiny-moe": (ArchConfig("mistral", 512, 128, 256, 2, 4, 2, 32, 1e4, 1e-5, "drelu", False, False, 1024), 8, 2),
    "mixtral-8x7b-sparse": (ArchConfig("mistral", 32000, 4096, 14336, 32, 32, 8, 128, 1e6, 1e-5, "drelu", False,
                                       False, 4096), 8, 2),
}


@dataclass
class MoESynthReport:
    shape: str
    seed: int
    experts: int
    top_k: int
    expert_sparsity: list[float]  # per layer: inactive share of a routed expert's neurons
    layer_sparsity: list[float]  # per layer: inactive share of all experts' neurons (top-k routing included)
    expert_load: list[list[float]]  # per layer: share of tokens routed to each expert
    parameters: int
    structure: dict = dataclasses.field(default_factory=dict)  # WeightStructure.to_dict()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def synthesize_moe(shape: str, sparsity: float, seed: int, out: str | os.PathLike, alpha: float = ALPHA,
                   layers: int | None = None, calib_tokens: int = 256, quiet: bool = True,
                   structure: WeightStructure = TRAINED_LIKE) -> MoESynthReport:
    """Write a Mixtral-format HF directory whose experts are dReLU FFNs with ``sparsity`` inside each expert.

    Each layer routes every token to ``top_k`` of ``experts`` experts (a random router, balanced on the
    calibration tokens by :func:`balance_router`; load is measured on held-out ones),
    so the share of a layer's neurons that fire for a token is ``top_k / experts * (1 - sparsity)``: with
    top-2 of 8 and 0.88 inside an expert, 97 % of the layer's FFN neurons are inactive. Gate biases are
    calibrated per expert on the tokens routed to it, as in :func:`synthesize`. The numpy forward used for
    calibration runs here, layer by layer, before the model is complete.
    """

    if shape not in MOE_SHAPES:
        raise XpucError(f"unknown MoE shape '{shape}' (known: {', '.join(MOE_SHAPES)})")
    if not 0.0 < sparsity < 1.0:
        raise XpucError("--sparsity must be between 0 and 1 (exclusive)")
    c, n_exp, top_k = MOE_SHAPES[shape]
    if layers is not None:
        if not 1 <= layers <= 256:
            raise XpucError("--layers must be between 1 and 256")
        c = dataclasses.replace(c, num_layers=layers)
    d, f, L = c.hidden_size, c.intermediate_size, c.num_layers
    n_params = c.num_parameters() + L * (n_exp - 1) * 3 * d * f + L * n_exp * d
    if n_params > 2e9:
        raise XpucError(f"shape '{shape}' with {L} layers has {n_params / 1e9:.1f} B parameters: generate fewer "
                        "--layers, or write a GGUF file (-o NAME.gguf), which is streamed layer by layer")
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    w["embed_tokens"] = embeddings(c, rng, structure)
    w["lm_head"] = (rng.standard_normal((c.vocab_size, d)) / np.sqrt(d)).astype(np.float32)
    w["final_norm"] = np.ones(d, np.float32)
    experts: list[list[dict[str, np.ndarray]]] = []
    routers: list[np.ndarray] = []
    for i in range(L):
        p = f"layers.{i}."
        attention_weights(w, p, c, rng, structure)
        r = (rng.standard_normal((n_exp, d)) / np.sqrt(d)).astype(np.float32)
        r[:, 0] = 0.0  # the bias channel carries the per-expert balance, calibrated below
        routers.append(r)
        layer = []
        for _ in range(n_exp):
            down = (rng.standard_normal((d, f)) * 0.3 / np.sqrt(f * (1 - sparsity))).astype(np.float32)
            down[0] = 0.0
            layer.append({"gate": gate_matrix(f, d, rng, structure),
                          "up": (rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32), "down": down})
        experts.append(layer)
        for k in ("gate_proj", "up_proj", "down_proj"):  # placeholders so the dense reference runs attention
            w[p + k] = np.zeros((d, f) if k == "down_proj" else (f, d), np.float32)

    class MoEReference(ReferenceModel):
        def ffn_block(self, i: int, x: np.ndarray) -> np.ndarray:
            top, gw = route_tokens(x, routers[i], top_k)
            y = np.zeros_like(x)
            for e in range(n_exp):
                rows, slot = np.nonzero(top == e)
                if rows.size:
                    xe, ex = x[rows], experts[i][e]
                    h = np.maximum(xe @ ex["gate"].T, 0) * np.maximum(xe @ ex["up"].T, 0)
                    y[rows] += (h @ ex["down"].T) * gw[rows, slot][:, None]
            return y

    def spec_now() -> ModelSpec:
        return ModelSpec(c, LazyWeights({k: (lambda v=v: v) for k, v in w.items()}), None, "synth", "synth")

    streams = rng.integers(0, c.vocab_size, (2, calib_tokens))
    pos = np.arange(calib_tokens)
    for i in range(L):  # calibrate layer i's experts on the tokens routed to them (earlier layers final)
        ref = MoEReference(spec_now())
        h = ref.w["embed_tokens"][streams[0]]
        for j in range(i):
            h = ref.layer(j, h, pos)
        x = _ffn_input(ref, i, h, calib_tokens)
        bias_in = x[:, 0].mean()
        balance_router(routers[i], x, top_k, bias_in)
        top, _ = route_tokens(x, routers[i], top_k)
        for e in range(n_exp):
            xe = x[np.any(top == e, axis=1)]
            if len(xe) < 4:
                xe = x  # an expert that sees (almost) no calibration token: calibrate on all
            calibrate_ffn(experts[i][e]["gate"], experts[i][e]["up"], xe, sparsity, alpha, rng)
        if not quiet:
            print(f"  layer {i}: {n_exp} experts calibrated on {calib_tokens} tokens", flush=True)
    # measure on held-out tokens
    ref = MoEReference(spec_now())
    h = ref.w["embed_tokens"][streams[1]]
    e_sp, l_sp, load = [], [], []
    for i in range(L):
        x = _ffn_input(ref, i, h, calib_tokens)
        top, _ = route_tokens(x, routers[i], top_k)
        fired = 0.0
        for e in range(n_exp):
            xe = x[np.any(top == e, axis=1)]
            if len(xe):
                ex = experts[i][e]
                fired += float(((xe @ ex["gate"].T > 0) & (xe @ ex["up"].T > 0)).sum())
        e_sp.append(1.0 - fired / (calib_tokens * top_k * f))
        l_sp.append(1.0 - fired / (calib_tokens * n_exp * f))
        load.append([float(np.any(top == e, axis=1).mean()) for e in range(n_exp)])
        h = ref.layer(i, h, pos)
    report = MoESynthReport(shape, seed, n_exp, top_k, e_sp, l_sp, load, int(n_params), structure.to_dict())
    extra = {}
    for i in range(L):
        pre = f"model.layers.{i}.block_sparse_moe."
        extra[pre + "gate.weight"] = routers[i]
        for e, ex in enumerate(experts[i]):
            extra[pre + f"experts.{e}.w1.weight"] = ex["gate"]
            extra[pre + f"experts.{e}.w3.weight"] = ex["up"]
            extra[pre + f"experts.{e}.w2.weight"] = ex["down"]
    skip = frozenset(f"layers.{i}.{k}" for i in range(L) for k in ("gate_proj", "up_proj", "down_proj"))
    with staged_directory(Path(out), force=False) as tmp:
        write_hf_dir(tmp, c, w, shards=1, dtype="float16", tokenizer_json=_byte_tokenizer(c.vocab_size),
                     tokenizer_config={"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
                     extra_config={"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                                   "num_local_experts": n_exp, "num_experts_per_tok": top_k},
                     extra_weights=extra, skip=skip)
        (tmp / "xpuc_synth.json").write_text(report.to_json())
    return report
