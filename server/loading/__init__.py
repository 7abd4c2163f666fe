"""Model loading: sources (folder, Hub id, GGUF, the built-in default), checkpoint reading,
quantizing while the weights stream in, export of prequantized checkpoints, inspection."""
