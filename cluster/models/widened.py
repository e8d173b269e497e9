"""The demo target, widened: the same tokens for several times the compute (benchmarks only).

On this project's CPUs the demo target costs only a few times its one-layer draft, so
speculative decoding cannot pay; on GPUs a target step is far costlier than a draft step.  To
study that regime with the demo pair, ``build_widened_target`` appends ``extra_layers`` decoder
layers to the demo target whose two output projections (attention ``o_proj``, MLP
``down_proj``) are zero.  Each such layer computes its attention and MLP in full (its KV cache
too) and adds exactly zero to the residual stream, so the model emits the demo target's tokens
bit for bit (float32: ``h + 0 == h``) while a step costs about ``(4 + extra) / 4`` times as much.
The demo draft stays a valid draft for it (same tokenizer, same distribution).

Cached next to the demo models under ``widened-<hash>`` (the demo's own directory and hash are
untouched).  Pure torch + safetensors; no transformers, no vLLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cluster.models.cache import cached_build, default_models_dir, hash_payload, progress_logger

__all__ = ["WIDENED_VERSION", "build_widened_target"]

WIDENED_VERSION = "1"
# Files of the demo target copied unchanged (tokenizer, generation config).
_COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "chat_template.jinja")
_ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def _widen(base: Path, out: Path, extra_layers: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((base / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    weights = load_file(str(base / "model.safetensors"))
    for i in range(extra_layers):
        source = i % layers  # real weights: the layer's compute looks like a real layer's
        prefix, src = f"model.layers.{layers + i}.", f"model.layers.{source}."
        for name, tensor in list(weights.items()):
            if name.startswith(src):
                suffix = name[len(src):]
                new = tensor.clone()
                if suffix in _ZEROED:
                    new = torch.zeros_like(tensor)
                weights[prefix + suffix] = new.contiguous()
    config["num_hidden_layers"] = layers + extra_layers
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in _COPIED:
        if (base / name).exists():
            shutil.copy2(base / name, out / name)


def build_widened_target(demo_dir: str | Path | None = None, extra_layers: int = 28, *,
                         out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The widened target's directory (built once per machine, in seconds).

    demo_dir: the demo models' directory (``build_demo_models()``, holding ``target/``).
    extra_layers: zero-output layers appended (28: a 32-layer model, ~8x the demo target).
    """
    if extra_layers < 1:
        raise ValueError(f"extra_layers must be >= 1, got {extra_layers}")
    if demo_dir is None:
        from cluster.models.demo import build_demo_models

        demo_dir = build_demo_models(progress=progress)
    base = Path(demo_dir) / "target"
    root = Path(out_dir).expanduser() if out_dir is not None else default_models_dir()
    name = "widened-" + hash_payload({"kind": "widened-target", "version": WIDENED_VERSION,
                                      "base": Path(demo_dir).name, "extra_layers": extra_layers})
    progress_logger(progress)(f"widened target: {root / name}")
    return cached_build(root, name, lambda tmp: _widen(base, tmp, extra_layers))
