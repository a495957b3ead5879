"""Tools beside the gateway, not part of the installed product: the benchmark
(``tools.bench``, run by ``python -m gateway bench``) and the capacity model
(``python -m tools.capacity``). They run from a source checkout."""
