"""Running the pipeline: :mod:`.pluginmanager` loads the plugins, :mod:`.components`
builds the parts through them, :mod:`.service` runs them as threads (start, reload,
shutdown, the summary); :mod:`.ingest` is the ingestor's client (e-mails into the inbound
stream, safe across a failover)."""
