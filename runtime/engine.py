"""Load an artifact and generate text with it."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xpuc.runtime.artifact import member_path, read_manifest, verify
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.runtime.generation import GenerationResult, generate
from xpuc.runtime.sampler import SamplingParams
from xpuc.runtime.session import DecoderSession, SplitSession
from xpuc.runtime.tokenizer import XpucTokenizer
from xpuc.runtime.weights import load_tensors


def _host_can_run(mtriple: str) -> bool:
    arch = mtriple.split("-")[0]
    return arch == platform.machine() and "android" not in mtriple


def prefill_device(module) -> tuple[object | None, str]:
    """The device that runs a separate prefill module here, or ``None`` and why prefill stays on the CPU."""

    import tvm

    if not _host_can_run(module.mtriple):
        return None, f"{module.name} is built for {module.mtriple}"
    try:
        kind = json.loads(module.target)["kind"]
    except (ValueError, KeyError, TypeError):
        kind = module.target.split()[0]
    dev = {"llvm": tvm.cpu, "opencl": tvm.opencl, "cuda": tvm.cuda, "vulkan": tvm.vulkan}.get(kind)
    if dev is None:
        return None, f"{module.name} targets '{kind}', which this runtime cannot drive"
    if not dev(0).exist:
        return None, f"no {kind} device on this machine for {module.name}"
    return dev(0), ""


class Engine:
    """A compiled model ready to generate: modules loaded, weights resident, tokenizer built.

    Parameters
    ----------
    artifact:
        Directory written by ``xpuc compile``.
    max_context:
        KV-cache capacity in tokens.
    verify_files:
        Check every file's SHA-256 against the manifest (on by default).
    """

    def __init__(self, artifact: str | os.PathLike, max_context: int = 2048, verify_files: bool = True) -> None:
        import tvm

        self.path = Path(artifact)
        self.manifest = read_manifest(self.path)
        if self.manifest.kind != "llm":
            raise XpucError(f"{self.path}: an ONNX graph artifact, not a language model (use `xpuc run --inputs`)")
        self._verify_files = verify_files
        if verify_files:  # the weights files are checked as they are read (_load_params)
            weights = {self.manifest.weights_file, *(m.weights for m in self.manifest.modules if m.weights)}
            verify(self.path, self.manifest, check_versions=True, streamed=tuple(w for w in weights if w))
        self.config = ArchConfig.from_dict(self.manifest.config)
        module = self.manifest.modules[0]
        if not _host_can_run(module.mtriple):
            raise XpucError(f"{self.path}: compiled for {module.mtriple}; this machine is {platform.machine()} "
                            "(copy the artifact to the device, or compile with --device host)")
        # the tokenizer first: its parse's transient heap is given back before the weights arrive (peak RSS)
        tok_file = self.path / "tokenizer.json"
        self.tokenizer = XpucTokenizer.from_artifact_dir(self.path) if tok_file.is_file() else None
        lib = tvm.runtime.load_module(str(member_path(self.path, module.file)))
        params = self._load_params(self.manifest.params, self.manifest.weights_file, tvm.cpu())
        self.weight_bytes = int(sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
                                    for p in self.manifest.params))
        self.session: DecoderSession | SplitSession = DecoderSession(lib, params, max_context=max_context)
        self.prefill_on, self.prefill_note = "cpu", ""
        pre = next((m for m in self.manifest.modules[1:] if m.role == "prefill"), None)
        if pre is not None:
            dev, self.prefill_note = prefill_device(pre)
            if dev is not None:
                pre_lib = tvm.runtime.load_module(str(member_path(self.path, pre.file)))
                pre_params = self._load_params(pre.info["params"], pre.weights, dev)
                self.session = SplitSession(DecoderSession(pre_lib, pre_params, max_context, device=dev),
                                            self.session)
                self.prefill_on = pre.name

    def _load_params(self, entries: list[dict], weights_file: str, dev) -> list:
        """The weights in the manifest's order, read once with their file's digest checked over the bytes read."""
        digest = self.manifest.files.get(weights_file) if self._verify_files else None
        tensors = load_tensors(member_path(self.path, weights_file), digest, dev, fix="recompile the model")
        params = []
        for p in entries:
            t = tensors.pop(p["name"], None)
            if t is None or list(t.shape) != list(p["shape"]) or str(t.dtype) != p["dtype"]:
                raise XpucError(f"{self.path}: weight '{p['name']}' does not match the manifest")
            params.append(t)
        return params

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if self.tokenizer is None:
            raise XpucError(f"{self.path}: artifact has no tokenizer; pass token ids instead of text")
        text = self.tokenizer.apply_chat_template(prompt, system) if chat else prompt
        return self.tokenizer.encode(text)

    def generate_ids(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams | None = None,
                     stop_ids: list[int] | None = None, on_token: Callable[[int], None] | None = None,
                     on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Prefill ``prompt_ids`` and decode up to ``max_tokens`` tokens (:func:`xpuc.runtime.generation.generate`)."""
        if stop_ids is None:
            stop_ids = self.tokenizer.eos_token_ids if self.tokenizer else []
        res = generate(self.session, prompt_ids, max_tokens, sampling, stop_ids, self.tokenizer,
                       self.config.vocab_size, on_text=on_text, on_token=on_token)
        res.prefill_on = self.prefill_on
        return res
