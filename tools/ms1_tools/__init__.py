"""ms1's tools, a distribution of their own (``tools/pyproject.toml``, ``ms1-tools``):
installed for tests and demos, never by ``pip install ms1``.

* :mod:`~ms1_tools.sim` — ``ms4-sim``, a contract-faithful MS4 on loopback;
* :mod:`~ms1_tools.sim_limits` — its rate limiters (sliding log, fixed window, GCRA ...);
* :mod:`~ms1_tools.fronts` — nginx and HAProxy in front of it, for tests;
* :mod:`~ms1_tools.bench` — ``ms1-bench``, the end-to-end benchmark.
"""
