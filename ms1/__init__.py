"""ms1: forwards invoice metadata from MS1 (the e-mail ingestor) to MS4 in batches.

The data flow, one module per stage::

    source.py -> processor.py -> batching.py -> queue.py -> sender.py -> transport.py
                       \\________________ deadletters.py ___________/

``pipeline.py`` wires the stages into threads, ``cli.py`` is ``ms1-service``,
``hookspecs.py`` documents every plugin hook and ``pluginmanager.py`` loads them.
Importing the package has no side effects.
"""

__version__ = "0.1.0"
