"""GGUF files (llama.cpp's format): `from_pretrained(dir, gguf_file=name)` for models, configs and tokenizers.

reader.py finds and opens a file (the `gguf` package parses it), config.py turns its metadata into a loom config,
tensors.py serves its tensors under loom's names as a checkpoint handle (float and dequantized types), load.py is the
format's load hook (the file as the checkpoint, Q4_0 and Q8_0 weights kept quantized on loom's int4 and group-wise
int8 kernels). The tokenizer lives in loom/tokenization/gguf.py.
"""
