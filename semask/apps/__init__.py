"""The applications of semask (arXiv 2112.12782): the command line, the demo, the benchmark and ONNX export."""
