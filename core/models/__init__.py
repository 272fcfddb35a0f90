"""Models as data, without Ray: the registry's index and its checks, artefacts with their
sha256, and the byte-budgeted cache of ONNX Runtime sessions.

- ``errors``: what the registry refuses (``RegistryError``, ``UnknownModel``, ``CorruptArtefact``);
- ``index``: the index's format (stages, tasks, metrics, paths) and ``index_problem``;
- ``artefacts``: ``ArtefactStore`` (bytes under the store's root) and the sha256 checks;
- ``registry``: ``ModelRegistry``, the index's one writer, and the ``RegistryClient``
  protocol every user of the registry calls through;
- ``cache``: ``ModelCache`` and ``OnnxModel``, members loaded under a byte budget.

Not here: the registry actor and the ensemble's Ray process (``actors.registry``,
``actors.model_cache``, ``actors.ensemble``).
"""
