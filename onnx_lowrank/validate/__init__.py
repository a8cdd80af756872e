"""Prove a compressed model: accuracy against the original, latency on ONNX Runtime, CI gate.

- :mod:`.runtime`: sessions on a named execution provider that never fall back silently;
- :mod:`.data`: ``.npz`` inputs matched to model inputs, or seeded random inputs;
- :mod:`.accuracy`: output errors, top-1 agreement, label accuracy, thresholds
  (:func:`.accuracy.compare_models`);
- :mod:`.latency`: I/O-bound timings, interleaved pairs, one layer alone dense vs factorized
  by the factorize pass's own lowering (:func:`.latency.measure`, :func:`.latency.measure_pair`,
  :func:`.latency.layer_model`, :func:`.latency.time_layer`: what the search's latency guard
  times);
- :mod:`.reference`: plain, unoptimized CPU runs for the torch side;
- :mod:`.gate`: baselines, tolerances and the Mann-Whitney U test behind ``check``.

This is the only package (with ``calibrate``) that imports onnxruntime.
"""
