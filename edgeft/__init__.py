"""edgeft: export a transformer once, fine-tune it on the device with forward passes only.

The public API, in the order a user meets it::

    import edgeft

    edgeft.export_bundle("my-model/", "bundle/", edgeft.ExportOptions(task="classification", labels=["neg", "pos"]))  # workstation
    bundle = edgeft.Bundle("bundle/", edgeft.load_profile("raspberry-pi-5-4gb"))                                   # device
    train = edgeft.load_dataset("train.jsonl", bundle.labels)
    encoded = bundle.encode(train.texts, train.labels)
    theta, _ = edgeft.starting_adapter(bundle, encoded)
    trainer = edgeft.Trainer(bundle, encoded, edgeft.make_optimizer("mezo", theta, lr=1e-3), edgeft.TrainConfig(steps=200))
    trainer.fit()
    edgeft.save_adapter("adapter/", bundle.layout, trainer.best, "my-model", None)

Names resolve lazily, so ``import edgeft`` costs nothing and the device side
(``edgeft.runtime``) never pulls in torch; only ``export_bundle`` needs it.
"""

from importlib import import_module

__version__ = "0.1.0"

_WHERE = {
    "export_bundle": "edgeft.export",
    "ExportOptions": "edgeft.export",
    "Bundle": "edgeft.runtime",
    "load_profile": "edgeft.runtime",
    "Trainer": "edgeft.runtime",
    "TrainConfig": "edgeft.runtime",
    "make_optimizer": "edgeft.runtime",
    "starting_adapter": "edgeft.runtime",
    "evaluate": "edgeft.runtime",
    "predict": "edgeft.runtime",
    "load_dataset": "edgeft.data",
    "k_shot": "edgeft.data",
    "save_adapter": "edgeft.adapters",
    "load_adapter": "edgeft.adapters",
    "TrainRequest": "edgeft.training",
    "run_training": "edgeft.training",
    "EdgeftError": "edgeft.errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'edgeft' has no attribute {name!r}")
