"""Torch-free text side of Tandem: tokenizer, chat template, media placeholder expansion
and 3-D positions, incremental detokenizer, reasoning parser and stop strings."""
