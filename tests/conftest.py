"""Shared by every test area: pytest puts this folder on sys.path, so ``onnx_testing`` imports."""
