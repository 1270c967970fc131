"""Records, JSONL I/O, safe image loading, text corpora."""
