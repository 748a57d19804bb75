"""Studies of what the method can reach: the tiny comparison and the research probes. Run each
as ``python -m studies.<name>`` from the repository root (results: ``studies/README.md``)."""
