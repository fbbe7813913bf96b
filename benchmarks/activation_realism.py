"""How real are the generated models? Activation statistics of real models next to generated ones.

Measures :mod:`xpuc.compiler.activation_stats` on the same license text (``--tokens`` tokens, the first 75 %
train the rank-``--rank`` predictor, the rest is held out) for

* SmolLM2-135M (the bundled model; SwiGLU, made sparse by a per-layer threshold on ``|silu(gate)|`` at
  ``--sparsity``, CATS/TEAL-style),
* optionally Qwen2.5-Coder-0.5B (``--qwen GGUF``, see the README's model list),
* generated dReLU models of the ``small`` shape: with the trained-like weight structure (the default of
  ``xpuc synth``) and with the earlier i.i.d. Gaussian weights,
* the TurboSparse-Mistral-7B layer shape with the trained-like structure (``--layers-7b`` layers; 0 skips it).

Prints a markdown table and writes ``benchmarks/results/activation_realism.json``.

    python benchmarks/activation_realism.py
    python benchmarks/activation_realism.py --qwen ~/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from xpuc.compiler.activation_stats import ActivationStats, compare_table, measure_activations
from xpuc.compiler.frontends import load_model
from xpuc.compiler.profiler import read_text_files
from xpuc.compiler.synth import synthesize
from xpuc.compiler.synth_weights import IID
from xpuc.compiler.zoo import resolve_model
from xpuc.runtime.tokenizer import XpucTokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [Path("/usr/share/common-licenses/Apache-2.0"), Path("/usr/share/common-licenses/GPL-3")]


def measure(path: str | Path, name: str, text: str, args: argparse.Namespace) -> ActivationStats:
    t = time.time()
    spec = load_model(str(path))
    ids = XpucTokenizer.from_source(spec.tokenizer).encode(text)[: args.tokens]
    st = measure_activations(spec, ids, args.sparsity if spec.config.ffn_kind == "swiglu" else None,
                             rank=args.rank, name=name)
    print(f"{name}: {len(ids)} tokens, {spec.config.ffn_units} FFN units, {time.time() - t:.0f} s", flush=True)
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of the SwiGLU models")
    ap.add_argument("--rank", type=int, default=64, help="predictor rank")
    ap.add_argument("--qwen", default=None, help="Qwen2.5-Coder-0.5B GGUF to measure as well")
    ap.add_argument("--layers-7b", type=int, default=2, help="layers of the generated 7B shape (0: skip)")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "activation_realism.json"))
    args = ap.parse_args()
    text = read_text_files(TEXTS)
    stats = [measure(resolve_model("smollm2-135m"), "SmolLM2-135M", text, args)]
    if args.qwen:
        stats.append(measure(args.qwen, "Qwen2.5-Coder-0.5B", text, args))
    with tempfile.TemporaryDirectory() as tmp:
        synthesize("small", 0.9, 0, Path(tmp) / "small")
        stats.append(measure(Path(tmp) / "small", "synth small", text, args))
        synthesize("small", 0.9, 0, Path(tmp) / "small-iid", alpha=1.0, structure=IID)
        stats.append(measure(Path(tmp) / "small-iid", "synth small, i.i.d.", text, args))
        if args.layers_7b:
            synthesize("turbosparse-mistral-7b", 0.9, 0, Path(tmp) / "7b", layers=args.layers_7b)
            stats.append(measure(Path(tmp) / "7b", f"synth 7B shape ({args.layers_7b} layers)", text, args))
    table = compare_table(stats)
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "sparsity": args.sparsity, "rank": args.rank,
                               "texts": [str(t) for t in TEXTS], "models": [s.to_dict() for s in stats],
                               "table": table}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
