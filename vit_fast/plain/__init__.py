"""The plain-PyTorch backend: every contract function of vit_fast.ops.contract in plain PyTorch with
explicit backward formulas, one module per op family (`vit_fast.plain.<family>`). It runs where
neither fused backend applies (no GPU and no C++ extension, or dtypes the extension lacks), serves as
the measured alternative of `vit_fast.tuning.ops`, and imports nothing above it: not the ops, and
not the test oracle `vit_fast.reference`.
"""
