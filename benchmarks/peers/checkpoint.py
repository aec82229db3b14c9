"""Write a kvc preset's seeded weights as a Hugging Face Llama checkpoint that every peer reads.

    python benchmarks/peers/checkpoint.py OUT_DIR [--preset llama-100m] [--seed 0] [--max-positions 65536]

Run with kvc's interpreter. OUT_DIR gets config.json, model.safetensors (kvc's parameter names are
Hugging Face's, a tied LM head stored once) and a tokenizer: the presets have random weights and no
vocabulary, but llama.cpp's GGUF converter and ORT-GenAI's builder both want one. The benchmarks
feed token ids, so its pieces only need to number exactly vocab_size. The script reads the
directory back with kvc's own HF loader and fails unless every tensor is bit-identical.
"""
from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

WORD_START = "\u2581"  # SentencePiece's space marker
SPECIALS = ("<unk>", "<s>", "</s>")


def hf_config_dict(config) -> dict:
    """config.json of a LlamaForCausalLM with the preset's shape."""
    if config.family.value != "llama" or config.rope_scaling is not None:
        raise SystemExit(f"only plain Llama presets can be written for the peers, not {config.name}")
    eos = list(config.eos_token_ids)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.resolved_head_dim,
            "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
            "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias,
            "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos, "torch_dtype": "float32"}


BYTE_FALLBACK_MIN_VOCAB = 1024  # smaller (test) vocabularies have no room for the 256 byte pieces


def vocabulary(size: int) -> list[str]:
    """SPECIALS, the 256 byte-fallback pieces (large vocabularies), single characters, then letter
    strings of growing length (each the concatenation of two earlier pieces, so BPE can reach it)."""
    pieces = list(SPECIALS)
    if size >= BYTE_FALLBACK_MIN_VOCAB:
        pieces += [f"<0x{b:02X}>" for b in range(256)]
    singles = [WORD_START, *string.ascii_letters, *string.digits, *".,;:!?'\"()-"]
    pieces += singles
    seen = set(pieces)
    frontier = [WORD_START + c for c in string.ascii_lowercase] + list(string.ascii_lowercase)
    while len(pieces) < size:
        grown = []
        for piece in frontier:
            if piece not in seen:
                pieces.append(piece)
                seen.add(piece)
                if len(pieces) == size:
                    return pieces
            grown += [piece + c for c in string.ascii_lowercase]
        frontier = grown
    return pieces[:size]


def write_sentencepiece(pieces: list[str], path: Path) -> None:
    """A BPE SentencePiece model over ``pieces`` (scores fall with the index: earlier merges first)."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    model = spm.ModelProto()
    for i, piece in enumerate(pieces):
        entry = model.pieces.add()
        entry.piece = piece
        if piece in SPECIALS:
            entry.type = spm.ModelProto.SentencePiece.UNKNOWN if piece == "<unk>" else spm.ModelProto.SentencePiece.CONTROL
        elif piece.startswith("<0x"):
            entry.type = spm.ModelProto.SentencePiece.BYTE
        else:
            entry.type, entry.score = spm.ModelProto.SentencePiece.NORMAL, -float(i)
    trainer = model.trainer_spec
    trainer.model_type, trainer.vocab_size = spm.TrainerSpec.BPE, len(pieces)
    trainer.byte_fallback = len(pieces) >= BYTE_FALLBACK_MIN_VOCAB
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name, model.normalizer_spec.add_dummy_prefix = "identity", True
    path.write_bytes(model.SerializeToString())


def write_tokenizer(out: Path, vocab_size: int, max_len: int) -> None:
    """tokenizer.model plus the Hugging Face files that load it (transformers converts it to a fast one)."""
    write_sentencepiece(vocabulary(vocab_size), out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": max_len}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def write_checkpoint(out: Path, preset: str, seed: int, max_positions: int | None = None) -> None:
    """``max_positions`` rewrites only config.json's max_position_embeddings: plain RoPE does not depend on
    it, so the same weights can be benched at capacities past the preset's table (e.g. 32768)."""
    import torch
    from safetensors.torch import save_file

    from kvc.models.loaders.hf import load_hf_checkpoint
    from kvc.models.loaders.source import load_source

    loaded = load_source(preset, seed=seed)
    model, config = loaded.model.eval(), loaded.config
    if max_positions is not None:
        config = config.replace(max_position_embeddings=max_positions)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor on disk, as transformers writes tied weights
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}, indent=2))
    write_tokenizer(out, config.vocab_size, config.max_position_embeddings)
    back = load_hf_checkpoint(out).model.state_dict()
    mismatched = [k for k, v in model.state_dict().items() if not torch.equal(v, back[k])]
    if mismatched:
        raise SystemExit(f"{out}: tensors differ after the round trip: {mismatched[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="llama-100m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-positions", type=int, default=None,
                        help="config.json's max_position_embeddings (default: the preset's)")
    args = parser.parse_args()
    write_checkpoint(args.out, args.preset, args.seed, args.max_positions)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
