"""``python -m onnx_lowrank`` runs the CLI."""

from onnx_lowrank.cli import main

if __name__ == "__main__":
    main(prog_name="onnx-lowrank")
