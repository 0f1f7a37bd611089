"""The shared core of every encoder family: registry, spec and family interface, weights,
device and precision, pooling, batching, errors, input files and the D probe."""
