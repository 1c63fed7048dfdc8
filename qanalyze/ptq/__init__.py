"""Weight-only post-training quantization (PTQ) in column groups: round-to-nearest and GPTQ.

`rtn` and `gptq` quantize one weight (GPTQ with its layer Hessian); `calibrate` runs a decoder layer by
layer to accumulate each linear module's Hessian from the partly quantized model; `quantize` applies a
method to every linear module of a model (`quantize_model`). The maths below them is
`qanalyze.quant.columns`.
"""
