"""Full-depth generated models, streamed layer by layer into one GGUF file (``xpuc synth ... -o model.gguf``).

The TurboSparse-Mistral-7B and Mixtral-8x7B shapes do not fit in this machine's memory as float32 (29 GB and
187 GB), so they are never held whole: each layer is generated (the weights of :mod:`synth`, trained-like
structure), calibrated on the hidden states of the calibration tokens carried over from the layer before
(:func:`synth.calibrate_ffn`; an MoE's router balanced by :func:`synth.balance_router`, then one expert at a
time), quantized to Q4_0 (norms F32), written at its place in the file and dropped. The hidden states
carried on are those of the *stored* (quantized) weights, so later layers are calibrated for the model as
written. Peak memory: one layer's float32 weights (an MoE layer: one expert) plus the token streams.

**The llama.cpp twin is the same file.** The GGUF uses the ``llama`` architecture (an MoE: llama with
``expert_count``, the layout llama.cpp converts Mixtral to) and carries ``xpuc.ffn_kind = drelu``, which xpuc's
GGUF frontend reads and llama.cpp ignores: llama.cpp computes SwiGLU over the same weights. Its dense decode
reads the same bytes per token and does the same arithmetic; its values differ.

**Interrupted runs resume.** The file is written as ``<out>.partial`` with a checkpoint
``<out>.partial.state.npz`` after each layer (the layer reached, the carried hidden states, the statistics so
far, and the arguments: a run with other arguments starts over). Every tensor's offset is fixed by the
header, which is written first, so a resumed run writes exactly the bytes an uninterrupted one does. The file
gets its name only when complete; the measured statistics go to ``<out>.synth.json``. Free disk space is
checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from xpuc.compiler.model_writer import gguf_name, permute_rope
from xpuc.compiler.reference import ReferenceModel, route_tokens
from xpuc.compiler.synth import (
    ALPHA,
    MOE_SHAPES,
    SHAPES,
    MoESynthReport,
    SynthReport,
    attention_weights,
    balance_router,
    byte_vocab,
    calibrate_ffn,
    embeddings,
    firing_statistics,
    gate_matrix,
)
from xpuc.compiler.synth_weights import TRAINED_LIKE, WeightStructure, random_basis
from xpuc.runtime.artifact import atomic_path
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig

QTYPE = "Q4_0"
STATE_VERSION = 1
DISK_MARGIN = 1 << 30  # left free besides the file


def stream_config(shape: str, layers: int | None) -> ArchConfig:
    """The config of ``shape`` (a dense or MoE shape of :mod:`synth`), ``layers`` overriding its depth."""
    if shape in SHAPES:
        c = SHAPES[shape]
    elif shape in MOE_SHAPES:
        base, n_exp, top_k = MOE_SHAPES[shape]
        c = dataclasses.replace(base, num_experts=n_exp, experts_per_token=top_k)
    else:
        raise XpucError(f"unknown shape '{shape}' (known: {', '.join([*SHAPES, *MOE_SHAPES])})")
    if layers is not None:
        if not 1 <= layers <= 256:
            raise XpucError("--layers must be between 1 and 256")
        c = dataclasses.replace(c, num_layers=layers)
    return c


def _gguf_tensors(c: ArchConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape, GGML type) of every tensor, in file order."""
    d, f, hd, e = c.hidden_size, c.intermediate_size, c.head_dim, c.num_experts
    out = [("token_embd.weight", (c.vocab_size, d), QTYPE), ("output_norm.weight", (d,), "F32"),
           ("output.weight", (c.vocab_size, d), QTYPE)]
    for i in range(c.num_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (d,), "F32"), (b + "attn_q.weight", (c.num_heads * hd, d), QTYPE),
                (b + "attn_k.weight", (c.num_kv_heads * hd, d), QTYPE),
                (b + "attn_v.weight", (c.num_kv_heads * hd, d), QTYPE),
                (b + "attn_output.weight", (d, c.num_heads * hd), QTYPE), (b + "ffn_norm.weight", (d,), "F32")]
        if e:
            out += [(b + "ffn_gate_inp.weight", (e, d), "F32"), (b + "ffn_gate_exps.weight", (e, f, d), QTYPE),
                    (b + "ffn_up_exps.weight", (e, f, d), QTYPE), (b + "ffn_down_exps.weight", (e, d, f), QTYPE)]
        else:
            out += [(b + "ffn_gate.weight", (f, d), QTYPE), (b + "ffn_up.weight", (f, d), QTYPE),
                    (b + "ffn_down.weight", (d, f), QTYPE)]
    return out


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return int(np.prod(shape[:-1])) * (shape[-1] // block) * size


def _quantized(a: np.ndarray, qtype: str) -> tuple[bytes, np.ndarray]:
    """(the bytes GGUF stores, the float32 values they decode to)."""
    import gguf

    if qtype == "F32":
        a = np.ascontiguousarray(a, np.float32)
        return a.tobytes(), a
    q = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(np.ascontiguousarray(a, np.float32), q)
    return raw.tobytes(), gguf.quants.dequantize(raw, q).reshape(a.shape).astype(np.float32)


class _LayerReference(ReferenceModel):
    """The numpy reference over one layer's weights (named ``layers.0.*``), without loading a whole model."""

    def __init__(self, config: ArchConfig, weights: dict[str, np.ndarray]) -> None:
        self.config = dataclasses.replace(config, num_layers=1)
        self.w = weights
        self.reset()


def _write_header(path: Path, c: ArchConfig) -> int:
    """Write the GGUF header, metadata and tensor infos; returns where the tensor data starts."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_layers)
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.experts_per_token)
    w.add_string("xpuc.ffn_kind", c.ffn_kind)
    tokens, types, eos = byte_vocab(c.vocab_size)
    # llama.cpp refuses a gpt2 vocabulary without merges (and gguf drops an empty list): one merge, two spaces
    tokens[eos + 1], types[eos + 1] = "ĠĠ", 1
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    for name, shape, qt in _gguf_tensors(c):
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qt),
                          raw_dtype=gguf.GGMLQuantizationType[qt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return -(-path.stat().st_size // ALIGN) * ALIGN


ALIGN = 32  # general.alignment: gguf's default


def _offsets(c: ArchConfig) -> tuple[dict[str, int], int]:
    """Each tensor's offset in the data section (gguf pads every tensor to ALIGN) and the section's size."""
    offsets, off = {}, 0
    for name, shape, qt in _gguf_tensors(c):
        offsets[name] = off
        off += -(-_nbytes(shape, qt) // ALIGN) * ALIGN
    return offsets, off


def _check_disk(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need + DISK_MARGIN:
        raise XpucError(f"not enough disk space in {where}: the model needs {need / 2**30:.1f} GiB more and "
                        f"{free / 2**30:.1f} GiB are free (1 GiB is kept free besides)")


def _load_state(path: Path, args: dict, c: ArchConfig, partial: Path) -> dict | None:
    """The checkpoint of an interrupted run with the same arguments, or None (none, another run's, damaged, or
    not matching the partial file beside it: the run then starts over)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            st = {k: z[k] for k in z.files}
        if json.loads(str(st["args"])) != args:
            return None
        state = {"layer": int(st["layer"]), "data_start": int(st["data_start"]), "h_cal": st["h_cal"],
                 "h_held": st["h_held"], "stats": json.loads(str(st["stats"]))}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    rows = (args["calib_tokens"], c.hidden_size)
    if not (0 <= state["layer"] <= c.num_layers and isinstance(state["stats"], dict)
            and state["h_cal"].shape == rows == state["h_held"].shape and state["h_cal"].dtype == np.float32
            and state["h_held"].dtype == np.float32
            and partial.stat().st_size == state["data_start"] + _offsets(c)[1]):
        return None
    return state


def _save_state(path: Path, args: dict, layer: int, data_start: int, h_cal, h_held, stats: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, args=json.dumps(args), layer=layer, data_start=data_start, h_cal=h_cal, h_held=h_held,
                     stats=json.dumps(stats))


def synthesize_gguf(shape: str, sparsity: float, seed: int, out: str | os.PathLike, layers: int | None = None,
                    alpha: float = ALPHA, structure: WeightStructure = TRAINED_LIKE, calib_tokens: int = 256,
                    progress=None, notify=None) -> SynthReport | MoESynthReport:
    """Stream a generated dReLU model of ``shape`` (dense or MoE) into the GGUF file ``out``.

    Parameters
    ----------
    shape, sparsity, seed, layers, alpha, structure:
        As for :func:`synth.synthesize` / :func:`synth.synthesize_moe`; ``layers`` defaults to the full depth.
    calib_tokens:
        Calibration tokens (random ids) the gate biases are set on; as many held-out ones measure the
        sparsity reported.
    progress:
        ``progress(layers_done, layers)`` after each layer.
    notify:
        ``notify(message)`` when an interrupted run is resumed or, having other arguments, started over.
    """
    if not 0.0 < sparsity < 1.0:
        raise XpucError("--sparsity must be between 0 and 1 (exclusive)")
    c = stream_config(shape, layers)
    out = Path(out)
    if out.exists():
        raise XpucError(f"{out} exists: remove it or choose another output")
    if not out.parent.is_dir():
        raise XpucError(f"{out.parent}: no such directory")
    partial, state_path = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.state.npz")
    args = {"version": STATE_VERSION, "shape": shape, "layers": c.num_layers, "sparsity": sparsity, "seed": seed,
            "alpha": alpha, "structure": structure.to_dict(), "calib_tokens": calib_tokens, "qtype": QTYPE}
    offsets, data_bytes = _offsets(c)
    state = _load_state(state_path, args, c, partial) if partial.is_file() else None
    if notify and partial.is_file():
        notify(f"resuming the interrupted run in {partial} at layer {state['layer']} of {c.num_layers}" if state
               else f"{partial} is from a run with other arguments (or damaged): starting over")
    n, pos = calib_tokens, np.arange(calib_tokens)
    if state is None:
        _check_disk(out.parent, data_bytes)
        partial.unlink(missing_ok=True)
        data_start = _write_header(partial, c)
        f = open(partial, "r+b")
        f.truncate(data_start + data_bytes)
        rng = np.random.default_rng([seed, 0])
        ids = rng.integers(0, c.vocab_size, (2, n))
        emb_raw, emb = _quantized(embeddings(c, rng, structure), QTYPE)
        h_cal, h_held = emb[ids[0]], emb[ids[1]]
        del emb
        head_raw, _ = _quantized(rng.standard_normal((c.vocab_size, c.hidden_size), np.float32)
                                 / np.sqrt(c.hidden_size), QTYPE)
        for name, raw in (("token_embd.weight", emb_raw), ("output_norm.weight", np.ones(c.hidden_size, np.float32)
                                                             .tobytes()), ("output.weight", head_raw)):
            f.seek(data_start + offsets[name])
            f.write(raw)
        del emb_raw, head_raw
        start, stats = 0, {}
    else:
        data_start, start, stats = state["data_start"], state["layer"], state["stats"]
        h_cal, h_held = state["h_cal"], state["h_held"]
        _check_disk(out.parent, data_bytes * (c.num_layers - start) // c.num_layers)
        f = open(partial, "r+b")
    try:
        for i in range(start, c.num_layers):
            if i == start:
                f.flush()
                os.fsync(f.fileno())
                _save_state(state_path, args, i, data_start, h_cal, h_held, stats)
            h_cal, h_held = _layer(c, i, seed, sparsity, alpha, structure, h_cal, h_held, pos, stats,
                                   lambda name, raw, at=0: (f.seek(data_start + offsets[name] + at), f.write(raw)))
            f.flush()
            os.fsync(f.fileno())
            _save_state(state_path, args, i + 1, data_start, h_cal, h_held, stats)
            if progress:
                progress(i + 1, c.num_layers)
    finally:
        f.close()
    report = _report(shape, seed, sparsity, c, structure, stats)
    os.replace(partial, out)
    with atomic_path(out.with_name(out.name + ".synth.json")) as tmp:
        tmp.write_text(report.to_json())
    state_path.unlink(missing_ok=True)
    return report


def _layer(c: ArchConfig, i: int, seed: int, sparsity: float, alpha: float, st: WeightStructure,
           h_cal: np.ndarray, h_held: np.ndarray, pos: np.ndarray, stats: dict, write) -> tuple[np.ndarray, ...]:
    """Generate, calibrate, quantize and write layer ``i``; returns the hidden states after it (both streams)."""
    rng = np.random.default_rng([seed, 1 + i])  # per layer: a resumed run draws what an uninterrupted one does
    d, f, b = c.hidden_size, c.intermediate_size, f"blk.{i}."
    w: dict[str, np.ndarray] = {}
    attention_weights(w, "layers.0.", c, rng, st)
    for local, heads in (("q_proj", c.num_heads), ("k_proj", c.num_kv_heads), ("v_proj", 0), ("o_proj", 0)):
        raw, w["layers.0." + local] = _quantized(w["layers.0." + local], QTYPE)
        rows = w["layers.0." + local].shape[0]
        if heads:  # llama.cpp's rope row order; rows quantize independently, so permuting the bytes is exact
            raw = permute_rope(np.frombuffer(raw, np.uint8).reshape(rows, -1), heads).tobytes()
        write(gguf_name(f"layers.{i}.{local}"), raw)
    for local in ("attn_norm", "ffn_norm"):
        write(gguf_name(f"layers.{i}.{local}"), w["layers.0." + local].tobytes())
    ref = _LayerReference(c, w)
    h_cal, x_cal = ref.attention_block(0, h_cal, pos, keep_cache=False)
    h_held, x_held = ref.attention_block(0, h_held, pos, keep_cache=False)
    y_cal, y_held = np.zeros_like(x_cal), np.zeros_like(x_held)
    if c.is_moe:
        router = (rng.standard_normal((c.num_experts, d)) / np.sqrt(d)).astype(np.float32)
        router[:, 0] = 0.0
        balance_router(router, x_cal, c.experts_per_token, float(x_cal[:, 0].mean()))
        write(b + "ffn_gate_inp.weight", router.tobytes())
        routes = [route_tokens(x, router, c.experts_per_token) for x in (x_cal, x_held)]
    fired, loads = 0.0, []
    basis = random_basis(d, rng) if c.is_moe else None
    for e in range(max(c.num_experts, 1)):
        gate = gate_matrix(f, d, rng, st, basis)
        up = (rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32)
        down = (rng.standard_normal((d, f)) * 0.3 / np.sqrt(f * (1 - sparsity))).astype(np.float32)
        down[0] = 0.0
        if c.is_moe:
            (rows_c, slot_c), (rows_h, slot_h) = (np.nonzero(top == e) for top, _ in routes)
            wt_c, wt_h = routes[0][1][rows_c, slot_c][:, None], routes[1][1][rows_h, slot_h][:, None]
        else:
            rows_c = rows_h = np.arange(len(x_cal))
            wt_c = wt_h = np.float32(1.0)
        calibrate_ffn(gate, up, x_cal[rows_c] if len(rows_c) >= 4 else x_cal, sparsity, alpha, rng)
        mats = {}
        for name, m in (("gate", gate), ("up", up), ("down", down)):
            raw, mats[name] = _quantized(m, QTYPE)
            tensor = b + (f"ffn_{name}_exps.weight" if c.is_moe else f"ffn_{name}.weight")
            write(tensor, raw, e * len(raw))
        del gate, up, down
        y_cal[rows_c] += _drelu(x_cal[rows_c], mats)[1] * wt_c
        firing, y = _drelu(x_held[rows_h], mats)
        y_held[rows_h] += y * wt_h
        if c.is_moe:
            fired += float(firing.sum())
            loads.append(float(len(rows_h) / len(x_held)))
        else:
            for k, v in zip(("sparsity", "overlap", "hot"), firing_statistics(firing), strict=True):
                stats.setdefault(k, []).append(v)
    if c.is_moe:
        n, k, units = len(x_held), c.experts_per_token, c.num_experts
        stats.setdefault("expert_sparsity", []).append(1.0 - fired / (n * k * f))
        stats.setdefault("layer_sparsity", []).append(1.0 - fired / (n * units * f))
        stats.setdefault("load", []).append(loads)
    return h_cal + y_cal, h_held + y_held


def _drelu(x: np.ndarray, m: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(which neurons fire, the FFN output) of a dReLU FFN on the rows ``x``."""
    act = np.maximum(x @ m["gate"].T, 0) * np.maximum(x @ m["up"].T, 0)
    return act > 0, act @ m["down"].T


def _report(shape: str, seed: int, sparsity: float, c: ArchConfig, st: WeightStructure,
            stats: dict) -> SynthReport | MoESynthReport:
    if c.is_moe:
        return MoESynthReport(shape, seed, c.num_experts, c.experts_per_token, stats["expert_sparsity"],
                              stats["layer_sparsity"], stats["load"], c.num_parameters(), st.to_dict())
    return SynthReport(shape, seed, sparsity, stats["sparsity"], stats["overlap"], stats["hot"],
                       c.num_parameters(), st.to_dict())
