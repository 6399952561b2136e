"""Tools that ship with ms1 for demos and tests, out of the service's path.

* :mod:`~ms1.tools.sim` — ``ms4-sim``, a contract-faithful MS4 on loopback;
* :mod:`~ms1.tools.bench` — ``ms1-bench``, the end-to-end benchmark;
* :mod:`~ms1.tools.samples` — generated sample e-mails (also the ``files`` source's
  demo input when no file is given).

The service never imports this package except for the ``files`` source's samples.
"""
