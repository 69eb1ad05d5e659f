"""Hardware: target specs (datasheet numbers, host calibration), the roofline cost model and timing helpers."""
