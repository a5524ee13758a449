"""Independent float64 reference implementations, written from the models' published
descriptions. They read weights with gguf-py (GGUFReader + gguf.quants.dequantize), never
with dsd's loader or kernels, so they can catch mistakes in either."""
