"""codecstream codec models: causal MDCT-domain neural speech codec, training and ONNX export.

Used offline only (training, export, evaluation). Importing this package does not import
torch; the submodules do. ``server/`` and ``client/`` never import it: they run the exported
ONNX graphs through ``streaming/``.
"""
