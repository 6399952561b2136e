"""The pipeline, stage by stage in the order an e-mail flows (contract, real
implementation and in-memory twin of each concept side by side):

1. :mod:`.source` — where e-mails come from (:mod:`ms1.runtime.ingest`: the ingestor's
   client);
2. :mod:`.intake` — the reader and committer threads: :mod:`.processor` turns an e-mail
   into MS4 objects, :mod:`.batching` closes batches; **an e-mail is acked here**, once
   its batch or dead letter is stored;
3. :mod:`.outbound` — the durable queue of batches;
4. :mod:`.sending` — the senders, the pacer, the answer table; **a batch is acked here**
   (:mod:`.sending.sender`, after MS4's 202);
5. :mod:`.transport` — the request to MS4; :mod:`.deadletters` — what will never reach it.
"""
