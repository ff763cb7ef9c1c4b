"""A tiny llama-architecture GGUF with random weights, generated on this machine.

Model weights cannot be downloaded here, and the demo cluster and the tests need a model that
real llama.cpp loads in milliseconds. The tokenizer is the smallest SentencePiece vocabulary
llama.cpp accepts: the three control tokens, all 256 byte tokens and the word-boundary mark.
The text it writes is gibberish; its slots, prompt cache, streaming and timings are real.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

_BYTE_TOKEN_TYPE = 6
_NORMAL_TOKEN_TYPE = 1
_UNKNOWN_TOKEN_TYPE = 2
_CONTROL_TOKEN_TYPE = 3


@dataclass(frozen=True)
class TinyModelShape:
    """Dimensions of a generated model; wider or deeper models make prefill cost more."""

    embedding_length: int = 64
    block_count: int = 2
    head_count: int = 4
    feed_forward_length: int = 128
    context_length: int = 8192
    seed: int = 0

    def digest(self) -> str:
        text = ",".join(f"{key}={value}" for key, value in sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "paddler" / "models"


def tiny_model_file(shape: TinyModelShape | None = None, directory: Path | None = None) -> Path:
    """Where the model with this shape is (or will be) kept; nothing is written."""
    shape = shape or TinyModelShape()
    return (directory or default_cache_dir()) / f"paddler-tiny-{shape.digest()}.gguf"


def ensure_tiny_model(shape: TinyModelShape | None = None, directory: Path | None = None) -> Path:
    """Return the path of the model with this shape, writing it first if it does not exist."""
    shape = shape or TinyModelShape()
    path = tiny_model_file(shape, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written under a temporary name and renamed, so that concurrent callers never load a
        # half-written file.
        partial = path.with_suffix(f".{os.getpid()}.partial")
        write_tiny_model(partial, shape)
        partial.replace(path)
    return path


def write_tiny_model(path: Path, shape: TinyModelShape) -> None:
    # Imported here: the writer alone needs them (the ``model`` extra), and gguf is slow to load.
    import gguf
    import numpy as np

    if shape.embedding_length % shape.head_count:
        raise ValueError("embedding_length must be a multiple of head_count")
    tokens = [b"<unk>", b"<s>", b"</s>"]
    tokens += [f"<0x{byte:02X}>".encode() for byte in range(256)]
    tokens.append("\u2581".encode())
    token_types = [_UNKNOWN_TOKEN_TYPE, _CONTROL_TOKEN_TYPE, _CONTROL_TOKEN_TYPE]
    token_types += [_BYTE_TOKEN_TYPE] * 256 + [_NORMAL_TOKEN_TYPE]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("paddler-tiny")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.embedding_length)
    writer.add_block_count(shape.block_count)
    writer.add_feed_forward_length(shape.feed_forward_length)
    writer.add_head_count(shape.head_count)
    writer.add_head_count_kv(shape.head_count)
    writer.add_rope_dimension_count(shape.embedding_length // shape.head_count)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    rng = np.random.default_rng(shape.seed)
    n_embd, n_ff = shape.embedding_length, shape.feed_forward_length

    def random(rows: int, cols: int) -> np.ndarray:
        # numpy shapes are the reverse of ggml's: (rows, cols) is ggml's [cols, rows]
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", random(len(tokens), n_embd))
    writer.add_tensor("output_norm.weight", ones)
    for block in range(shape.block_count):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", ones)
        writer.add_tensor(f"{prefix}.ffn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", random(n_embd, n_embd))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", random(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", random(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", random(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
