//! Tiled (flash) attention on the CPU: online-softmax forward and recomputing backward.
