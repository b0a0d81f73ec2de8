"""Library code shared by the scripts: data, training, checkpoints, regularizers, devices."""
