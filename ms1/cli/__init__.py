"""``ms1-service``: :mod:`.command` (the commands, exit statuses), :mod:`.admin`
(``enqueue``, ``status``, ``dlq``), :mod:`.top`, :mod:`.progressbar` (``--once``'s
progress)."""
