"""llama2.c legacy (version 0) checkpoints: a 7 x int32 header, then float32 tensors in a fixed order.

Layout (karpathy/llama2.c run.c, memory_map_weights): token_embedding [V, D]; per layer, stacked over L:
rms_att [D], wq [D, D], wk [KV, D], wv [KV, D], wo [D, D], rms_ffn [D], w1 [H, D], w2 [D, H], w3 [H, D];
rms_final [D]; two unused RoPE tables [seq_len, head_dim/2]; then wcls [V, D] only when the header's
vocab_size is negative (an untied classifier). Matrices are stored [out, in] like torch Linear weights.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvc.errors import CheckpointError
from kvc.models.config import Family, ModelConfig
from kvc.models.loaders import LoadedCheckpoint, fill_model

__all__ = ["Llama2cHeader", "read_header", "config_from_header", "load_llama2c_checkpoint",
           "interleaved_to_rotate_half"]

HEADER = struct.Struct("<7i")
FLOAT_BYTES = 4
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c export.py --version 1/2 files, a different layout
BOS_ID, EOS_ID = 1, 2  # fixed in llama2.c's tokenizer and run.c


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative: an untied classifier follows the RoPE tables
    seq_len: int

    @property
    def vocab(self) -> int:
        return abs(self.vocab_size)

    @property
    def shared_classifier(self) -> bool:
        return self.vocab_size > 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(llama2.c name, shape) of every stored array, in file order."""
        v, d, h, kv, n = self.vocab, self.dim, self.hidden_dim, self.kv_dim, self.n_layers
        shapes = [("token_embedding", (v, d)), ("rms_att", (n, d)), ("wq", (n, d, d)), ("wk", (n, kv, d)),
                  ("wv", (n, kv, d)), ("wo", (n, d, d)), ("rms_ffn", (n, d)), ("w1", (n, h, d)),
                  ("w2", (n, d, h)), ("w3", (n, h, d)), ("rms_final", (d,)),
                  ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
                  ("freq_cis_imag", (self.seq_len, self.head_dim // 2))]
        return shapes if self.shared_classifier else [*shapes, ("wcls", (v, d))]

    def file_size(self) -> int:
        return HEADER.size + FLOAT_BYTES * sum(int(np.prod(s)) for _, s in self.tensor_shapes())


def read_header(path: Path) -> Llama2cHeader:
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); pass an existing llama2.c .bin checkpoint") from None
    if len(raw) < HEADER.size:
        raise CheckpointError(f"{path} is {len(raw)} bytes, shorter than a llama2.c header; the file is truncated "
                              "or not a llama2.c checkpoint")
    values = HEADER.unpack(raw)
    if values[0] == VERSIONED_MAGIC:
        raise CheckpointError(f"{path} is a llama2.c version-1/2 export; kvc reads the legacy format: re-export it "
                              "with llama2.c's export.py --version 0")
    header = Llama2cHeader(*values)
    if min(header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads, header.seq_len,
           header.vocab) <= 0 or header.dim % header.n_heads:
        raise CheckpointError(f"{path} has an impossible llama2.c header {values}; it is not a llama2.c checkpoint")
    return header


def config_from_header(header: Llama2cHeader, name: str = "") -> ModelConfig:
    """llama2.c models: RMSNorm eps 1e-5, RoPE theta 10000, SwiGLU, no biases, BOS 1 / EOS 2."""
    return ModelConfig(family=Family.LLAMA, vocab_size=header.vocab, hidden_size=header.dim,
                       num_layers=header.n_layers, num_heads=header.n_heads, num_kv_heads=header.n_kv_heads,
                       intermediate_size=header.hidden_dim, max_position_embeddings=header.seq_len, norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=header.shared_classifier, bos_token_id=BOS_ID,
                       eos_token_ids=(EOS_ID,), name=name)


def load_llama2c_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """The own fp32 Llama for a llama2.c legacy .bin, with wq/wk rows moved to the rotate-half RoPE layout."""
    path = Path(path)
    header = read_header(path)
    size, expected = path.stat().st_size, header.file_size()
    if size != expected:
        raise CheckpointError(f"{path} is {size} bytes but its header (dim {header.dim}, layers {header.n_layers}, "
                              f"vocab {header.vocab}, ...) needs {expected}; the file is truncated or not a "
                              "llama2.c legacy checkpoint")
    config = config_from_header(header, name=path.stem)
    arrays = _read_arrays(path, header)
    tensors = _own_tensors(arrays, header)
    model = fill_model(config, tensors.get, tensors.keys(), str(path))
    return LoadedCheckpoint(config=config, model=model, path=path)


def _read_arrays(path: Path, header: Llama2cHeader) -> dict[str, torch.Tensor]:
    flat = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    arrays, offset = {}, 0
    for name, shape in header.tensor_shapes():
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(flat[offset:offset + count].reshape(shape))
        offset += count
    return arrays


def _own_tensors(a: dict[str, torch.Tensor], header: Llama2cHeader) -> dict[str, torch.Tensor]:
    hd = header.head_dim
    tensors = {"model.embed_tokens.weight": a["token_embedding"], "model.norm.weight": a["rms_final"]}
    if not header.shared_classifier:
        tensors["lm_head.weight"] = a["wcls"]
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": a["rms_att"][i],
            p + "self_attn.q_proj.weight": interleaved_to_rotate_half(a["wq"][i], header.n_heads, hd),
            p + "self_attn.k_proj.weight": interleaved_to_rotate_half(a["wk"][i], header.n_kv_heads, hd),
            p + "self_attn.v_proj.weight": a["wv"][i],
            p + "self_attn.o_proj.weight": a["wo"][i],
            p + "post_attention_layernorm.weight": a["rms_ffn"][i],
            p + "mlp.gate_proj.weight": a["w1"][i],
            p + "mlp.down_proj.weight": a["w2"][i],
            p + "mlp.up_proj.weight": a["w3"][i],
        })
    return tensors


def interleaved_to_rotate_half(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder a q/k projection's output rows from adjacent-pair RoPE to Hugging Face's rotate-half RoPE.

    llama2.c rotates pairs (2j, 2j+1) of each head by frequency j; rotate-half rotates (j, j + head_dim/2).
    Moving row 2j to j and row 2j+1 to j + head_dim/2 makes the two agree; q and k get the same permutation,
    so their dot products, and the attention, are unchanged.
    """
    order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    rows = weight.reshape(heads, head_dim, -1)
    return rows[:, order].reshape(heads * head_dim, -1)
