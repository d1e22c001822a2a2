"""jisu (极速): a fast, readable LLM inference engine."""

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `jisu pull` and `jisu --help` should not pay for importing torch
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        import gc
        # importing torch (through jisu.llm) runs ~400 collections over its own young objects:
        # ~0.2 s of a ~1.1 s import, so the collector pauses for it (and is left as it was)
        enabled = gc.isenabled()
        gc.disable()
        try:
            from jisu import llm
        finally:
            if enabled:
                gc.enable()
        return getattr(llm, name)
    if name == "SamplingParams":
        from jisu.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'jisu' has no attribute {name!r}")
