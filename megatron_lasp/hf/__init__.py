"""Hugging Face export/import of the linear LM (``convert``) and its pure-PyTorch HF model code."""
