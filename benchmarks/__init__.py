"""Performance measurements of dpg_lightning: run each as ``python -m benchmarks.<name>`` from the
repository root (results and commands: ``benchmarks/README.md``)."""
