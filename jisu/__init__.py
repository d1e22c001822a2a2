"""jisu (极速): a fast, readable LLM inference engine."""

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `jisu pull` and `jisu --help` should not pay for importing torch
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from jisu import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from jisu.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'jisu' has no attribute {name!r}")
