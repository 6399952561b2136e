"""ms1's built-in plugins, installed as the ``ms1_plugins`` package.

They reach ms1 the way any third-party plugin does: through the ``ms1``
entry-point group declared in ``setup.cfg``.
"""
