"""Top layer: ServerApp, engines, config and presets, results, and the ``fedmerge`` CLI."""
