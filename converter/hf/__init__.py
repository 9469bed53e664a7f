"""Hugging Face ``save_pretrained`` folders: encoders (feature extraction, classification) and causal LMs."""
