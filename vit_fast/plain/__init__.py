"""The plain-PyTorch backend: every contract function of vit_fast.ops.contract in plain PyTorch
with explicit backward formulas, one module per op family (the "reference" backend name)."""
