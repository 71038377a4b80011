"""Checkpoints: the directory layout, what a save records, which iteration to load, the run's lock,
save / load and the resharding between a model's live layout and the saved one.

Training (``megatron_lasp.training``) and both Hugging Face converters (``megatron_lasp.hf``) use
this package; it imports neither. What differs between its callers is handed in: the error class
a reader raises (``error=``), and the names a refused architecture is reported with
(:class:`~megatron_lasp.checkpoint.record.FieldNames`).

Modules, lightest first (the first three import the standard library only, so that the
command-line converters check their flags and paths before torch is imported):

- ``layout.py``: the directory layout, listing, the tracker, ``config.json``, the integrity check;
- ``resolve.py``: the one reader of "which iteration do I load";
- ``lock.py``: :class:`SaveLock`, held on a training run's ``--save``;
- ``record.py``: :class:`RunRecord`, ``config.json``'s contents, the architecture check;
- ``modules.py``: unwrapping DDP / FSDP wrappers, FSDP2 gathering, optimizer shards, RNG states;
- ``io.py``: :class:`CheckpointSettings`, the checks before a run, save, load, the weights-only
  save and the one-process load for inference and export.
"""
