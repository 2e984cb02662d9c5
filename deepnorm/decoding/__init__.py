"""Decoding: search algorithms over a step function (``search``) and the Transformer's
incremental, KV-cached step function (``incremental``)."""
