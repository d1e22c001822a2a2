"""jisu (极速): a fast, readable LLM inference engine."""

from jisu.llm import LLM, CompletionOutput, RequestOutput
from jisu.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
