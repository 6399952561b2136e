"""Operating ms1: :mod:`.metrics` (``/metrics``, ``/healthz``, ``/readyz``), :mod:`.fleet`
(every instance's snapshot), :mod:`.overview` (what the console and ``top`` show),
:mod:`.logs`, :mod:`.notify` (systemd), :mod:`.deploy` (the operator's files)."""
