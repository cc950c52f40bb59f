"""dcc: a model-conversion compiler for quantized neural networks."""
__version__ = "0.1.0"
