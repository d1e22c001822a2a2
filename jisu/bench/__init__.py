"""Speed benchmarks of jisu next to llama.cpp and transformers (speed.py, `jisu bench`)."""

DECODE_CONTEXT = 8     # tokens before the decoded ones, by default: a short chat turn (here, not in
                       # speed.py, so that the CLI's option reads it without importing numpy)
