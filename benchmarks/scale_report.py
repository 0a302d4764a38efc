"""docs/SCALE.md from docs/scale-runs/*.json (placeholder until the first run finishes)."""


def render(docs):
    pass
