"""ms1: forwards invoice metadata from MS1 (the e-mail ingestor) to MS4 in batches.

The data flow, one place per stage::

    source.py -> intake.py (processor.py, batching.py) -> outbound.py -> sending/ -> transport.py
                     \\______________________ deadletters.py ____________________/

* an inbound e-mail is acked in :mod:`ms1.intake` (after its batch or dead letter is
  stored); a batch is acked in :mod:`ms1.sending.sender` (after MS4's 202);
* :mod:`ms1.components` builds the parts through the plugins, :mod:`ms1.service` runs
  them as threads (shutdown, reload), :mod:`ms1.cli` is ``ms1-service``;
* :mod:`ms1.hookspecs` documents every plugin hook, :mod:`ms1.pluginmanager` loads them;
  the built-in plugins are the ``ms1_plugins`` package (``plugins/``: memory, files,
  policies, http, redis);
* :mod:`ms1.metrics`, :mod:`ms1.notify`, :mod:`ms1.logs` are the operations layer,
  :mod:`ms1.admin` the admin commands;
* :mod:`ms1.inbound` is the ingestor's side: e-mails into the inbound stream, once per
  key, safe on ``[redis] min_replicas_acked`` replicas before it returns;
* :mod:`ms1.tools` holds what ships for demos and tests (``ms4-sim``, ``ms1-bench``,
  sample e-mails), out of the service's path.

Importing the package has no side effects.
"""

__version__ = "1.0.0"
