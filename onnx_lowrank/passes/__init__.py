"""Graph rewrites: each module is one transformation over an ONNX ModelProto."""
