"""The GGML weight types qanalyze models, by llama.cpp's name, with their code bits: what the engine targets'
table (`qanalyze.quant.targets`) and the command line need, without importing torch or the ``gguf`` package as
their quantizers (`qanalyze.quant.ggml`) do."""

GGML_BITS: dict[str, int] = {
    "Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8,
}
"""Code bits per GGML type, in `qanalyze.quant.ggml.GGML_TYPES`' order."""


def is_ggml_layout(name: object) -> bool:
    """Whether ``name`` names a GGML type (``"Q4_K"``, any case)."""
    return isinstance(name, str) and name.upper() in GGML_BITS
