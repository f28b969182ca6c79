"""Models: pooling, the bi-encoder embedder and the three rerankers.

- :mod:`~distributed_ir.models.embedder`: :class:`Embedder` and its ``EmbedderSettings``.
- :mod:`~distributed_ir.models.rerankers`: ``load_reranker(path)`` and ``RERANKER_CLASSES``
  (:mod:`~distributed_ir.models.cross_encoder`, :mod:`~distributed_ir.models.colbert`,
  :mod:`~distributed_ir.models.llm_reranker`, on :mod:`~distributed_ir.models.reranker_base`).
- :mod:`~distributed_ir.models.settings`: ``RerankerSettings`` and the settings file's name.

Nothing is imported here: the app's config imports :mod:`distributed_ir.models.settings`, which
must not pull in torch or the modules that read the config.
"""
