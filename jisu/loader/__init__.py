from jisu.loader.gguf import GGUFError, GGUFFile, GGUFTensor, read_gguf

__all__ = ["GGUFError", "GGUFFile", "GGUFTensor", "read_gguf"]
