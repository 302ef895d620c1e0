"""Exports to other runtimes: a Hugging Face model directory (transformers, rwkv7-hf), a GGUF
file (llama.cpp, Ollama) and a Hugging Face peft adapter directory. run.py is the entry point
merge.py calls; each writer verifies what it wrote before it reports success."""
