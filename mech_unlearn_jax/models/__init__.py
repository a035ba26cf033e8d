"""Model definitions (penzai pytrees), loaders and tokenizers."""
