"""Tokenizers, chat formats, sampling and the generation loop, and the backends that run builds."""
