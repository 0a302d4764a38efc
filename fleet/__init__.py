"""edgeft fleets: federated forward-only fine-tuning on Flower, seeds and scalars on the wire.

``directions`` (the portable generator) and ``protocol`` (uploads, aggregation, replay) need only
numpy; ``client`` runs on the device through edgeft.runtime; ``apps`` and ``simulate`` need Flower
(``pip install -e '.[fleet]'``).
"""
