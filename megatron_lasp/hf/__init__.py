"""Hugging Face export/import of the linear LM (``to_hf``, ``from_hf``) and its pure-PyTorch HF model code."""
