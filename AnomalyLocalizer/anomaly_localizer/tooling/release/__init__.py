"""Making a trained model shippable: calibration, tuning, scan-relative maps, fusion, folds, model cards."""
