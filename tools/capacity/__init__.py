"""Capacity planning: a model of what rooms, rates and gateways cost the brokers
(``model``), the measurements it takes its constants from (``measure``), and the
command line (``python -m tools.capacity``)."""
