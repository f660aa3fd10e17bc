"""Generate safetensors models with realistic tensor shapes, and check loads against them.

The bytes are random (not trained weights) but the layout is a real decoder-only model's:
embedding, per-layer attention and MLP matrices, norms, an LM head, split into shards with
an index file, as Hugging Face checkpoints are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ModelSpec", "write_model", "tensor_digests", "load_all"]


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def for_size(cls, total_bytes: int) -> ModelSpec:
        """A float16 model of roughly ``total_bytes``: widen until the layer count is sane."""
        hidden = 256
        while True:
            intermediate = hidden * 4 * 2 // 3 // 64 * 64 or 64
            per_layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
            vocab = 32000
            fixed = 2 * (2 * vocab * hidden + hidden)
            layers = max(1, (total_bytes - fixed) // per_layer)
            if layers <= 32 or hidden >= 8192:
                return cls(hidden, intermediate, int(layers), vocab)
            hidden *= 2

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out


def write_model(directory: Path, total_bytes: int, shards: int = 4, seed: int = 0) -> dict[str, str]:
    """Write ``model-0000k-of-0000n.safetensors`` shards, the index and config.json.

    Returns the sha256 of every tensor's bytes, for checking a load. One shard is in memory
    at a time.
    """
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.for_size(total_bytes)
    tensors = spec.tensors()
    per_shard = -(-len(tensors) // shards)
    rng = np.random.default_rng(seed)
    digests: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for s in range(shards):
        chunk = tensors[s * per_shard : (s + 1) * per_shard]
        if not chunk:
            break
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        arrays: dict[str, np.ndarray] = {}
        for tensor_name, shape in chunk:
            count = int(np.prod(shape))
            arrays[tensor_name] = np.frombuffer(rng.bytes(count * 2), dtype=np.float16).reshape(shape)
            digests[tensor_name] = hashlib.sha256(arrays[tensor_name].tobytes()).hexdigest()
            weight_map[tensor_name] = name
        save_file(arrays, str(directory / name), metadata={"format": "pt"})
        del arrays
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": spec.hidden,
                "intermediate_size": spec.intermediate,
                "num_hidden_layers": spec.layers,
                "vocab_size": spec.vocab,
                "torch_dtype": "float16",
            },
            indent=1,
        )
    )
    return digests


def tensor_digests(directory: Path) -> dict[str, str]:
    """sha256 of every tensor in the safetensors files under ``directory`` (as loaded)."""
    return {name: hashlib.sha256(array.tobytes()).hexdigest() for name, array in load_all(directory)}


def load_all(directory: Path):  # type: ignore[no-untyped-def]
    """Yield (name, array) for every tensor, loaded with safe_open (mmap), shard by shard."""
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
