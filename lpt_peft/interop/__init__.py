"""Interop: converters from other formats into `transformers` backbones and LPT adapters, and the demo backbone."""
