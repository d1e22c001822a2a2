"""ModelConfig (read from GGUF metadata) and EngineConfig (how the engine runs)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from jisu.loader.gguf import GGUFError, GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")


@dataclass
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_base_local: float = 10000.0     # gemma3 sliding-window layers
    sliding_window: int | None = None    # gemma3
    swa_pattern: int = 0                 # every swa_pattern-th layer is global (gemma3: 6)
    attn_scale: float | None = None
    name: str = ""

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and self.swa_pattern > 0 and (layer + 1) % self.swa_pattern != 0

    def kv_groups(self) -> list[tuple[list[int], int | None]]:
        """Layers grouped for the paged KV cache: (layer indices, sliding window or None).

        Every group has the same number of layers, so one page size serves all: full-attention
        layers and sliding-window layers are cut into groups of gcd(#full, #sliding). A
        window group frees its pages behind the window (Gemma 3: 3 global layers, 15 local
        in 5 groups of 3)."""
        local = [i for i in range(self.n_layers) if self.is_sliding(i)]
        full = [i for i in range(self.n_layers) if not self.is_sliding(i)]
        if not local or not full:
            return [(list(range(self.n_layers)), self.sliding_window if local else None)]
        size = math.gcd(len(local), len(full))
        return ([(full[i:i + size], None) for i in range(0, len(full), size)]
                + [(local[i:i + size], self.sliding_window) for i in range(0, len(local), size)])

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "ModelConfig":
        arch = g.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{g.path}: unknown architecture '{arch}' in general.architecture "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def key(k: str, default=None):
            v = g.get(f"{arch}.{k}", default)
            if v is None:
                raise GGUFError(f"{g.path}: missing metadata field '{arch}.{k}'")
            return v

        d_model = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        n_kv = key("attention.head_count_kv", n_heads)
        if not isinstance(n_kv, int):   # per-layer arrays exist in some files; ours are uniform
            n_kv = int(n_kv[0])
        head_dim = int(g.get(f"{arch}.attention.key_length", d_model // n_heads))
        tokens = g.require("tokenizer.ggml.tokens")
        cfg = cls(
            arch=arch,
            n_layers=int(key("block_count")),
            d_model=d_model,
            d_ff=int(key("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            head_dim=head_dim,
            vocab_size=int(g.get(f"{arch}.vocab_size", len(tokens))),
            context_length=int(key("context_length")),
            rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_base=float(key("rope.freq_base", 10000.0)),
            name=str(g.get("general.name", os.path.basename(g.path))),
        )
        if arch == "gemma3":
            cfg.sliding_window = int(key("attention.sliding_window"))
            cfg.swa_pattern = 6
            cfg.rope_base_local = float(g.get(f"{arch}.rope.freq_base_swa", 10000.0))
            # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(d_model/n_heads)
            scale_dim = d_model // n_heads if cfg.n_layers == 62 else head_dim
            cfg.attn_scale = 1.0 / scale_dim ** 0.5
            if g.get(f"{arch}.final_logit_softcapping"):
                raise GGUFError(f"{g.path}: {arch}.final_logit_softcapping is not supported yet")
        return cfg


KV_DTYPES = {"float32": 4, "float16": 2}     # -> bytes per value


@dataclass
class EngineConfig:
    max_num_seqs: int = 32              # sequences running at once
    max_num_batched_tokens: int = 512   # tokens in one step: decodes plus prompt chunks
    block_size: int = 16                # tokens per KV-cache block
    kv_cache_gb: float | None = 1.0     # KV-cache pool size; None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.25
    max_model_len: int | None = None    # defaults to the model's context length
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "float32"     # or "float16": half the memory and the attention's reads

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"EngineConfig.kv_cache_gb must be > 0, got {self.kv_cache_gb!r}")
        if not 0 < self.kv_cache_fraction <= 0.9:
            raise ValueError(f"EngineConfig.kv_cache_fraction must be in (0, 0.9], got {self.kv_cache_fraction!r}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"EngineConfig.kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")

    def model_len(self, context_length: int) -> int:
        """Longest sequence: max_model_len, capped by the model's context (the KV-cache size
        may cap it further)."""
        return min(self.max_model_len or context_length, context_length)

    def kv_cache_bytes(self) -> int:
        if self.kv_cache_gb is not None:
            return int(self.kv_cache_gb * 2**30)
        return int(self.kv_cache_fraction * available_memory())


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
