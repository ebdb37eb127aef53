"""The scoring core: geometry and the volume pipeline, model packages and their schema,
networks, one module per detector family (:mod:`.detectors`), smoothing, anomaly levels,
brain extraction and the results folder. It never imports tooling or the command line."""
